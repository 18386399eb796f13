"""The version registry: rolling-deploy bookkeeping of one namespace in the store,
through the `Backend` protocol only (``{ns}`` = namespace)::

    {ns}:meta:{{ns}}:revision        the published database-revision part (no TTL)
    {ns}:meta:{{ns}}:versions        JSON {version: first seen, unix time}: known versions
    {ns}:meta:{{ns}}:live:{version}  "<last heartbeat> <live since>" (unix times); TTL = grace

A known version without a live key is retired; `VersionRegistry.gc` deletes its
entries (``{ns}:{version}:*``) and forgets it.

Every commit repeats its entry deletes under each live version (`VersionRegistry.fan_out`),
reading the live set at most `LIVE_REFRESH` seconds old. So a version that goes live
while others are live is announced first and used only `join_wait()` seconds later: by
then every process's read of the live set includes it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import sqlalchemy as sa

from .backends.base import NO_VALUE, BackendError, NoValue
from .keys import RESERVED_SEGMENTS, check_version
from .version_names import revision_part, split_version

if TYPE_CHECKING:
    from .cache import Cache
    from .versioning import Tracker

log = logging.getLogger("sa_cache")

DEFAULT_GRACE = 600.0
"""Seconds a version stays live after its last heartbeat."""

LIVE_REFRESH = 1.0
"""Seconds a process reuses its read of the live versions when fanning out a commit."""


def join_wait() -> float:
    """Seconds between announcing a version and using it, when other versions are live:
    two `LIVE_REFRESH` periods (a read of the live set at most that old), plus margin."""
    return 2 * LIVE_REFRESH + 0.5


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


def _seconds(raw: bytes, field: int = 0) -> float:
    """Field ``field`` of a live value (0: last heartbeat, 1: live since)."""
    try:
        return float(raw.split()[field])
    except (ValueError, IndexError):
        return 0.0  # a foreign value still means "live": gc must not collect on a doubt


def _is_version(name: str) -> bool:
    """Can ``name`` be a version? (gc must never scan ``{ns}:wb:*``, nor a pattern.)"""
    try:
        check_version(name)
    except ValueError:
        return False
    return True


def _key_version(key: str, ns_prefix: str) -> str | None:
    """The version segment of an entry key of this namespace, else None."""
    if not key.startswith(ns_prefix):
        return None
    version, sep, _ = key[len(ns_prefix) :].partition(":")
    return version if sep and version not in RESERVED_SEGMENTS else None


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


_REVISION_PART = re.compile(r"r[0-9a-f]+")
"""What `version_names.revision_part` makes."""


class VersionRegistry:
    """Published revision, live versions (heartbeats) and gc of one cache's namespace.

    Store failures raise `BackendError`; callers decide (the alembic hook logs them).
    """

    def __init__(self, cache: Cache, grace: float = DEFAULT_GRACE, follow: bool = True) -> None:
        if grace <= 0:
            raise ValueError(f"grace must be a positive number of seconds, got {grace!r}")
        self.cache = cache
        self.grace = float(grace)
        self.follow = follow
        """Does `sync` follow a newly published revision? (Not for a manual version.)"""
        ns = cache.namespace
        self._meta = f"{ns}:meta:{{{ns}}}:"
        self.revision_key = self._meta + "revision"
        self.index_key = self._meta + "versions"
        self.live: tuple[str, ...] = ()
        """Live versions as last read (by `sync`, or by `fan_out` when that was too old)."""
        self._live_read = -LIVE_REFRESH  # time.monotonic() of that read: none yet
        self.pending: Callable[[], None] | None = None
        """Work `sync` retries until it succeeds (`track`: reconcile with the database)."""
        self.tracker: Tracker | None = None

    def live_key(self, version: str) -> str:
        """Key whose presence means ``version`` had a heartbeat within the grace period."""
        return f"{self._meta}live:{version}"

    # published revision

    def publish(self, db_revision_part: str, expected: str | NoValue | None = NO_VALUE) -> bool:
        """Record the database-revision part every instance should use now; with
        ``expected``, only if that is still what is published (None: nothing)."""
        if not re.fullmatch(r"r[0-9a-f]+", db_revision_part):
            raise ValueError(f"not a revision part: {db_revision_part!r}")
        value = db_revision_part.encode()
        if expected is NO_VALUE:
            self.cache.backend.set_many({self.revision_key: value}, None)
            return True
        old = None if expected is None else expected.encode()
        return self.cache.backend.cas(self.revision_key, old, value)

    def current_published(self) -> str | None:
        """The published database-revision part, None when nothing was published."""
        raw = self.cache.backend.get_many([self.revision_key])[0]
        if raw is NO_VALUE:
            return None
        text = raw.decode("utf-8", "replace")
        if _REVISION_PART.fullmatch(text) is None:  # garbage, a foreign value: not ours
            self.cache.stats.incr("version.unreadable")
            return None
        return text

    def reconcile(self, bind: sa.Engine | sa.Connection, schema: str | None = None) -> None:
        """Publish the database's revision part if it differs from the published one (a
        migration whose publish failed), invalidating every entry (a migration may have
        changed any row). Reads the published part first: a migration committing in
        between is then seen in the database, never published over."""
        published = self.current_published()
        part = revision_part(read_db_revisions(bind, schema=schema))
        if published == part:
            return
        if published is not None:
            self.cache.invalidate_all()
        if self.publish(part, expected=published):
            log.info("sa_cache: published database revision part %s (was %s)", part, published)

    def sync_pending(self) -> None:
        """Run `pending` (BackendError: it stays pending; a database error is logged)."""
        if self.pending is not None:
            try:
                self.pending()
            except sa.exc.SQLAlchemyError as exc:
                log.warning("sa_cache: could not read the database revision (%s)", exc)
                return
            self.pending = None

    # liveness

    def _index(self) -> dict[str, float]:
        return self._parse_index(self.cache.backend.get_many([self.index_key])[0])

    def _parse_index(self, raw: bytes | NoValue) -> dict[str, float]:
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

    def _update_index(self, change: Callable[[dict[str, float]], bool]) -> None:
        """Apply ``change`` (True: it changed the index) with compare-and-set, so two
        processes updating the index at once never drop each other's version."""
        backend = self.cache.backend
        for _ in range(20):
            raw = backend.get_many([self.index_key])[0]
            index = self._parse_index(raw)
            if not change(index):
                return
            payload = json.dumps(index, sort_keys=True).encode()
            if backend.cas(self.index_key, None if raw is NO_VALUE else raw, payload):
                return
        raise BackendError(f"version index {self.index_key} kept changing; try again")

    def heartbeat(self, version: str | None = None) -> float:
        """Mark ``version`` (default: the cache's) live for the grace period; return since
        when it has been live (unix time: now, if it was not).

        Also (re-)adds it to the index: a concurrent writer may have dropped it, so
        the index heals at the next heartbeat.
        """
        version = check_version(version or self.cache.version)
        key = self.live_key(version)
        now = time.time()
        raw, index_raw = self.cache.backend.get_many([key, self.index_key])
        since = now if raw is NO_VALUE else min(_seconds(raw, 1) or now, now)
        self.cache.backend.set_many({key: f"{now} {since}".encode()}, self.grace)
        if version not in self._parse_index(index_raw):
            self._update_index(lambda index: index.setdefault(version, now) == now)
        return since

    def join(self, version: str) -> None:
        """Announce ``version`` before this process uses it; when other versions are live,
        wait until their processes' reads of the live set include it (`join_wait`)."""
        since = self.heartbeat(version)
        others = [v for v in self.live_versions() if v != version]
        left = since + join_wait() - time.time()
        if others and left > 0:
            time.sleep(left)

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
            if v not in live and v != self.cache.version and _is_version(v)
        ]

    def sync(self) -> str:
        """Follow a newly published revision, heartbeat, read the live versions.

        A computed version keeps its schema part and takes the published revision
        part (announced first: see `join`); a manual version never changes. Returns
        the version now in use.
        """
        self.sync_pending()
        version = self.cache.version
        published = self.current_published() if self.follow else None
        parts = split_version(version)
        if published is not None and parts is not None and parts[0] != published:
            version = f"{published}-{parts[1]}"
            self.join(version)
            _use_version(self.cache, version)
        else:
            self.heartbeat()
        self._set_live(self.live_versions())
        return self.cache.version

    def _set_live(self, live: Iterable[str]) -> None:
        self.live = tuple(live)
        self._live_read = time.monotonic()

    def live_now(self) -> tuple[str, ...]:
        """The live versions, read again when the last read is `LIVE_REFRESH` seconds old
        (a store failure keeps the last read: counted, logged, retried next time)."""
        if time.monotonic() - self._live_read >= LIVE_REFRESH:
            read = self.cache._call(self.live_versions, None, "versions")
            if read is not None:
                self._set_live(read)
        return self.live

    def fan_out(self, keys: Iterable[str]) -> list[str]:
        """Entry ``keys``, each repeated under every other live version (its own version
        is the key's: one written before a switch of version carries the old one).
        Generations need no fan-out (shared)."""
        keys = list(keys)
        if not keys:
            return keys
        ns = self.cache.namespace + ":"
        versions = sorted({*self.live_now(), self.cache.version})
        out = []
        for key in keys:
            out.append(key)
            own = _key_version(key, ns)
            if own is not None:
                rest = key[len(ns) + len(own) :]
                out.extend(f"{ns}{v}{rest}" for v in versions if v != own)
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
            if version in self.live_versions() or not _is_version(version):
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
            collected = [v for v in counts if v not in self.live_versions()]

            def forget(index: dict[str, float]) -> bool:
                found = [v for v in collected if index.pop(v, None) is not None]
                return bool(found)

            self._update_index(forget)
        return counts
