"""Background fills (sa_cache.filler): order, per-thread waits, close; and on a real store."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from models import User
from sqlalchemy import select

import sa_cache
from sa_cache import filler as filler_module
from sa_cache import with_cache
from sa_cache.filler import Filler


def test_jobs_run_in_order_off_the_calling_thread() -> None:
    filler = Filler()
    ran: list[tuple[int, str]] = []
    for i in range(20):
        assert filler.submit(lambda i=i: ran.append((i, threading.current_thread().name)))
    filler.wait_own()
    assert [i for i, _ in ran] == list(range(20))
    assert {name for _, name in ran} == {"sa_cache-fill"}
    filler.close()


def test_a_thread_waits_for_its_own_fills_only() -> None:
    filler = Filler()
    release, stored = threading.Event(), threading.Event()

    def slow_fill() -> None:
        release.wait(5)
        stored.set()

    assert filler.submit(slow_fill)
    other_done = threading.Event()

    def other_thread() -> None:
        filler.wait_own()  # nothing of its own queued: returns at once
        other_done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    assert other_done.wait(2)
    assert not stored.is_set()
    release.set()
    filler.wait_own()  # ours: returns once it is stored
    assert stored.is_set()
    t.join()
    filler.close()


def test_a_read_waits_only_for_fills_of_the_keys_it_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(filler_module, "WAIT_LIMIT", 30.0)  # a wait would show
    filler = Filler()
    release, stored = threading.Event(), threading.Event()

    def slow_fill() -> None:
        release.wait(30)
        stored.set()

    watchdog = threading.Timer(10, release.set)  # only if a wait hangs
    watchdog.start()
    assert filler.submit(slow_fill, ["a"])
    filler.wait_own(["b", "c"])  # reads other keys: no wait
    assert not stored.is_set()
    threading.Timer(0.05, release.set).start()
    filler.wait_own(["b", "a"])  # reads the key it fills: waits for it
    assert stored.is_set()
    watchdog.cancel()
    filler.close()


def test_a_fill_of_unknown_keys_makes_every_read_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filler_module, "WAIT_LIMIT", 30.0)
    filler = Filler()
    release, stored = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_fill() -> None:
        release.wait(30)
        order.append("fill")
        stored.set()

    assert filler.submit(slow_fill)  # keys not named
    assert filler.submit(lambda: order.append("keyed"), ["a"])
    threading.Timer(0.05, release.set).start()
    filler.wait_own(["z"])
    assert stored.is_set()
    filler.wait_own(["a"])  # the keyed one, stored after it, in order
    assert order == ["fill", "keyed"]
    filler.close()


def test_a_fill_that_submits_a_fill_runs_it_itself() -> None:
    filler = Filler()
    ran: list[str] = []

    def outer() -> None:
        ran.append("outer")
        if not filler.submit(lambda: ran.append("inner")):
            ran.append("inline")

    filler.submit(outer)
    filler.wait_own()
    filler.close()
    assert ran == ["outer", "inline"]


def test_close_stores_what_is_queued_then_refuses() -> None:
    filler = Filler()
    ran: list[int] = []
    for i in range(5):
        filler.submit(lambda i=i: ran.append(i))
    filler.close()
    assert ran == [0, 1, 2, 3, 4]
    assert filler.submit(lambda: ran.append(99)) is False


def test_a_failing_fill_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    filler = Filler()

    def boom() -> None:
        raise RuntimeError("store exploded")

    filler.submit(boom)
    filler.wait_own()
    filler.close()
    assert "store exploded" in caplog.text


@pytest.fixture
def env(engine: sa.Engine, namespace: str, cache_url: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache)


def test_misses_fill_in_the_background_on_redis_only(env: Env) -> None:
    stmt = select(User).where(User.id == 2).options(with_cache())
    with env.Session() as s:
        s.scalars(stmt).one()
    in_process = getattr(env.cache.backend, "in_process", False)
    assert (env.cache._filler is None) == in_process
    env.log.clear()
    with env.Session() as s:  # this thread's next read waits for its fill: a hit
        assert s.scalars(stmt).one().name == "user2"
    assert env.log.statements == []
    assert env.cache.stats["query.fill"] == 1


@pytest.fixture
def redis_env(engine: sa.Engine, namespace: str, redis_url: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    yield from make_env(engine, cache)


def test_misses_on_other_keys_do_not_wait_for_earlier_fills(
    redis_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of misses on different queries costs one round trip each: the second miss
    does not wait for the first one's fill to be stored; the same query read again
    does (it is a hit)."""
    monkeypatch.setattr(filler_module, "WAIT_LIMIT", 30.0)
    env = redis_env
    release, stored = threading.Event(), threading.Event()
    real_store = env.cache.backend.cas

    def held_store(*args: object, **kwargs: object) -> object:
        release.wait(30)  # the first fill's store does not return until released
        try:
            return real_store(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            stored.set()

    watchdog = threading.Timer(10, release.set)  # only if a read hangs
    watchdog.start()
    first = select(User).where(User.id == 1).options(with_cache())
    second = select(User).where(User.id == 2).options(with_cache())
    with env.Session() as s:
        monkeypatch.setattr(env.cache.backend, "cas", held_store)
        assert s.scalars(first).one().name == "user1"  # a miss: its fill is held
        assert s.scalars(second).one().name == "user2"  # another miss, at once
        assert not stored.is_set()  # it did not wait for the first fill
        # (held_store stays: the filler thread may not have reached it yet)
        threading.Timer(0.05, release.set).start()
    env.log.clear()
    with env.Session() as s:
        assert s.scalars(first).one().name == "user1"  # waits for its fill: a hit
        assert stored.is_set()
        assert s.scalars(second).one().name == "user2"
    assert env.log.statements == []
    watchdog.cancel()
