"""The `Backend` contract, run on every store; then Redis URLs, outages and the cluster.

Each test writes under its own random key prefix and deletes only those keys.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from redis.crc import key_slot
from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection
from redis_servers import HOST, RedisServer, free_port, missing_service

from sa_cache.backends import NO_VALUE, Backend, BackendError, MemoryBackend
from sa_cache.backends.redis import RedisBackend, RedisClusterBackend
from sa_cache.backends.redis_url import backend_from_url

AnyBackend = MemoryBackend | RedisBackend | RedisClusterBackend
SHORT_TTL = 0.2  # long enough to read the entry back first, even on a slow CI box
EXPIRED = 0.45  # sleep this long after writing; the entry must be gone by then


# --- fixtures and helpers ----------------------------------------------------------


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> Iterator[AnyBackend]:
    """Every store; the Redis URL fixtures are only asked for when needed."""
    store: AnyBackend
    if request.param == "memory":
        store = MemoryBackend()
    else:
        fixture = "redis_url" if request.param == "redis" else "redis_cluster_url"
        url = request.getfixturevalue(fixture)
        # Generous timeouts: these tests are about behaviour, not about a slow CI box.
        store = backend_from_url(url, socket_timeout=5, connect_timeout=5)
    yield store
    store.close()


@pytest.fixture
def prefix(backend: AnyBackend) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHDB)."""
    own = f"sa-cache-test:{uuid.uuid4().hex}:"
    yield own
    if not isinstance(backend, MemoryBackend):
        backend.unlink_many(backend.scan_keys(own + "*"))


def spread_keys(prefix: str, n: int) -> list[str]:
    """``n`` keys under ``prefix`` whose slots fall, in turn, in each third of the slots.

    The test cluster gives each node a third of the slots, so the keys hit every node.
    """
    per_third = -(-n // 3)
    thirds: list[list[str]] = [[], [], []]
    i = 0
    while min(len(t) for t in thirds) < per_third:
        key = f"{prefix}{i}"
        thirds[key_slot(key.encode()) * 3 // 16384].append(key)
        i += 1
    return [t[j] for j in range(per_third) for t in thirds][:n]


def live_keys(backend: AnyBackend, prefix: str) -> set[str]:
    if isinstance(backend, MemoryBackend):
        return set(backend.keys(prefix))
    return set(backend.scan_keys(prefix + "*", count=10))


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not on PATH")


# --- the contract --------------------------------------------------------------------


def test_implements_the_protocol(backend: AnyBackend) -> None:
    assert isinstance(backend, Backend)


def test_get_many_keeps_order_and_marks_misses(backend: AnyBackend, prefix: str) -> None:
    a, empty, missing = (prefix + name for name in ("a", "empty", "missing"))
    backend.set_many({a: b"A", empty: b""})
    got = backend.get_many([missing, a, empty, a])
    assert got == [NO_VALUE, b"A", b"", b"A"]
    assert got[2] is not NO_VALUE  # a cached b"" is a value, not a miss
    assert backend.get_many([]) == []


def test_values_are_binary_safe(backend: AnyBackend, prefix: str) -> None:
    key = prefix + "ключ-🔑"
    value = bytes(range(256)) * 4
    backend.set_many({key: value}, ttl=30)
    assert backend.get_many([key]) == [value]
    assert live_keys(backend, prefix) == {key}


def test_set_many_overwrites(backend: AnyBackend, prefix: str) -> None:
    key = prefix + "k"
    backend.set_many({key: b"1"})
    backend.set_many({key: b"2"}, ttl=30)
    assert backend.get_many([key]) == [b"2"]


def test_ttl_expires_entries(backend: AnyBackend, prefix: str) -> None:
    short, forever, long = prefix + "short", prefix + "forever", prefix + "long"
    backend.set_many({short: b"s", prefix + "short2": b"s"}, ttl=SHORT_TTL)
    backend.set_many({forever: b"f"})
    backend.set_many({long: b"l"}, ttl=30)
    assert backend.get_many([short]) == [b"s"]
    time.sleep(EXPIRED)
    assert backend.get_many([short, prefix + "short2", forever, long]) == [
        NO_VALUE,
        NO_VALUE,
        b"f",
        b"l",
    ]


def test_ttl_zero_or_negative_stores_nothing(backend: AnyBackend, prefix: str) -> None:
    a, b = prefix + "a", prefix + "b"
    backend.set_many({a: b"old", b: b"old"})
    backend.set_many({a: b"new"}, ttl=0)
    backend.apply(sets=[(b, b"new", -1.0)])
    assert backend.get_many([a, b]) == [NO_VALUE, NO_VALUE]


def test_add_stores_only_once(backend: AnyBackend, prefix: str) -> None:
    key = prefix + "lock"
    assert backend.add(key, b"first") is True
    assert backend.add(key, b"second") is False
    assert backend.add(key, b"third", ttl=30) is False
    assert backend.get_many([key]) == [b"first"]


def test_add_respects_ttl(backend: AnyBackend, prefix: str) -> None:
    key = prefix + "lock"
    assert backend.add(key, b"first", ttl=SHORT_TTL) is True
    assert backend.add(key, b"second", ttl=SHORT_TTL) is False
    time.sleep(EXPIRED)
    assert backend.get_many([key]) == [NO_VALUE]
    assert backend.add(key, b"third") is True
    assert backend.get_many([key]) == [b"third"]


def test_delete_many_counts_existing_keys(backend: AnyBackend, prefix: str) -> None:
    keys = spread_keys(prefix, 6)
    backend.set_many(dict.fromkeys(keys, b"v"))
    assert backend.delete_many([*keys[:4], prefix + "missing"]) == 4
    assert backend.get_many(keys) == [NO_VALUE] * 4 + [b"v"] * 2
    assert backend.delete_many(keys[:4]) == 0
    assert backend.delete_many([]) == 0


def test_apply_sets_and_deletes_in_one_call(backend: AnyBackend, prefix: str) -> None:
    """Keys in every slot range, so on the cluster the batch spans all nodes."""
    keys = spread_keys(prefix, 12)
    doomed, kept, written, short = keys[:3], keys[3:6], keys[6:9], keys[9:]
    backend.set_many(dict.fromkeys(doomed + kept, b"old"))
    backend.apply(
        sets=[
            *((k, b"new:" + k.encode(), None) for k in written),
            *((k, b"short", SHORT_TTL) for k in short),
            (kept[0], b"replaced", 30.0),
        ],
        deletes=[*doomed, prefix + "missing"],
    )
    assert backend.get_many(doomed) == [NO_VALUE] * 3
    assert backend.get_many(kept) == [b"replaced", b"old", b"old"]
    assert backend.get_many(written) == [b"new:" + k.encode() for k in written]
    assert backend.get_many(short) == [b"short"] * 3
    time.sleep(EXPIRED)
    assert backend.get_many(short) == [NO_VALUE] * 3


def test_apply_deletes_win_over_sets_of_the_same_key(backend: AnyBackend, prefix: str) -> None:
    key = prefix + "k"
    backend.apply(sets=[(key, b"v", None)], deletes=[key])
    assert backend.get_many([key]) == [NO_VALUE]
    backend.apply()  # nothing to do is fine


def test_large_values(backend: AnyBackend, prefix: str) -> None:
    big = os.urandom(1 << 20)
    a, b = prefix + "a", prefix + "b"
    backend.set_many({a: big}, ttl=30)
    backend.apply(sets=[(b, big[::-1], None)])
    assert backend.get_many([a, b]) == [big, big[::-1]]


def test_many_keys_across_slots(backend: AnyBackend, prefix: str) -> None:
    keys = spread_keys(prefix, 500)
    items = {k: k.encode() for k in keys}
    backend.set_many(items, ttl=30)
    shuffled = [*keys[::-3], prefix + "missing"]
    assert backend.get_many(shuffled) == [k.encode() for k in keys[::-3]] + [NO_VALUE]
    assert backend.get_many(keys) == list(items.values())
    assert backend.delete_many(keys) == 500
    assert backend.get_many(keys) == [NO_VALUE] * 500


def test_scan_keys_finds_exactly_the_prefixed_keys(backend: AnyBackend, prefix: str) -> None:
    keys = set(spread_keys(prefix, 40))
    backend.set_many(dict.fromkeys(keys, b"v"), ttl=30)
    neighbour = prefix[:-1] + "x:"  # another prefix, also this test's own
    backend.set_many({neighbour + "1": b"v"}, ttl=30)
    try:
        assert live_keys(backend, prefix) == keys
        if isinstance(backend, MemoryBackend):
            return
        assert set(backend.scan_keys(prefix + "*")) == keys  # default COUNT
        assert backend.unlink_many(backend.scan_keys(prefix + "*"), batch_size=7) == 40
        assert live_keys(backend, prefix) == set()
    finally:
        backend.delete_many([neighbour + "1"])


def test_advance_moves_the_clock_and_stamps_keys(backend: AnyBackend, prefix: str) -> None:
    clock_key, a, b = (prefix + "{gen}" + name for name in ("clock", "a", "b"))  # one slot
    first = backend.advance(clock_key, [a, b], "n1")
    assert abs(first - time.time_ns() // 1000) < 60_000_000  # microseconds, store's clock
    assert backend.get_many([clock_key, a, b]) == [
        str(first).encode(),
        f"{first}:n1".encode(),
        f"{first}:n1".encode(),
    ]
    second = backend.advance(clock_key, [], "n2")
    assert second > first
    ahead = second + 10**12  # a clock ahead of the store's time still moves forward
    backend.set_many({clock_key: str(ahead).encode()})
    assert backend.advance(clock_key, [b], "n3") == ahead + 1
    assert backend.get_many([a, b]) == [f"{first}:n1".encode(), f"{ahead + 1}:n3".encode()]


def test_cas_swaps_only_on_the_expected_value(backend: AnyBackend, prefix: str) -> None:
    key = prefix + "cas"
    assert backend.cas(key, None, b"lease-1", 10) is True  # absent -> set
    assert backend.cas(key, None, b"lease-2", 10) is False  # not absent any more
    assert backend.cas(key, b"lease-2", b"value", 10) is False  # wrong expectation
    assert backend.get_many([key]) == [b"lease-1"]
    assert backend.cas(key, b"lease-1", b"value", None) is True
    assert backend.get_many([key]) == [b"value"]
    assert backend.cas(key, b"value", None) is True  # compare-and-delete
    assert backend.get_many([key]) == [NO_VALUE]
    assert backend.cas(key, None, b"short", 0.05) is True
    time.sleep(0.15)
    assert backend.get_many([key]) == [NO_VALUE]


def test_swap_many_later_replaces_and_returns_what_was_there(
    backend: AnyBackend, prefix: str
) -> None:
    held, empty, other = prefix + "held", prefix + "empty", prefix + "other"
    backend.set_many({held: b"old", other: b"kept"})
    read = backend.swap_many_later([held, empty], b"mark", SHORT_TTL, [other])
    assert read() == [b"old", NO_VALUE, b"kept"]
    assert backend.get_many([held, empty, other]) == [b"mark", b"mark", b"kept"]
    time.sleep(EXPIRED)  # the mark expires
    assert backend.get_many([held, empty, other]) == [NO_VALUE, NO_VALUE, b"kept"]
    assert backend.swap_many_later([], b"mark", 1.0)() == []


def test_commit_writes_deletes_and_stamps_in_one_call(backend: AnyBackend, prefix: str) -> None:
    clock, gen = prefix + "{g}clock", prefix + "{g}gen"
    same, changed, absent, gone = (prefix + n for n in ("same", "changed", "absent", "gone"))
    backend.set_many({same: b"v1", changed: b"other", gone: b"x"})
    swapped = backend.commit(
        [(same, b"v1", b"v2", 60), (changed, b"v1", b"v2", 60), (absent, None, b"new", None)],
        [gone],
        clock,
        [gen],
        "n1",
    )
    assert swapped == [True, False, True]
    # a failed compare deletes: the writer cannot know the newest value
    assert backend.get_many([same, changed, absent, gone]) == [b"v2", NO_VALUE, b"new", NO_VALUE]
    stamped, token = backend.get_many([clock, gen])
    assert token == stamped + b":n1"  # type: ignore[operator]
    assert backend.commit([], [], clock, [], "n2") == []


def test_commit_leaves_tombstones_when_asked(backend: AnyBackend, prefix: str) -> None:
    clock = prefix + "{g}clock"
    same, changed, absent, gone = (prefix + n for n in ("same", "changed", "absent", "gone"))
    backend.set_many({same: b"v1", changed: b"other", gone: b"x"})
    swapped = backend.commit(
        [(same, b"v1", b"v2", 60), (changed, b"v1", b"v2", 60), (absent, b"v1", b"new", 60)],
        [gone],
        clock,
        [],
        "n1",
        (b"tomb", 0.5),
    )
    assert swapped == [True, False, False]
    # what would be deleted holds the tombstone instead, which an insert cannot match
    assert backend.get_many([same, changed, absent, gone]) == [b"v2", b"tomb", b"tomb", b"tomb"]
    assert backend.commit([(gone, None, b"late insert", 60)], [], clock, [], "n2") == [False]
    time.sleep(0.6)  # and it expires
    assert backend.get_many([changed, absent, gone]) == [NO_VALUE] * 3


def test_cas_many_swaps_each_key_on_its_own_expectation(
    backend: AnyBackend, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sa_cache.backends import redis as redis_module

    monkeypatch.setattr(redis_module, "CAS_BATCH_SIZE", 3)  # several script runs
    keys = [prefix + f"many{i}" for i in range(7)]
    backend.set_many({keys[0]: b"v0", keys[1]: b"v1", keys[2]: b"\x00bin\xff"})
    swapped = backend.cas_many(
        [
            (keys[0], b"v0", b"new0", 60),  # as expected: set
            (keys[1], b"other", b"new1", 60),  # not as expected: unchanged
            (keys[2], b"\x00bin\xff", None, None),  # as expected: deleted
            (keys[3], None, b"\x00new3\xff" * 1000, None),  # absent as expected
            (keys[4], b"v4", b"new4", None),  # expected a value, absent
            (keys[5], None, b"gone", 0),  # a ttl <= 0 stores nothing
            (keys[6], None, b"new6", 0.05),
        ]
    )
    assert swapped == [True, False, True, True, False, True, True]
    assert backend.get_many(keys[:6]) == [
        b"new0", b"v1", NO_VALUE, b"\x00new3\xff" * 1000, NO_VALUE, NO_VALUE
    ]  # fmt: skip
    time.sleep(0.15)
    assert backend.get_many([keys[6]]) == [NO_VALUE]
    assert backend.cas_many([]) == []


def test_ping(backend: AnyBackend) -> None:
    assert backend.ping() is True


# --- Redis only ----------------------------------------------------------------------


@pytest.fixture(params=["redis", "cluster"])
def redis_backend(request: pytest.FixtureRequest) -> Iterator[RedisBackend | RedisClusterBackend]:
    fixture = "redis_url" if request.param == "redis" else "redis_cluster_url"
    store = backend_from_url(request.getfixturevalue(fixture))
    yield store
    store.close()


def test_server_info(redis_backend: RedisBackend | RedisClusterBackend) -> None:
    info = redis_backend.server_info("persistence")
    if isinstance(redis_backend, RedisBackend):
        assert "aof_enabled" in info
    else:
        assert len(info) == 3
        assert all("aof_enabled" in node_info for node_info in info.values())


def test_cluster_get_many_in_one_slot(redis_cluster_url: str) -> None:
    store = backend_from_url(redis_cluster_url)
    prefix = f"sa-cache-test:{{{uuid.uuid4().hex}}}:"  # a hash tag: one slot
    keys = [f"{prefix}{i}" for i in range(5)]
    try:
        store.set_many(dict.fromkeys(keys, b"v"))
        assert store.get_many([*keys, prefix + "x"]) == [b"v"] * 5 + [NO_VALUE]
    finally:
        store.delete_many(keys)
        store.close()


# --- URLs ----------------------------------------------------------------------------


def pool_kwargs(store: RedisBackend | RedisClusterBackend) -> dict[str, Any]:
    assert isinstance(store, RedisBackend)
    return dict(store.client.connection_pool.connection_kwargs)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", {"host": "localhost", "port": 6379, "db": 0, "password": None}),
        (
            "redis://:s3cret@cache.example:6380/3",
            {"host": "cache.example", "port": 6380, "db": 3, "password": "s3cret"},
        ),
        (
            "redis://alice:p%40ss%3Aword@127.0.0.9:1/15",
            {
                "host": "127.0.0.9",
                "port": 1,
                "db": 15,
                "username": "alice",
                "password": "p@ss:word",
            },
        ),
        ("redis://[::1]:6400/0", {"host": "::1", "port": 6400}),
        ("redis://h/?db=7", {"db": 7}),
        (
            "redis://h/0?socket_timeout=0.5&connect_timeout=1.5&client_name=app",
            {"socket_timeout": 0.5, "socket_connect_timeout": 1.5, "client_name": "app"},
        ),
    ],
)
def test_redis_url(url: str, expected: dict[str, Any]) -> None:
    store = backend_from_url(url)
    assert isinstance(store, RedisBackend)
    kwargs = pool_kwargs(store)
    assert {k: kwargs.get(k) for k in expected} == expected
    assert store.client.connection_pool.connection_class is redis.Connection
    store.close()


def test_redis_url_defaults() -> None:
    store = backend_from_url("redis://h", client_name="from-kwargs")
    kwargs = pool_kwargs(store)
    assert kwargs["socket_timeout"] == 0.25
    assert kwargs["socket_connect_timeout"] == 0.25
    assert kwargs["client_name"] == "from-kwargs"
    assert kwargs["decode_responses"] is False
    assert kwargs["retry"].get_retries() == 0  # a dead server costs one timeout
    store.close()


def test_rediss_url_uses_tls() -> None:
    store = backend_from_url("rediss://:pw@secure.example:6390/1?ssl_cert_reqs=none")
    assert isinstance(store, RedisBackend)
    pool = store.client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["host"] == "secure.example"
    assert pool.connection_kwargs["port"] == 6390
    assert pool.connection_kwargs["db"] == 1
    assert pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["ssl_cert_reqs"] == "none"
    store.close()


@pytest.mark.parametrize(
    ("url", "path", "db", "password"),
    [
        ("unix:///tmp/redis.sock", "/tmp/redis.sock", 0, None),
        ("unix:///var/run/redis/redis.sock?db=4", "/var/run/redis/redis.sock", 4, None),
        ("unix://:pw@/tmp/r.sock?db=2", "/tmp/r.sock", 2, "pw"),
    ],
)
def test_unix_url(url: str, path: str, db: int, password: str | None) -> None:
    store = backend_from_url(url)
    assert isinstance(store, RedisBackend)
    pool = store.client.connection_pool
    assert pool.connection_class is redis.UnixDomainSocketConnection
    assert (pool.connection_kwargs["path"], pool.connection_kwargs["db"]) == (path, db)
    assert pool.connection_kwargs.get("password") == password
    store.close()


def test_sentinel_url() -> None:
    url = "redis+sentinel://:pw@s1.example:26379,s2.example:26380/mymaster/2?socket_timeout=1"
    store = backend_from_url(url)
    assert isinstance(store, RedisBackend)
    pool: Any = store.client.connection_pool
    assert pool.service_name == "mymaster"
    assert pool.connection_class is SentinelManagedConnection
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["socket_timeout"] == 1.0
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [(s["host"], s["port"]) for s in sentinels] == [
        ("s1.example", 26379),
        ("s2.example", 26380),
    ]
    assert all(s["socket_timeout"] == 1.0 for s in sentinels)
    store.close()


def test_sentinel_url_defaults_and_tls() -> None:
    url = "rediss+sentinel://s1/cache?sentinel_password=spw"
    store = backend_from_url(url)
    assert isinstance(store, RedisBackend)
    pool: Any = store.client.connection_pool
    assert pool.service_name == "cache"
    assert pool.connection_kwargs["db"] == 0
    assert pool.connection_class is SentinelManagedSSLConnection
    (sentinel,) = pool.sentinel_manager.sentinels
    kwargs = sentinel.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == ("s1", 26379, "spw")
    assert sentinel.connection_pool.connection_class is redis.SSLConnection
    store.close()


def test_cluster_url() -> None:
    store = backend_from_url("redis+cluster://bob:pw@n1.example:7000,n2.example,[::1]:7002/")
    assert isinstance(store, RedisClusterBackend)
    assert store.startup_nodes == (("n1.example", 7000), ("n2.example", 6379), ("::1", 7002))
    kwargs = store.client_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["ssl"]) == ("bob", "pw", False)
    assert kwargs["socket_timeout"] == 0.25
    assert store.retry.get_retries() == 0  # one failed command costs one timeout
    store.close()


def test_rediss_cluster_url() -> None:
    store = backend_from_url("rediss+cluster://n1.example:7000?socket_timeout=2")
    assert isinstance(store, RedisClusterBackend)
    assert store.startup_nodes == (("n1.example", 7000),)
    assert store.client_kwargs["ssl"] is True
    assert store.client_kwargs["socket_timeout"] == 2.0
    store.close()


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("http://localhost:6379", "'http'"),
        ("localhost:6379", "scheme"),
        ("redis://localhost:abc/0", "'abc'"),
        ("redis://localhost:0", "'0'"),
        ("redis://localhost:70000", "'70000'"),
        ("redis://", "missing host"),
        ("redis://:pw@:6379", "missing host"),
        ("redis://h/abc", "db='abc'"),
        ("redis://h/0/1", "db='0/1'"),
        ("redis://h?db=x", "db='x'"),
        ("redis://h?socket_timeout=fast", "socket_timeout='fast'"),
        ("redis://h?connect_timeout=-1", "connect_timeout='-1'"),
        ("redis://h?sockettimeout=1", "'sockettimeout'"),
        ("redis://h?novalue", "novalue"),
        ("redis://h#frag", "fragment"),
        ("redis://[::1:6379", "IPv6"),
        ("redis://[::1]x:6379", "IPv6"),
        ("redis://h1,h2", "one host"),
        ("redis://h?sentinel_password=x", "redis+sentinel"),
        ("redis+sentinel://s1:26379", "service name"),
        ("redis+sentinel://s1:26379/", "service name"),
        ("redis+sentinel://s1:x/mymaster", "'x'"),
        ("redis+sentinel://s1/mymaster/x", "db='x'"),
        ("redis+sentinel://s1/mymaster/0/extra", "unexpected path"),
        ("redis+sentinel:///mymaster", "missing host"),
        ("redis+cluster://n1:7000/2", "db 0"),
        ("redis+cluster://n1:7000,n2:port", "'port'"),
        ("redis+cluster://", "missing host"),
        ("unix://", "socket path"),
        ("unix://host/tmp/redis.sock", "no host"),
    ],
)
def test_malformed_url_names_the_bad_part(url: str, names: str) -> None:
    with pytest.raises(ValueError, match="Redis URL") as info:
        backend_from_url(url)
    assert names in str(info.value)


# --- outages ---------------------------------------------------------------------------


def outage_ops(store: RedisBackend | RedisClusterBackend) -> list[Any]:
    return [
        lambda: store.get_many(["k"]),
        lambda: store.set_many({"k": b"v"}),
        lambda: store.set_many({"k": b"v", "k2": b"v"}, ttl=1),
        lambda: store.delete_many(["k"]),
        lambda: store.add("k", b"v", ttl=1),
        lambda: store.apply(sets=[("k", b"v", None)], deletes=["k2"]),
        store.server_info,
        lambda: list(store.scan_keys("*")),
        lambda: store.unlink_many(["k"]),
        lambda: store.advance("clock", ["k"], "nonce"),
    ]


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_unreachable_server(scheme: str) -> None:
    port = free_port()  # nobody listens here
    url = f"{scheme}://{HOST}:{port}"
    store = backend_from_url(url)  # building never connects, so never raises
    try:
        started = time.monotonic()
        with pytest.raises(BackendError) as info:
            store.get_many(["k"])
        assert time.monotonic() - started < 2
        assert isinstance(info.value.__cause__, redis.RedisError | redis.RedisClusterException)
        for op in outage_ops(store):
            with pytest.raises(BackendError):
                op()
        assert store.ping() is False
        # Empty batches need no round trip, so they work even now.
        assert store.get_many([]) == []
        assert store.delete_many([]) == 0
        store.set_many({})
        store.apply()
    finally:
        store.close()


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_silent_server_times_out(scheme: str) -> None:
    """A server that accepts connections but never answers costs about one timeout."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(16)  # the kernel completes handshakes; nobody ever replies
        port = listener.getsockname()[1]
        store = backend_from_url(f"{scheme}://{HOST}:{port}", socket_timeout=0.2)
        try:
            started = time.monotonic()
            with pytest.raises(BackendError):
                store.get_many(["k"])
            assert time.monotonic() - started < 2
            assert store.ping() is False
        finally:
            store.close()


def test_killed_server_then_restart_reconnects() -> None:
    require_redis_server()
    with RedisServer() as server:
        store = backend_from_url(server.url)
        try:
            store.set_many({"k": b"v"})
            assert store.get_many(["k"]) == [b"v"]  # a pooled connection stays open
            clock = store.advance("clock", [], "n")  # the server caches the script
            server.kill()
            for op in outage_ops(store):
                started = time.monotonic()
                with pytest.raises(BackendError):
                    op()
                assert time.monotonic() - started < 2
            assert store.ping() is False
            server.restart()
            # The same backend object reconnects by itself (the data was not persisted).
            assert store.get_many(["k"]) == [NO_VALUE]
            store.set_many({"k": b"again"}, ttl=30)
            assert store.get_many(["k"]) == [b"again"]
            assert store.ping() is True
            # The restarted server lost its script cache: EVALSHA falls back to EVAL.
            assert store.advance("clock", ["k"], "n") > clock
        finally:
            store.close()


def test_sentinel_finds_the_master() -> None:
    require_redis_server()
    with RedisServer() as master:
        monitor = f"sentinel monitor cache {HOST} {master.port} 1\n"
        with RedisServer(config=monitor, args=("--sentinel",)) as sentinel:
            store = backend_from_url(f"redis+sentinel://{HOST}:{sentinel.port}/cache/0")
            try:
                store.set_many({"k": b"v"}, ttl=30)
                assert store.get_many(["k"]) == [b"v"]
                assert store.ping() is True
            finally:
                store.close()


# --- the cluster backend is lazy -------------------------------------------------------


def test_cluster_backend_is_lazy_and_retries_discovery(redis_cluster_url: str) -> None:
    dead = (HOST, free_port())
    store = RedisClusterBackend([dead], socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        with pytest.raises(BackendError, match="cluster discovery"):
            store.get_many(["k"])
        assert store.ping() is False
        # Discovery is tried again by a later call; here the cluster appears.
        live = backend_from_url(redis_cluster_url)
        assert isinstance(live, RedisClusterBackend)
        store.startup_nodes = live.startup_nodes
        live.close()
        assert store.ping() is True
        assert store.get_many(["sa-cache-test:never-written"]) == [NO_VALUE]
    finally:
        store.close()
    with pytest.raises(BackendError, match="closed"):
        store.get_many(["k"])


def test_get_many_later_reads_once(backend: AnyBackend, prefix: str) -> None:
    key = prefix + "later"
    backend.set_many({key: b"before"})
    read = backend.get_many_later([key, prefix + "absent"])
    assert read() == [b"before", NO_VALUE]
    backend.set_many({key: b"after"})
    assert read() == [b"before", NO_VALUE]  # collected once, kept
    assert backend.get_many_later([key])() == [b"after"]
    assert backend.get_many_later([])() == []
    soon = backend.get_many_soon([key, prefix + "absent"])  # read once, right away
    assert soon() == [b"after", NO_VALUE]
    assert backend.get_many_soon([])() == []


@contextmanager
def three_keys() -> Iterator[RedisBackend]:
    """A backend on a private server holding ``k0``..``k2`` = ``b"0"``..``b"2"``."""
    require_redis_server()
    with RedisServer() as server:
        store = backend_from_url(server.url)
        assert isinstance(store, RedisBackend)
        try:
            store.set_many({f"k{i}": str(i).encode() for i in range(3)})
            yield store
        finally:
            store.close()


def test_later_reads_collect_in_any_order_and_drop_abandoned_replies() -> None:
    with three_keys() as store:
        reads = [store.get_many_later([f"k{i}"]) for i in range(3)]
        assert reads[2]() == [b"2"]  # reads the replies sent before it first
        assert reads[0]() == [b"0"]
        for _ in range(200):  # never collected (a rolled-back flush): never pile up
            store.get_many_later(["k1"])
        assert len(store._later._waiting) <= 32
        assert reads[1]() == [b"1"]
        assert store.get_many_later(["k1"])() == [b"1"]


@pytest.mark.parametrize("method", ["get_many_later", "get_many_soon"])
def test_deferred_reads_fail_cleanly_and_reconnect(method: str) -> None:
    require_redis_server()
    with RedisServer() as server:
        store = backend_from_url(server.url)
        read = getattr(store, method)
        try:
            store.set_many({"k": b"v"})
            assert read(["k"])() == [b"v"]
            server.kill()
            started = time.monotonic()
            with pytest.raises(BackendError):  # at the send or at the read
                read(["k"])()
            assert time.monotonic() - started < 2
            server.restart()
            assert read(["k"])() == [NO_VALUE]  # reconnected (not persisted)
            store.set_many({"k": b"again"})
            assert read(["k"])() == [b"again"]
        finally:
            store.close()


def test_soon_reads_keep_their_connection_until_read() -> None:
    """A soon read's connection is its own until its reply is read, so reads and other
    commands sent meanwhile (on other connections) never take each other's replies; the
    connection is kept for later commands after that."""
    with three_keys() as store:
        reads = [store.get_many_soon([f"k{i}"]) for i in range(3)]
        assert store.get_many(["k1"]) == [b"1"]
        assert [read() for read in reversed(reads)] == [[b"2"], [b"1"], [b"0"]]
        pool = store.client.connection_pool
        in_use = len(pool._in_use_connections)
        for _ in range(50):
            assert store.get_many_soon(["k2"])() == [b"2"]
        assert len(pool._in_use_connections) == in_use  # none leaked
