"""A fork while threads of the parent load, refresh or replay invalidations: the child
has none of those threads, so it must not wait for their loads nor believe their
refreshes run, and it delivers its own remembered invalidations."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
import redis
from redis_servers import RedisServer

import sa_cache
from sa_cache.stampede import guard_for


def _in_child(check: Callable[[], bool], limit: float = 20) -> None:
    """Fork; the child exits 0 if ``check()`` is true. Fails if it takes over ``limit``
    seconds (the child is then killed) or the check fails."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            code = 0 if check() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child waited for a load of the parent's")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def cache(redis_url: str, namespace: str) -> sa_cache.Cache:
    c = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    yield c  # type: ignore[misc]
    c.delete("k")
    c.close()


def test_a_forked_child_does_not_join_the_parents_single_flight(cache: sa_cache.Cache) -> None:
    """A miss the parent is loading in another thread: the child's miss of the same
    entry loads by itself at once (it used to join the parent's flight, which nothing
    in the child ever ends, and wait ``flight_wait``)."""
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(10)
        return "parent"

    leader = threading.Thread(target=lambda: cache.get_or_set("k", slow, ttl=60, lease=False))
    leader.start()
    try:
        assert started.wait(5)

        def child() -> bool:
            guard_for(cache).flight_wait = 600.0  # a wait would outlive the test
            value = cache.get_or_set("k", lambda: "child", ttl=60, lease=False)
            return value == "child" and cache.stats["flight.wait_timeout"] == 0

        _in_child(child)
    finally:
        release.set()
        leader.join(10)


def test_a_forked_child_knows_no_refresh_runs(cache: sa_cache.Cache) -> None:
    """A refresh running in the parent is not running in the child: the child can
    schedule its own (it used to be told one was running, so a stale entry was served
    without ever being reloaded there)."""
    refresher = guard_for(cache).refresher
    release = threading.Event()
    assert refresher.submit("k", lambda: release.wait(10)) == "scheduled"
    try:
        assert refresher.running("k")

        def child() -> bool:
            ran = threading.Event()
            if refresher.running("k"):
                return False
            if refresher.submit("k", ran.set) != "scheduled":
                return False
            return ran.wait(5)

        _in_child(child)
    finally:
        release.set()
        refresher.wait_idle(10)


def test_a_forked_child_replays_its_remembered_invalidations(namespace: str) -> None:
    """The store is down in the parent, which remembered an invalidation (and started
    its replayer); a child forked then remembers one of its own and never uses the
    store again: its replayer delivers it once the store is back (the child had
    inherited the parent's "replayer started" and never ran one)."""
    with RedisServer() as server:
        cache = sa_cache.Cache.from_url(server.url, namespace=namespace)
        try:
            server.stop()
            cache.invalidate("t_parent")  # remembered: the replayer starts
            assert cache.stats["invalidate.deferred"] == 1
            mine = cache.keys.generation("t_child")

            def child() -> bool:
                cache.invalidate("t_child")  # remembered in the child only
                raw = redis.Redis(port=server.port, socket_timeout=1)
                for _ in range(200):  # up to ~10 s: the replayer retries every 0.1 s
                    try:
                        if raw.get(mine) is not None:
                            return True
                    except redis.ConnectionError:
                        pass  # (not up yet)
                    time.sleep(0.05)
                return False

            restart = threading.Thread(target=lambda: (time.sleep(0.5), server.start()))
            restart.start()
            try:
                _in_child(child)
            finally:
                restart.join(10)
        finally:
            cache.close()


def test_a_second_fork_finds_the_replayer_state_it_left(namespace: str) -> None:
    """A child of a child (nothing pending, so no replayer was started in between):
    its fork hook found the attributes the first one had removed and raised."""
    with RedisServer() as server:
        cache = sa_cache.Cache.from_url(server.url, namespace=namespace)
        try:
            server.stop()
            cache.invalidate("t")  # remembered: a replayer starts
            server.start()
            cache.set("k", 1)  # (any call delivers what was remembered)
            deadline = time.monotonic() + 10
            while cache._pending_bumps and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not cache._pending_bumps

            def child() -> bool:  # forked once: the hook ran; now as a second fork would
                cache._replayer_after_fork()
                cache.invalidate("u")
                return cache.stats["invalidate"] >= 1

            _in_child(child)
        finally:
            cache.close()
