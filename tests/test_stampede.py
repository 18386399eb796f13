"""Stampede protection on memory and Redis: single-flight, leases, guarded fills, refreshes.

Freshness is decided by an injected clock and random source, so the XFetch,
refresh-ahead and stale-window tests are deterministic; only lease expiry and
cross-process waits use real time.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest
import redis

from sa_cache import NO_VALUE, Cache
from sa_cache.freshness import Freshness
from sa_cache.stampede import (
    Lease,
    Refresher,
    SingleFlight,
    StampedeGuard,
    get_or_load,
    guarded_fill,
)

SPAWN = multiprocessing.get_context("spawn")


class FakeClock:
    """Unix time that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Counter:
    """A thread-safe call counter that returns ``value`` (after ``delay`` seconds)."""

    def __init__(self, value: Any = "v1", delay: float = 0.0) -> None:
        self.value, self.delay, self.calls = value, delay, 0
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        return self.value


def drop_keys(cache: Cache, namespace: str) -> None:
    """Delete only this test's keys (never FLUSHDB)."""
    scan = getattr(cache.backend, "scan_keys", None)
    if scan is not None:
        keys = list(scan(f"{namespace}:*"))
        if keys:
            cache.backend.delete_many(keys)


@pytest.fixture
def cache(cache_url: str, namespace: str) -> Iterator[Cache]:
    c = Cache.from_url(cache_url, namespace=namespace)
    yield c
    drop_keys(c, namespace)
    c.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def guard(clock: FakeClock) -> Iterator[StampedeGuard]:
    g = StampedeGuard(clock=clock, rand=lambda: 0.999_999)  # XFetch never fires by luck
    yield g
    g.close()


def run_threads(n: int, fn: Callable[[], Any]) -> list[Any]:
    """Start ``n`` threads at once (barrier) running ``fn``; their results in order."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # collected and checked by the test
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# -- single-flight -----------------------------------------------------------------------


def test_single_flight_runs_once_for_32_threads() -> None:
    flight = SingleFlight()
    loader = Counter(["rows"], delay=0.2)
    results = run_threads(32, lambda: flight.do("k", loader))
    assert loader.calls == 1
    assert all(r is results[0] for r in results)  # the leader's very object
    assert flight.try_do("k", lambda: "again", "busy") == "again"  # nothing left behind


def test_single_flight_shares_the_error_and_then_forgets_it() -> None:
    flight = SingleFlight()
    calls: list[int] = []

    def boom() -> None:
        calls.append(1)
        time.sleep(0.2)
        raise LookupError("db down")

    results = run_threads(16, lambda: flight.do("k", boom))
    assert len(calls) == 1
    assert all(isinstance(r, LookupError) for r in results)
    assert flight.do("k", lambda: 7) == 7  # a new call after the failure runs again


def test_single_flight_try_do_does_not_wait() -> None:
    flight = SingleFlight()
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        return "done"

    t = threading.Thread(target=flight.do, args=("k", slow))
    t.start()
    assert started.wait(5)
    assert flight.try_do("k", lambda: "other", "busy") == "busy"
    assert flight.try_do("k2", lambda: "other", "busy") == "other"
    release.set()
    t.join(5)


# -- get_or_load on a miss ---------------------------------------------------------------


def test_32_threads_missing_one_key_load_it_once(cache: Cache, guard: StampedeGuard) -> None:
    key = cache.keys.user("hot")
    loader = Counter({"answer": 42}, delay=0.2)
    fresh = Freshness(60)
    results = run_threads(32, lambda: get_or_load(cache, key, loader, fresh, guard=guard))
    assert results == [{"answer": 42}] * 32
    assert loader.calls == 1
    assert cache.stats["load"] == 1
    assert cache.stats["fill"] == 1
    assert get_or_load(cache, key, Counter("unused"), fresh, guard=guard) == {"answer": 42}
    assert cache.stats["hit"] == 1


def test_newer_generations_never_join_an_older_load(cache: Cache) -> None:
    """A reader that saw a newer generation must not get rows loaded before that commit.

    It waits (bounded by ``lease_wait``) for the older load's lease, then loads itself.
    """
    key, fresh = cache.keys.user("k"), Freshness(60)
    guard = StampedeGuard(lease_wait=0.2)
    started, release = threading.Event(), threading.Event()

    def before_commit() -> str:
        started.set()
        release.wait(10)
        return "old rows"

    old: list[Any] = []
    t = threading.Thread(
        target=lambda: old.append(
            get_or_load(cache, key, before_commit, fresh, gens=("1:a",), guard=guard)
        )
    )
    t.start()
    try:
        assert started.wait(5)
        same = threading.Thread(
            target=lambda: old.append(
                get_or_load(cache, key, Counter("x"), fresh, gens=("1:a",), guard=guard)
            )
        )
        same.start()  # same generations: joins the load in flight
        newer = get_or_load(cache, key, lambda: "new rows", fresh, gens=("2:b",), guard=guard)
    finally:
        release.set()
        t.join(10)
        same.join(10)
    guard.close()
    assert newer == "new rows"
    assert old == ["old rows", "old rows"]
    assert cache.stats["lease.wait_timeout"] == 1


def test_store_ok_false_loads_without_storing(cache: Cache, guard: StampedeGuard) -> None:
    key = cache.keys.user("k")
    loader = Counter("v")
    for _ in range(2):
        assert get_or_load(cache, key, loader, Freshness(60), store_ok=lambda: False, guard=guard)
    assert loader.calls == 2
    assert cache.stats["fill.skipped"] == 2


def test_a_value_that_cannot_be_encoded_is_returned_not_cached(
    cache: Cache, guard: StampedeGuard
) -> None:
    key, thing = cache.keys.user("k"), object()
    assert get_or_load(cache, key, lambda: thing, Freshness(60), guard=guard) is thing
    assert cache.stats["fill.unencodable"] == 1
    assert cache.fetch([key]) == [NO_VALUE]


def _miss_worker(
    url: str, namespace: str, threads: int, barrier: Any, out: Any, lease_ttl: float
) -> None:
    """One process of the cross-process test: ``threads`` threads miss one key at once."""
    cache = Cache.from_url(url, namespace=namespace)
    client = redis.Redis.from_url(url)
    guard = StampedeGuard(lease_ttl=lease_ttl)

    def loader() -> dict[str, int]:
        client.incr(f"{namespace}:loads")  # counted in Redis itself, across processes
        time.sleep(0.3)
        return {"answer": 42}

    key = cache.keys.user("hot")
    barrier.wait(60)  # every process is up and connected
    results = run_threads(
        threads, lambda: get_or_load(cache, key, loader, Freshness(60), guard=guard)
    )
    out.put((results, cache.stats.snapshot()))
    guard.close()
    cache.close()
    client.close()


def test_lease_across_4_processes_x_16_threads_loads_once(redis_url: str, namespace: str) -> None:
    procs_n, threads = 4, 16
    barrier, out = SPAWN.Barrier(procs_n), SPAWN.Queue()
    args = (redis_url, namespace, threads, barrier, out, 5.0)
    procs = [SPAWN.Process(target=_miss_worker, args=args) for _ in range(procs_n)]
    for p in procs:
        p.start()
    reports = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    client = redis.Redis.from_url(redis_url)
    try:
        loads = int(client.get(f"{namespace}:loads") or 0)
        leftovers = list(client.scan_iter(match=f"{namespace}:*"))
        if leftovers:
            client.delete(*leftovers)
    finally:
        client.close()
    results = [r for rs, _ in reports for r in rs]
    assert results == [{"answer": 42}] * (procs_n * threads)
    assert loads == 1
    stats = [s for _, s in reports]
    assert sum(s.get("load", 0) for s in stats) == 1
    waited = sum(s.get("lease.wait_hit", 0) + s.get("lease.recheck_hit", 0) for s in stats)
    assert waited + sum(s.get("hit", 0) for s in stats) >= procs_n - 1


def _hold_lease(url: str, namespace: str, ttl: float, ready: Any) -> None:
    """Take the lease of the hot key, then hang until killed."""
    cache = Cache.from_url(url, namespace=namespace)
    assert Lease(cache, cache.keys.user("hot"), ttl).acquire() is True
    ready.set()
    time.sleep(60)


def test_dead_lease_holder_lease_expires_and_another_process_loads(
    redis_url: str, namespace: str
) -> None:
    ttl = 1.0
    ready = SPAWN.Event()
    holder = SPAWN.Process(target=_hold_lease, args=(redis_url, namespace, ttl, ready))
    holder.start()
    try:
        assert ready.wait(30), "the lease holder did not start"
        holder.kill()  # SIGKILL: no finally, no release
        holder.join(10)
    finally:
        if holder.is_alive():
            holder.kill()
    cache = Cache.from_url(redis_url, namespace=namespace)
    guard = StampedeGuard(lease_ttl=ttl, lease_wait=10.0)
    try:
        key = cache.keys.user("hot")
        loader = Counter("loaded")
        started = time.monotonic()
        assert get_or_load(cache, key, loader, Freshness(60), guard=guard) == "loaded"
        elapsed = time.monotonic() - started
        assert loader.calls == 1
        assert cache.stats["lease.busy"] == 1  # the dead holder's lease was still there
        assert elapsed < ttl + 0.5  # took over when it expired, not after lease_wait
        assert get_or_load(cache, key, Counter("unused"), Freshness(60), guard=guard) == "loaded"
    finally:
        guard.close()
        drop_keys(cache, namespace)
        cache.close()


# -- guarded writes ----------------------------------------------------------------------


def test_expired_lease_release_does_not_free_a_newer_lease(cache: Cache) -> None:
    old = Lease(cache, cache.keys.user("k"), ttl=0.1)
    assert old.acquire() is True
    time.sleep(0.2)
    new = Lease(cache, cache.keys.user("k"), ttl=5)
    assert new.acquire() is True
    assert old.release() is False
    assert Lease(cache, cache.keys.user("k")).acquire() is False  # still held by `new`
    assert new.release() is True


@pytest.mark.parametrize("entry_key", ["ns:v1:q:0123abcd", "ns:v1:e:{ns}:users:7", "k{half"])
def test_lease_key_shares_the_entry_cluster_slot(entry_key: str) -> None:
    from redis.crc import key_slot

    lease = Lease(Cache.from_url("memory://"), entry_key)
    assert lease.key.endswith(":lease")
    assert key_slot(lease.key.encode()) == key_slot(entry_key.encode())


def test_on_a_redis_cluster(redis_cluster_url: str, namespace: str, clock: FakeClock) -> None:
    cache = Cache.from_url(redis_cluster_url, namespace=namespace)
    guard = StampedeGuard(clock=clock, lease_wait=5.0)
    try:
        key, fresh = cache.keys.user("hot"), Freshness(1, stale_ttl=30, xfetch=False)
        loader = Counter("v1", delay=0.2)
        assert (
            run_threads(16, lambda: get_or_load(cache, key, loader, fresh, guard=guard))
            == ["v1"] * 16
        )
        assert loader.calls == 1
        clock.advance(2)  # stale: another process holds the lease, so it is served stale
        other = Lease(cache, key, 5)
        assert other.acquire() is True
        assert get_or_load(cache, key, Counter("v2"), fresh, guard=guard) == "v1"
        assert cache.stats["stale.served"] == 1
        assert other.release() is True
        assert get_or_load(cache, key, Counter("v2"), fresh, guard=guard) == "v2"
        assert cache.stats["store.error"] == 0
    finally:
        guard.close()
        drop_keys(cache, namespace)
        cache.close()


def test_guarded_fill_writes_only_over_what_was_read(cache: Cache) -> None:
    key = cache.keys.user("k")
    assert guarded_fill(cache, key, None, b"one", 60) is True
    assert guarded_fill(cache, key, None, b"two", 60) is False
    assert guarded_fill(cache, key, b"one", b"three", 60) is True
    assert cache.fetch([key]) == [b"three"]


def test_expired_lease_holder_never_overwrites_a_newer_value(cache: Cache) -> None:
    """A loads (slowly) under a lease that expires; B takes over and stores; A must lose."""
    key, fresh = cache.keys.user("k"), Freshness(60)
    guard_a = StampedeGuard(lease_ttl=0.2)  # two guards: two processes' single flights
    guard_b = StampedeGuard(lease_ttl=5.0, lease_wait=5.0)
    started, release = threading.Event(), threading.Event()

    def slow_old() -> str:
        started.set()
        release.wait(10)
        return "old"

    a_result: list[Any] = []
    a = threading.Thread(
        target=lambda: a_result.append(get_or_load(cache, key, slow_old, fresh, guard=guard_a))
    )
    a.start()
    try:
        assert started.wait(5)
        time.sleep(0.3)  # A's lease has expired, A still loading
        assert get_or_load(cache, key, lambda: "new", fresh, guard=guard_b) == "new"
    finally:
        release.set()
        a.join(10)
    assert a_result == ["old"]  # A's caller gets what A loaded ...
    assert cache.stats["fill.conflict"] == 1  # ... but A's fill was refused
    assert cache.stats["fill"] == 1
    assert get_or_load(cache, key, Counter("unused"), fresh, guard=guard_b) == "new"
    guard_a.close()
    guard_b.close()


# -- early refresh -----------------------------------------------------------------------


class RecordingRefresher(Refresher):
    """Records what would be refreshed, runs nothing (the decision is under test)."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted: list[Hashable] = []

    def submit(self, key: Hashable, fn: Callable[[], object]) -> str:
        self.submitted.append(key)
        return "scheduled"


def test_xfetch_in_get_or_load_fires_more_often_near_expiry(cache: Cache, clock: FakeClock) -> None:
    rng = random.Random(2024)
    refresher = RecordingRefresher()
    guard = StampedeGuard(clock=clock, rand=rng.random, refresher=refresher)
    key, fresh = cache.keys.user("k"), Freshness(100, beta=1.0)

    def compute() -> str:
        clock.advance(2.0)  # the computation "takes" 2 s: stored as compute_time
        return "v"

    get_or_load(cache, key, compute, fresh, guard=guard)
    created = clock.now
    rates = []
    for remaining in (60, 10, 6, 4, 2, 1, 0.2):
        clock.now = created + 100 - remaining
        refresher.submitted.clear()
        for _ in range(300):
            assert get_or_load(cache, key, Counter("unused"), fresh, guard=guard) == "v"
        rates.append(len(refresher.submitted) / 300)
    assert rates == sorted(rates), rates
    assert rates[0] == 0.0, rates
    assert rates[-1] > 0.85, rates
    assert cache.stats["refresh.early"] == round(sum(rates) * 300)


def test_xfetch_background_refresh_runs_at_most_once_per_key(
    cache: Cache, clock: FakeClock
) -> None:
    draws = iter([0.5] * 1000)
    guard = StampedeGuard(clock=clock, rand=lambda: next(draws))
    key, fresh = cache.keys.user("k"), Freshness(100)

    def compute() -> str:
        clock.advance(2.0)
        return "v1"

    assert get_or_load(cache, key, compute, fresh, guard=guard) == "v1"
    created = clock.now
    clock.now = created + 50  # 50 + 2 * ln 2 < 100: no early refresh
    assert get_or_load(cache, key, compute, fresh, guard=guard) == "v1"
    assert cache.stats["refresh.early"] == 0
    started, release = threading.Event(), threading.Event()
    refreshes = Counter()

    def refresh() -> str:
        refreshes()
        started.set()
        release.wait(10)
        return "v2"

    clock.now = created + 98.7  # 98.7 + 2 * ln 2 = 100.09 >= 100: refresh early
    for _ in range(20):
        assert get_or_load(cache, key, compute, fresh, refresh=refresh, guard=guard) == "v1"
    assert started.wait(5)
    assert cache.stats["refresh.early"] == 1
    assert cache.stats["refresh.running"] == 19
    release.set()
    assert guard.refresher.wait_idle(10)
    assert refreshes.calls == 1
    assert cache.stats["refresh.done"] == 1
    assert get_or_load(cache, key, compute, fresh, guard=guard) == "v2"
    guard.close()


def test_refresh_ahead_fires_in_the_window_and_not_before(
    cache: Cache, clock: FakeClock, guard: StampedeGuard
) -> None:
    key = cache.keys.user("k")
    fresh = Freshness(10, refresh_ahead=0.2, xfetch=False)
    assert get_or_load(cache, key, lambda: "v1", fresh, guard=guard) == "v1"
    created = clock.now
    loader = Counter("v2")
    clock.now = created + 7.9  # 2.1 s of 10 left: outside the last 20 %
    assert get_or_load(cache, key, loader, fresh, guard=guard) == "v1"
    assert guard.refresher.wait_idle(5)
    assert loader.calls == 0
    clock.now = created + 8.1
    assert get_or_load(cache, key, loader, fresh, guard=guard) == "v1"  # served at once
    assert guard.refresher.wait_idle(5)
    assert loader.calls == 1
    assert cache.stats["refresh.ahead"] == 1
    assert get_or_load(cache, key, loader, fresh, guard=guard) == "v2"  # a fresh entry now
    assert loader.calls == 1


# -- stale values ------------------------------------------------------------------------


def test_stale_while_revalidate_serves_stale_while_one_reload_runs(
    cache: Cache, clock: FakeClock, guard: StampedeGuard
) -> None:
    key = cache.keys.user("k")
    fresh = Freshness(1, stale_ttl=10, xfetch=False)
    assert get_or_load(cache, key, lambda: "v1", fresh, guard=guard) == "v1"
    clock.advance(2)  # expired, inside the stale window
    started, release = threading.Event(), threading.Event()
    reloads = Counter()

    def reload() -> str:
        reloads()
        started.set()
        release.wait(10)
        return "v2"

    leader: list[Any] = []
    t = threading.Thread(
        target=lambda: leader.append(get_or_load(cache, key, reload, fresh, guard=guard))
    )
    t.start()
    try:
        assert started.wait(5)
        # Same process: the reload is in flight. Another process: the lease is taken.
        same = run_threads(8, lambda: get_or_load(cache, key, reload, fresh, guard=guard))
        other = StampedeGuard(clock=clock)
        assert get_or_load(cache, key, reload, fresh, guard=other) == "v1"
        other.close()
    finally:
        release.set()
        t.join(10)
    assert same == ["v1"] * 8
    assert leader == ["v2"]
    assert reloads.calls == 1
    assert cache.stats["stale.served"] == 9
    assert get_or_load(cache, key, reload, fresh, guard=guard) == "v2"
    assert cache.stats["hit"] == 1  # this read (the first one was a miss)


def test_stale_if_error_within_the_window_and_raise_outside(
    cache: Cache, clock: FakeClock, guard: StampedeGuard
) -> None:
    key = cache.keys.user("k")
    fresh = Freshness(1, stale_ttl=5, xfetch=False)
    assert get_or_load(cache, key, lambda: "v1", fresh, guard=guard) == "v1"

    def broken() -> str:
        raise ConnectionError("database down")

    clock.advance(3)  # 2 s after expiry, window 5 s
    assert get_or_load(cache, key, broken, fresh, guard=guard) == "v1"
    assert cache.stats["stale.if_error"] == 1
    clock.advance(4)  # 6 s after expiry: beyond the window
    with pytest.raises(ConnectionError):
        get_or_load(cache, key, broken, fresh, guard=guard)


def test_moved_generations_are_never_served_stale(
    cache: Cache, clock: FakeClock, guard: StampedeGuard
) -> None:
    key = cache.keys.user("k")
    fresh = Freshness(1, stale_ttl=60, xfetch=False)
    assert get_or_load(cache, key, lambda: "v1", fresh, gens=("1:a",), guard=guard) == "v1"
    # Fresh, but a table it read was written: a miss.
    assert get_or_load(cache, key, lambda: "v2", fresh, gens=("2:b",), guard=guard) == "v2"
    assert cache.stats["invalidated"] == 1
    clock.advance(2)  # expired and inside the stale window, but its generations moved:

    def broken() -> str:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        get_or_load(cache, key, broken, fresh, gens=("3:c",), guard=guard)
    assert cache.stats["stale.served"] == 0
    assert cache.stats["stale.if_error"] == 0


def test_events_are_counted_with_a_prefix(cache: Cache, guard: StampedeGuard) -> None:
    key = cache.keys.user("k")
    get_or_load(cache, key, lambda: 1, Freshness(60), prefix="query.", guard=guard)
    get_or_load(cache, key, lambda: 1, Freshness(60), prefix="query.", guard=guard)
    stats = cache.stats.snapshot()
    assert stats["query.miss"] == 1
    assert stats["query.hit"] == 1
    assert stats["query.fill"] == 1
    assert "hit" not in stats
    assert "miss" not in stats


# -- the refresher -----------------------------------------------------------------------


def test_refresher_is_bounded_and_one_per_key() -> None:
    refresher = Refresher(max_workers=1, max_queue=1)
    release = threading.Event()
    ran: list[str] = []

    def job(name: str) -> Callable[[], None]:
        def run() -> None:
            release.wait(10)
            ran.append(name)

        return run

    assert refresher.submit("a", job("a")) == "scheduled"  # running
    assert refresher.submit("b", job("b")) == "scheduled"  # queued
    assert refresher.submit("a", job("a2")) == "running"
    assert refresher.submit("c", job("c")) == "full"
    workers = [t for t in threading.enumerate() if t.name.startswith("sa_cache-refresh")]
    assert len(workers) == 1
    release.set()
    assert refresher.wait_idle(10)
    assert sorted(ran) == ["a", "b"]
    assert not refresher.running("a")
    assert refresher.submit("a", job("a3")) == "scheduled"  # done keys are forgotten
    refresher.close()
    assert refresher.submit("d", job("d")) == "closed"
    assert sorted(ran) == ["a", "a3", "b"]


@pytest.mark.parametrize("lease", [True, False])
def test_a_load_that_read_before_a_delete_never_stores_after_it(cache: Cache, lease: bool) -> None:
    """The loader reads its source, the source changes and the app deletes the key, then
    the loader returns the old value: it is not stored (the delete left a tombstone
    that the load's fill, expecting the empty entry it saw, does not match)."""
    source = {"v": "old"}
    loaded, go = threading.Event(), threading.Event()

    def slow_loader() -> str:
        value = source["v"]
        loaded.set()
        go.wait(5)
        return value

    got: list[str] = []
    reader = threading.Thread(
        target=lambda: got.append(cache.get_or_set("k", slow_loader, ttl=300, lease=lease))
    )
    reader.start()
    assert loaded.wait(5)
    source["v"] = "new"
    assert cache.delete("k") is False  # nothing stored yet
    go.set()
    reader.join(10)
    cache.wait_for_fills()
    assert got == ["old"]  # what it read, for itself
    assert cache.get("k") is NO_VALUE
    assert cache.get_or_set("k", lambda: source["v"], ttl=300) == "new"
    assert cache.delete("k") is True  # a stored value counts; a tombstone does not
    assert cache.delete("k") is False


def test_a_load_slower_than_a_tombstone_lives_is_not_stored(
    cache: Cache, guard: StampedeGuard, clock: FakeClock
) -> None:
    """A tombstone left after the load's read may have expired by the time a very slow
    load returns: past half its life the value is returned but not stored."""
    key = cache.keys.user("slow")

    def slow() -> str:
        clock.advance(200.0)
        return "late"

    assert get_or_load(cache, key, slow, Freshness(600), guard=guard) == "late"
    cache.wait_for_fills()
    assert cache.stats["fill.too_late"] == 1
    assert cache.fetch([key]) == [NO_VALUE]  # (a bare entry: `get` checks generations)
    assert get_or_load(cache, key, lambda: "quick", Freshness(600), guard=guard) == "quick"
    cache.wait_for_fills()
    stored = cache.unpack(cache.fetch([key])[0])
    assert stored is not NO_VALUE
    assert stored.value == "quick"
