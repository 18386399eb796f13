"""Key versions: the database's alembic revision(s) plus a hash of the mapped tables.

A version looks like ``r<revisions digest>-s<schema digest>`` (or a manual override).
Instances of old and new code share the ``r`` part (every instance moves when a
migration is published) and differ in the ``s`` part (old code never reads rows
cached in the new shape, nor the reverse).

`track` puts a cache on its version and keeps it there (a `Tracker` thread); the
bookkeeping in the store is `version_registry.VersionRegistry`'s.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

import sqlalchemy as sa

from .backends.base import BackendError
from .freshness import check_seconds
from .version_names import compute_version, revision_part, schema_hash
from .version_registry import (
    DEFAULT_GRACE,
    VersionRegistry,
    _use_version,
    read_db_revisions,
)

if TYPE_CHECKING:
    from .cache import Cache

__all__ = [
    "DEFAULT_GRACE",
    "Tracker",
    "VersionRegistry",
    "attach_registry",
    "read_db_revisions",
    "refresh_version",
    "track",
    "version_report",
]

log = logging.getLogger("sa_cache")


def refresh_version(
    cache: Cache,
    bind: sa.Engine | sa.Connection,
    metadata: sa.MetaData,
    manual: str | None = None,
    schema: str | None = None,
) -> str:
    """Compute the version from the database and ``metadata``; switch ``cache`` to it.

    ``schema`` is where ``alembic_version`` lives (alembic's ``version_table_schema``).
    """
    version = compute_version(read_db_revisions(bind, schema=schema), schema_hash(metadata), manual)
    _use_version(cache, version)
    return version


_trackers: weakref.WeakSet[Tracker] = weakref.WeakSet()


class Tracker:
    """Keeps a cache on the current version: a daemon thread calling `VersionRegistry.sync`
    (restarted in a child process after ``os.fork``: threads do not survive it)."""

    def __init__(self, registry: VersionRegistry, interval: float) -> None:
        self.registry = registry
        self.interval = check_seconds("interval", interval)
        self._stop = threading.Event()
        self._start()
        _trackers.add(self)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sa-cache-version", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        if not self._stop.is_set():
            self._stop = threading.Event()  # the parent's may be mid-wait: never reuse it
            self._start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sync_once()

    def sync_once(self) -> None:
        """One sync; a store failure is logged, never raised."""
        try:
            self.registry.sync()
        except BackendError as exc:
            log.warning("sa_cache: version sync failed (%s); retrying later", exc)

    def stop(self) -> None:
        """Stop the thread (`Cache.close` calls this)."""
        self._stop.set()
        _trackers.discard(self)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _restart_trackers() -> None:
    for tracker in list(_trackers):
        tracker._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows (no fork there)
    os.register_at_fork(after_in_child=_restart_trackers)


def track(
    cache: Cache,
    bind: sa.Engine | sa.Connection,
    metadata: sa.MetaData,
    *,
    manual: str | None = None,
    schema: str | None = None,
    grace: float = DEFAULT_GRACE,
    interval: float | None = None,
) -> VersionRegistry:
    """Put ``cache`` on the version computed from the database and the models, and keep
    it there: heartbeats, following a newly published revision, fanning entry deletes
    out to every live version. Call once at start-up.

    The database is the truth: when its revision differs from the published one (a
    migration whose publish failed), its part is published and every entry invalidated.
    """
    _check_interval(interval)
    registry = VersionRegistry(cache, grace, follow=manual is None)
    if manual is None:
        registry.pending = lambda: registry.reconcile(bind, schema)
        try:
            registry.sync_pending()
        except BackendError as exc:
            log.warning("sa_cache: could not check the published version (%s)", exc)
    revisions = read_db_revisions(bind, schema=schema)
    version = compute_version(revisions, schema_hash(metadata), manual)
    _start(cache, registry, version, interval)
    return registry


def attach_registry(
    cache: Cache, grace: float = DEFAULT_GRACE, interval: float | None = None
) -> VersionRegistry:
    """Announce ``cache``'s own (manual or default) version and fan its commits out to
    every live version, as `track` does without following the database. Idempotent."""
    _check_interval(interval)
    if cache.registry is not None:
        return cache.registry  # type: ignore[no-any-return]
    return _start(cache, VersionRegistry(cache, grace, follow=False), cache.version, interval)


def _check_interval(interval: float | None) -> None:
    """The heartbeat ``interval`` (None: a quarter of the grace) must be positive and
    finite: 0 or less would make the `Tracker` thread sync with the store in a busy loop."""
    if interval is not None:
        check_seconds("interval", interval)


def _start(
    cache: Cache, registry: VersionRegistry, version: str, interval: float | None
) -> VersionRegistry:
    try:
        registry.join(version)
    except BackendError as exc:
        log.warning("sa_cache: could not announce key version %s (%s)", version, exc)
    _use_version(cache, version)
    tracker = Tracker(registry, interval if interval is not None else registry.grace / 4)
    previous = getattr(cache.registry, "tracker", None)
    if previous is not None:
        previous.stop()  # track() after attach_registry(): one tracker per cache
    registry.tracker = tracker
    cache.attach_versioning(registry, tracker.stop)
    return registry


def version_report(
    cache: Cache,
    bind: sa.Engine | sa.Connection | None = None,
    metadata: sa.MetaData | None = None,
    grace: float = DEFAULT_GRACE,
    schema: str | None = None,
) -> dict[str, object]:
    """What ``sa-cache version`` shows: the versions in use, published, live and retired.

    With ``bind`` and ``metadata``, also the version this code would compute now.
    Store failures raise `BackendError`.
    """
    registry = VersionRegistry(cache, grace)
    report: dict[str, object] = {
        "namespace": cache.namespace,
        "version": cache.version,
        "published": registry.current_published(),
        "live": registry.last_seen(),
        "retired": registry.retired_versions(),
    }
    if bind is not None:
        revisions = read_db_revisions(bind, schema=schema)
        report["db_revisions"] = list(revisions)
        report["db_revision_part"] = revision_part(revisions)
        if metadata is not None:
            report["schema_hash"] = schema_hash(metadata)
            report["computed"] = compute_version(revisions, schema_hash(metadata))
    return report
