"""Freshness policy (pure, no I/O): when an entry is fresh, due for refresh, or servable stale.

An entry is *logically* expired ``ttl`` seconds after ``created_at`` (both in its
envelope). It stays in the store ``stale_ttl`` seconds longer (`Freshness.store_ttl`),
so a stale value can still be served while one refresh runs, or when the loader fails.

Early refresh comes in two flavours that can be combined:

- refresh-ahead: refresh when less than ``refresh_ahead`` (a fraction) of the TTL remains;
- XFetch (Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache Stampede
  Prevention", VLDB 2015): refresh when ``now - compute_time * beta * log(rand())``
  reaches the expiry time, so the probability grows as expiry nears and is higher
  for entries that take long to compute.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "Freshness",
    "check_seconds",
    "in_refresh_window",
    "is_fresh",
    "is_servable_stale",
    "should_refresh_early",
]


def is_fresh(now: float, created_at: float, ttl: float | None) -> bool:
    """True while the entry is not logically expired (``ttl`` None: never expires)."""
    return ttl is None or now < created_at + ttl


def should_refresh_early(
    now: float,
    created_at: float,
    ttl: float | None,
    compute_time: float,
    beta: float = 1.0,
    rand: Callable[[], float] = random.random,
) -> bool:
    """The XFetch decision: True when ``now - compute_time * beta * log(rand())`` >= expiry.

    Also True once the entry is logically expired. ``rand`` returns a float in [0, 1);
    0 (whose log is minus infinity) means "refresh". Never True for ``ttl`` None.
    """
    if ttl is None:
        return False
    expiry = created_at + ttl
    if now >= expiry:
        return True
    if compute_time <= 0 or beta <= 0:
        return False
    r = rand()
    if r <= 0.0:
        return True
    return now - compute_time * beta * math.log(r) >= expiry


def in_refresh_window(now: float, created_at: float, ttl: float | None, fraction: float) -> bool:
    """True when the entry is still fresh but less than ``fraction`` of its TTL remains."""
    if ttl is None or fraction <= 0:
        return False
    expiry = created_at + ttl
    return expiry - ttl * fraction <= now < expiry


def is_servable_stale(now: float, created_at: float, ttl: float | None, stale_ttl: float) -> bool:
    """True when the entry is logically expired but less than ``stale_ttl`` ago."""
    if ttl is None or stale_ttl <= 0:
        return False
    expiry = created_at + ttl
    return expiry <= now < expiry + stale_ttl


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_seconds(name: str, value: object, *, zero: bool = False) -> float:
    """``value`` as float seconds, or ValueError naming ``name``.

    Every TTL, timeout and interval a user gives goes through here, so that NaN, an
    infinity or a bool (``True`` is the int 1) is refused at the call, rather than failing
    later inside a query, a fill or after a database COMMIT. ``zero``: 0 is allowed.
    """
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if zero else value > 0)
    ):
        return float(value)
    wanted = "a finite number of seconds >= 0" if zero else "a positive finite number of seconds"
    raise ValueError(f"{name} must be {wanted}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Freshness:
    """How long an entry is fresh, and what happens around its expiry.

    Invalid values raise ValueError naming the field.
    """

    ttl: float | None
    """Seconds an entry is fresh; None: never expires (and is never refreshed early)."""

    stale_ttl: float = 0.0
    """Seconds after expiry an entry may still be served while one refresh runs, or when
    the loader fails (stale-while-revalidate, stale-if-error). 0 disables both."""

    refresh_ahead: float | None = None
    """Refresh in the background when less than this fraction (0 < f < 1) of ``ttl``
    remains; None disables refresh-ahead."""

    beta: float = 1.0
    """XFetch aggressiveness: > 1 refreshes earlier, < 1 later, 0 never early."""

    xfetch: bool = True
    """Use probabilistic early refresh (XFetch) on fresh entries."""

    def __post_init__(self) -> None:
        if self.ttl is not None and not (_finite(self.ttl) and self.ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds or None, got {self.ttl!r}")
        if not (_finite(self.stale_ttl) and self.stale_ttl >= 0):
            raise ValueError(f"stale_ttl must be >= 0 seconds, got {self.stale_ttl!r}")
        if self.refresh_ahead is not None and not (
            _finite(self.refresh_ahead) and 0 < self.refresh_ahead < 1
        ):
            raise ValueError(
                f"refresh_ahead must be a fraction between 0 and 1 (exclusive) or None, "
                f"got {self.refresh_ahead!r}"
            )
        if not (_finite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if not isinstance(self.xfetch, bool):
            raise ValueError(f"xfetch must be a bool, got {self.xfetch!r}")
        if self.ttl is None and (self.stale_ttl or self.refresh_ahead is not None):
            raise ValueError("stale_ttl and refresh_ahead need a ttl (ttl is None)")

    @property
    def store_ttl(self) -> float | None:
        """The physical TTL in the store: ``ttl + stale_ttl`` (None: no expiry)."""
        return None if self.ttl is None else self.ttl + self.stale_ttl

    def classify(
        self,
        now: float,
        created_at: float,
        ttl: float | None,
        compute_time: float,
        rand: Callable[[], float] = random.random,
    ) -> str:
        """What a read of an entry (with matching generations) should do.

        ``"fresh"``: serve it. ``"ahead"`` / ``"early"``: serve it and refresh in the
        background (refresh-ahead window / XFetch). ``"stale"``: expired but inside
        ``stale_ttl``: serve it while one caller reloads. ``"expired"``: a miss.
        """
        if not is_fresh(now, created_at, ttl):
            return "stale" if is_servable_stale(now, created_at, ttl, self.stale_ttl) else "expired"
        if self.refresh_ahead is not None and in_refresh_window(
            now, created_at, ttl, self.refresh_ahead
        ):
            return "ahead"
        if self.xfetch and should_refresh_early(
            now, created_at, ttl, compute_time, self.beta, rand
        ):
            return "early"
        return "fresh"
