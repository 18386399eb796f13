"""``sa-cache warm module:warmer``: run a `Warmer` once, list it, or keep it on schedule.

A thin layer over `Warmer.run`, `Warmer.plan` and `Warmer.scheduler`. ``module:name``
names a `Warmer`, or a function returning one (called with ``url=`` when it takes it).
``--url`` is exported as ``$SA_CACHE_URL`` while the module is imported, so an app that
builds its cache with ``Cache.from_url()`` warms the store the command names.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .cli_common import load_target
from .warming import Warmer, WarmReport
from .warming_schedule import JobRun, jobs_table

URL_ENV = "SA_CACHE_URL"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def _exported_url(url: str | None) -> Iterator[None]:
    if url is None:
        yield
        return
    before = os.environ.get(URL_ENV)
    os.environ[URL_ENV] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(URL_ENV, None)
        else:
            os.environ[URL_ENV] = before


def _factory_kwargs(target: str, obj: Any, url: str) -> dict[str, str]:
    """How to call the factory ``obj``: with ``url=`` when it takes it, else with nothing.
    A callable that needs other arguments is not a factory: a usage error, not a TypeError."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # no signature to read (some builtins): just call it
        return {}
    kwargs = {"url": url} if "url" in signature.parameters else {}
    try:
        signature.bind(**kwargs)
    except TypeError:
        raise click.BadParameter(
            f"{target} is not an sa_cache.Warmer, nor a function returning one that can be "
            f"called with no arguments or with url= only (its signature: {signature})",
            param_hint="TARGET",
        ) from None
    return kwargs


def load_warmer(target: str, url: str | None) -> Warmer:
    """The `Warmer` named by ``module:attribute`` (or built by the function named)."""
    with _exported_url(url):
        obj: Any = load_target(target, param_hint="TARGET")
        if not isinstance(obj, Warmer) and callable(obj):
            default = url or os.environ.get(URL_ENV) or "memory://"
            obj = obj(**_factory_kwargs(target, obj, default))
    if not isinstance(obj, Warmer):
        raise click.BadParameter(
            f"{target} is a {type(obj).__name__}, not an sa_cache.Warmer", param_hint="TARGET"
        )
    return obj


def _check_url(url: str) -> None:
    """A bad ``--url`` named before TARGET's module builds a cache on it."""
    from .cache import Cache

    try:
        Cache.from_url(url).close()
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from exc


def _summary(report: WarmReport) -> Table:
    table = Table(title="sa-cache warm")
    for column in ("target", "rows", "entries", "bytes", "time", "rows/s", "status"):
        table.add_column(column, justify="left" if column in ("target", "status") else "right")
    for r in report.results:
        status = "ok" if r.ok else f"[red]failed: {type(r.error).__name__}: {r.error}[/red]"
        if r.ok and r.skipped:
            status = f"ok ({r.skipped} left to newer writes)"
        table.add_row(
            r.name,
            f"{r.rows:,}",
            f"{r.entries:,}",
            _human_bytes(r.bytes),
            f"{r.seconds:.2f} s",
            f"{r.rows_per_second:,.0f}",
            status,
        )
    table.add_section()
    table.add_row(
        "total",
        f"{report.rows:,}",
        f"{report.entries:,}",
        _human_bytes(report.bytes),
        f"{report.seconds:.2f} s",
        f"{report.rows_per_second:,.0f}",
        "ok" if report.ok else f"[red]{len(report.failed)} failed[/red]",
    )
    return table


def _run_once(warmer: Warmer, only: tuple[str, ...], console: Console) -> WarmReport:
    try:
        chosen = [warmer.target(name) for name in only] if only else list(warmer.targets)
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--only") from exc
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, TaskID] = {t.name: bar.add_task(t.name, total=None) for t in chosen}

        def progress(name: str, done: int, total: int | None) -> None:
            bar.update(tasks[name], completed=done, total=total)

        report = warmer.run(chosen, progress=progress)
        for result in report.results:
            task = tasks[result.name]
            total = bar.tasks[task].total
            bar.update(task, completed=total if result.ok and total else result.rows)
    return report


def _print_plan(warmer: Warmer, console: Console) -> None:
    table = Table(title="sa-cache warm --dry-run: what would be warmed")
    for column in ("target", "kind", "what"):
        table.add_column(column)
    for name, kind, description in warmer.plan():
        table.add_row(name, kind, description)
    console.print(table)
    if warmer.jobs:
        jobs = Table(title="schedule")
        for column in ("target", "when", "next run (UTC)"):
            jobs.add_column(column)
        for row in jobs_table(warmer.scheduler().jobs):
            jobs.add_row(*row)
        console.print(jobs)


def _run_scheduled(warmer: Warmer, max_runs: int | None, console: Console) -> None:
    if not warmer.jobs:
        raise click.UsageError("--schedule: the warmer declares no warmer.every(...) jobs")

    def on_run(run: JobRun) -> None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run.started))
        if run.ok:
            r = run.result
            rows, entries = getattr(r, "rows", 0), getattr(r, "entries", 0)
            console.print(
                f"{when} {run.job.name}: {rows:,} rows, {entries:,} entries, {run.seconds:.2f} s"
            )
        else:
            err = run.error
            console.print(
                f"[red]{when} {run.job.name} failed: {type(err).__name__}: {err}[/red]"
                f" (next run as scheduled; {run.job.failures} failures so far)"
            )

    scheduler = warmer.scheduler(on_run=on_run)
    table = Table(title="sa-cache warm --schedule")
    for column in ("target", "when", "next run (UTC)"):
        table.add_column(column)
    for row in jobs_table(scheduler.jobs):
        table.add_row(*row)
    console.print(table)
    try:
        ran = scheduler.run_forever(max_runs=max_runs)
    except KeyboardInterrupt:
        ran = sum(job.runs for job in scheduler.jobs)
        console.print("stopped")
    failures = sum(job.failures for job in scheduler.jobs)
    console.print(f"{ran} runs, {failures} failed")


@click.command()
@click.argument("target")
@click.option(
    "--url",
    default=lambda: os.environ.get(URL_ENV) or "memory://",
    help="Cache URL (default: $SA_CACHE_URL, then memory://); exported as $SA_CACHE_URL "
    "while TARGET's module is imported.",
)
@click.option("--only", multiple=True, help="Warm only this target (repeatable).")
@click.option("--dry-run", is_flag=True, help="List what would be warmed; touch nothing.")
@click.option(
    "--schedule", is_flag=True, help="Keep running the warmer.every(...) jobs on their schedule."
)
@click.option(
    "--max-runs",
    type=click.IntRange(min=1),
    default=None,
    help="With --schedule: stop after N runs.",
)
@click.pass_context
def warm(
    ctx: click.Context,
    target: str,
    url: str,
    only: tuple[str, ...],
    dry_run: bool,
    schedule: bool,
    max_runs: int | None,
) -> None:
    """Preload the cache with the targets of TARGET, a module:attribute Warmer."""
    source = ctx.get_parameter_source("url")
    explicit = source is not None and source.name != "DEFAULT"
    if explicit:
        _check_url(url)
    warmer = load_warmer(target, url if explicit else None)
    console = Console()
    if dry_run:
        _print_plan(warmer, console)
        return
    if schedule:
        _run_scheduled(warmer, max_runs, console)
        return
    report = _run_once(warmer, only, console)
    console.print(_summary(report))
    if not report.ok:
        failed = "; ".join(f"{r.name}: {type(r.error).__name__}: {r.error}" for r in report.failed)
        raise click.ClickException(f"warming failed for {len(report.failed)} target(s): {failed}")
