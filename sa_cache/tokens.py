"""Generation tokens, the commit clock and tombstones: what the store's invalidation
keys hold, and how readers tell their age (used by `cache_invalidation.Invalidation`
and the readers that compare entries with a snapshot)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from .backends.base import NO_VALUE, NoValue

CLOCK = "__clock__"
"""Pseudo-table whose key holds the commit clock (see `Backend.advance`)."""


def new_nonce() -> str:
    return secrets.token_hex(6)


MAX_CLOCK = 2**53
"""Clocks are microseconds since the epoch: one at or past this (or below 0) is foreign."""


def token_clock(token: str) -> int | None:
    """The commit clock a generation token was stamped with (None if unreadable)."""
    head, _, _ = token.partition(":")
    try:
        clock = int(head)
    except ValueError:
        return None
    return clock if 0 <= clock < MAX_CLOCK else None


def clock_of(raw: bytes | NoValue) -> int | None:
    """A stored commit clock (None: absent, or not a clock: garbage)."""
    text = None if raw is NO_VALUE else token_text(raw)
    return None if text is None else token_clock(text)


def token_text(raw: bytes) -> str | None:
    """A generation token or clock as text; None for bytes that are not UTF-8 (garbage)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def older_than(tokens: Sequence[str], clock: int | None) -> bool:
    """Were all generation ``tokens`` set at or before the commit clock ``clock``? (None:
    not known.) Then a snapshot taken at ``clock`` holds every commit they stand for."""
    if clock is None:
        return False
    for token in tokens:
        stamp = token_clock(token)
        if stamp is None or stamp > clock:
            return False
    return True


TOMBSTONE_PREFIX = b"sac-tomb:"
"""What an entity entry holds after a commit deleted or invalidated its row (see `bump`)."""
TOMBSTONE_TTL = 30.0
"""Seconds a tombstone lives: far longer than a commit's image can take to arrive."""
QUERY_TOMBSTONE_TTL = 300.0
"""Seconds the tombstone `Invalidation.invalidate_query` leaves lives: a query fill loaded
before the call cannot replace it (see `fill_in_time`)."""


def fill_in_time(elapsed: float) -> bool:
    """May a query fill whose reader read its entry ``elapsed`` seconds ago still be
    stored? Not once a tombstone left after that read could have expired (with margin)."""
    return elapsed < QUERY_TOMBSTONE_TTL / 2
