"""Key versions: the database's alembic revision(s) plus a hash of the mapped tables.

A version looks like ``r<revisions digest>-s<schema digest>`` (or a manual override).
Instances of old and new code share the ``r`` part (every instance moves when a
migration is published) and differ in the ``s`` part (old code never reads rows
cached in the new shape, nor the reverse).

`VersionRegistry` keeps the rolling-deploy bookkeeping in the store, through the
`Backend` protocol only (``{ns}`` = namespace)::

    {ns}:meta:{{ns}}:revision        the published database-revision part (no TTL)
    {ns}:meta:{{ns}}:versions        JSON {version: first seen, unix time}: known versions
    {ns}:meta:{{ns}}:live:{version}  last heartbeat (unix time); TTL = grace period

A known version without a live key is retired; `VersionRegistry.gc` deletes its
entries (``{ns}:{version}:*``) and forgets it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import sqlalchemy as sa

from .backends.base import NO_VALUE, BackendError
from .keys import check_version
from .version_names import compute_version, revision_part, schema_hash, split_version

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger("sa_cache")

DEFAULT_GRACE = 600.0
"""Seconds a version stays live after its last heartbeat."""

_RESERVED = frozenset({"meta", "gen", "tag"})
"""Second key segments that are not versions: gc never deletes under them."""

Progress = Callable[[str, int], None]
"""``progress(version, n)``: ``n`` more keys of ``version`` were deleted (or counted)."""


def read_db_revisions(
    bind: sa.Engine | sa.Connection,
    version_table: str = "alembic_version",
    schema: str | None = None,
) -> tuple[str, ...]:
    """Sorted alembic heads of the database; ``()`` when there is no version table.

    On a `Connection` outside a transaction, the transaction this read begins is
    rolled back, so the connection is left as it was found.
    """
    if isinstance(bind, sa.Engine):
        with bind.connect() as conn:
            return read_db_revisions(conn, version_table, schema)
    began = not bind.in_transaction()
    try:
        if not sa.inspect(bind).has_table(version_table, schema=schema):
            return ()
        table = sa.table(version_table, sa.column("version_num"), schema=schema)
        rows = bind.execute(sa.select(table.c.version_num)).scalars()
        return tuple(sorted(str(r) for r in rows))
    finally:
        if began and bind.in_transaction():
            bind.rollback()


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


class Tracker:
    """Keeps a cache on the current version: a daemon thread calling `VersionRegistry.sync`."""

    def __init__(self, registry: VersionRegistry, interval: float) -> None:
        self.registry = registry
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sa-cache-version", daemon=True)
        self._thread.start()

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
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


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
    """
    refresh_version(cache, bind, metadata, manual, schema)
    registry = VersionRegistry(cache, grace)
    tracker = Tracker(registry, interval if interval is not None else grace / 4)
    tracker.sync_once()
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


def _use_version(cache: Cache, version: str) -> None:
    use = getattr(cache, "use_version", None)
    if use is not None and cache.version != version:
        use(version)


# -- key enumeration on the stores that support it ---------------------------------------


@runtime_checkable
class _Scanning(Protocol):
    """Redis backends: SCAN (every primary on Cluster) and UNLINK."""

    def scan_keys(self, match: str, count: int) -> Iterable[str | bytes]: ...

    def unlink_many(self, keys: Sequence[str]) -> int: ...


@runtime_checkable
class _Listing(Protocol):
    """The memory backend: a list of live keys with a prefix."""

    def keys(self, prefix: str = "") -> list[str]: ...

    def delete_many(self, keys: Sequence[str]) -> int: ...


def _seconds(raw: bytes) -> float:
    try:
        return float(raw)
    except ValueError:
        return 0.0  # a foreign value still means "live": gc must not collect on a doubt


def _batches(keys: Iterable[str | bytes], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for key in keys:
        batch.append(key.decode() if isinstance(key, bytes) else key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- the registry ------------------------------------------------------------------------


class VersionRegistry:
    """Published revision, live versions (heartbeats) and gc of one cache's namespace.

    Store failures raise `BackendError`; callers decide (the alembic hook logs them).
    """

    def __init__(self, cache: Cache, grace: float = DEFAULT_GRACE) -> None:
        if grace <= 0:
            raise ValueError(f"grace must be a positive number of seconds, got {grace!r}")
        self.cache = cache
        self.grace = float(grace)
        ns = cache.namespace
        self._meta = f"{ns}:meta:{{{ns}}}:"
        self.revision_key = self._meta + "revision"
        self.index_key = self._meta + "versions"
        self.live: tuple[str, ...] = ()
        """Live versions seen by the last `sync` (used by `fan_out`)."""

    def live_key(self, version: str) -> str:
        """Key whose presence means ``version`` had a heartbeat within the grace period."""
        return f"{self._meta}live:{version}"

    # published revision

    def publish(self, db_revision_part: str) -> None:
        """Record the database-revision part every instance should use now."""
        if not re.fullmatch(r"r[0-9a-f]+", db_revision_part):
            raise ValueError(f"not a revision part: {db_revision_part!r}")
        self.cache.backend.set_many({self.revision_key: db_revision_part.encode()}, None)

    def current_published(self) -> str | None:
        """The published database-revision part, None when nothing was published."""
        raw = self.cache.backend.get_many([self.revision_key])[0]
        return None if raw is NO_VALUE else raw.decode()

    # liveness

    def _index(self) -> dict[str, float]:
        raw = self.cache.backend.get_many([self.index_key])[0]
        if raw is NO_VALUE:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            log.warning("sa_cache: unreadable version index %s; starting afresh", self.index_key)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}

    def _write_index(self, index: dict[str, float]) -> None:
        payload = json.dumps(index, sort_keys=True).encode()
        self.cache.backend.set_many({self.index_key: payload}, None)

    def heartbeat(self, version: str | None = None) -> None:
        """Mark ``version`` (default: the cache's) live for the grace period.

        Also (re-)adds it to the index: a concurrent writer may have dropped it, so
        the index heals at the next heartbeat.
        """
        version = check_version(version or self.cache.version)
        now = time.time()
        self.cache.backend.set_many({self.live_key(version): str(now).encode()}, self.grace)
        index = self._index()
        if version not in index:
            index[version] = now
            self._write_index(index)

    def known_versions(self) -> list[str]:
        """Every version that ever sent a heartbeat and was not collected since."""
        return sorted(self._index())

    def last_seen(self) -> dict[str, float]:
        """Last heartbeat (unix time) of each live version."""
        known = self.known_versions()
        raws = self.cache.backend.get_many([self.live_key(v) for v in known]) if known else []
        return {v: _seconds(raw) for v, raw in zip(known, raws, strict=True) if raw is not NO_VALUE}

    def live_versions(self) -> list[str]:
        """Known versions with a heartbeat within the grace period."""
        return sorted(self.last_seen())

    def retired_versions(self) -> list[str]:
        """Known versions without a recent heartbeat, never the cache's own version."""
        live = set(self.live_versions())
        return [
            v
            for v in self.known_versions()
            if v not in live and v != self.cache.version and v not in _RESERVED
        ]

    def sync(self) -> str:
        """Follow a newly published revision, heartbeat, snapshot the live versions.

        A computed version keeps its schema part and takes the published revision
        part; a manual version never changes. Returns the version now in use.
        """
        published = self.current_published()
        parts = split_version(self.cache.version)
        if published is not None and parts is not None and parts[0] != published:
            _use_version(self.cache, f"{published}-{parts[1]}")
        self.heartbeat()
        self.live = tuple(self.live_versions())
        return self.cache.version

    def fan_out(self, keys: Iterable[str]) -> list[str]:
        """Entry ``keys`` of the cache's version, repeated for every other live version.

        Uses the snapshot of the last `sync`; generations need no fan-out (shared).
        """
        own = self.cache.keys.data_prefix()
        others = [self.cache.keys.data_prefix(v) for v in self.live if v != self.cache.version]
        out = []
        for key in keys:
            out.append(key)
            if key.startswith(own):
                out.extend(p + key[len(own) :] for p in others)
        return out

    # gc

    def gc(
        self, dry_run: bool = False, batch: int = 500, progress: Progress | None = None
    ) -> dict[str, int]:
        """Delete the entries of retired versions; keys deleted (or found) per version.

        Uses SCAN + UNLINK on Redis (every primary on Cluster) and the key list on
        the memory store. Live versions and the cache's own version are never touched.
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        backend = self.cache.backend
        counts: dict[str, int] = {}
        for version in self.retired_versions():
            if version in self.live_versions():
                continue  # a heartbeat arrived since we looked
            prefix = self.cache.keys.data_prefix(version)
            if isinstance(backend, _Scanning):
                found: Iterable[str | bytes] = backend.scan_keys(prefix + "*", batch)
                remove: Callable[[Sequence[str]], int] = backend.unlink_many
            elif isinstance(backend, _Listing):
                found = backend.keys(prefix)
                remove = backend.delete_many
            else:
                raise TypeError(f"{type(backend).__name__} cannot list keys; gc needs it")
            done = 0
            for keys in _batches(found, batch):
                if not dry_run:
                    remove(keys)
                done += len(keys)
                if progress is not None:
                    progress(version, len(keys))
            counts[version] = done
        if counts and not dry_run:
            index = self._index()
            for version in counts:
                index.pop(version, None)
            self._write_index(index)
        return counts
