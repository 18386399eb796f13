"""What a write-behind worker holds per partition: read records, coalesced by key.

Pure state, no I/O (the worker in `write_behind_worker` reads and writes): prepared
images wait for their transaction's commit record, then join the *ready* changes, one
`Slot` per key where the last image wins; the stream records behind a slot are done
(to acknowledge) once it is applied or dead-lettered.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from .codec import CodecError
from .entity import EntitySpec
from .write_behind_records import read_prepare, stream_id

# A prepared change: table, key, first operation, queued entry, primary key, image.
Change = tuple[str, str, str, bytes, list[Any], list[Any] | None]


class Slot:
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


class Partition:
    """One owned partition stream: its fencing token and the records read from it."""

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
        self.prepared: dict[str, list[tuple[str, Change]]] = {}  # tx -> [(record id, change)]
        self.ready: dict[str, Slot] = {}
        self.ready_since: float | None = None
        self.refs: dict[str, int] = {}  # record id -> changes not yet done
        self.acks: list[str] = []  # done records not yet acknowledged
        self.finals: list[tuple[str, bytes, bytes, str]] = []  # cache entries to finalize
        self.retry_at = 0.0  # whole-partition backoff while the database is unavailable
        self.outages = 0  # consecutive batches that failed that way

    def feed(
        self, entry_id: str, fields: Mapping[str, bytes], specs: Mapping[str, EntitySpec]
    ) -> str | None:
        """One record, in stream order; the error if it is a corrupt prepare record."""
        kind, tx = fields.get("t", b"").decode(), fields.get("x", b"").decode()
        if kind == "p":
            try:
                change = read_prepare(fields["c"])
            except (CodecError, KeyError, TypeError, ValueError) as exc:
                return f"corrupt prepare record: {exc!r}"
            self.prepared.setdefault(tx, []).append((entry_id, change))
            self.refs[entry_id] = 1
        elif kind == "c" and tx in self.prepared:
            prepared = self.prepared.pop(tx)
            self.refs[entry_id] = len(prepared)
            for prepare_id, (table, key, first, entry, pk, image) in prepared:
                slot = self.ready.get(key)
                if slot is None:
                    slot = self.ready[key] = Slot(key, table, first)
                slot.spec = specs.get(table)
                slot.image, slot.pk, slot.entry = image, pk, entry
                slot.ids += [prepare_id, entry_id]
                slot.attempts, slot.not_before = 0, 0.0
            if self.ready_since is None:
                self.ready_since = time.monotonic()
        elif kind == "a" and tx in self.prepared:
            for prepare_id, _ in self.prepared.pop(tx):
                self.refs.pop(prepare_id, None)
                self.acks.append(prepare_id)
            self.acks.append(entry_id)
        else:  # a commit/abort of a transaction already dead-lettered, or unknown
            self.acks.append(entry_id)
        return None

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
        ``limit_ms`` that never got a commit or abort record (as slots to dead-letter)."""
        for tx, prepared in list(self.prepared.items()):
            if stream_id(prepared[0][0])[0] >= limit_ms:
                continue
            del self.prepared[tx]
            out = []
            for prepare_id, (table, key, first, entry, pk, image) in prepared:
                slot = Slot(key, table, first)
                slot.image, slot.pk, slot.entry = image, pk, entry
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
