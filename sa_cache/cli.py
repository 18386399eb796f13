"""The ``sa-cache`` command line: thin click commands over plain functions."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from .backends.base import BackendError
from .cli_common import (
    Seconds,
    create_engine,
    database_errors,
    load_target,
    namespace_option,
    url_option,
)
from .cli_warm import warm
from .cli_worker import worker

if TYPE_CHECKING:
    from .cache import Cache

POSITIVE = click.IntRange(min=1)
SECONDS = Seconds()


@click.group()
@click.version_option(package_name="sa-cache")
def main() -> None:
    """sa_cache: a caching layer for SQLAlchemy ORM applications."""


@main.command()
@url_option
@click.option(
    "--requests", type=POSITIVE, default=2000, show_default=True, help="Requests per run."
)
@click.option(
    "--customers", type=POSITIVE, default=500, show_default=True, help="Rows in the demo shop."
)
def demo(url: str, requests: int, customers: int) -> None:
    """Run a read-heavy request mix on SQLite, uncached then cached, and compare."""
    from .demo import run_demo

    _cache(url, "demo").close()  # a bad URL is a usage error, named before any work
    console = Console()
    with Progress(console=console, transient=True) as bar:
        tasks = {
            name: bar.add_task(f"{name:>8} requests", total=requests)
            for name in ("uncached", "cached")
        }
        plain, cached, cache = run_demo(
            url, requests, customers, progress=lambda name, n: bar.advance(tasks[name], n)
        )
    stats = cache.stats.snapshot()
    hits, misses = stats.get("query.hit", 0), stats.get("query.miss", 0)
    table = Table(title=f"sa-cache demo on {url} ({requests} requests, SQLite)")
    table.add_column("")
    table.add_column("uncached", justify="right")
    table.add_column("cached", justify="right")
    table.add_row("queries", str(plain.queries), str(cached.queries))
    # (per cache lookup: a query with selectinload looks up its secondary SELECT too)
    table.add_row("cache hits (lookups)", "-", str(hits))
    table.add_row("cache misses (lookups)", "-", str(misses))
    rate = hits / (hits + misses) if hits + misses else 0.0
    table.add_row("hit rate", "-", f"{rate:.1%}")
    table.add_row("database statements", str(plain.statements), str(cached.statements))
    table.add_row("statements saved", "-", str(plain.statements - cached.statements))
    per_plain = plain.seconds / plain.requests * 1e6
    per_cached = cached.seconds / cached.requests * 1e6
    table.add_row("time per request", f"{per_plain:,.0f} µs", f"{per_cached:,.0f} µs")
    table.add_row("speed-up", "1.00x", f"{per_plain / per_cached:.2f}x")
    console.print(table)
    if stats.get("store.error"):
        console.print(
            f"[yellow]the store failed {stats['store.error']} times; "
            "those requests used the database[/yellow]"
        )
    cache.close()


def _cache(url: str, namespace: str) -> Cache:
    """The cache on ``--url`` (``--namespace`` is checked by its option)."""
    from .cache import Cache

    try:
        return Cache.from_url(url, namespace=namespace)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from exc


def _store_version(live: Iterable[str], default: str) -> str:
    """The namespace's version as the store says (its live versions), else the default."""
    versions = sorted(live)
    if versions:
        return ", ".join(versions)
    return f"{default} (the CLI default: no live version in the store)"


def _cell(name: str, value: Any, now: float) -> str:
    if name == "live" and isinstance(value, Mapping):
        return ", ".join(f"{v} (heartbeat {now - t:,.0f} s ago)" for v, t in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value)


def _metadata(target: str) -> Any:
    import sqlalchemy as sa

    md = load_target(target, param_hint="--metadata")
    if not isinstance(md, sa.MetaData):
        md = getattr(md, "metadata", md)
    if not isinstance(md, sa.MetaData):
        raise click.BadParameter(
            f"{target} is not a MetaData (or a declarative base)", param_hint="--metadata"
        )
    return md


@main.command()
@url_option
@namespace_option
@click.option("--database-url", help="Database to read the alembic revision(s) from.")
@click.option("--metadata", help="module:attribute of the app's MetaData (for the schema hash).")
@click.option("--version-table-schema", help="Schema of alembic_version.")
@click.option(
    "--grace", type=SECONDS, default=600.0, show_default=True, help="Seconds a version stays live."
)
def version(
    url: str,
    namespace: str,
    database_url: str | None,
    metadata: str | None,
    version_table_schema: str | None,
    grace: float,
) -> None:
    """Show the key versions: this one, the published revision, live and retired ones."""
    from .versioning import version_report

    md = _metadata(metadata) if metadata else None
    engine = create_engine(database_url) if database_url else None
    cache = _cache(url, namespace)
    try:
        if engine is None:
            report = version_report(cache, None, md, grace, version_table_schema)
        else:
            with database_errors(engine):
                report = version_report(cache, engine, md, grace, version_table_schema)
    except BackendError as exc:
        raise click.ClickException(f"the cache store did not answer: {exc}") from exc
    finally:
        cache.close()
        if engine is not None:
            engine.dispose()
    live = report["live"]
    report["version"] = _store_version(live if isinstance(live, Mapping) else (), cache.version)
    table = Table(title="sa-cache version")
    table.add_column("")
    table.add_column("value")
    now = time.time()
    for name, value in report.items():
        table.add_row(name, _cell(name, value, now))
    Console().print(table)


@main.command()
@url_option
@namespace_option
@click.option("--dry-run", is_flag=True, help="Count the keys, delete nothing.")
@click.option(
    "--batch", type=POSITIVE, default=500, show_default=True, help="Keys per SCAN / UNLINK."
)
@click.option(
    "--grace", type=SECONDS, default=600.0, show_default=True, help="Seconds a version stays live."
)
def gc(url: str, namespace: str, dry_run: bool, batch: int, grace: float) -> None:
    """Delete the entries of retired key versions (SCAN + UNLINK, every Cluster primary)."""
    from .versioning import VersionRegistry

    cache = _cache(url, namespace)
    registry = VersionRegistry(cache, grace)
    console = Console()
    try:
        with Progress(console=console, transient=True) as bar:
            tasks: dict[str, TaskID] = {}

            def advance(v: str, n: int) -> None:
                if v not in tasks:
                    tasks[v] = bar.add_task(f"version {v}", total=None)
                bar.advance(tasks[v], n)

            counts = registry.gc(dry_run=dry_run, batch=batch, progress=advance)
    except BackendError as exc:
        raise click.ClickException(f"the cache store did not answer: {exc}") from exc
    verb = "would delete" if dry_run else "deleted"
    if not counts:
        console.print("no retired versions")
    for v, n in counts.items():
        console.print(f"version {v}: {verb} {n} keys")
    cache.close()


@main.command()
@url_option
@namespace_option
@click.option("--table", "tables", multiple=True, help="Table name (repeatable).")
@click.option("--model", "models", multiple=True, help="module:Class of a mapped class.")
@click.option("--tag", "tags", multiple=True, help="Query tag (repeatable).")
@click.option("--all", "everything", is_flag=True, help="Every entry of the namespace.")
def invalidate(
    url: str,
    namespace: str,
    tables: tuple[str, ...],
    models: tuple[str, ...],
    tags: tuple[str, ...],
    everything: bool,
) -> None:
    """Invalidate cached results by table, model, tag, or everything."""
    if not (tables or models or tags or everything):
        raise click.UsageError("say what to invalidate: --table, --model, --tag or --all")
    for option, values in (("--table", tables), ("--tag", tags)):
        if any(not value.strip() for value in values):
            raise click.BadParameter(f"empty {option[2:]} name", param_hint=option)
    mapped = [_mapped(m) for m in models]  # every target checked before anything is done
    cache = _cache(url, namespace)
    if everything:
        cache.invalidate_all()
    if tables or mapped:
        cache.invalidate(*tables, *mapped)
    if tags:
        cache.invalidate_tags(*tags)
    pending = cache.stats["invalidate.deferred"]
    cache.close()
    if pending:
        raise click.ClickException("the cache store did not answer; nothing was invalidated")
    Console().print("invalidated")


def _mapped(target: str) -> Any:
    """The mapped class or Table named ``module:attribute`` by ``--model``."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Mapper

    obj = load_target(target, param_hint="--model")
    if isinstance(obj, sa.TableClause) or (
        isinstance(obj, type) and isinstance(sa.inspect(obj, raiseerr=False), Mapper)
    ):
        return obj
    raise click.BadParameter(
        f"{target} is {obj!r}, not a mapped class or a Table", param_hint="--model"
    )


@main.command()
@url_option
@namespace_option
def stats(url: str, namespace: str) -> None:
    """Show what the store holds for a namespace: entries by version and kind,
    generations, the write-behind backlog, server memory and persistence."""
    from .metrics import store_report
    from .versioning import VersionRegistry

    cache = _cache(url, namespace)
    console = Console()
    try:
        with console.status("scanning keys") as status:
            report = store_report(cache, lambda n: status.update(f"scanned {n:,} keys"))
            live = VersionRegistry(cache).live_versions()
    except BackendError as exc:
        raise click.ClickException(f"the cache store did not answer: {exc}") from exc
    finally:
        cache.close()
    report["version"] = _store_version(live, cache.version)
    table = Table(title=f"sa-cache stats: {namespace} on {url}")
    table.add_column("")
    table.add_column("value", justify="right")
    for name in ("namespace", "version", "keys"):
        table.add_row(name, str(report[name]))
    for name, n in report["entries"].items():
        table.add_row(name, f"{n:,}")
    for name, n in report["bookkeeping"].items():
        table.add_row(name, f"{n:,}")
    for name, value in report.get("server", {}).items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        table.add_row(f"server {name}", shown)
    backlog = report.get("write_behind_backlog")
    if backlog is not None:
        table.add_row(
            "write-behind backlog", f"{backlog:,}" if isinstance(backlog, int) else backlog
        )
    console.print(table)


main.add_command(warm)
main.add_command(worker)
