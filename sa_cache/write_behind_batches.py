"""The write-behind worker's batches: applying ready changes, failures, dead letters.

`Batches` is the half of `write_behind_worker.WriteBehindWorker` that works on what it
has read (`write_behind_coalesce`): expiring prepared changes whose producer never
confirmed them, applying due keys in database transactions (`write_behind_apply`),
bisecting a failed batch to find the failing keys (rows deleted early first, and what
their delete can reach held back while one of them fails: `write_behind_holds`),
retrying them with backoff and dead-lettering those that keep failing, acknowledging
done records.

Failures: a transient one (`write_behind_errors.is_transient`) backs the batch off,
counted against no key.
Any other error of a key (a constraint, a type its column refuses, a bug) is retried and
counted toward ``max_attempts``, never allowed to stop the worker: except a change that
does not fit the model (`write_behind_apply.Misfit`), dead-lettered at once, and a
foreign-key violation, retried uncounted for ``foreign_key_wait`` first: the row it
refers to may sit in another partition, applied later (its worker died; the lease
expires after ``lease_ttl``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .backends.base import BackendError
from .entity_types import changes_are_exact, checks_of
from .write_behind_apply import Misfit, UnknownTable, misfit, write_batch
from .write_behind_coalesce import Partition, Slot
from .write_behind_config import WorkerConfig
from .write_behind_dead import dead_letter_fields
from .write_behind_errors import is_foreign_key_violation, is_transient
from .write_behind_fence import Fenced, drop_markers
from .write_behind_finalize import finalize
from .write_behind_holds import bisection_order, hold_back, not_held
from .write_behind_order import foreign_key_reach
from .write_behind_records import partition_of_key, redis_errors
from .write_behind_versions import finals_of, live_versions

if TYPE_CHECKING:
    from .cache import Cache
    from .write_behind import WriteBehind

log = logging.getLogger("sa_cache")

TAINT = 5.0
"""Seconds after a row's change was dead-lettered (or an entry that may hold it was
dropped) during which images of the row made by producers may hold its values: their
entries are dropped once applied, not kept (clocks: keep hosts on NTP)."""


class Batches:
    """Applying what a worker read; mixed into `write_behind_worker.WriteBehindWorker`."""

    cache: Cache
    engine: Engine
    queue: WriteBehind
    config: WorkerConfig
    consumer: str
    parts: dict[int, Partition]
    applied: int
    dead: int
    _next_gc: float
    # rows retried for a foreign-key violation: their slot (a row taken again later
    # waits afresh) and when its first one was (monotonic clock)
    _fk_waits: dict[str, tuple[Slot, float]]
    _versions: list[Any]  # a registry to read the live key versions with, once made
    # tables whose images wait, in this round, for a row deleted early that failed
    # (`_hold`): until when (monotonic clock)
    _held: dict[Any, float]

    def _drop(self, index: int) -> None:
        raise NotImplementedError

    def _expire_prepared(self, part: Partition) -> None:
        """Dead-letter prepared changes whose producer never said commit or abort: only
        those older than ``prepare_timeout`` when the partition was last read to its end
        (a worker catching up on a backlog has not read their commit records yet)."""
        if part.caught_up_at is None:
            return
        limit_ms = (part.caught_up_at - self.queue.config.prepare_timeout) * 1000
        error = (
            "outcome unknown: the producer stopped between queueing and confirming "
            "its commit; check the database before replaying"
        )
        for slots in part.expired(limit_ms):
            for prepare_id, slot in slots:
                slot.error = error
                self._dead(part, prepare_id, slot, error, finalize=False)
                part.refs.pop(prepare_id, None)
                part.acks.append(prepare_id)

    def _drop_markers(self) -> None:
        """Forget sync markers (`write_behind_fence.mark_synced`) older than any image
        this worker may still apply: those made before them were all read by then."""
        timeout = self.queue.config.prepare_timeout
        self._next_gc = time.time() + max(timeout, 1.0)
        limits = {}
        for part in self.parts.values():
            if part.caught_up_at is None:
                continue
            held = [s.oldest for s in part.ready.values()]
            held += [c[6] for changes in part.prepared.values() for _, c in changes]
            limits[part.stream] = min([part.caught_up_at - timeout, *held])
        if limits:
            try:
                with self.engine.begin() as conn:
                    for stream, before in limits.items():
                        drop_markers(conn, stream, before)
            except sa.exc.SQLAlchemyError as exc:  # next time
                log.warning("sa_cache: worker %s: dropping sync markers: %s", self.consumer, exc)

    def _apply_due(self, force: bool) -> int:
        """Once any partition is due (full, or waited ``max_delay``): apply the due keys
        of every partition, ``batch_size`` keys per database transaction."""
        now, cfg = time.monotonic(), self.config
        items: list[tuple[Partition, Slot]] = []
        trigger = force
        for part in self.parts.values():
            due, ripe = part.due(now, cfg.max_delay, cfg.batch_size)
            trigger = trigger or ripe
            for slot in due:
                spec = slot.spec
                reason = (
                    None if spec is None or slot.cancelled else misfit(spec, slot.pk, slot.image)
                )
                if reason is None:
                    items.append((part, slot))
                else:  # (a record of code whose model had other columns)
                    self._failed(part, slot, Misfit(reason))
        if not trigger or not items:
            return 0
        items = bisection_order(items)
        self._held = {}
        done = 0
        for start in range(0, len(items), cfg.batch_size):
            chunk = [
                (p, s) for p, s in items[start : start + cfg.batch_size] if p.index in self.parts
            ]
            chunk = not_held(self._held, chunk)
            done += self._apply(chunk) if chunk else 0
        for part in {id(p): p for p, _ in items}.values():
            part.ready_since = time.monotonic() if part.ready else None
        return done

    def _stored_as_is(self, slot: Slot) -> bool:
        """Does the database give back ``slot``'s image as it is (`entity_types`)? If not
        (``Decimal("1.005")`` in a ``Numeric(10, 2)``, say), the queued entry is dropped
        once applied, instead of becoming the row's entry."""
        assert slot.spec is not None
        assert slot.image is not None
        checks = checks_of(slot.spec, self.engine.dialect.name)
        return changes_are_exact(slot.image, slot.spec.attr_keys, checks)

    def _tainted(self, part: Partition, slot: Slot) -> bool:
        """Was ``slot``'s image made while the row's entry could still hold a change
        that was dead-lettered (a later update merges over it, `write_behind_merge`)?"""
        until = part.tainted.get(slot.row)
        if until is None:
            return False
        if slot.created > until:
            del part.tainted[slot.row]
            return False
        part.tainted[slot.row] = max(until, time.time() + TAINT)  # its entry goes now
        return True

    def _apply(self, items: list[tuple[Partition, Slot]]) -> int:
        """Apply ``items`` in one transaction; on an error of some rows, bisect."""
        live = [(p, s) for p, s in items if not s.cancelled]
        parts = list({id(p): p for p, _ in items}.values())
        try:
            gens, skipped = write_batch(self.engine, self.cache, live) if live else ({}, set())
        except Fenced as exc:
            for index in exc.partitions:
                log.warning(
                    "sa_cache: worker %s: partition %d has a newer owner", self.consumer, index
                )
                self._drop(index)
            return 0
        except Exception as exc:  # whatever the error of some rows: find them, go on
            for _, slot in live:  # its COMMIT may have gone through all the same
                slot.maybe_applied = True
            database = isinstance(exc, (sa.exc.SQLAlchemyError, BackendError))
            if database and is_transient(self.engine, exc):
                for part in parts:
                    part.outages += 1
                    delay = self.config.backoff * 2 ** (part.outages - 1)
                    part.retry_at = time.monotonic() + min(self.config.max_backoff, delay)
                log.warning("sa_cache: worker %s: database unavailable (%s)", self.consumer, exc)
                return 0
            if len(items) > 1:  # find the failing rows; the others go through
                return self._bisect(items)
            if not database and not isinstance(exc, (UnknownTable, Misfit)):
                log.error(  # not a refusal by the database: say where it came from
                    "sa_cache: worker %s: unexpected error applying %s",
                    self.consumer, items[0][1].key, exc_info=exc,
                )  # fmt: skip
            self._failed(*items[0], exc)
            self._hold(*items[0])
            return 0
        waits, versions = self._fk_waits, self._live()
        for part, slot in items:
            part.outages = 0
            waits.pop(slot.row, None)
            if slot.single and len(slot.parts) > 1:  # one change done: on to the next
                part.done(slot.ids)
                slot.next_part()
                continue
            del part.ready[slot.row]
            dropped = slot.image is None or slot.cancelled or slot.row in skipped
            if slot.cols is not None and not dropped:  # the row as read back, if found
                image, kept = slot.stored, slot.stored is not None
            else:
                # an image the database stores otherwise, whose other columns are only
                # the producer's object's, or which may hold a dead-lettered change's
                # values: the next read loads what the database holds
                image = slot.image
                kept = not dropped and slot.whole and not self._tainted(part, slot)
                kept = kept and self._stored_as_is(slot)
            final, px = b"", ""
            if kept:
                assert slot.spec is not None
                ttl = self.cache._ttl(slot.spec.ttl)
                final = self.cache.pack(image, ttl, gens[slot.spec.table])
                px = "" if ttl is None else str(max(1, round(ttl * 1000)))
            part.finals += finals_of(slot.key, slot.entry, final, px, slot.writes, versions)
            part.done(slot.ids)
        # the tables changed in the database, and those its foreign-key actions changed
        # (CASCADE, SET NULL...): cached queries over them, and entries of the latter, are stale
        reach = foreign_key_reach(
            (s.spec, s.image, s.cols, s.renewed) for _, s in live if s.spec is not None
        )
        if gens or reach:
            self.cache.bump(sorted({*gens, *reach}))
        self.applied += len(items)
        self.cache.stats.incr("write_behind.applied", len(items))
        return len(items)

    def _bisect(self, items: list[tuple[Partition, Slot]]) -> int:
        """Apply the halves of ``items`` (in `write_behind_holds.bisection_order`) one
        after the other, the second without what the first held back (`_hold`)."""
        half = len(items) // 2
        done = self._apply(items[:half])
        rest = not_held(self._held, items[half:])
        return done + (self._apply(rest) if rest else 0)

    def _hold(self, part: Partition, slot: Slot) -> None:
        """``slot`` failed: if it stays to be retried, what its delete can reach waits
        for it (`write_behind_holds.hold_back`)."""
        if part.ready.get(slot.row) is slot:
            hold_back(self._held, slot, time.monotonic() + self.config.backoff)

    def _failed(self, part: Partition, slot: Slot, exc: BaseException) -> None:
        """``slot`` alone failed with ``exc``: retry it after a backoff, or, after
        ``max_attempts`` counted failures, dead-letter it (see the module's docstring)."""
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:2000]
        if is_foreign_key_violation(exc) and self._waits_for_reference(slot, error):
            return
        slot.attempts += 1
        slot.error = error
        if slot.attempts >= self.config.max_attempts or isinstance(exc, Misfit):  # (no retry)
            self._fk_waits.pop(slot.row, None)
            if len(slot.parts) > 1 and not slot.single:  # find the change that fails
                log.warning(
                    "sa_cache: write-behind of %s keeps failing; applying its %d changes "
                    "one at a time", slot.key, len(slot.parts),
                )  # fmt: skip
                slot.one_at_a_time()
                return
            part.tainted[slot.row] = time.time() + TAINT
            if len(slot.parts) > 1:  # this one alone; the entry belongs to later ones
                self._dead(part, None, slot, slot.error, finalize=False)
                part.done(slot.ids)
                slot.next_part()
                return
            del part.ready[slot.row]
            self._dead(part, None, slot, slot.error)
            part.done(slot.ids)
            return
        delay = min(self.config.max_backoff, self.config.backoff * 2 ** (slot.attempts - 1))
        slot.not_before = time.monotonic() + delay
        log.warning(
            "sa_cache: write-behind of %s failed (attempt %d/%d, retry in %.2f s): %s",
            slot.key, slot.attempts, self.config.max_attempts, delay, slot.error,
        )  # fmt: skip

    def _waits_for_reference(self, slot: Slot, error: str) -> bool:
        """A foreign-key violation of ``slot``: retry it, uncounted, until
        ``foreign_key_wait`` has passed since its first one (True), each time after half
        the time waited so far (from ``backoff`` to ``max_backoff``): soon after the row
        it needs arrives, with few retries while it does not."""
        now, cfg, waits = time.monotonic(), self.config, self._fk_waits
        held = waits.get(slot.row)
        if held is None or held[0] is not slot:
            for row, (other, _) in list(waits.items()):  # forget slots no longer held
                part = self.parts.get(partition_of_key(row))
                if part is None or part.ready.get(row) is not other:
                    del waits[row]
            held = waits[slot.row] = (slot, now)
        waited = now - held[1]
        if waited >= cfg.foreign_key_wait:
            return False  # from now on its failures count
        delay = min(cfg.max_backoff, max(cfg.backoff, waited / 2))
        slot.not_before, slot.error = now + delay, error
        self.cache.stats.incr("write_behind.foreign_key_wait")
        log.info(
            "sa_cache: write-behind of %s waits for a row it refers to (or that refers to "
            "it), retry in %.2f s, counted after %.0f s: %s",
            slot.key, delay, cfg.foreign_key_wait, error,
        )  # fmt: skip
        return True

    def _dead(
        self,
        part: Partition,
        record: str | None,
        slot: Slot | None,
        error: str,
        finalize: bool = True,
    ) -> None:
        """Move a change (or a corrupt record) to the dead-letter stream."""
        if slot is not None and finalize:  # the queued entry claims a row the database lacks
            part.finals += finals_of(slot.key, slot.entry, b"", "", slot.writes, self._live())
        with redis_errors("dead letter"):
            self.queue.client.xadd(self.queue.dead_key, dead_letter_fields(part.index, slot, error))
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

    def _live(self) -> tuple[str, ...]:
        """The live key versions (`write_behind_versions.live_versions`)."""
        return live_versions(self.cache, self._versions)

    def _flush_acks(self, only: Partition | None = None) -> None:
        """Acknowledge done records and finalize cache entries (see `finalize`)."""
        parts = [only] if only is not None else list(self.parts.values())
        finalize(self.queue.client, parts, self.consumer)
