"""Freshness policy: XFetch, refresh-ahead and stale windows, as pure decisions (no server)."""

from __future__ import annotations

import math
import random

import pytest

from sa_cache.freshness import (
    Freshness,
    in_refresh_window,
    is_fresh,
    is_servable_stale,
    should_refresh_early,
)

CREATED, TTL = 1_000.0, 60.0
EXPIRY = CREATED + TTL


def early_rate(now: float, compute_time: float, beta: float = 1.0, n: int = 4000) -> float:
    """Share of reads at ``now`` that XFetch sends to refresh, with a seeded source."""
    rng = random.Random(1234)
    hits = sum(
        should_refresh_early(now, CREATED, TTL, compute_time, beta, rng.random) for _ in range(n)
    )
    return hits / n


def test_xfetch_probability_rises_as_expiry_nears() -> None:
    grid = [CREATED + TTL * f for f in (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999)]
    rates = [early_rate(now, compute_time=1.0) for now in grid]
    assert rates == sorted(rates), rates
    assert rates[0] == 0.0  # 60 s before expiry with a 1 s computation: never
    assert rates[-1] > 0.9  # 60 ms before expiry: almost always
    # Matches the closed form P = exp(-(expiry - now) / (compute_time * beta)).
    for now, rate in zip(grid, rates, strict=True):
        assert rate == pytest.approx(math.exp(-(EXPIRY - now) / 1.0), abs=0.03)


def test_xfetch_slow_computations_and_larger_beta_refresh_earlier() -> None:
    now = EXPIRY - 3.0
    assert early_rate(now, 0.5) < early_rate(now, 2.0) < early_rate(now, 8.0)
    assert early_rate(now, 1.0, beta=0.5) < early_rate(now, 1.0) < early_rate(now, 1.0, beta=3.0)


def test_xfetch_exact_rule_with_a_fixed_draw() -> None:
    # now - compute_time * beta * log(r) >= expiry  <=>  now >= expiry + log(r) * ct * beta
    r = 0.5
    threshold = EXPIRY + math.log(r) * 2.0
    assert not should_refresh_early(threshold - 1e-6, CREATED, TTL, 2.0, 1.0, lambda: r)
    assert should_refresh_early(threshold + 1e-6, CREATED, TTL, 2.0, 1.0, lambda: r)


def test_xfetch_edges() -> None:
    assert should_refresh_early(EXPIRY, CREATED, TTL, 0.0)  # expired: always
    assert not should_refresh_early(EXPIRY - 1e-3, CREATED, TTL, 0.0)  # instant computation
    assert not should_refresh_early(EXPIRY - 1e-3, CREATED, TTL, 5.0, beta=0.0)
    assert should_refresh_early(CREATED, CREATED, TTL, 1.0, rand=lambda: 0.0)  # log(0)
    assert not should_refresh_early(10**9, CREATED, None, 5.0)  # never expires


def test_refresh_ahead_window() -> None:
    start = EXPIRY - 0.2 * TTL  # the last 20 % of the TTL
    assert not in_refresh_window(start - 0.01, CREATED, TTL, 0.2)
    assert in_refresh_window(start, CREATED, TTL, 0.2)
    assert in_refresh_window(EXPIRY - 0.01, CREATED, TTL, 0.2)
    assert not in_refresh_window(EXPIRY, CREATED, TTL, 0.2)  # expired: not "ahead"
    assert not in_refresh_window(EXPIRY - 1, CREATED, None, 0.2)
    assert not in_refresh_window(EXPIRY - 1, CREATED, TTL, 0.0)


def test_stale_window() -> None:
    assert is_fresh(EXPIRY - 0.01, CREATED, TTL)
    assert not is_fresh(EXPIRY, CREATED, TTL)
    assert is_fresh(10**12, CREATED, None)
    assert not is_servable_stale(EXPIRY - 0.01, CREATED, TTL, 30)  # still fresh
    assert is_servable_stale(EXPIRY, CREATED, TTL, 30)
    assert is_servable_stale(EXPIRY + 29.9, CREATED, TTL, 30)
    assert not is_servable_stale(EXPIRY + 30, CREATED, TTL, 30)
    assert not is_servable_stale(EXPIRY + 1, CREATED, TTL, 0)


def test_classify() -> None:
    f = Freshness(TTL, stale_ttl=30, refresh_ahead=0.1, beta=1.0)
    never = lambda: 0.999_999  # noqa: E731 - a draw that never triggers XFetch early
    assert f.classify(CREATED + 1, CREATED, TTL, 0.0, never) == "fresh"
    assert f.classify(EXPIRY - 1, CREATED, TTL, 0.0, never) == "ahead"
    assert f.classify(EXPIRY - 10, CREATED, TTL, 100.0, lambda: 0.5) == "early"
    assert f.classify(EXPIRY + 1, CREATED, TTL, 0.0, never) == "stale"
    assert f.classify(EXPIRY + 31, CREATED, TTL, 0.0, never) == "expired"
    off = Freshness(TTL, xfetch=False)
    assert off.classify(EXPIRY - 1e-3, CREATED, TTL, 100.0, lambda: 0.0) == "fresh"
    assert off.classify(EXPIRY + 1, CREATED, TTL, 0.0) == "expired"  # no stale window


def test_store_ttl_keeps_stale_values_readable() -> None:
    assert Freshness(60).store_ttl == 60
    assert Freshness(60, stale_ttl=30).store_ttl == 90
    assert Freshness(None).store_ttl is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"ttl": "60"}, "ttl"),
        ({"ttl": 60, "stale_ttl": -1}, "stale_ttl"),
        ({"ttl": 60, "stale_ttl": float("nan")}, "stale_ttl"),
        ({"ttl": 60, "refresh_ahead": 0}, "refresh_ahead"),
        ({"ttl": 60, "refresh_ahead": 1}, "refresh_ahead"),
        ({"ttl": 60, "refresh_ahead": 1.5}, "refresh_ahead"),
        ({"ttl": 60, "beta": -0.1}, "beta"),
        ({"ttl": 60, "beta": True}, "beta"),
        ({"ttl": 60, "xfetch": 1}, "xfetch"),
        ({"ttl": None, "stale_ttl": 5}, "stale_ttl"),
        ({"ttl": None, "refresh_ahead": 0.2}, "refresh_ahead"),
    ],
)
def test_freshness_rejects_bad_fields(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Freshness(**kwargs)  # type: ignore[arg-type]


def test_freshness_is_frozen() -> None:
    f = Freshness(60, stale_ttl=5, refresh_ahead=0.2, beta=2.0)
    with pytest.raises(AttributeError):
        f.ttl = 1  # type: ignore[misc]
    assert f == Freshness(60, stale_ttl=5, refresh_ahead=0.2, beta=2.0)
