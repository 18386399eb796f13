"""The write-behind worker: applies queued changes to the database in batches.

``WriteBehindWorker(cache, engine).run()`` (or ``sa-cache worker --app module:cache``).
The queue and its records are described in `write_behind`. Per partition it owns:

- reads records in order (XREADGROUP); a transaction's prepared images become ready
  when its commit record arrives, in commit-record order; an abort record drops them
  (even one read before them); prepared images without either are dead-lettered once
  the partition was read to its end ``prepare_timeout`` after them (a backlog is
  read first). Once caught up with the streams it lets records gather until the next
  batch is due (at most ``poll_interval`` and ``max_delay``) rather than read again;
- coalesces ready changes by row (`write_behind_coalesce`: the last image wins; an
  insert whose last change is a delete cancels out unless it may have been applied
  already) and applies a batch when it holds
  ``batch_size`` rows or its oldest change waited ``max_delay`` (at once while a
  `WriteBehind.flush` waits): one database transaction with the dialect's upsert and
  the partition's fencing token checked, then one script that acknowledges the records
  and turns the queued cache entries into ordinary ones (`write_behind_apply`);
- on a failure (`write_behind_batches`): transient errors (connection, lock wait
  timeout, deadlock, serialization failure) retry the batch after a backoff, counted
  against no key; other errors split the batch to find the failing keys, which retry
  with exponential backoff and after ``max_attempts`` go to the dead-letter stream
  with the error (`write_behind_dead`), without holding up other keys;
- on taking a partition (a lease with a TTL, renewed; partitions are shared fairly
  between live workers, see `write_behind_leases`): claims every pending record of the
  group (XAUTOCLAIM), i.e. those of a dead worker, and replays them in order before
  reading new ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .backends.base import BackendError
from .write_behind import WriteBehind, write_behind_for
from .write_behind_apply import apply_rows
from .write_behind_batches import Batches
from .write_behind_coalesce import Partition
from .write_behind_config import WorkerConfig
from .write_behind_fence import FENCE, Fenced, ensure_fence_table, fence_token
from .write_behind_leases import Leases
from .write_behind_records import redis_errors

if TYPE_CHECKING:
    from .cache import Cache

__all__ = [
    "FENCE",
    "Fenced",
    "WorkerConfig",
    "WriteBehindWorker",
    "apply_rows",
    "ensure_fence_table",
]

log = logging.getLogger("sa_cache")


DRAIN_ATTEMPTS = 10
"""Steps in a row that may fail (each after a backoff) before a drain gives up."""


class WriteBehindWorker(Batches):
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
        self.parts: dict[int, Partition] = {}
        self.applied = 0
        self.dead = 0
        self._next_lease = 0.0
        self._started = False
        self._offset = secrets.randbelow(self.queue.config.partitions)
        self.leases = Leases(self.queue, self.consumer, self.config.lease_ttl)
        self._behind = False  # the last read filled a batch: the streams hold more
        self._flushing = False  # someone waits in WriteBehind.flush: apply at once
        self._next_gc = 0.0  # when to forget old sync markers next (unix time)
        self._fk_waits = {}  # see `Batches._waits_for_reference`
        self._versions = []  # see `Batches._live`

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
        """Apply the queue until ``stop`` is set or (``drain``) it is empty. A drain raises
        the store's (or database's) error once `DRAIN_ATTEMPTS` steps in a row failed."""
        stop = stop or threading.Event()
        self.start()
        failures = 0  # in a row
        try:
            while not stop.is_set():
                before = self.applied
                try:
                    busy = self.step(force=drain)
                    if drain and not busy and self.idle() and not self.queue.pending():
                        break
                    failures = 0
                except (BackendError, sa.exc.SQLAlchemyError) as exc:
                    failures += 1
                    if drain and failures >= DRAIN_ATTEMPTS:
                        raise  # (a drain is a step before a migration: say it failed)
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
                elif not self._behind:  # caught up with the streams: let records gather
                    stop.wait(self._pause())
            self.step(force=True, read=False)  # apply what was read, then let go
        except (BackendError, sa.exc.SQLAlchemyError) as exc:
            if drain:
                raise
            log.warning(
                "sa_cache: worker %s stopped with %s; the rest stays queued", self.consumer, exc
            )
        finally:
            self.close()

    def _pause(self) -> float:
        """Seconds to let records gather once caught up: until the next batch is due, at
        most ``poll_interval`` and ``max_delay`` (changes wait for their batch anyway;
        Redis is spared a read script per partition per step)."""
        if self._flushing:
            return 0.0
        now, wait = time.monotonic(), min(self.config.poll_interval, self.config.max_delay)
        for part in self.parts.values():
            if part.ready and part.ready_since is not None:
                wait = min(wait, part.ready_since + self.config.max_delay - now)
        return max(0.0, wait)

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
        if time.time() >= self._next_gc:
            self._drop_markers()
        done = self._apply_due(force or self._flushing)
        self._flush_acks()
        return bool(got or done)

    def close(self) -> None:
        """Release every partition and leave the worker registry."""
        for index in list(self.parts):
            self._drop(index)
        self.leases.leave()

    # -- leases (see write_behind_leases) --------------------------------------------------

    def _leases(self) -> None:
        n = self.queue.config.partitions
        try:
            with redis_errors("lease"):
                share = self.leases.fair_share()
                for index in sorted(self.parts, reverse=True)[: max(0, len(self.parts) - share)]:
                    self._drop(index)  # more than a fair share: let another worker have it
                for step in range(n):
                    if len(self.parts) >= share:
                        break
                    index = (self._offset + step) % n
                    if index not in self.parts and self.leases.acquire(index):
                        self._take(index)
        except (BackendError, sa.exc.SQLAlchemyError) as exc:
            log.warning("sa_cache: worker %s: lease round failed: %s", self.consumer, exc)

    def _take(self, index: int) -> None:
        """Own partition ``index``: new fencing token, group, claim every pending record."""
        stream = self.queue.stream(index)
        claimed = 0
        try:
            token = fence_token(self.queue.client, self.engine, stream)
            self.leases.join(stream)
            part = Partition(index, stream, token)
            for entry_id, fields in self.leases.claim(stream):
                if fields is None:  # deleted meanwhile: only to acknowledge
                    part.seen(entry_id)
                    part.acks.append(entry_id)
                else:
                    self._feed(part, entry_id, fields, claimed=True)
                    claimed += 1
            self.leases.forget_dead_consumers(stream)
        except BaseException:
            self._drop(index)
            raise
        self.parts[index] = part
        if claimed:
            log.info("sa_cache: worker %s claimed %d records", self.consumer, claimed)
            self.cache.stats.incr("write_behind.claimed", claimed)

    def _drop(self, index: int) -> None:
        """Give partition ``index`` up; what it read stays pending for the next owner."""
        part = self.parts.pop(index, None)
        if part is not None:
            self._flush_acks(part)
        self.leases.release(index)

    # -- reading ------------------------------------------------------------------------------

    def _read(self) -> int:
        self._behind = self._flushing = False
        if not self.parts:
            return 0
        owned = sorted(self.parts)
        started = time.time()  # a read that reaches the end has seen all appended before
        try:
            streams = [(i, self.parts[i].stream, self.parts[i].last_id) for i in owned]
            results, self._flushing = self.leases.read(streams, self.config.batch_size)
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
            if len(result) < 2:  # nothing new: read to the end
                part.caught_up_at = started
            redelivered = int(result[0]) == 2  # (a lost reply's): more may follow
            for _, entries in result[1] if len(result) > 1 else []:
                for entry_id, flat in entries:
                    if flat is None:  # (redelivered after a lost reply) deleted since
                        part.seen(entry_id.decode())
                        part.acks.append(entry_id.decode())
                        continue
                    fields = {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
                    self._feed(part, entry_id.decode(), fields)
                    got += 1
                # a full read: more may be waiting, read again at once
                if redelivered or len(entries) >= self.config.batch_size:
                    self._behind = True
                else:
                    part.caught_up_at = started
        return got

    def _feed(
        self, part: Partition, entry_id: str, fields: dict[str, bytes], claimed: bool = False
    ) -> None:
        """One record, in stream order; a corrupt one goes to the dead letters."""
        error = part.feed(entry_id, fields, self.specs, claimed)
        if error is not None:
            self._dead(part, entry_id, None, error)
