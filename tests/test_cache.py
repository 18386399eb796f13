"""The Cache facade's cache-aside API, on memory, Redis and a Redis Cluster."""

from __future__ import annotations

import datetime
import decimal
import time
import uuid
from collections.abc import Iterator

import pytest

import sa_cache
from sa_cache import NO_VALUE, Cache


@pytest.fixture(params=["memory", "redis", "cluster"])
def cache(request: pytest.FixtureRequest, namespace: str) -> Iterator[Cache]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("redis_cluster_url")
    c = Cache.from_url(url, namespace=namespace, default_ttl=60)
    yield c
    backend = c.backend
    scan = getattr(backend, "scan_keys", None)
    if scan is not None:  # delete only this test's keys
        keys = list(scan(f"{namespace}:*"))
        if keys:
            backend.delete_many(keys)
    c.close()


def test_get_set_delete_and_sentinel(cache: Cache) -> None:
    assert cache.get("missing") is NO_VALUE
    assert cache.get("missing", default="d") == "d"
    cache.set("none", None)
    assert cache.get("none") is None  # a cached None is a value
    value = {
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
        "amount": decimal.Decimal("1.10"),
        "id": uuid.UUID(int=7),
        "tags": {"a", "b"},
        "pair": (1, "x"),
        "raw": b"\x00\xff",
    }
    cache.set("v", value)
    assert cache.get("v") == value
    assert cache.delete("v") is True
    assert cache.delete("v") is False
    assert cache.get("v") is NO_VALUE
    assert cache.stats["hit"] == 2
    assert cache.stats["miss"] == 3


def test_many_and_get_or_set(cache: Cache) -> None:
    cache.set_many({f"k{i}": i for i in range(50)}, ttl=30)
    found = cache.get_many([f"k{i}" for i in range(55)])
    assert found == {f"k{i}": i for i in range(50)}
    assert cache.delete_many([f"k{i}" for i in range(10)]) == 10
    assert len(cache.get_many([f"k{i}" for i in range(50)])) == 40
    calls: list[int] = []

    def loader() -> list[int]:
        calls.append(1)
        return [1, 2, 3]

    assert cache.get_or_set("computed", loader) == [1, 2, 3]
    assert cache.get_or_set("computed", loader) == [1, 2, 3]
    assert calls == [1]


def test_ttl_expires(cache: Cache) -> None:
    cache.set("short", "x", ttl=0.05)
    assert cache.get("short") == "x"
    time.sleep(0.15)
    assert cache.get("short") is NO_VALUE


def test_keys_are_namespaced_and_versioned(cache: Cache) -> None:
    cache.set("a", 1)
    other = Cache(cache.backend, namespace=cache.namespace + "x")
    assert other.get("a") is NO_VALUE
    newer = Cache(cache.backend, namespace=cache.namespace, version="v2")
    assert newer.get("a") is NO_VALUE
    assert cache.keys.user("a") == f"{cache.namespace}:v1:k:a"


def test_corrupt_and_foreign_values_are_counted_misses(cache: Cache) -> None:
    cache.backend.set_many({cache.keys.user("bad"): b"\x93\x01\x02"}, 60)
    cache.backend.set_many({cache.keys.user("worse"): b"\xc1"}, 60)
    assert cache.get("bad") is NO_VALUE
    assert cache.get("worse") is NO_VALUE
    assert cache.stats["decode_error"] == 2


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="'mongo'"):
        Cache.from_url("mongo://localhost")
    with pytest.raises(ValueError, match="port"):
        Cache.from_url("redis://localhost:abc/0")
    with pytest.raises(ValueError, match="memory:// takes no host"):
        Cache.from_url("memory://somewhere")
    with pytest.raises(ValueError, match="max_entries"):
        Cache.from_url("memory://?max_entries=lots")
    with pytest.raises(TypeError, match=r"unknown cache setting.*namespce"):
        Cache.from_url("memory://", namespce="typo")
    with pytest.raises(ValueError, match="namespace"):
        Cache.from_url("memory://", namespace="has space")
    cache = Cache.from_url("memory://")
    with pytest.raises(TypeError, match="'object'"):
        cache.set("k", object())
    with pytest.raises(TypeError, match="cache keys must be str"):
        cache.get(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        cache.set("k", 1, ttl=-1)


def test_unreachable_redis_is_a_fast_miss(namespace: str) -> None:
    cache = Cache.from_url("redis://127.0.0.1:1/0", namespace=namespace, connect_timeout=0.1)
    try:
        started = time.monotonic()
        assert cache.get("k") is NO_VALUE
        cache.set("k", 1)
        assert cache.get_or_set("k", lambda: 5) == 5
        assert time.monotonic() - started < 2.0
        assert cache.stats["store.error"] >= 1
    finally:
        cache.close()  # (its replayer would go on trying until the interpreter exits)


def test_circuit_breaker_skips_the_store_then_recovers(redis_url: str, namespace: str) -> None:
    from redis_servers import RedisServer

    with RedisServer() as server:
        cache = Cache.from_url(server.url, namespace=namespace, breaker_cooldown=0.2)
        cache.set("k", "v")
        server.kill()
        for _ in range(10):
            assert cache.get("k") is NO_VALUE
        assert cache.stats["store.error"] == 5  # then the circuit opened
        assert cache.stats["store.skipped"] == 5
        cache.invalidate("users")  # undeliverable: remembered
        server.restart()
        time.sleep(0.3)
        cache.set("k", "again")  # the probe closes the circuit and replays
        assert cache.get("k") == "again"
        assert cache.stats["invalidate.replayed"] == 1
        cache.close()


def test_public_api_names() -> None:
    for name in ("Cache", "CachingSession", "with_cache", "NO_VALUE", "Backend"):
        assert name in sa_cache.__all__


def test_a_cache_cannot_be_pickled_or_copied() -> None:
    """It holds store connections, locks and threads: a clear error, not a half copy."""
    import copy
    import pickle

    cache = sa_cache.Cache.from_url("memory://", namespace="no-pickle")
    try:
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            pickle.dumps(cache)
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            copy.copy(cache)
    finally:
        cache.close()


def test_the_alembic_helpers_are_reached_after_a_plain_import() -> None:
    """README and DESIGN write ``sa_cache.alembic.run_migrations(...)`` with ``import
    sa_cache`` only: in a fresh interpreter that was an AttributeError (README audit
    rc-04). alembic itself is still imported only once the helpers are used."""
    import subprocess
    import sys

    program = (
        "import sys, sa_cache\n"
        "assert 'alembic' not in sys.modules\n"
        "assert callable(sa_cache.alembic.configure_kwargs)\n"
        "assert callable(sa_cache.versioning.track)\n"
        "try:\n"
        "    sa_cache.no_such_module\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_module' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
