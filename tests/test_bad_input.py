"""Bad input is refused at the call, with an error naming what is wrong.

NaN, an infinity or a bool given as a TTL, timeout or interval used to pass the
``<= 0`` checks and fail later: inside every query, in redis-py after the database
COMMIT, or as a heartbeat thread spinning on ``interval=0``. Wrong types (a URL where a
`Cache` or a backend belongs, one key where an iterable of keys belongs) failed late or
did the wrong thing. The demo left its keys in the user's Redis.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from models import Base, Country
from sqlalchemy.orm import Session, sessionmaker

import sa_cache
from sa_cache import NO_VALUE
from sa_cache.backends.memory import MemoryBackend
from sa_cache.versioning import Tracker, VersionRegistry, attach_registry, track
from sa_cache.warming_schedule import Interval, parse_schedule
from sa_cache.write_behind import write_behind_for
from sa_cache.write_behind_config import WorkerConfig, WriteBehindConfig

NAN, INF = float("nan"), float("inf")
BAD_SECONDS = [NAN, INF, -INF, True, False, 0, -1, "5", None]
BAD_SECONDS_IDS = ["nan", "inf", "-inf", "True", "False", "0", "-1", "str", "None"]


@pytest.fixture
def cache(cache_url: str, namespace: str) -> Iterator[sa_cache.Cache]:
    made = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield made
    made.backend.delete_many([made.keys.user("k"), made._all_gen_key, made.clock_key])
    made.close()


# -- B1: non-finite and bool settings -------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["default_ttl", "socket_timeout", "connect_timeout", "breaker_cooldown"]
)
@pytest.mark.parametrize("value", [NAN, INF, True], ids=["nan", "inf", "True"])
def test_cache_settings_refuse_nonfinite_and_bool_seconds(
    name: str, value: object, redis_url: str
) -> None:
    """``socket_timeout=nan`` on Redis raised from redis-py after the database COMMIT;
    ``default_ttl=nan`` failed every cached query."""
    for url in ("memory://", redis_url):
        with pytest.raises(ValueError, match=name):
            sa_cache.Cache.from_url(url, **{name: value})


@pytest.mark.parametrize("name", ["breaker_threshold", "max_entries"])
def test_count_settings_refuse_bool(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        sa_cache.Cache.from_url("memory://", **{name: True})


@pytest.mark.parametrize("ttl", [NAN, INF, True, 0, -1, "5"], ids=str)
def test_set_refuses_a_bad_ttl_and_stores_nothing(cache: sa_cache.Cache, ttl: Any) -> None:
    with pytest.raises(ValueError, match="ttl"):
        cache.set("k", 1, ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        cache.get_or_set("k", lambda: 2, ttl=ttl)
    assert cache.get("k") is NO_VALUE


@pytest.mark.parametrize("ttl", [NAN, INF, True, 0], ids=str)
def test_register_refuses_a_bad_ttl(ttl: Any, cache: sa_cache.Cache) -> None:
    """``register(Model, ttl=nan)`` on Redis made every entity fill fail (logged)."""
    with pytest.raises(ValueError, match="ttl"):
        cache.register(Country, ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        cache.register(ttl=ttl)
    assert not cache.entities


@pytest.mark.parametrize("grace", [NAN, INF, True], ids=str)
def test_track_refuses_a_bad_grace(grace: Any, redis_url: str, namespace: str) -> None:
    """``track(grace=nan)`` passed the ``<= 0`` check, then failed in redis-py."""
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    try:
        with pytest.raises(ValueError, match="grace"):
            track(cache, sa.create_engine("sqlite://"), Base.metadata, grace=grace)
        assert cache.registry is None
    finally:
        cache.close()


@pytest.mark.parametrize("value", BAD_SECONDS[:8], ids=BAD_SECONDS_IDS[:8])
def test_interval_schedules_refuse_nonfinite_and_bool(value: Any) -> None:
    """``Warmer.every(inf)`` was accepted; the CLI's job table then raised."""
    with pytest.raises((ValueError, TypeError), match=r"interval|schedule"):
        parse_schedule(value)
    if not isinstance(value, str):
        with pytest.raises(ValueError, match="interval"):
            Interval(value)
    assert parse_schedule(datetime.timedelta(minutes=5)) == Interval(300.0)


def test_predictive_lead_must_be_finite() -> None:
    engine = sa.create_engine("sqlite://")
    cache = sa_cache.Cache.from_url("memory://")
    warmer = sa_cache.Warmer(
        cache, sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    )
    for lead in (NAN, INF, -1.0, True):
        with pytest.raises(ValueError, match="lead"):
            warmer.predictive(lead=lead)
    assert warmer.predictive(lead=0).name == "predictive"
    cache.close()


# -- B3: a heartbeat interval of 0 or less --------------------------------------------------


@pytest.mark.parametrize("interval", [0, -1.0, NAN, INF, True], ids=str)
def test_track_refuses_a_bad_interval_before_starting_a_thread(
    interval: Any, redis_url: str, namespace: str
) -> None:
    """``interval=0`` started a heartbeat thread syncing with Redis in a busy loop."""
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    try:
        with pytest.raises(ValueError, match="interval"):
            track(cache, sa.create_engine("sqlite://"), Base.metadata, interval=interval)
        with pytest.raises(ValueError, match="interval"):
            attach_registry(cache, interval=interval)
        assert cache.registry is None  # nothing announced, no thread
        with pytest.raises(ValueError, match="interval"):
            Tracker(VersionRegistry(cache), interval)
    finally:
        cache.close()


# -- B4: wrong types ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis://127.0.0.1:6379/0", None, object()], ids=str)
def test_cache_takes_a_backend(backend: Any) -> None:
    """``Cache("redis://...")`` failed at the first commit, after the database COMMIT."""
    with pytest.raises(TypeError, match=r"Backend.*Cache\.from_url"):
        sa_cache.Cache(backend)
    sa_cache.Cache(MemoryBackend()).close()


@pytest.mark.parametrize("bad", ["redis://127.0.0.1:6379/0", object()], ids=["str", "object"])
def test_caching_session_takes_a_cache(engine: sa.Engine, bad: Any) -> None:
    """``cache="redis://..."`` failed at the first read; now the Session is refused."""
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=bad)
    with pytest.raises(TypeError, match=r"cache= must be an sa_cache\.Cache"):
        factory()
    with Session(engine) as plain:  # the database was never touched
        assert plain.execute(sa.text("SELECT 1")).scalar() == 1


@pytest.mark.parametrize("method", ["get_many", "delete_many"])
@pytest.mark.parametrize("keys", ["user:1", b"user:1"], ids=["str", "bytes"])
def test_key_lists_refuse_one_bare_key(cache: sa_cache.Cache, method: str, keys: Any) -> None:
    """``delete_many("user:1")`` deleted the keys "u", "s", "e"... and left "user:1"."""
    cache.set("k", "old")
    with pytest.raises(TypeError, match="keys"):
        getattr(cache, method)(keys)
    assert cache.get_many(["k"]) == {"k": "old"}
    assert cache.delete_many(["k"]) == 1
    assert cache.get("k") is NO_VALUE


# -- B6: the demo cleans up after itself ----------------------------------------------------


def test_demo_on_redis_leaves_no_keys(redis_url: str) -> None:
    """Each demo run uses a new namespace; its generations have no TTL, so a run left
    permanent keys in the user's Redis."""
    from sa_cache.demo import run_demo

    _, _, cache = run_demo(redis_url, 20, 5)
    pattern = f"{cache.namespace}:*"
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(pattern)), "the demo should have used the store"
        cache.close()
        assert list(client.scan_iter(pattern)) == []
    finally:
        for key in client.scan_iter(pattern):
            client.delete(key)
        client.close()


# -- write-behind settings and dead-letter ids ---------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("prepare_timeout", float("nan")),
        ("prepare_timeout", float("inf")),
        ("prepare_timeout", True),
    ],
)
def test_write_behind_settings_refuse_nonfinite_and_bool(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=setting):
        WriteBehindConfig(**{setting: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_delay", float("nan")),
        ("backoff", float("inf")),
        ("max_backoff", float("nan")),
        ("foreign_key_wait", float("inf")),
        ("poll_interval", True),
        ("lease_ttl", 0),
        ("lease_ttl", float("inf")),
        ("batch_size", True),
        ("max_attempts", False),
    ],
)
def test_worker_settings_refuse_nonfinite_and_bool(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=setting):
        WorkerConfig(**{setting: value})  # type: ignore[arg-type]


def test_replay_refuses_one_bare_id(redis_url: str, namespace: str) -> None:
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    try:
        with pytest.raises(TypeError, match=r"pass \['1-0'\]"):
            write_behind_for(cache).replay("1-0")  # type: ignore[arg-type]
    finally:
        cache.close()


def test_invalidate_query_takes_the_bind_the_read_ran_on(cache: sa_cache.Cache) -> None:
    stmt = sa.select(Country).options(sa_cache.with_cache())
    with Session() as session, pytest.raises(TypeError, match=r"session.get_bind\(\)"):
        cache.invalidate_query(stmt, session)
    with pytest.raises(TypeError, match="Engine or Connection"):
        cache.invalidate_query(stmt, None)
