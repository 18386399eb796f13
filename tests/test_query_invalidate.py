"""``cache.invalidate_query()`` against a fill of that query already running.

A reader that read the entry and the generations before the call, then loaded the rows,
must not store them after it: the call leaves a marker (a tombstone) where the entry
was, and a query fill only replaces what its reader saw before its load.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env, read_paused_after_load
from models import User
from redis_servers import RedisServer, missing_service
from sqlalchemy import select, update

import sa_cache
from sa_cache import with_cache
from sa_cache.query import REFRESH_OPTION, query_key


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The embedded store, one Redis server and a Redis Cluster."""
    if request.param == "memory":
        return "memory://"
    fixture = "redis_url" if request.param == "redis" else "redis_cluster_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def env(engine: sa.Engine, store_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(store_url, namespace=namespace)
    yield from make_env(engine, cache)


def _reader(stmt: Any) -> Callable[[sa.orm.Session, dict[str, Any]], object]:
    """Reads user 1's name with ``stmt`` (and execution options)."""
    if stmt.column_descriptions[0]["type"] is User:  # objects built from processed values
        return lambda s, opts: s.execute(stmt, execution_options=opts).scalars().one().name
    return lambda s, opts: s.execute(stmt, execution_options=opts).scalar_one()  # raw rows


PATHS: dict[str, tuple[Any, str, dict[str, Any]]] = {
    # the first execution of a shape in this process stores without get_or_load
    "first of its shape": (select(User.name), "", {}),
    "shape seen before": (select(User.name), "shape", {}),  # get_or_load's fill
    "objects": (select(User), "shape", {}),  # a direct shape: its own key format
    "warmer refresh": (select(User.name), "shape", {REFRESH_OPTION: True}),
    # the reader sees the marker of an earlier call: a later call leaves another one
    "after an earlier invalidate_query": (select(User.name), "marker", {}),
}


@pytest.mark.parametrize("path", PATHS)
def test_fill_that_began_before_invalidate_query_never_lands(env: Env, path: str) -> None:
    base, before, options = PATHS[path]
    stmt = base.where(User.id == 1).options(with_cache())
    read_name = _reader(stmt)
    if before:
        with env.Session() as s:  # the shape is known: a hit could be replayed
            s.execute(base.where(User.id == 2).options(with_cache()))
            if before == "marker":  # user 1's entry too, then its marker
                assert read_name(s, {}) == "user1"
        env.cache.wait_for_fills()
    if before == "marker":
        env.cache.invalidate_query(stmt, env.engine)

    def read() -> object:
        with env.Session() as s:
            name = read_name(s, options)
        env.cache.wait_for_fills()  # this thread's fill has landed, or was refused
        return name

    def write() -> None:  # behind the cache's back: only invalidate_query tells it
        with env.engine.begin() as conn:
            conn.execute(update(User).where(User.id == 1).values(name="newer"))
        env.cache.invalidate_query(stmt, env.engine)

    assert read_paused_after_load(env.engine, read, write) == "user1"
    for _ in range(2):  # a miss that loads the new row, then its hit
        with env.Session() as s:
            assert read_name(s, {}) == "newer"
        env.cache.wait_for_fills()
    assert env.cache.stats["decode_error"] == 0


def test_invalidated_entry_is_a_plain_miss_then_filled_again(env: Env) -> None:
    stmt = select(User.name).where(User.id == 1).options(with_cache())
    with env.Session() as s:
        assert s.scalar(stmt) == "user1"
    env.cache.wait_for_fills()
    with env.engine.begin() as conn:
        conn.execute(update(User).where(User.id == 1).values(name="newer"))
    env.cache.invalidate_query(stmt, env.engine)
    env.log.clear()
    for _ in range(3):
        with env.Session() as s:
            assert s.scalar(stmt) == "newer"
        env.cache.wait_for_fills()
    assert len(env.log.selects) == 1  # the marker is a miss; the fill replaced it
    assert env.cache.stats["query.hit"] == 2
    assert env.cache.stats["decode_error"] == 0  # a marker is not a corrupt entry


@pytest.mark.parametrize("dialect_name", ["sqlite"])
def test_invalidate_query_the_store_missed_is_replayed_as_a_marker(
    engine: sa.Engine, namespace: str
) -> None:
    """Made during an outage, the invalidation is remembered and delivered later: still
    a marker, so a fill loaded before the call cannot land after the replay either."""
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not on PATH: cannot start a private Redis")
    server = RedisServer().start()
    writer = sa_cache.Cache.from_url(
        server.url, namespace=namespace, socket_timeout=0.2, connect_timeout=0.2
    )
    env_iter = make_env(engine, sa_cache.Cache.from_url(server.url, namespace=namespace))
    try:
        env = next(env_iter)
        stmt = select(User.name).where(User.id == 1).options(with_cache())
        with env.Session() as s:  # the shape is known: the reader's fill is get_or_load's
            s.scalar(select(User.name).where(User.id == 2).options(with_cache()))
        env.cache.wait_for_fills()

        def read() -> object:
            with env.Session() as s:
                name = s.scalar(stmt)
            env.cache.wait_for_fills()
            return name

        def write() -> None:
            with env.engine.begin() as conn:
                conn.execute(update(User).where(User.id == 1).values(name="newer"))
            server.kill()
            writer.invalidate_query(stmt, env.engine)  # not delivered: remembered
            assert writer.stats["invalidate.deferred"] == 1
            server.start()
            deadline = time.monotonic() + 10  # replayed in the background
            while not writer.stats["invalidate.replayed"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert writer.stats["invalidate.replayed"] == 1

        assert read_paused_after_load(env.engine, read, write) == "user1"
        assert env.cache.stats["query.fill"] == 1  # the shape's first read; not the race's
        for _ in range(2):
            with env.Session() as s:
                assert s.scalar(stmt) == "newer"
            env.cache.wait_for_fills()
    finally:
        env_iter.close()  # drops the tables, closes the reader's cache
        writer.close()
        server.close()


def _name_via(how: str, env: Env) -> tuple[Callable[[], object], Callable[[], None]]:
    """A read of user 1's name one way, and the ``invalidate_query`` call for it."""
    cache, engine, opts = env.cache, env.engine, with_cache()
    stmt = select(User.name).where(User.id == 1).options(opts)
    if how == "legacy Query":  # it runs other SQL than its .statement: pass the Query

        def query(s: sa.orm.Session) -> Any:
            return s.query(User.name).filter(User.id == 1).options(opts)

        def read() -> object:
            with env.Session() as s:
                return query(s).scalar()

        def invalidate() -> None:
            with env.Session() as s:
                cache.invalidate_query(query(s), engine)

        return read, invalidate
    if how == "identity_token":
        token = {"identity_token": "t1"}

        def read() -> object:
            with env.Session() as s:
                return s.execute(stmt, execution_options=token).scalar()

        return read, lambda: cache.invalidate_query(stmt, engine, identity_token="t1")
    if how == "schema_translate_map":  # a tenant engine: its map is part of the key
        schema = sa.inspect(engine).default_schema_name
        tenant = engine.execution_options(schema_translate_map={None: schema})
        factory = sa.orm.sessionmaker(tenant, class_=sa_cache.CachingSession, cache=cache)

        def read() -> object:
            with factory() as s:
                return s.scalar(stmt)

        return read, lambda: cache.invalidate_query(stmt, tenant)
    assert how == "registered model"  # a primary-key select: its entity entry answers
    cache.register(User, ttl=300)
    by_pk = select(User).where(User.id == 1).options(opts)

    def read() -> object:
        with env.Session() as s:
            return s.scalars(by_pk).one().name

    return read, lambda: cache.invalidate_query(by_pk, engine)


@pytest.mark.parametrize(
    "how", ["legacy Query", "identity_token", "schema_translate_map", "registered model"]
)
def test_invalidate_query_reaches_the_entry_each_way_it_is_keyed(env: Env, how: str) -> None:
    read, invalidate = _name_via(how, env)
    assert read() == "user1"
    env.cache.wait_for_fills()
    env.log.clear()
    assert read() == "user1"
    assert not env.log.selects  # a hit
    with env.engine.begin() as conn:
        conn.execute(update(User).where(User.id == 1).values(name="newer"))
    invalidate()
    assert read() == "newer"


@pytest.mark.parametrize("shape", ["objects", "columns"])
def test_an_entry_of_older_generations_is_not_decoded(
    env: Env, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miss on an entry an invalidation outdated reads its generations from its
    header (`codec_peek.other_generations`): the stale rows are never decoded (a
    100-row entry costs about as much to decode as the query saves), and it is still
    counted as invalidated."""
    from sa_cache import cache as cache_module
    from sa_cache import codec_peek

    monkeypatch.setattr(codec_peek, "PEEK_MIN", 0)  # (these entries are short)
    stmt = (select(User) if shape == "objects" else select(User.name)).options(with_cache())
    for _ in range(2):  # the second run stores through get_or_load (a shape seen before)
        with env.Session() as s:
            s.execute(stmt.where(User.id == 1)).all()
        env.cache.wait_for_fills()
        env.cache.invalidate(User)
    with env.Session() as s:
        s.execute(stmt.where(User.id == 1)).all()
    env.cache.wait_for_fills()
    entry = env.cache.fetch([query_key(env.cache, stmt.where(User.id == 1), env.engine)])[0]
    assert isinstance(entry, bytes)
    env.cache.invalidate(User)
    decoded: list[bytes] = []
    real = cache_module.decode

    def spy(data: bytes) -> Any:
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(cache_module, "decode", spy)
    before = env.cache.stats["query.invalidated"]
    with env.Session() as s:
        assert len(s.execute(stmt.where(User.id == 1)).all()) == 1
    assert entry not in decoded
    assert env.cache.stats["query.invalidated"] == before + 1
