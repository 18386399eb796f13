"""The alembic hook: publish the new key version once a migration has committed.

In ``migrations/env.py`` (online mode), one line replaces ``context.configure(...)``
and the ``begin_transaction()`` / ``run_migrations()`` block::

    with connectable.connect() as connection:
        sa_cache.alembic.run_migrations(context, connection, cache, target_metadata=...)

It is the same as::

    context.configure(connection=connection, **sa_cache.alembic.configure_kwargs(cache))
    try:
        with context.begin_transaction():
            context.run_migrations()
    finally:
        sa_cache.alembic.publish_after_migrations(cache, connection)

alembic calls ``on_version_apply`` inside the migration's transaction, before the
commit, and SQLAlchemy has no event after a commit. So the callback only notes on
the connection that a migration step ran; `publish_after_migrations`, called once
the transaction block has exited, checks that nothing is left uncommitted, reads
the heads the database now holds (the committed truth, also after a failure part
way through ``transaction_per_migration``) and publishes them.

Offline (``--sql``) runs and ``stamp`` (unless ``stamp=True``) publish nothing. A
store that cannot be reached never fails the migration: the hook logs a warning,
and the first instance to start (`versioning.track`) finds the new revision in the
database, publishes it and invalidates every entry, as the hook would have.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from typing import Any

import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext, MigrationInfo

from .cache import Cache
from .version_names import revision_part
from .versioning import VersionRegistry, read_db_revisions

log = logging.getLogger("sa_cache")

PENDING = "sa_cache.alembic.pending"
"""``connection.info`` key: a migration step ran on this connection, not yet published."""


class PublishHook:
    """An ``on_version_apply`` callback noting that a migration step ran online."""

    __slots__ = ("stamp",)

    def __init__(self, stamp: bool = False) -> None:
        self.stamp = stamp

    def __call__(
        self,
        ctx: MigrationContext,
        step: MigrationInfo,
        heads: Collection[Any],
        run_args: Mapping[str, Any],
    ) -> None:
        if ctx.as_sql or ctx.connection is None:
            return  # offline: nothing reaches a database, nothing to publish
        if step.is_stamp and not self.stamp:
            return
        ctx.connection.info[PENDING] = (ctx.version_table, ctx.version_table_schema)


def configure_kwargs(cache: Cache | None, stamp: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``context.configure(...)`` that install the hook.

    ``stamp=True`` also publishes after ``alembic stamp``. With no cache, nothing.
    """
    if cache is None:
        return {}
    return {"on_version_apply": PublishHook(stamp)}


def publish_after_migrations(
    cache: Cache | None, connection: sa.Connection, invalidate: bool = True
) -> str | None:
    """Publish the database's revision part after the migrations committed.

    Does nothing unless a step ran on ``connection`` (see `PublishHook`). With
    ``invalidate`` (the default) every entry of every version is invalidated too,
    through `Cache.invalidate_all`: a migration may have changed any row behind the
    cache's back. Returns the published part, None when nothing was published.
    Never raises for the store.
    """
    pending = connection.info.get(PENDING)
    if cache is None or pending is None:
        return None
    if connection.in_transaction():
        log.warning(
            "sa_cache: publish_after_migrations was called inside an open transaction; "
            "call it again after the commit. Nothing was published yet."
        )
        return None
    del connection.info[PENDING]
    version_table, schema = pending
    try:
        part = revision_part(read_db_revisions(connection, version_table, schema))
        registry = VersionRegistry(cache)
        if registry.current_published() == part:
            return None
        if invalidate:
            cache.invalidate_all()
        registry.publish(part)
    except Exception as exc:
        log.warning(
            "sa_cache: could not publish the new key version (%s: %s); instances "
            "will pick up the new revision from the database when they start",
            type(exc).__name__,
            exc,
        )
        return None
    log.info("sa_cache: published database revision part %s", part)
    return part


def run_migrations(
    context: Any,
    connection: sa.Connection,
    cache: Cache | None,
    *,
    stamp: bool = False,
    **configure: Any,
) -> str | None:
    """Configure alembic with the hook, run the migrations, publish after the commit.

    ``configure`` goes to ``context.configure`` (``target_metadata``,
    ``version_table_schema``, ...). Returns what `publish_after_migrations` returns.
    """
    context.configure(connection=connection, **configure, **configure_kwargs(cache, stamp))
    try:
        with context.begin_transaction():
            context.run_migrations()
    except BaseException:
        if cache is not None and not context.get_context().impl.transactional_ddl:
            # MySQL / MariaDB commit DDL as it runs: the failed step may have changed
            # rows (its DML before the DDL) that no revision will ever announce.
            _invalidate_all(cache)
        raise
    finally:
        published = publish_after_migrations(cache, connection)
    return published


def _invalidate_all(cache: Cache) -> None:
    """`Cache.invalidate_all`, logged and never raised (a migration's error comes first)."""
    try:
        cache.invalidate_all()
        log.warning(
            "sa_cache: a migration failed on a database without transactional DDL: "
            "every cache entry was invalidated (the work it committed is not known)"
        )
    except Exception as exc:
        log.error("sa_cache: could not invalidate the cache after a failed migration: %s", exc)


def cache_from_env() -> Cache | None:
    """The cache of ``$SA_CACHE_URL`` (default ``memory://``), namespace ``$SA_CACHE_NAMESPACE``.

    A bad setting is logged and gives None: it must not stop a migration.
    """
    settings: dict[str, Any] = {}
    namespace = os.environ.get("SA_CACHE_NAMESPACE")
    if namespace:
        settings["namespace"] = namespace
    try:
        return Cache.from_url(os.environ.get("SA_CACHE_URL") or "memory://", **settings)
    except Exception as exc:
        log.warning("sa_cache: no cache for the alembic hook (%s: %s)", type(exc).__name__, exc)
        return None
