"""The write-behind worker: applies queued changes to the database in batches.

``WriteBehindWorker(cache, engine).run()`` (or ``sa-cache worker --app module:cache``).
The queue and its records are described in `write_behind`. Per partition it owns:

- reads records in order (XREADGROUP); a transaction's prepared images become ready
  when its commit record arrives, in commit-record order; an abort record drops them;
  prepared images without either after ``prepare_timeout`` are dead-lettered;
- coalesces ready changes by key (the last image wins; an insert whose last change is
  a delete cancels out) and applies a batch when it holds ``batch_size`` keys or its
  oldest change waited ``max_delay``: one database transaction, the dialect's upsert
  (``ON CONFLICT`` / ``ON DUPLICATE KEY UPDATE``) and DELETE by key with executemany;
- checks the partition's fencing token in that transaction, so a worker that lost its
  lease (paused, partitioned) cannot commit after the new owner: ``UPDATE
  sa_cache_write_behind_fence SET token = :mine WHERE stream = :s AND token <= :mine``
  must match its row; the table is created on start;
- after the COMMIT, in one Lua script: XACK + XDEL the records, and turn each queued
  cache entry that still holds the applied image into an ordinary entry with its TTL
  (a crash before that re-applies the same full images: no change);
- on a failure: transient errors (connection, deadlock) retry the batch after a
  backoff; other errors split the batch to find the failing keys, which retry with
  exponential backoff and after ``max_attempts`` go to the dead-letter stream with the
  error, without holding up other keys;
- on taking a partition (a lease with a TTL, renewed; partitions are shared fairly
  between live workers): claims every pending record of the group (XAUTOCLAIM), i.e.
  those of a dead worker, and replays them in order before reading new ones.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .backends.base import BackendError
from .codec import CodecError, pack, unpack
from .entity import EntitySpec
from .write_behind import GROUP, WriteBehind, redis_errors, stream_id, write_behind_for

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger("sa_cache")

FENCE = sa.Table(
    "sa_cache_write_behind_fence",
    sa.MetaData(),
    sa.Column("stream", sa.String(191), primary_key=True),
    sa.Column("token", sa.BigInteger, nullable=False),
)
"""One row per partition stream: the fencing token of its current owner."""

# KEYS: stream, entity keys; ARGV: group, n, n ids, then per key: expected, final, px
_FINALIZE = """local n = tonumber(ARGV[2])
if n > 0 then
  local ids = {}
  for i = 1, n do ids[i] = ARGV[2 + i] end
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
local a = 3 + n
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[a] then
    if ARGV[a + 1] == '' then redis.call('DEL', KEYS[i])
    elseif ARGV[a + 2] == '' then redis.call('SET', KEYS[i], ARGV[a + 1])
    else redis.call('SET', KEYS[i], ARGV[a + 1], 'PX', ARGV[a + 2]) end
  end
  a = a + 3
end
return 1"""
# KEYS: lease, stream; ARGV: me, ttl ms, group, count. Only the lease holder reads, so a
# worker that lost its partition cannot take records out of the new owner's order.
_READ = """if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local r = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[1], 'COUNT', ARGV[4],
  'STREAMS', KEYS[2], '>')
if not r then return {1} end
return {1, r}"""
_RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Settings of one `WriteBehindWorker`."""

    batch_size: int = 500
    """Keys per database transaction at most."""

    max_delay: float = 0.2
    """Seconds a ready change may wait for its batch to fill."""

    max_attempts: int = 5
    """Failed applications of a key before it goes to the dead-letter stream."""

    backoff: float = 0.5
    """Seconds before the first retry; doubled per attempt up to ``max_backoff``."""

    max_backoff: float = 30.0
    """Upper bound of the retry delay."""

    lease_ttl: float = 10.0
    """Seconds a partition stays owned by a worker that stopped renewing its lease."""

    poll_interval: float = 0.05
    """Seconds to sleep when no partition had anything to read."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_delay", "backoff", "max_backoff", "lease_ttl", "poll_interval"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be seconds >= 0, got {value!r}")


class Fenced(Exception):
    """Newer owners of these partitions exist: this worker must drop them."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"partitions {partitions} have a newer owner")
        self.partitions = partitions


# -- SQL ------------------------------------------------------------------------------


def _upsert(spec: EntitySpec, dialect: str) -> Any:
    table: Any = spec.mapper.local_table
    cols = [c for c in spec.columns if not c.primary_key]
    pk = list(spec.mapper.primary_key)
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        module: Any = postgresql if dialect == "postgresql" else sqlite
        stmt = module.insert(table)
        if not cols:
            return stmt.on_conflict_do_nothing(index_elements=pk)
        return stmt.on_conflict_do_update(
            index_elements=pk, set_={c.name: stmt.excluded[c.key] for c in cols}
        )
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        stmt = mysql.insert(table)
        return stmt.on_duplicate_key_update(
            {c.name: stmt.inserted[str(c.key)] for c in (cols or pk[:1])}
        )
    return None


def apply_rows(
    conn: Connection, spec: EntitySpec, rows: Sequence[tuple[Sequence[Any], Sequence[Any] | None]]
) -> None:
    """Write ``rows`` — (primary key, full image or None to delete) — with executemany."""
    keys = [str(c.key) for c in spec.columns]
    pk_cols = list(spec.mapper.primary_key)
    upserts = [dict(zip(keys, image, strict=True)) for _, image in rows if image is not None]
    deletes = [{f"pk{i}": v for i, v in enumerate(pk)} for pk, image in rows if image is None]
    table: Any = spec.mapper.local_table
    match = sa.and_(*(c == sa.bindparam(f"pk{i}") for i, c in enumerate(pk_cols)))
    if upserts:
        stmt = _upsert(spec, conn.dialect.name)
        if stmt is None:  # no upsert in this dialect: delete, then insert
            params = [{f"pk{i}": r[str(c.key)] for i, c in enumerate(pk_cols)} for r in upserts]
            conn.execute(table.delete().where(match), params)
            stmt = table.insert()
        conn.execute(stmt, upserts)
    if deletes:
        conn.execute(table.delete().where(match), deletes)


def ensure_fence_table(engine: Engine) -> None:
    """Create the fencing-token table if it is missing."""
    FENCE.create(engine, checkfirst=True)


# -- per-partition state ----------------------------------------------------------------


class _Slot:
    """The coalesced changes of one key waiting to be applied."""

    __slots__ = (
        "attempts",
        "entry",
        "error",
        "first",
        "ids",
        "image",
        "key",
        "not_before",
        "pk",
        "spec",
        "table",
    )

    def __init__(self, key: str, table: str, first: str) -> None:
        self.key = key
        self.table = table
        self.first = first
        self.spec: EntitySpec | None = None
        self.image: list[Any] | None = None
        self.pk: list[Any] = []
        self.entry = b""
        self.ids: list[str] = []  # stream records that are done once this key is applied
        self.attempts = 0
        self.not_before = 0.0
        self.error = ""

    @property
    def cancelled(self) -> bool:
        return self.first == "i" and self.image is None


class _Partition:
    __slots__ = (
        "acks",
        "finals",
        "index",
        "outages",
        "prepared",
        "ready",
        "ready_since",
        "refs",
        "retry_at",
        "stream",
        "token",
    )

    def __init__(self, index: int, stream: str, token: int) -> None:
        self.index = index
        self.stream = stream
        self.token = token
        self.prepared: dict[str, list[tuple[str, Any]]] = {}  # tx -> [(record id, change)]
        self.ready: dict[str, _Slot] = {}
        self.ready_since: float | None = None
        self.refs: dict[str, int] = {}  # record id -> changes not yet done
        self.acks: list[str] = []  # done records not yet acknowledged
        self.finals: list[tuple[str, bytes, bytes, str]] = []  # cache entries to finalize
        self.retry_at = 0.0  # whole-partition backoff while the database is unavailable
        self.outages = 0  # consecutive batches that failed that way


class WriteBehindWorker:
    """Applies the write-behind queue of ``cache`` to ``engine``.

    ``run()`` loops until ``stop`` is set (SIGTERM in the CLI: it applies what it has
    read, releases its partitions and returns) or, with ``drain=True``, until the whole
    queue is empty. Several workers may run at once; each partition has one owner.
    """

    def __init__(
        self,
        cache: Cache,
        engine: Engine,
        config: WorkerConfig | None = None,
        *,
        consumer: str | None = None,
        **settings: Any,
    ) -> None:
        if config is not None and settings:
            raise TypeError("pass either config= or keyword settings, not both")
        known = {f.name for f in dataclasses.fields(WorkerConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown worker setting(s) {', '.join(unknown)}")
        self.config = config if config is not None else WorkerConfig(**settings)
        self.cache = cache
        self.engine = engine
        self.queue: WriteBehind = write_behind_for(cache)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.specs = {s.table: s for s in cache.entities.values() if s.write == "behind"}
        self.parts: dict[int, _Partition] = {}
        self.applied = 0
        self.dead = 0
        self._next_lease = 0.0
        self._started = False
        self._offset = secrets.randbelow(self.queue.config.partitions)

    # -- the loop -------------------------------------------------------------------------

    def start(self) -> None:
        """Check durability, create the fence table; `run` calls it."""
        if not self._started:
            self.queue.check_durability()
            ensure_fence_table(self.engine)
            self._started = True

    def run(
        self,
        stop: threading.Event | None = None,
        drain: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Apply the queue until ``stop`` is set or (``drain``) it is empty."""
        stop = stop or threading.Event()
        self.start()
        try:
            while not stop.is_set():
                before = self.applied
                try:
                    busy = self.step(force=drain)
                    if drain and not busy and self.idle() and not self.queue.pending():
                        break
                except (BackendError, sa.exc.SQLAlchemyError) as exc:
                    # Redis (or the database) failed mid-step: rebuild from the stream.
                    log.warning("sa_cache: worker %s: %s; starting over", self.consumer, exc)
                    for index in list(self.parts):
                        self._drop(index)
                    stop.wait(min(self.config.max_backoff, max(self.config.backoff, 0.1)))
                    continue
                if progress is not None and self.applied != before:
                    progress(self.applied - before)
                if not busy:
                    stop.wait(self.config.poll_interval)
            self.step(force=True, read=False)  # apply what was read, then let go
        except (BackendError, sa.exc.SQLAlchemyError) as exc:
            log.warning(
                "sa_cache: worker %s stopped with %s; the rest stays queued", self.consumer, exc
            )
        finally:
            self.close()

    def idle(self) -> bool:
        """True when this worker holds nothing it has read and not finished."""
        return not any(p.ready or p.prepared or p.acks or p.finals for p in self.parts.values())

    def step(self, force: bool = False, read: bool = True) -> bool:
        """One round: leases, reads, timeouts, due batches. True if anything happened."""
        now = time.monotonic()
        if read and now >= self._next_lease:
            self._leases()
            self._next_lease = now + max(self.config.lease_ttl / 3, 0.01)
        got = self._read() if read else 0
        for part in list(self.parts.values()):
            self._expire_prepared(part)
        done = self._apply_due(force)
        self._flush_acks()
        return bool(got or done)

    def close(self) -> None:
        """Release every partition and leave the worker registry."""
        client = self.queue.client
        for index in list(self.parts):
            self._drop(index)
        try:
            with redis_errors("release"):
                client.zrem(self.queue.workers_key, self.consumer)
        except BackendError:
            pass

    # -- leases -----------------------------------------------------------------------------

    def _lease_key(self, index: int) -> str:
        return f"{self.queue.stream(index)}:lease"

    def _leases(self) -> None:
        client, ttl_ms = self.queue.client, max(1, int(self.config.lease_ttl * 1000))
        n = self.queue.config.partitions
        try:
            with redis_errors("lease"):
                pipe = client.pipeline(transaction=False)
                now = time.time()
                pipe.zadd(self.queue.workers_key, {self.consumer: now + self.config.lease_ttl})
                pipe.zremrangebyscore(self.queue.workers_key, "-inf", now)
                pipe.zcard(self.queue.workers_key)
                live = pipe.execute()[-1]  # owned leases are renewed by every read (_READ)
                share = math.ceil(n / max(1, int(live)))
                for index in sorted(self.parts, reverse=True)[: max(0, len(self.parts) - share)]:
                    self._drop(index)  # more than a fair share: let another worker have it
                for step in range(n):
                    if len(self.parts) >= share:
                        break
                    index = (self._offset + step) % n
                    if index not in self.parts and client.set(
                        self._lease_key(index), self.consumer, nx=True, px=ttl_ms
                    ):
                        self._take(index)
        except (BackendError, sa.exc.SQLAlchemyError) as exc:
            log.warning("sa_cache: worker %s: lease round failed: %s", self.consumer, exc)

    def _take(self, index: int) -> None:
        """Own partition ``index``: new fencing token, group, claim every pending record."""
        client, stream = self.queue.client, self.queue.stream(index)
        try:
            token = int(client.incr(f"{stream}:fence"))
            with self.engine.begin() as conn:
                query = sa.select(FENCE.c.token).where(FENCE.c.stream == stream)
                stored = conn.execute(query).scalar()
                if stored is None:
                    conn.execute(FENCE.insert(), {"stream": stream, "token": 0})
                    stored = 0
            if stored >= token:  # Redis lost its counter (no AOF): move past the database
                token = int(client.incrby(f"{stream}:fence", stored - token + 1))
            try:
                client.execute_command("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")
            except Exception as exc:
                if "BUSYGROUP" not in str(exc):  # BUSYGROUP: it exists already
                    raise
            part = _Partition(index, stream, token)
            claimed = self._claim(part)
            self._forget_dead_consumers(stream)
        except BaseException:
            self._drop(index)
            raise
        self.parts[index] = part
        if claimed:
            log.info("sa_cache: worker %s claimed %d records", self.consumer, claimed)
            self.cache.stats.incr("write_behind.claimed", claimed)

    def _claim(self, part: _Partition) -> int:
        """XAUTOCLAIM every pending record of the group (a previous owner's), in order."""
        cursor, claimed = "0-0", 0
        while True:
            cursor_raw, entries, *rest = self.queue.client.execute_command(
                "XAUTOCLAIM", part.stream, GROUP, self.consumer, 0, cursor, "COUNT", 500
            )
            for entry_id, fields in entries:
                if fields is not None:
                    self._feed(part, entry_id.decode(), _fields(fields))
                    claimed += 1
            part.acks += [gone.decode() for gone in (rest[0] if rest else [])]
            cursor = cursor_raw.decode() if isinstance(cursor_raw, bytes) else str(cursor_raw)
            if cursor == "0-0":
                return claimed

    def _forget_dead_consumers(self, stream: str) -> None:
        client = self.queue.client
        idle_ms = self.config.lease_ttl * 1000
        for consumer in client.xinfo_consumers(stream, GROUP):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if name != self.consumer and not consumer["pending"] and consumer["idle"] > idle_ms:
                client.xgroup_delconsumer(stream, GROUP, name)

    def _drop(self, index: int) -> None:
        """Give partition ``index`` up; what it read stays pending for the next owner."""
        part = self.parts.pop(index, None)
        if part is not None:
            self._flush_acks(part)
        try:
            with redis_errors("release"):
                self.queue.client.execute_command(
                    "EVAL", _RELEASE, 1, self._lease_key(index), self.consumer
                )
        except BackendError:
            pass

    # -- reading ------------------------------------------------------------------------------

    def _read(self) -> int:
        if not self.parts:
            return 0
        owned = sorted(self.parts)
        ttl_ms = max(1, int(self.config.lease_ttl * 1000))
        pipe = self.queue.client.pipeline(transaction=False)
        for index in owned:
            keys = (self._lease_key(index), self.parts[index].stream)
            args = (self.consumer, ttl_ms, GROUP, self.config.batch_size)
            pipe.execute_command("EVAL", _READ, 2, *keys, *args)
        try:
            with redis_errors("XREADGROUP"):
                results = pipe.execute(raise_on_error=False)
        except BackendError as exc:
            log.warning("sa_cache: worker %s: read failed: %s", self.consumer, exc)
            return 0
        got = 0
        for index, result in zip(owned, results, strict=True):
            part = self.parts.get(index)
            if part is None:
                continue
            if isinstance(result, BaseException) or not result[0]:
                if not isinstance(result, BaseException) or "NOGROUP" in str(result):
                    log.warning("sa_cache: worker %s lost partition %d", self.consumer, index)
                    self._drop(index)  # lease gone (or stream deleted): take it again later
                continue
            for _, entries in result[1] if len(result) > 1 else []:
                for entry_id, flat in entries:
                    fields = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
                    self._feed(part, entry_id.decode(), fields)
                    got += 1
        return got

    def _feed(self, part: _Partition, entry_id: str, fields: dict[str, bytes]) -> None:
        """One record, in stream order."""
        kind, tx = fields.get("t", b"").decode(), fields.get("x", b"").decode()
        if kind == "p":
            try:
                table, key, first, entry, pk = unpack(fields["c"])
                change = (table, key, first, entry, list(pk), _image_of(entry))
            except (CodecError, KeyError, TypeError, ValueError) as exc:
                self._dead(part, entry_id, None, f"corrupt prepare record: {exc!r}")
                return
            part.prepared.setdefault(tx, []).append((entry_id, change))
            part.refs[entry_id] = 1
        elif kind == "c" and tx in part.prepared:
            prepared = part.prepared.pop(tx)
            part.refs[entry_id] = len(prepared)
            for prepare_id, (table, key, first, entry, pk, image) in prepared:
                slot = part.ready.get(key)
                if slot is None:
                    slot = part.ready[key] = _Slot(key, table, first)
                slot.spec = self.specs.get(table)
                slot.image, slot.pk, slot.entry = image, pk, entry
                slot.ids += [prepare_id, entry_id]
                slot.attempts, slot.not_before = 0, 0.0
            if part.ready_since is None:
                part.ready_since = time.monotonic()
        elif kind == "a" and tx in part.prepared:
            for prepare_id, _ in part.prepared.pop(tx):
                part.refs.pop(prepare_id, None)
                part.acks.append(prepare_id)
            part.acks.append(entry_id)
        else:  # a commit/abort of a transaction already dead-lettered, or unknown
            part.acks.append(entry_id)

    def _done(self, part: _Partition, ids: list[str]) -> None:
        for entry_id in ids:
            left = part.refs.get(entry_id, 1) - 1
            if left > 0:
                part.refs[entry_id] = left
            else:
                part.refs.pop(entry_id, None)
                part.acks.append(entry_id)

    def _expire_prepared(self, part: _Partition) -> None:
        """Dead-letter prepared changes whose producer never said commit or abort."""
        limit_ms = (time.time() - self.queue.config.prepare_timeout) * 1000
        for tx, prepared in list(part.prepared.items()):
            if stream_id(prepared[0][0])[0] >= limit_ms:
                continue
            del part.prepared[tx]
            error = (
                "outcome unknown: the producer stopped between queueing and confirming "
                "its commit; check the database before replaying"
            )
            for prepare_id, (table, key, first, entry, pk, image) in prepared:
                slot = _Slot(key, table, first)
                slot.image, slot.pk, slot.entry, slot.error = image, pk, entry, error
                self._dead(part, prepare_id, slot, error, finalize=False)
                part.refs.pop(prepare_id, None)
                part.acks.append(prepare_id)

    # -- applying -------------------------------------------------------------------------

    def _apply_due(self, force: bool) -> int:
        """Once any partition is due (full, or waited ``max_delay``): apply the due keys
        of every partition, ``batch_size`` keys per database transaction."""
        now, cfg = time.monotonic(), self.config
        items: list[tuple[_Partition, _Slot]] = []
        trigger = force
        for part in self.parts.values():
            if not part.ready or now < part.retry_at or part.acks or part.finals:
                continue  # the last batch's acks must land first: a replay must not go back
            due = [s for s in part.ready.values() if s.not_before <= now]
            waited = part.ready_since is not None and now - part.ready_since >= cfg.max_delay
            trigger = trigger or (bool(due) and (waited or len(due) >= cfg.batch_size))
            items += [(part, slot) for slot in due]
        if not trigger or not items:
            return 0
        done = 0
        for start in range(0, len(items), cfg.batch_size):
            chunk = [
                (p, s) for p, s in items[start : start + cfg.batch_size] if p.index in self.parts
            ]
            done += self._apply(chunk) if chunk else 0
        for part in {id(p): p for p, _ in items}.values():
            part.ready_since = time.monotonic() if part.ready else None
        return done

    def _apply(self, items: list[tuple[_Partition, _Slot]]) -> int:
        """Apply ``items`` in one transaction; on an error of some rows, bisect."""
        live = [(p, s) for p, s in items if not s.cancelled]
        parts = list({id(p): p for p, _ in items}.values())
        try:
            gens = self._write(live) if live else {}
        except Fenced as exc:
            for index in exc.partitions:
                log.warning(
                    "sa_cache: worker %s: partition %d has a newer owner", self.consumer, index
                )
                self._drop(index)
            return 0
        except (sa.exc.SQLAlchemyError, BackendError, _Unknown) as exc:
            if self._transient(exc):
                for part in parts:
                    part.outages += 1
                    delay = self.config.backoff * 2 ** (part.outages - 1)
                    part.retry_at = time.monotonic() + min(self.config.max_backoff, delay)
                log.warning("sa_cache: worker %s: database unavailable (%s)", self.consumer, exc)
                return 0
            if len(items) > 1:  # find the failing rows; the others go through
                half = len(items) // 2
                return self._apply(items[:half]) + self._apply(items[half:])
            self._failed(*items[0], exc)
            return 0
        for part, slot in items:
            part.outages = 0
            del part.ready[slot.key]
            if slot.image is None or slot.cancelled:
                part.finals.append((slot.key, slot.entry, b"", ""))
            else:
                assert slot.spec is not None
                ttl = self.cache._ttl(slot.spec.ttl)
                final = self.cache.pack(slot.image, ttl, gens[slot.spec.table])
                px = "" if ttl is None else str(max(1, round(ttl * 1000)))
                part.finals.append((slot.key, slot.entry, final, px))
            self._done(part, slot.ids)
        if gens:  # the tables changed in the database: cached queries over them are stale
            self.cache.bump(sorted(gens))
        self.applied += len(items)
        self.cache.stats.incr("write_behind.applied", len(items))
        return len(items)

    def _write(self, items: list[tuple[_Partition, _Slot]]) -> dict[str, tuple[str, ...]]:
        """The database transaction of one batch; returns the generations read before it."""
        by_spec: dict[EntitySpec, list[tuple[list[Any], list[Any] | None]]] = {}
        for _, slot in items:
            if slot.spec is None:
                raise _Unknown(
                    f"table {slot.table!r} is not registered with write='behind' in this worker"
                )
            by_spec.setdefault(slot.spec, []).append((slot.pk, slot.image))
        gens: dict[str, tuple[str, ...]] = {}
        for spec in by_spec:
            keys = spec.gen_keys(self.cache)
            clock, *raws = self.cache.fetch([self.cache.clock_key, *keys])
            found = self.cache.ensure_generations(keys, raws, clock)
            gens[spec.table] = found if found is not None else ("-",)
        parts = list({p.index: p for p, _ in items}.values())
        with self.engine.begin() as conn:
            # One statement checks (and takes) every partition's fence: a newer owner's
            # token makes it match fewer rows, and the whole batch rolls back.
            mine = sa.or_(
                *(sa.and_(FENCE.c.stream == p.stream, FENCE.c.token <= p.token) for p in parts)
            )
            tokens = sa.case({p.stream: p.token for p in parts}, value=FENCE.c.stream)
            matched = conn.execute(FENCE.update().where(mine).values(token=tokens)).rowcount
            if matched != len(parts):
                query = sa.select(FENCE.c.stream, FENCE.c.token)
                held = dict(
                    conn.execute(query.where(FENCE.c.stream.in_([p.stream for p in parts]))).all()
                )
                lost = [p.index for p in parts if held.get(p.stream, p.token + 1) > p.token]
                raise Fenced(lost or [p.index for p in parts])
            for spec, rows in by_spec.items():
                apply_rows(conn, spec, rows)
        return gens

    def _transient(self, exc: BaseException) -> bool:
        """A failure of the database rather than of these rows: lost connection, or the
        database does not answer a trivial query now (counted against no key)."""
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, sa.exc.DisconnectionError):
            return True
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.select(1))
        except sa.exc.SQLAlchemyError:
            return True
        return False

    def _failed(self, part: _Partition, slot: _Slot, exc: BaseException) -> None:
        slot.attempts += 1
        slot.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
        if slot.attempts >= self.config.max_attempts:
            del part.ready[slot.key]
            self._dead(part, None, slot, slot.error)
            self._done(part, slot.ids)
            return
        delay = min(self.config.max_backoff, self.config.backoff * 2 ** (slot.attempts - 1))
        slot.not_before = time.monotonic() + delay
        log.warning(
            "sa_cache: write-behind of %s failed (attempt %d/%d, retry in %.2f s): %s",
            slot.key, slot.attempts, self.config.max_attempts, delay, slot.error,
        )  # fmt: skip

    def _dead(
        self,
        part: _Partition,
        record: str | None,
        slot: _Slot | None,
        error: str,
        finalize: bool = True,
    ) -> None:
        """Move a change (or a corrupt record) to the dead-letter stream."""
        fields: dict[str, Any] = {"partition": part.index, "error": error, "op": "?"}
        fields.update(table="", key="", entry=b"", pk=pack([]), attempts=0)
        if slot is not None:
            fields.update(table=slot.table, key=slot.key, op=slot.first, entry=slot.entry)
            fields.update(pk=pack(slot.pk), attempts=slot.attempts)
            if finalize:  # the queued cache entry claims a row the database will not have
                part.finals.append((slot.key, slot.entry, b"", ""))
        with redis_errors("dead letter"):
            self.queue.client.xadd(self.queue.dead_key, fields)
        if record is not None and slot is None:
            part.refs.pop(record, None)
            part.acks.append(record)
        self.dead += 1
        self.cache.stats.incr("write_behind.dead_letter")
        log.error(
            "sa_cache: write-behind change %s dead-lettered: %s",
            slot.key if slot else record,
            error,
        )

    def _flush_acks(self, only: _Partition | None = None) -> None:
        """XACK + XDEL done records and finalize cache entries: one script per partition,
        all in one pipeline."""
        parts = [only] if only is not None else list(self.parts.values())
        while True:
            pending = [p for p in parts if p.acks or p.finals]
            if not pending:
                return
            pipe = self.queue.client.pipeline(transaction=False)
            sizes = []
            for part in pending:
                acks, finals = part.acks[:1000], part.finals[:500]
                keys = [part.stream, *(f[0] for f in finals)]
                args: list[Any] = [GROUP, len(acks), *acks]
                for _, expected, final, px in finals:
                    args += [expected, final, px]
                pipe.execute_command("EVAL", _FINALIZE, len(keys), *keys, *args)
                sizes.append((len(acks), len(finals)))
            try:
                with redis_errors("ack"):
                    results = pipe.execute(raise_on_error=False)
            except BackendError as exc:
                log.warning("sa_cache: worker %s: ack failed (%s); retrying", self.consumer, exc)
                return
            for part, (n_acks, n_finals), result in zip(pending, sizes, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("sa_cache: worker %s: ack failed (%s)", self.consumer, result)
                    parts = [p for p in parts if p is not part]
                    continue
                del part.acks[:n_acks]
                del part.finals[:n_finals]


class _Unknown(Exception):
    """A change this worker cannot apply (its model is not registered here)."""


def _fields(raw: dict[bytes, bytes]) -> dict[str, bytes]:
    return {k.decode(): v for k, v in raw.items()}


def _image_of(entry: bytes) -> list[Any] | None:
    from .codec import decode

    value = decode(entry).value
    return None if value is None else list(value)
