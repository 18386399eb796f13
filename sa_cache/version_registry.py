"""The version registry: rolling-deploy bookkeeping of one namespace in the store,
through the `Backend` protocol only (``{ns}`` = namespace)::

    {ns}:meta:{{ns}}:revision        the published database-revision part (no TTL)
    {ns}:meta:{{ns}}:versions        JSON {version: first seen, unix time}: known versions
    {ns}:meta:{{ns}}:live:{version}  "<last heartbeat> <live since>" (unix times); TTL = grace
    {ns}:meta:{{ns}}:shapes:{version}  JSON {table: digest}: its write-behind models' shapes
                                     (`write_behind_versions.table_shape`); TTL = grace

A known version without a live key is retired; `VersionRegistry.gc` (`version_gc`)
deletes its entries (``{ns}:{version}:*``) and forgets it.

Every commit repeats its entry deletes under each live version (`VersionRegistry.fan_out`),
reading the live set at most `LIVE_REFRESH` seconds old. So a version that goes live
while others are live is announced first and used only `join_wait()` seconds later: by
then every process's read of the live set includes it. Write-behind commits set their
queued entries under every live version the same way (`write_behind_versions`), reading
the versions' table shapes with the live set.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import sqlalchemy as sa

from .backends.base import NO_VALUE, BackendError, NoValue
from .freshness import check_seconds
from .keys import RESERVED_SEGMENTS, check_version
from .version_gc import Progress, is_version
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


def _seconds(raw: bytes, field: int = 0) -> float:
    """Field ``field`` of a live value (0: last heartbeat, 1: live since)."""
    try:
        return float(raw.split()[field])
    except (ValueError, IndexError):
        return 0.0  # a foreign value still means "live": gc must not collect on a doubt


def _key_version(key: str, ns_prefix: str) -> str | None:
    """The version segment of an entry key of this namespace, else None."""
    if not key.startswith(ns_prefix):
        return None
    version, sep, _ = key[len(ns_prefix) :].partition(":")
    return version if sep and version not in RESERVED_SEGMENTS else None


def _parse_shapes(raw: bytes | NoValue) -> dict[str, str]:
    """A version's shapes as stored (unreadable or missing: none known)."""
    if raw is NO_VALUE:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items()}


# -- the registry ------------------------------------------------------------------------


_REVISION_PART = re.compile(r"r[0-9a-f]+")
"""What `version_names.revision_part` makes."""


class VersionRegistry:
    """Published revision, live versions (heartbeats) and gc of one cache's namespace.

    Store failures raise `BackendError`; callers decide (the alembic hook logs them).
    """

    def __init__(self, cache: Cache, grace: float = DEFAULT_GRACE, follow: bool = True) -> None:
        self.grace = check_seconds("grace", grace)
        self.cache = cache
        self.follow = follow
        """Does `sync` follow a newly published revision? (Not for a manual version.)"""
        ns = cache.namespace
        self._meta = f"{ns}:meta:{{{ns}}}:"
        self.revision_key = self._meta + "revision"
        self.index_key = self._meta + "versions"
        self.live: tuple[str, ...] = ()
        """Live versions as last read (by `sync`, or by `fan_out` when that was too old)."""
        self._live_read = -LIVE_REFRESH  # time.monotonic() of that read: none yet
        self._seen: dict[str, float] = {}  # version -> when last read live (monotonic)
        self.pending: Callable[[], None] | None = None
        """Work `sync` retries until it succeeds (`track`: reconcile with the database)."""
        self.tracker: Tracker | None = None
        self.shapes: dict[str, dict[str, str]] = {}
        """Per live version, the shapes of its write-behind tables, read with `live`."""
        self.own_shapes: dict[str, str] = {}
        """The shapes this process published (`publish_shapes`), again at each heartbeat."""

    def live_key(self, version: str) -> str:
        """Key whose presence means ``version`` had a heartbeat within the grace period."""
        return f"{self._meta}live:{version}"

    def shapes_key(self, version: str) -> str:
        """Key of the shapes of ``version``'s write-behind tables."""
        return f"{self._meta}shapes:{version}"

    def publish_shapes(self, shapes: dict[str, str]) -> None:
        """Record ``shapes`` (table: digest) with this cache's version (for the grace
        period; each heartbeat records them again)."""
        self.own_shapes.update(shapes)
        payload = json.dumps(self.own_shapes, sort_keys=True).encode()
        self.cache.backend.set_many({self.shapes_key(self.cache.version): payload}, self.grace)

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
        values = {key: f"{now} {since}".encode()}
        from .write_behind_versions import shapes_of  # (the layer above: lazily)

        self.own_shapes.update(shapes_of(self.cache))
        if self.own_shapes:
            shapes = json.dumps(self.own_shapes, sort_keys=True).encode()
            values[self.shapes_key(version)] = shapes
        self.cache.backend.set_many(values, self.grace)
        # The index as it is *after* the live key was written (not as read before): a gc
        # that dropped this version in between reads the live key after it (`collect`).
        del index_raw
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
            if v not in live and v != self.cache.version and is_version(v)
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
        self._set_live(*self._read_live())
        return self.cache.version

    def _set_live(self, live: Iterable[str], shapes: dict[str, dict[str, str]]) -> None:
        """Versions read live now, and those read live within ``grace`` before: a store
        that lost its keys (restarted empty, evicted them) does not end fan-out to a
        version whose processes still run (their next heartbeat brings it back)."""
        now = time.monotonic()
        for version in live:
            self._seen[version] = now
        self._seen = {v: at for v, at in self._seen.items() if now - at < self.grace}
        merged = {**self.shapes, **shapes}
        self.live = tuple(sorted(self._seen))
        self.shapes = {v: merged[v] for v in self.live if v in merged}
        self._live_read = now

    def _read_live(self) -> tuple[list[str], dict[str, dict[str, str]]]:
        """The live versions and their shapes (`shapes`), in the round trips of
        `live_versions`."""
        known = self.known_versions()
        if not known:
            return [], {}
        keys = [self.live_key(v) for v in known] + [self.shapes_key(v) for v in known]
        raws = self.cache.backend.get_many(keys)
        live, shapes = [], {}
        n = len(known)
        for version, raw, shape in zip(known, raws[:n], raws[n:], strict=True):
            if raw is NO_VALUE:
                continue
            live.append(version)
            shapes[version] = _parse_shapes(shape)
        return live, shapes

    def live_now(self) -> tuple[str, ...]:
        """The live versions, read again when the last read is `LIVE_REFRESH` seconds old
        (a store failure keeps the last read: counted, logged, retried next time)."""
        if time.monotonic() - self._live_read >= LIVE_REFRESH:
            read = self.cache._call(self._read_live, None, "versions")
            if read is not None:
                self._set_live(*read)
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
        """Delete the entries of retired versions; keys deleted (or found) per version
        (`version_gc.collect`)."""
        from .version_gc import collect

        return collect(self, dry_run, batch, progress)
