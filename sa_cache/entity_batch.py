"""A flush's write-through images waiting for the store's view of their rows
(`FlushBatch`), and the checks that decide whether an image may be written: does the
entry (or an earlier flush's image) hold the row the object started from?

Used by `entity_writes.record_flush`; the commit writes what `FlushBatch.settle`
computed (`entity_writes.commit_writes`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from .backends.base import NO_VALUE, NoValue
from .codec import CodecError, Envelope, decode
from .codec_peek import holds
from .entity import LEASE_PREFIX, EntitySpec
from .entity_encoding import RowEncoder
from .tokens import TOMBSTONE_PREFIX, TOMBSTONE_TTL, new_nonce
from .transaction import NEVER, EntityChange

if TYPE_CHECKING:
    from .cache import Cache


_Row = tuple["EntityChange", EntitySpec, list[Any], Any, "EntityChange | None", tuple[int, ...]]
"""(change, spec, image, values before the flush, the earlier change of the row in the
transaction, positions whose old values do not matter: see `entity_writes`)"""


class FlushBatch:
    """The images one flush recorded, waiting for the store's view of their rows: the
    entries of rows written for the first time in the transaction, and the generations
    of their tables.

    At the flush (the rows are locked by then) each of those entries is swapped for a
    tombstone of this batch, in one round trip that also reads the generations; the
    reply is collected when the first image is needed, which settles them all, and the
    commit writes an image only over that tombstone. Until then readers miss (and read
    the database), and a writer whose flush comes after this transaction's COMMIT but
    before its images reach the store finds the tombstone, not the row it loaded: it
    invalidates instead of writing an image that lacks this change. A rollback puts
    back what the entries held (`restore`).

    ``every_row``: the flush was committed as it ran (an AUTOCOMMIT connection), and so
    was each earlier flush of the transaction, whose rows are no longer locked: the
    entries of rows written before are swapped again too, and an image is kept only if
    the entry still held what the earlier flush left (its tombstone) or the row the
    object started from (`_again`)."""

    __slots__ = (
        "_cache", "_entries", "_every", "_gen_keys", "_own", "_read", "_rows", "_swapped",
        "_tomb", "_ttls", "_wanted",
    )  # fmt: skip

    def __init__(self, cache: Cache, every_row: bool = False) -> None:
        self._cache = cache
        self._every = every_row
        self._rows: list[_Row] = []
        self._gen_keys: dict[str, tuple[str, ...]] = {}
        self._entries: list[str] = []
        self._swapped: list[str] = []  # the entries, under every live key version
        self._own: dict[str, str] = {}  # each of those: the entry (own version) it stands for
        self._ttls: dict[str, float | None] = {}  # entry: its model's TTL
        self._wanted: list[str] = []
        self._tomb = TOMBSTONE_PREFIX + new_nonce().encode()
        self._read: Callable[[], list[bytes | NoValue]] = list

    def add(
        self,
        change: EntityChange,
        spec: EntitySpec,
        image: list[Any],
        pre: list[Any] | bool | None,
        earlier: EntityChange | None,
        skip: tuple[int, ...] = (),
    ) -> None:
        table = spec.table
        if table not in self._gen_keys:
            self._gen_keys[table] = spec.gen_keys(self._cache)
        if earlier is None or self._every:
            self._entries.append(change.key)
            self._ttls[change.key] = change.ttl  # (kept for `restore`: `settle` drops rows)
        self._rows.append((change, spec, image, pre, earlier, skip))

    def send(self) -> None:
        gen_keys = [k for keys in self._gen_keys.values() for k in keys]
        # Under every live key version (a rolling deploy): a writer of another version
        # must find this tombstone too, not the row it loaded, until the commit's images
        # and deletes arrive.
        cache = self._cache
        if cache.registry is None:  # (the usual case: one version, no call per row)
            self._own = {key: key for key in self._entries}
        else:
            self._own = {k: key for key in self._entries for k in cache.fan_out([key])}
        self._swapped = list(self._own)
        self._wanted = [*self._swapped, *gen_keys]
        self._read = self._cache.swap_later(self._swapped, self._tomb, TOMBSTONE_TTL, gen_keys)
        if self._every:
            # committed as it ran (AUTOCOMMIT): the tombstones are in place before the
            # flush returns, not a round trip later (another process may read meanwhile)
            self._read()

    def settle(self) -> None:
        """Compute (image to write, expected entry) of every row of the flush."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        cache = self._cache
        raws = dict(zip(self._wanted, self._read(), strict=True))
        gens_of = {
            table: cache.ensure_generations(keys, [raws[k] for k in keys])
            for table, keys in self._gen_keys.items()
        }
        now = time.time()
        encoder = RowEncoder()
        for change, spec, image, pre, earlier, skip in rows:
            gens = gens_of[spec.table]  # (``skip``: set by the UPDATE, old values moot)
            if earlier is not None:
                want = earlier.expected
                if pre is not None and want != NEVER:
                    # the image holds the row as the earlier flush's check found it, under
                    # the generations read then: a bulk write since moved them
                    gens = _continues(earlier, pre, skip)
                    if gens is None:
                        want = NEVER  # changed in place since that flush: no UPDATE sent it
                if self._every:
                    raw = raws[change.key]
                    want, gens = self._again(
                        encoder, raw, want, gens, pre, gens_of[spec.table], skip
                    )
            else:
                want = self._tomb  # what the swap put there (if it failed: no image)
                if pre is not None and not _holds(encoder, raws[change.key], pre, gens, skip):
                    want = NEVER  # the object may be older than the row: invalidate
            packed = None
            if gens is not None and want != NEVER:
                with suppress(TypeError):  # not encodable: invalidate instead
                    packed = encoder.encode(Envelope(image, now, change.ttl, gens))
            change.settle(packed, want)

    def _again(
        self,
        encoder: RowEncoder,
        raw: bytes | NoValue,
        want: bytes | None,
        gens: tuple[str, ...] | None,
        pre: list[Any] | bool | None,
        now: tuple[str, ...] | None,
        skip: Sequence[int],
    ) -> tuple[bytes | None, tuple[str, ...] | None]:
        """(expected entry, generations) of the image of a row an earlier flush wrote,
        whose entry this one swapped again (``every_row``; ``raw``: what it held then).
        ``want`` and ``gens`` are the earlier flush's, continued (`_continues`); ``now``
        the generations read by this flush's swap."""
        if pre is None:  # an insert: the row is the image
            return self._tomb, now
        if want != NEVER and isinstance(raw, bytes) and raw == want:
            return self._tomb, gens  # untouched since the earlier flush: continued
        if _holds(encoder, raw, pre, now, skip):
            return self._tomb, now  # (another reader filled the earlier flush's row)
        return NEVER, gens

    def restore(self) -> None:
        """The flush was rolled back: put back what the swapped entries held, where they
        still hold this batch's tombstone (one round trip; a failure leaves tombstones,
        which readers take for misses)."""
        entries, self._entries, self._swapped = self._swapped, [], []
        ttls = {k: self._ttls.get(key) for k, key in self._own.items()}
        self._rows = []
        if not entries:
            return
        cache = self._cache
        held = self._read()[: len(entries)]
        items = [  # (a full TTL again: what was left of it is not known)
            (key, self._tomb, _restorable(old), ttls.get(key))
            for key, old in zip(entries, held, strict=True)
        ]
        cache._call(lambda: cache.backend.cas_many(items), None, "restore")


def _restorable(old: bytes | NoValue) -> bytes | None:
    """What a rolled-back flush puts back for an entry that held ``old``: nothing for a
    reader's lease (its fill fails either way; put back with the entry's TTL it would
    keep every other reader from filling until then)."""
    return None if old is NO_VALUE or old.startswith(LEASE_PREFIX) else old


def restore_flushes(changes: Iterable[EntityChange]) -> None:
    """Undo the swaps of the flushes behind ``changes`` (a rolled-back frame's)."""
    batches = {id(c.batch): c.batch for c in changes if c.batch is not None}
    for batch in batches.values():
        batch.restore()


def _holds(
    encoder: RowEncoder,
    raw: bytes | NoValue,
    values: list[Any] | bool,
    gens: tuple[str, ...] | None,
    skip: Sequence[int] = (),
) -> bool:
    """Does the entry ``raw`` hold exactly the row ``values`` (but at positions ``skip``,
    which an UPDATE sets anyway), and is it valid under the current generations
    ``gens``? (After a bulk write moved them, an entry holding the object's values says
    nothing about the row: the bulk write may have changed it.)"""
    if not isinstance(values, list) or raw is NO_VALUE or gens is None:
        return False
    return encoder.holds(raw, gens, _as_in(raw, values, skip))


def _continues(
    earlier: EntityChange, values: list[Any] | bool, skip: Sequence[int]
) -> tuple[str, ...] | None:
    """The generations of the image an earlier flush of the row in this transaction
    wrote, if a later flush starts from it (``values``: the object's values before the
    later flush, but at positions ``skip``); None if not: a value changed in place in
    between, which no UPDATE sent, so the row does not hold the later image."""
    image = earlier.parts()[0]
    if not isinstance(values, list) or image is None:
        return None
    try:
        gens = decode(image).gens
    except CodecError:
        return None
    return gens if holds(image, gens, _as_in(image, values, skip)) else None


def _as_in(raw: bytes, values: list[Any], skip: Sequence[int]) -> list[Any]:
    """``values`` with the positions ``skip`` taken from the entry ``raw`` (as they are,
    if it holds no row image)."""
    if not skip:
        return values
    try:
        held = decode(raw).value
    except CodecError:
        return values
    if type(held) is not list or len(held) != len(values):
        return values
    out = list(values)
    for i in skip:
        out[i] = held[i]
    return out
