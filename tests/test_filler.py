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
