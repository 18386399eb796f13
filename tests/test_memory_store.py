"""The embedded store's LRU never evicts a guard (a tombstone, a lease): evicted, it
would read as "absent", which a fill loaded before it compares equal to."""

from __future__ import annotations

import threading

from helpers import StalledLoad

import sa_cache
from sa_cache.backends.base import NO_VALUE
from sa_cache.backends.memory import MemoryBackend
from sa_cache.tokens import TOMBSTONE_PREFIX


def test_a_load_begun_before_a_delete_never_lands_after_its_tombstone_is_pushed_out() -> None:
    cache = sa_cache.Cache.from_url("memory://?max_entries=50")
    source = {"v": "old"}
    slow = StalledLoad(source)
    began, release = slow.began, slow.release
    loader = threading.Thread(target=lambda: cache.get_or_set("user:1", slow, ttl=60))
    loader.start()
    try:
        assert began.wait(10)
        source["v"] = "new"
        cache.delete("user:1")  # leaves a tombstone
        for i in range(60):  # more than max_entries of other traffic
            cache.set(f"other:{i}", i)
    finally:
        release.set()
        loader.join(10)
    assert cache.get("user:1") is NO_VALUE  # the old load was not stored
    assert cache.get_or_set("user:1", lambda: source["v"]) == "new"
    cache.close()


def test_guards_are_passed_over_and_expire_by_their_ttl() -> None:
    now = [0.0]
    store = MemoryBackend(max_entries=3, clock=lambda: now[0])
    guards = {"tomb": TOMBSTONE_PREFIX + b"x", "lease": b"sac-lease:y"}
    for key, value in guards.items():
        store.set_many({key: value}, ttl=10)
    for i in range(5):
        store.set_many({f"k{i}": b"value"})
    assert store.get_many(["tomb", "lease"]) == list(guards.values())
    # (guards are kept apart: the LRU holds max_entries values besides them)
    assert store.get_many([f"k{i}" for i in range(5)]) == [NO_VALUE] * 2 + [b"value"] * 3
    now[0] = 11.0  # the guards expired: they go like any entry
    for i in range(5, 8):
        store.set_many({f"k{i}": b"value"})
    assert store.get_many(["tomb", "lease"]) == [NO_VALUE, NO_VALUE]
    assert store.get_many(["k5", "k6", "k7"]) == [b"value"] * 3


def test_guards_stay_outside_the_lru_and_go_by_their_ttl_or_the_guard_limit() -> None:
    """Many deletes (each a tombstone) neither push entries out nor make the LRU walk
    over them: guards are kept apart, purged as they expire; past ``guard_limit`` the
    soonest to expire are dropped (counted)."""
    now = [0.0]
    store = MemoryBackend(max_entries=10, clock=lambda: now[0])
    store.set_many({f"k{i}": b"value" for i in range(10)})
    for i in range(500):
        store.set_many({f"t{i}": TOMBSTONE_PREFIX + b"x"}, ttl=30 + i / 100)
    assert store.get_many([f"k{i}" for i in range(10)]) == [b"value"] * 10  # none evicted
    assert len(store.keys("t")) == 500
    now[0] = 33.0  # t0..t300 expired
    store.set_many({"t-new": TOMBSTONE_PREFIX + b"y"}, ttl=30)
    assert len(store.keys("t")) == 200
    assert len(store._expiry) <= 2 * len(store._guards) + 64
    store.guard_limit = 100
    store.set_many({"t-last": TOMBSTONE_PREFIX + b"z"}, ttl=60)
    assert len(store.keys("t")) == 100
    assert store.guards_dropped == 101  # the soonest to expire
    assert store.get_many(["t-last"]) == [TOMBSTONE_PREFIX + b"z"]
    store.set_many({"t-last": b"value"})  # a guard replaced by a value: in the LRU
    assert store.get_many(["t-last"]) == [b"value"]
    assert "t-last" not in store._guards
