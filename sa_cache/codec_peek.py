"""Reading an encoded entry's header without decoding it (`sa_cache.codec` layout):
whether it holds a given value (`holds`), whether its generations differ from the
current ones (`other_generations`), so that a reader skips decoding an entry it would
throw away."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .codec import _HEAD, _packb

# An entry is an 8-array: magic, version, created_at (float64: 9 bytes), ttl (nil: 1
# byte, float64: 9), compute_time (9), gens, meta, value.
_VERSIONS = (b"\x01", b"\x02")


def _gens_at(data: bytes) -> int | None:
    """Where the generations of entry ``data`` start; None if it is not an entry."""
    if data[:5] != _HEAD or data[5:6] not in _VERSIONS:
        return None
    return 25 if data[15:16] == b"\xc0" else 33


def holds(data: bytes, gens: tuple[str, ...], value: Any) -> bool:
    """Does the entry ``data`` hold exactly ``value``, under ``gens`` and without meta?

    Compared as encodings, without decoding: equal encodings decode to equal values.
    Equal values can have different encodings (``1`` and ``1.0``, ``Decimal("1.5")``
    and ``Decimal("1.50")``): then the answer is False, so callers must read False as
    "not known to hold it".
    """
    at = _gens_at(data)
    if at is None:
        return False
    try:
        tail = _packb(list(gens)) + b"\xc0" + _packb(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return len(data) - at == len(tail) and data.endswith(tail)


PEEK_MIN = 1024
"""Entries shorter than this are decoded rather than peeked at: the peek costs about a
microsecond, which only entries of several rows save many times over."""


def other_generations(data: Any, gens: Sequence[str]) -> bool:
    """Is ``data`` an entry made under other generation tokens than ``gens`` (which
    `stampede.get_or_load` counts as invalidated, never serves)? False when unsure:
    not an entry (a tombstone, corrupt bytes: decoding tells), or the same tokens.
    (The tokens' encoding is canonical and self-delimiting: equal bytes, equal tokens.)"""
    if type(data) is not bytes or len(data) < PEEK_MIN:
        return False  # (a short entry decodes about as fast as its header is checked)
    at = _gens_at(data)
    if at is None:
        return False
    try:
        mine = _packb(list(gens))
    except (TypeError, ValueError):
        return False
    return bool(data[at : at + len(mine)] != mine)
