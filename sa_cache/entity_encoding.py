"""Encoding the images of a settled flush (`entity_batch.FlushBatch.settle`) with less
work than `codec.encode` and `codec_peek.holds` each do alone, to the same bytes.

Before writing an update's image, the flush checks that the entry holds the values the
object started from (`holds`), then encodes the image. The two lists differ only in the
changed columns, yet each is encoded whole, and a row's Decimals and datetimes are
encoded in Python (`codec._default`): twice. `RowEncoder` encodes each such value once
for the whole flush (they are immutable: the same object gives the same bytes), with
one msgpack Packer instead of one per call, and otherwise makes exactly the bytes those
functions make — each value at the depth it has there (msgpack's nesting limit counts
it), an entry as its header (which does not depend on the value) then the value.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgpack

from .codec import MARKER_VERSION, Envelope, _default, _packb, encode
from .codec_peek import _gens_at

_SHARED = frozenset({Decimal, datetime, date, time, timedelta, UUID})
"""Immutable types `codec._default` encodes (their encoding is made once per object)."""


class RowEncoder:
    """Encodes for one settled flush; one thread (it holds a msgpack Packer)."""

    __slots__ = ("_gens", "_heads", "_markers", "_packer")

    def __init__(self) -> None:
        self._markers = 0  # marker arrays made so far (see `codec`: the version byte)
        made: dict[int, tuple[Any, Any]] = {}  # id -> (object, its encoding), kept alive

        def default(obj: Any) -> Any:
            if type(obj) in _SHARED:
                found = made.get(id(obj))
                if found is None:
                    found = made[id(obj)] = (obj, _default(obj))
                out = found[1]
            else:
                out = _default(obj)
            if type(out) is list:  # a marker array
                self._markers += 1
            return out

        self._packer = msgpack.Packer(default=default, strict_types=True, use_bin_type=True)
        self._gens: dict[tuple[str, ...], bytes] = {}
        self._heads: dict[tuple[float, float | None, tuple[str, ...]], bytes] = {}

    def holds(self, data: bytes, gens: tuple[str, ...], value: Any) -> bool:
        """`codec_peek.holds`: does the entry ``data`` hold exactly ``value``, under
        ``gens`` and without meta?"""
        at = _gens_at(data)
        if at is None:
            return False
        try:
            tail = self._gens.get(gens)
            if tail is None:
                tail = self._gens[gens] = _packb(list(gens)) + b"\xc0"
            tail += self._packer.pack(value)
        except (TypeError, ValueError, OverflowError):
            return False
        return len(data) - at == len(tail) and data.endswith(tail)

    def encode(self, envelope: Envelope) -> bytes:
        """`codec.encode` of an entry without meta or compute time."""
        if envelope.meta is not None or envelope.compute_time:
            return encode(envelope)
        value, created_at, ttl, gens = (
            envelope.value,
            envelope.created_at,
            envelope.ttl,
            envelope.gens,
        )
        before = self._markers
        try:
            packed: bytes = self._packer.pack([value])[1:]  # (as the entry's item)
        except Exception:  # `encode` raises what it raises
            return encode(envelope)
        memo = (created_at, ttl, gens)
        head = self._heads.get(memo)
        if head is None:  # (an empty list is the one byte 0x90)
            head = self._heads[memo] = encode(Envelope([], created_at, ttl, gens))[:-1]
        if self._markers != before:
            head = head[:5] + bytes([MARKER_VERSION]) + head[6:]
        return head + packed
