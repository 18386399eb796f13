"""Write-behind for mapped entities: a durable queue on Redis Streams.

``cache.register(PageView, write="behind")``: committed inserts, updates and deletes of
such rows go to the entity cache and to a queue; a worker (`write_behind_worker`,
``sa-cache worker``) writes them to the database later, many per statement. This
module is the queue (its producer side, and the design below). The Session hooks are
`write_behind_session` and `write_behind_commit`; the worker is `write_behind_worker`,
whose docstring names its parts (leases, coalescing, batches, the batch transaction in
`write_behind_apply`, fencing and sync marks in `write_behind_fence`); the other
``write_behind_*`` modules each say what they hold (settings, record formats, Lua
scripts, backlog, dead letters, key versions).

**Out of the flush, yet persistent.** A ``before_flush`` hook takes each write-behind
object out of the unit of work: it records the object's full column image (Python
column defaults applied, as the INSERT would) in the transaction frame, then moves the
object as a flush would — pending to persistent (``Session._register_persistent``),
deleted (``Session._remove_newly_deleted``) — so it emits no SQL, sits in the identity
map like any flushed object, and a (SAVEPOINT) rollback restores it. Expired
attributes of such objects (after commit, ``refresh()``) load from the queued image,
not from the database that trails behind. Other models flush and commit as usual.

**Where the queue write happens.** Per partition, one *prepare* record ``p`` per row
(its image), then one *commit* record ``c`` per transaction:

1. ``before_commit`` of the outermost transaction, after its final flush and *before*
   the database COMMIT: the prepare records (those a later ``before_commit`` listener
   changes join them in the final flush). If Redis cannot take them, the images are
   written to the database in this very transaction (``on_queue_error="sync"``, the
   default), or the commit raises `WriteBehindUnavailable` and aborts them (``"raise"``).
2. After the COMMIT: one Lua script per partition appends the commit record and sets
   the queued images in the entity cache — atomically, so images reach the cache in
   commit-record order. A failed COMMIT appends an *abort* record ``a`` instead.
   Nothing reaches the cache before the COMMIT.

The worker applies prepared images only once their commit record is read, in
commit-record order, and drops them on an abort record, even one read before them (a
prepare that timed out may run late): a rolled-back transaction is never applied.
**The window** is between (1) and (2): if the process dies there, the prepared images
have neither record; once the worker has read their partition to its end
``prepare_timeout`` after them, it moves them to the dead-letter stream as "outcome
unknown", where an operator checks the database and replays them (``sa-cache worker
--replay``) — never lost, never applied blindly. The commit script refuses (2) once half
of ``prepare_timeout`` passed since the first prepare (Redis's clock): such a slow
producer, like one whose Redis fails between (1) and (2), writes the images to the
database synchronously before ``commit()`` returns, then aborts them in the queue; if
that write fails too, they stay prepared (outcome unknown). Under ``"raise"``, an abort
Redis cannot take either leaves a late prepare as such a dead letter, never applied.

**Synchronous writes** (the fallbacks above) mark each row in the fence table, in
their transaction (`write_behind_fence.mark_synced`); the worker skips images of that
row made before the mark, so an older queued image never overwrites them. Images are
ordered by their producers' clocks here: keep the hosts' clocks synchronised (NTP).

A transaction that did no database work (no connection: e.g. ``session.get`` from the
cache, change, commit) has no COMMIT that could fail: with ``"sync"`` its queue write
in ``before_commit`` *is* the commit — prepare and commit records and cache entries in
one script, one round trip (``"raise"`` keeps two steps: a write that timed out must be
undoable). Only if sa_cache's ``before_commit`` listener is the Session's last one: a
later one may still fail the commit, so then the transaction takes the two steps too.

**Order and idempotence.** A row's key hashes to one of ``partitions`` streams; its
entity entry carries the same hash tag, so the commit script touches one Cluster slot.
One worker at a time owns a partition (a lease; it reads only while it holds it) and
applies its records in order, with a fencing token checked in the batch's database
transaction, so a worker that lost its lease while paused cannot commit an older image
over a newer one. Images are full rows, or the changed columns of an update
(`write_behind_merge`): applying one again (after a crash before the acknowledgement)
changes nothing. A prepare record is acknowledged only once its row is
applied with that image or a later one, so a replay never goes back.

While an image is queued, its cache entry is marked queued (``meta["wb"]``) and has no
expiry: it *is* the row for ``session.get`` and primary-key selects, in every process
(a delete is a queued tombstone). Other queries on the table read the database, which
trails by the worker's delay; ``cache.write_behind.flush()`` waits until everything
queued so far is applied. The worker turns applied entries into ordinary ones.

Not supported on write-behind models (refused at `register`): keys generated by the
database, server-side defaults / computed columns, relationships; Redis is required
(``memory://`` is refused: no durable queue). Bulk DML on such a table bypasses the
queue: images still queued for the same rows are applied after it (an update's
columns only). Durability is
Redis's: run it with ``appendonly yes`` (a warning is logged when it is off).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import write_behind_backlog as backlog
from . import write_behind_dead as dead
from . import write_behind_merge as merging
from .backends.base import BackendError
from .backends.redis_direct import Direct
from .keys import digest
from .transaction import BehindChange
from .write_behind_config import QUEUE_ERRORS, WriteBehindConfig
from .write_behind_dead import DeadLetter
from .write_behind_records import (
    GROUP,
    PrepareFailed,
    Queued,
    WriteBehindUnavailable,
    confirm_by,
    partition_of_key,
    redis_errors,
    stream_id,
)
from .write_behind_scripts import COMMIT
from .write_behind_versions import Models, fan_out, fanned_keys, fanned_ttl

if TYPE_CHECKING:
    from .cache import Cache

__all__ = [
    "GROUP",
    "QUEUE_ERRORS",
    "DeadLetter",
    "PrepareFailed",
    "Queued",
    "WriteBehind",
    "WriteBehindConfig",
    "WriteBehindUnavailable",
    "partition_of_key",
    "partition_tag",
    "queue_of",
    "redis_errors",
    "stream_id",
    "write_behind_for",
]

log = logging.getLogger("sa_cache")


class WriteBehind:
    """The write-behind queue of one `Cache`: ``cache.write_behind``.

    Producers use it from the Session hooks; operators call `flush`, `pending`,
    `dead_letters` and `replay`; `write_behind_worker.WriteBehindWorker` consumes it.
    """

    def __init__(self, cache: Cache) -> None:
        self._cache = weakref.ref(cache)
        self.namespace = cache.namespace
        self.config = WriteBehindConfig()
        self.used = False
        # mappers registered with write="behind" (adding one publishes its table's shape)
        self.models: set[Any] = Models(self.cache)
        self.checked: set[Any] = set()  # ... whose relationships were checked
        self.onupdate: dict[Any, list[tuple[str, Any]]] = {}  # mapper: (attr, column)s
        self._checked_durability = False
        self.dead_key = f"{self.namespace}:wb:dead"
        self.workers_key = f"{self.namespace}:wb:workers"
        self.flush_key = f"{self.namespace}:wb:flush"  # exists while a flush() waits
        self._streams: dict[int, str] = {}
        self._direct: Direct | None = None

    @property
    def cache(self) -> Cache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the Cache of this write-behind queue is gone")
        return cache

    def configure(self, **settings: Any) -> WriteBehindConfig:
        """Replace settings (see `WriteBehindConfig`); only before the queue is used."""
        known = {f.name for f in dataclasses.fields(WriteBehindConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown write-behind setting(s) {', '.join(unknown)}")
        if (
            self.used
            and settings.get("partitions", self.config.partitions) != self.config.partitions
        ):
            raise RuntimeError("partitions cannot change once the queue is in use (drain first)")
        if settings.get("partitions", self.config.partitions) != self.config.partitions:
            for spec in self.cache._entities.values():  # (decorated ones: none made yet)
                spec.forget_keys()  # write-behind keys carry their partition's hash tag
        self.config = dataclasses.replace(self.config, **settings)
        return self.config

    # -- keys: every key of one partition shares its hash tag (one Cluster slot) ---------

    def tag(self, partition: int) -> str:
        return f"{{{self.namespace}:wb:{partition}}}"

    def stream(self, partition: int) -> str:
        found = self._streams.get(partition)
        if found is None:
            found = self._streams[partition] = f"{self.namespace}:wb:{self.tag(partition)}"
        return found

    def partition_of(self, table: str, text: str) -> int:
        return int(digest(f"{table}\0{text}")[:8], 16) % self.config.partitions

    @property
    def client(self) -> Any:
        """The redis-py client (``redis.Redis`` or ``RedisCluster``) of the cache's backend."""
        client = getattr(self.cache.backend, "client", None)
        if client is None:
            raise BackendError("write='behind' needs a Redis backend")
        return client

    def check_durability(self) -> bool:
        """Log a warning when a Redis server keeps no append-only file; True if all do."""
        self._checked_durability = True
        return backlog.check_durability(self)

    # -- producer ------------------------------------------------------------------------

    def prepare(
        self,
        changes: Sequence[BehindChange],
        commit: bool = False,
        into: Queued | None = None,
        seen: dict[str, bytes | None] | None = None,
    ) -> Queued:
        """Store the prepare records of one transaction, one per row (before its COMMIT).

        ``commit=True`` (a transaction with no database work, whose COMMIT cannot fail):
        prepare and commit records and the cached images in one step per partition.
        ``into``: more records of that (two-step) transaction. ``seen``: the entries the
        Session last saw of its rows, to merge updates over (`write_behind_merge`).
        Raises `PrepareFailed` (a `BackendError`) whose ``queued.partitions`` got their
        records (a timed-out command may still run later: see `abort`); TypeError for
        a value msgpack cannot encode.
        """
        self.used = True
        if not self._checked_durability:
            self.check_durability()
        queued = into if into is not None else Queued(secrets.token_hex(8), commit)
        now = time.time()
        records: dict[int, list[bytes]] = {}
        for change in changes:  # one record per row: it is acknowledged when the row is done
            p = partition_of_key(change.key)
            guess = merging.first_guess(change, seen)
            fanned = fan_out(self.cache, change.spec, change.key)
            entry, record, expected = merging.build(queued, change, now, guess, True, fanned)
            queued.fanned.setdefault(p, []).append(fanned)
            queued.changes.setdefault(p, []).append(change)
            queued.entries.setdefault(p, []).append(entry)
            queued.expected.setdefault(p, []).append(expected)
            queued.made.setdefault(p, []).append(now)
            records.setdefault(p, []).append(record)
        order = sorted(records)
        done = set(queued.partitions)
        if commit:
            stored, error = merging.commit(self, queued, order, records)
            queued.partitions = sorted(done | set(stored))
            if error is not None:
                raise PrepareFailed(queued, error)
            return queued
        tx = queued.tx
        if len(order) == 1 and len(records[order[0]]) == 1:
            p = order[0]  # the common case: one command, no pipeline
            try:
                with redis_errors("prepare"):
                    record = records[p][0]
                    at = self.execute("XADD", self.stream(p), "*", "t", "p", "x", tx, "c", record)
            except BackendError as exc:
                raise PrepareFailed(queued, exc) from exc
            queued.since.setdefault(p, stream_id(at)[0])
            queued.partitions = sorted(done | {p})
            return queued
        pipe = self.client.pipeline(transaction=False)
        sent: list[int] = []
        for p in order:
            for record in records[p]:
                pipe.execute_command("XADD", self.stream(p), "*", "t", "p", "x", tx, "c", record)
                sent.append(p)
        try:
            with redis_errors("prepare"):
                results = pipe.execute(raise_on_error=False)
        except BackendError as exc:
            raise PrepareFailed(queued, exc) from exc
        errors = [r for r in results if isinstance(r, BaseException)]
        ok = [
            (p, r) for p, r in zip(sent, results, strict=True) if not isinstance(r, BaseException)
        ]
        for p, at in ok:  # (in stream order: a partition's first is its oldest)
            queued.since.setdefault(p, stream_id(at)[0])
        queued.partitions = sorted(done | {p for p, _ in ok})
        if errors:
            raise PrepareFailed(queued, errors[0])
        return queued

    def commit_script(
        self, pipe: Any, p: int, queued: Queued, records: Sequence[bytes], keys: Sequence[str]
    ) -> None:
        """Queue on ``pipe`` the commit script of partition ``p`` (see `write_behind_scripts`)."""
        pipe.execute_command("EVAL", COMMIT, *self.script_args(p, queued, records, keys))

    def script_args(
        self, p: int, queued: Queued, records: Sequence[bytes], keys: Sequence[str]
    ) -> list[Any]:
        expected = queued.expected.get(p, ())
        more, how = fanned_keys(queued.fanned.get(p, ()), keys)
        px = fanned_ttl(self.cache) if more else 0
        deadline = confirm_by(queued, p, self.config.prepare_timeout)
        return [1 + len(keys) + len(more), self.stream(p), *keys, *more, queued.tx,
                len(records), len(more), px, deadline, *records, *how, *queued.entries[p],
                *expected]  # fmt: skip

    def execute(self, *args: Any) -> Any:
        """One command, the shortest way redis-py allows (see `backends.redis_direct`)."""
        client, direct = self.client, self._direct
        if direct is None or direct.client is not client:
            direct = self._direct = Direct(client)
        return direct.execute(*args)

    def confirm(self, queued: Queued) -> None:
        """After the COMMIT: commit records, and the queued images into the entity cache
        (updates merged over the rows' entries as they are now)."""
        error = merging.commit(self, queued, queued.partitions, None)[1]
        if isinstance(error, BackendError):
            raise error
        if error is not None:
            raise BackendError(f"write-behind queue: confirm failed: {error!r}") from error

    def abort(self, queued: Queued) -> bool:
        """After a failed COMMIT: abort records, so the worker drops the prepared images.

        In every partition the transaction tried, stored or not: a prepare that timed
        out may still be run by Redis later (the worker honours an abort record read
        before the prepare records)."""
        partitions = sorted(queued.changes)
        if not partitions:
            return True
        pipe = self.client.pipeline(transaction=False)
        for partition in partitions:
            pipe.execute_command("XADD", self.stream(partition), "*", "t", "a", "x", queued.tx)
        try:
            with redis_errors("abort"):
                pipe.execute()
        except BackendError as exc:
            log.warning(
                "sa_cache: could not queue the abort of write-behind transaction %s (%s); "
                "the worker will dead-letter its changes as outcome unknown",
                queued.tx,
                exc,
            )
            return False
        return True

    # -- operators (see write_behind_backlog and write_behind_dead) ----------------------

    def pending(self) -> dict[int, int]:
        """Entries not yet applied per partition (delivered-but-unacked plus unread)."""
        return backlog.pending(self)

    def flush(self, timeout: float | None = 60.0, poll: float = 0.02) -> None:
        """Wait until every change queued so far is in the database (or dead-lettered).

        A worker must be running; while it waits, workers apply what they hold at once
        instead of letting batches fill for ``max_delay``. TimeoutError after ``timeout``
        seconds (None: forever).
        """
        backlog.flush(self, timeout, poll)

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters."""
        return dead.dead_letters(self, count)

    def replay(self, ids: Sequence[str] | None = None) -> int:
        """Queue dead letters again (all, or those ``ids``) as new committed changes.

        A replayed image is queued *after* everything already queued for its row, so it
        wins over them: check that it is still wanted. Returns how many were replayed.
        """
        return dead.replay(self, ids)


_queues: weakref.WeakKeyDictionary[Cache, WriteBehind] = weakref.WeakKeyDictionary()
_queues_lock = threading.Lock()


def write_behind_for(cache: Cache) -> WriteBehind:
    """The `WriteBehind` of ``cache`` (created once)."""
    found = _queues.get(cache)
    if found is None:
        with _queues_lock:
            found = _queues.get(cache)
            if found is None:
                found = _queues[cache] = WriteBehind(cache)
    return found


def partition_tag(cache: Cache, table: str, text: str) -> str:
    """The hash tag of the partition an entity key belongs to (see `EntitySpec.key`)."""
    wb = write_behind_for(cache)
    return wb.tag(wb.partition_of(table, text))


def queue_of(cache: Cache) -> WriteBehind | None:
    """The `WriteBehind` of ``cache`` if it has one (cheap: for the Session hooks)."""
    return _queues.get(cache)
