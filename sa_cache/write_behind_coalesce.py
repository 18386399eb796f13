"""What a write-behind worker holds per partition: read records, coalesced by row.

Pure state, no I/O (the worker in `write_behind_worker` reads and writes): prepared
images wait for their transaction's commit record, then join the *ready* changes, one
`Slot` per row where the last image wins; the stream records behind a slot are done
(to acknowledge) once it is applied or dead-lettered. A row is its key without the key
version (`write_behind_versions.row_of`): during a rolling deploy old and new code
write one row under two keys, and its changes still apply in record order.

An abort record may precede its prepare records (the producer gave up on a prepare
that Redis ran late): its transaction is remembered so they are dropped when they
arrive. Prepared changes expire only once the partition was read to its end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from .codec import CodecError
from .entity import EntitySpec
from .write_behind_merge import overlay
from .write_behind_records import Prepared, read_record, stream_id
from .write_behind_versions import row_of, writes_of

Part = tuple[list[str], Prepared, dict[str, bytes]]
"""A committed change of a slot: its records, the change, and every key its commit
set with what it set there (`write_behind_versions.writes_of`)."""


class Slot:
    """The coalesced changes of one row waiting to be applied."""

    __slots__ = (
        "attempts",
        "cols",
        "created",
        "entry",
        "error",
        "first",
        "ids",
        "image",
        "key",
        "maybe_applied",
        "not_before",
        "parts",
        "pk",
        "renewed",
        "row",
        "single",
        "spec",
        "stored",
        "table",
        "times",
        "whole",
        "writes",
    )

    def __init__(self, key: str, table: str, first: str) -> None:
        self.key = key  # the key of the last change taken (its version's)
        self.row = row_of(key)
        self.table = table
        self.first = first
        self.spec: EntitySpec | None = None
        self.image: list[Any] | None = None
        self.cols: frozenset[int] | None = None  # the columns to write (None: all)
        # the image follows a delete of the row (in its transaction or an earlier one
        # coalesced here): the delete is applied first where it sets off ON DELETE actions
        self.renewed = False
        self.whole = True  # the image is the whole row (a partial one overlays the last)
        # an update of some columns: the row as the batch that applied it read it back
        self.stored: list[Any] | None = None
        self.pk: list[Any] = []
        self.entry = b""
        self.created = 0.0  # when the producer made the image (its clock)
        # per column written: when the producer made the change that set its value here
        # (the image coalesces changes of different times; sync marks compare per column)
        self.times: dict[int, float] = {}
        self.maybe_applied = False  # some image of it may be in the database already
        self.ids: list[str] = []  # stream records that are done once this key is applied
        self.attempts = 0
        self.not_before = 0.0
        self.error = ""
        # the committed changes behind it, each with its records, in commit order
        self.parts: list[Part] = []
        self.single = False  # applying them one at a time (a coalesced write failed)
        # every key the commits of its changes set (under any key version), with what
        # the last of them set there: what to take back once the row is applied
        self.writes: dict[str, bytes] = {}

    @property
    def cancelled(self) -> bool:
        """An insert deleted again before it was applied: nothing to write. Not when an
        image may be in the database already (a record redelivered after a worker died
        past its COMMIT, or a failed attempt whose COMMIT outcome is unknown): then the
        delete is applied (an idempotent DELETE by primary key)."""
        return self.first == "i" and self.image is None and not self.maybe_applied

    def misfits(self, change: Prepared) -> bool:
        """Would ``change``, an update of some columns, overlay an image of another
        shape (queued by code whose model of the table had other columns)? Then neither
        its columns nor the image's mean the same: they must not be mixed."""
        image, cols = change[5], change[7]
        return (
            cols is not None
            and image is not None
            and self.image is not None
            and len(image) != len(self.image)
        )

    def take(self, change: Prepared) -> None:
        """The next committed change of this row: the last image wins, but an update of
        some columns only replaces those (`write_behind_merge`); over an image of
        another shape (`misfits`: `add` never lets it come to that) it is taken alone."""
        _, key, first, entry, pk, image, created, cols, whole = change
        if image is not None and (first == "d" or (self.deleted and self.ids)):
            self.renewed = True
        elif image is None:
            self.renewed = False  # (a delete is applied as one anyway)
        if self.misfits(change):
            self.image = self.cols = None
        if cols is not None and image is not None and self.image is not None:
            if not whole:  # (nor is the result: its row changed outside the queue since)
                image = overlay(self.image, image, cols)
            self.times.update(dict.fromkeys(cols, created))
            cols = None if self.cols is None else self.cols | cols
        else:
            self.times = dict.fromkeys(range(len(image) if image is not None else 0), created)
        self.image, self.cols, self.whole = image, cols, whole
        self.key, self.pk, self.entry, self.created = key, pk, entry, created

    @property
    def deleted(self) -> bool:
        """Is the last change taken a delete (once one was taken: see `ids`)?"""
        return self.image is None

    @property
    def oldest(self) -> float:
        """When the oldest change still in this slot's write was made."""
        return min(self.times.values(), default=self.created)

    def add(self, change: Prepared, ids: list[str], writes: dict[str, bytes] | None = None) -> None:
        """A committed change, its records (prepare, commit) and the keys its commit
        set (`writes`; default: its own key with its entry). A change of another shape
        than the image it would overlay turns the slot to one change at a time."""
        writes = {change[1]: change[3]} if writes is None else writes
        self.parts.append((ids, change, writes))
        self.writes.update(writes)
        if self.single and len(self.parts) > 1:
            return
        if self.misfits(change):
            self.one_at_a_time()
            return
        self.take(change)
        self.ids += ids

    def one_at_a_time(self) -> None:
        """The coalesced write keeps failing, or its changes have images of different
        shapes (`misfits`): apply them one by one, so that only the one that cannot be
        applied is dead-lettered, not those before or after it."""
        self.single = True
        self._restart(self.parts)

    def next_part(self) -> None:
        """The current change (one at a time) is done: go on with the next one."""
        self._restart(self.parts[1:])

    def _restart(self, parts: list[Part]) -> None:
        self.parts, self.ids, self.times = [], [], {}
        self.image, self.cols, self.whole, self.renewed = None, None, True, False
        self.attempts, self.not_before, self.error = 0, 0.0, ""
        if parts:
            self.first = parts[0][1][2]
        for ids, change, writes in parts:
            self.add(change, ids, writes)


class Partition:
    """One owned partition stream: its fencing token and the records read from it."""

    __slots__ = (
        "aborted",
        "acks",
        "caught_up_at",
        "claimed",
        "fanned",
        "finals",
        "index",
        "last_id",
        "outages",
        "prepared",
        "ready",
        "ready_since",
        "refs",
        "retry_at",
        "stream",
        "tainted",
        "token",
    )

    def __init__(self, index: int, stream: str, token: int) -> None:
        self.index = index
        self.stream = stream
        self.token = token
        self.prepared: dict[str, list[tuple[str, Prepared]]] = {}  # tx -> [(id, change)]
        self.ready: dict[str, Slot] = {}  # by row (`write_behind_versions.row_of`)
        # prepare record id -> the other key versions its commit writes to
        self.fanned: dict[str, tuple[tuple[str, bool], ...]] = {}
        self.ready_since: float | None = None
        self.refs: dict[str, int] = {}  # record id -> changes not yet done
        self.acks: list[str] = []  # done records not yet acknowledged
        self.finals: list[tuple[str, bytes, bytes, str]] = []  # cache entries to finalize
        self.retry_at = 0.0  # whole-partition backoff while the database is unavailable
        self.outages = 0  # consecutive batches that failed that way
        # unix time before the last read that reached the end of the stream: every
        # record appended before it has been read (None: not yet, since taking it)
        self.caught_up_at: float | None = None
        self.claimed: set[str] = set()  # transactions with records redelivered to us
        self.aborted: dict[str, str] = {}  # tx -> abort record read before its prepares
        # rows with a dead-lettered change, and until when (unix time, producers' clocks)
        # an image of theirs may have been merged over it (see `Batches._final`)
        self.tainted: dict[str, float] = {}
        self.last_id = "0-0"  # the newest record read or claimed

    def seen(self, entry_id: str) -> None:
        """Note a record read or claimed (fed, or only to acknowledge)."""
        if _id_order(entry_id) > _id_order(self.last_id):
            self.last_id = entry_id

    def feed(
        self,
        entry_id: str,
        fields: Mapping[str, bytes],
        specs: Mapping[str, EntitySpec],
        claimed: bool = False,
    ) -> str | None:
        """One record, in stream order; the error if it is a corrupt prepare record.

        ``claimed``: the record was delivered before, to a worker that may have applied
        it (XAUTOCLAIM)."""
        self.seen(entry_id)
        kind, tx = fields.get("t", b"").decode(), fields.get("x", b"").decode()
        if claimed and kind in ("p", "c"):
            self.claimed.add(tx)
        if kind == "p":
            try:
                change, fanned = read_record(fields["c"])
            except (CodecError, KeyError, TypeError, ValueError) as exc:
                return f"corrupt prepare record: {exc!r}"
            if tx in self.aborted:  # aborted before it arrived: drop it
                self.acks.append(entry_id)
                return None
            self.prepared.setdefault(tx, []).append((entry_id, change))
            self.refs[entry_id] = 1
            if fanned:
                self.fanned[entry_id] = fanned
        elif kind == "c" and tx in self.prepared:
            self._committed(entry_id, tx, specs)
        elif kind == "a" and tx in self.prepared:
            self.claimed.discard(tx)
            for prepare_id, _ in self.prepared.pop(tx):
                self.refs.pop(prepare_id, None)
                self.fanned.pop(prepare_id, None)
                self.acks.append(prepare_id)
            self.acks.append(entry_id)
        elif kind == "a" and tx not in self.aborted:
            # before its prepare records (or they never come): remember the transaction
            # until they arrive or it is older than ``prepare_timeout`` (see `expired`)
            self.aborted[tx] = entry_id
            self.acks.append(entry_id)
        else:  # a commit/abort of a transaction already dead-lettered, or unknown
            self.claimed.discard(tx)
            self.acks.append(entry_id)
        return None

    def _committed(self, entry_id: str, tx: str, specs: Mapping[str, EntitySpec]) -> None:
        """The commit record ``entry_id`` of ``tx``: its prepared changes join the ready
        ones, each in its row's slot."""
        prepared = self.prepared.pop(tx)
        maybe_applied = tx in self.claimed
        self.claimed.discard(tx)
        self.refs[entry_id] = len(prepared)
        # a row's later record in one transaction replaces its earlier ones (a later
        # flush, or the image merged again at the commit): those are only acked
        superseded: dict[str, list[str]] = {}
        writes: dict[str, dict[str, bytes]] = {}  # what the commit set, by row
        last = {row_of(change[1]): prepare_id for prepare_id, change in prepared}
        own = {change[1] for _, change in prepared}
        for prepare_id, change in prepared:
            table, key, first = change[:3]
            row = row_of(key)
            fanned = self.fanned.pop(prepare_id, ())
            writes.setdefault(row, {}).update(writes_of(key, change[3], tx, fanned, own))
            if last[row] != prepare_id:
                superseded.setdefault(row, []).extend((prepare_id, entry_id))
                continue
            slot = self.ready.get(row)
            if slot is None:
                slot = self.ready[row] = Slot(key, table, first)
            slot.spec = specs.get(table)
            slot.add(change, [*superseded.pop(row, ()), prepare_id, entry_id], writes[row])
            slot.maybe_applied = slot.maybe_applied or maybe_applied
            # (a failing slot keeps its attempts and backoff: steady traffic on the
            # row must not keep it from being split and dead-lettered)
        if self.ready_since is None:
            self.ready_since = time.monotonic()

    def done(self, ids: list[str]) -> None:
        """A slot behind these records is finished: acknowledge those no other slot needs."""
        for entry_id in ids:
            left = self.refs.get(entry_id, 1) - 1
            if left > 0:
                self.refs[entry_id] = left
            else:
                self.refs.pop(entry_id, None)
                self.acks.append(entry_id)

    def expired(self, limit_ms: float) -> Iterator[list[tuple[str, Slot]]]:
        """Take out, transaction by transaction, prepared changes recorded before
        ``limit_ms`` that never got a commit or abort record (as slots to dead-letter),
        and let go of early abort records as old. Only for a partition read to its end
        after ``limit_ms`` + ``prepare_timeout`` (the worker's `caught_up_at`): a
        commit record written in time would have been read."""
        for tx, abort_id in list(self.aborted.items()):
            if stream_id(abort_id)[0] < limit_ms:
                del self.aborted[tx]
        for tx, prepared in list(self.prepared.items()):
            if stream_id(prepared[0][0])[0] >= limit_ms:
                continue
            del self.prepared[tx]
            self.claimed.discard(tx)
            out = []
            for prepare_id, change in prepared:
                self.fanned.pop(prepare_id, None)
                slot = Slot(change[1], change[0], change[2])
                slot.take(change)
                out.append((prepare_id, slot))
            yield out

    def due(self, now: float, max_delay: float, batch_size: int) -> tuple[list[Slot], bool]:
        """Ready slots out of their backoff, and whether they make a batch now (full, or
        waited ``max_delay``). Nothing while the last batch's acks are outstanding: a
        replay must never go back."""
        if not self.ready or now < self.retry_at or self.acks or self.finals:
            return [], False
        due = [s for s in self.ready.values() if s.not_before <= now]
        waited = self.ready_since is not None and now - self.ready_since >= max_delay
        return due, bool(due) and (waited or len(due) >= batch_size)


def _id_order(entry_id: str) -> tuple[int, int]:
    """A stream record id (``ms-seq``) as a tuple that sorts as the stream does."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
