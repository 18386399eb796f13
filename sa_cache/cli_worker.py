"""``sa-cache worker``: run the write-behind worker, or inspect and replay dead letters.

A thin layer over `write_behind_worker.WriteBehindWorker` and `write_behind.WriteBehind`.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from .backends.base import BackendError
from .cli_common import (
    Seconds,
    create_engine,
    database_errors,
    load_target,
    namespace_option,
    url_option,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

    from .cache import Cache

_STREAM_ID = re.compile(r"\d+(-\d+)?")


def _from_url(url: str, **settings: Any) -> Cache:
    from .cache import Cache

    try:
        return Cache.from_url(url, **settings)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from exc


def _cache(ctx: click.Context, url: str, namespace: str, app: str | None) -> Cache:
    """The application's cache (``--app``), on ``--url`` when that is given explicitly:
    then a cache on that store with the app's settings, key version, registered models
    and write-behind settings (its namespace is the app's, not ``--namespace``)."""
    from .cache import Cache
    from .write_behind import write_behind_for

    if app is None:
        return _from_url(url, namespace=namespace)
    found = load_target(app, param_hint="--app")
    if not isinstance(found, Cache):
        raise click.BadParameter(
            f"{app} is a {type(found).__name__}, not an sa_cache.Cache", param_hint="--app"
        )
    if ctx.get_parameter_source("url") is click.core.ParameterSource.DEFAULT:
        return found
    moved = _from_url(url, **dataclasses.asdict(found.config))
    moved.use_version(found.version)
    moved.entities.update(found.entities)
    write_behind_for(moved).config = write_behind_for(found).config
    return moved


def _replay_ids(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Any:
    bad = [v for v in value if v != "all" and not _STREAM_ID.fullmatch(v)]
    if bad:
        raise click.BadParameter(
            f"{', '.join(map(repr, bad))}: expected a dead-letter id (as --dead-letters "
            "lists them, e.g. 1712345678901-0) or all",
            ctx,
            param,
        )
    return value


@click.command()
@url_option
@namespace_option
@click.option("--app", help="module:attribute of the application's Cache (its registered models).")
@click.option(
    "--database-url",
    envvar="SA_CACHE_DATABASE_URL",
    help="Database the changes go to (default: $SA_CACHE_DATABASE_URL).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Keys per transaction.",
)
@click.option(
    "--max-delay",
    type=Seconds(zero=True),
    default=0.2,
    show_default=True,
    help="Seconds a change may wait.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Tries before dead-lettering.",
)
@click.option(
    "--lease-ttl",
    type=Seconds(),
    default=10.0,
    show_default=True,
    help="Seconds a partition lease lasts.",
)
@click.option(
    "--foreign-key-wait",
    type=Seconds(zero=True),
    default=60.0,
    show_default=True,
    help="Seconds a foreign-key violation is retried before it counts as an attempt.",
)
@click.option("--drain", is_flag=True, help="Exit once the queue is empty.")
@click.option("--dead-letters", is_flag=True, help="List the dead-letter stream and exit.")
@click.option(
    "--replay",
    multiple=True,
    metavar="ID|all",
    callback=_replay_ids,
    help="Queue dead letters again.",
)
@click.pass_context
def worker(
    ctx: click.Context,
    url: str,
    namespace: str,
    app: str | None,
    database_url: str | None,
    batch_size: int,
    max_delay: float,
    max_attempts: int,
    lease_ttl: float,
    foreign_key_wait: float,
    drain: bool,
    dead_letters: bool,
    replay: tuple[str, ...],
) -> None:
    """Apply queued write-behind changes to the database (SIGTERM drains and exits)."""
    from .write_behind import write_behind_for

    cache = _cache(ctx, url, namespace, app)
    console = Console(stderr=True)
    from .backends.redis import RedisBackend, RedisClusterBackend

    if not isinstance(cache.backend, (RedisBackend, RedisClusterBackend)):
        cache.close()
        raise click.UsageError("write-behind needs a Redis cache: give --url (or $SA_CACHE_URL)")
    try:
        queue = write_behind_for(cache)
        if dead_letters or replay:
            _dead_letters(queue, dead_letters, replay)
            return
        if app is None:
            raise click.UsageError("the worker needs --app module:cache (its registered models)")
        if not database_url:
            raise click.UsageError("the worker needs --database-url (or $SA_CACHE_DATABASE_URL)")
        engine = create_engine(database_url, pool_pre_ping=True)
        try:
            with database_errors(engine):
                settings = {
                    "batch_size": batch_size,
                    "max_delay": max_delay,
                    "max_attempts": max_attempts,
                    "lease_ttl": lease_ttl,
                    "foreign_key_wait": foreign_key_wait,
                }
                _run(cache, engine, console, drain, settings)
        finally:
            engine.dispose()
    except BackendError as exc:
        raise click.ClickException(f"the cache store did not answer: {exc}") from exc
    finally:
        cache.close()


def _dead_letters(queue: Any, show: bool, replay: tuple[str, ...]) -> None:
    console = Console()
    if replay:
        ids = None if "all" in replay else list(replay)
        try:
            count = queue.replay(ids)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--replay") from None
        console.print(f"replayed {count} dead letters")
    if show:
        letters = queue.dead_letters(count=1000)
        console.print(f"{len(letters)} write-behind dead letters", highlight=False)
        for d in letters:
            console.print(
                f"{d.id}  partition {d.partition}  {d.table} {d.op}  attempts {d.attempts}\n"
                f"  key:   {d.key}\n  image: {d.image!r}\n"
                + ("" if d.cols is None else f"  changed columns (positions): {d.cols}\n")
                + f"  error: {d.error}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )


def _run(
    cache: Cache,
    engine: sa.Engine,
    console: Console,
    drain: bool,
    settings: dict[str, Any],
) -> None:
    from .write_behind_worker import WriteBehindWorker

    stop = threading.Event()
    before = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    runner = WriteBehindWorker(cache, engine, **settings)
    try:
        with console.status("write-behind worker: starting") as status:

            def progress(_: int) -> None:
                status.update(
                    f"write-behind worker {runner.consumer}: applied {runner.applied}, "
                    f"dead letters {runner.dead}, partitions {sorted(runner.parts)}"
                )

            runner.run(stop, drain=drain, progress=progress)
    finally:
        for sig, handler in before.items():  # in process (tests, embedding): put them back
            signal.signal(sig, handler)
    console.print(f"applied {runner.applied} changes, {runner.dead} dead letters")


if __name__ == "__main__":  # python -m sa_cache.cli_worker (until cli.py registers it)
    worker()
