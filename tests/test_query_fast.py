"""`CachingSession.execute` / ``scalars`` / ``scalar`` answer a plain `with_cache` hit
without ``Session.execute`` (sa_cache.query_fast), and hand everything else over to
it with what they read.

"Took the short way" is observed by counting calls of ``Session._execute_internal``
(every ``Session.execute`` goes through it) and reads of the store.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from models import Address, Country, User
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

import sa_cache
from sa_cache import query_fast, with_cache


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache)


class Calls:
    """Counts ``Session.execute`` runs and store reads while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cache: sa_cache.Cache) -> None:
        self.executes = 0
        self.reads: list[list[str]] = []
        execute_internal = Session._execute_internal
        get_many = cache.backend.get_many

        def counting_execute(session: Session, *args: Any, **kwargs: Any) -> Any:
            self.executes += 1
            return execute_internal(session, *args, **kwargs)

        def counting_get_many(keys: Any) -> Any:
            self.reads.append(list(keys))
            return get_many(keys)

        monkeypatch.setattr(Session, "_execute_internal", counting_execute)
        monkeypatch.setattr(cache.backend, "get_many", counting_get_many)

    def clear(self) -> None:
        self.executes = 0
        self.reads.clear()


def by_country(code: str) -> sa.Select[tuple[User]]:
    return select(User).where(User.country_code == code).order_by(User.id).options(with_cache())


def names(users: Any) -> list[str]:
    return [u.name for u in users]


def test_hit_skips_session_execute_and_a_miss_reads_once(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    stmt = by_country("DE")
    calls = Calls(monkeypatch, env.cache)
    with env.Session() as s:
        first = names(s.scalars(stmt))  # a miss: the ordinary path runs the query
    assert calls.executes >= 1
    entry_reads = [r for r in calls.reads if r[0].split(":")[2] == "q"]
    assert len(entry_reads) == 1  # the fast path's read was handed over, not repeated
    env.cache.wait_for_fills()
    calls.clear()
    env.log.clear()
    with env.Session() as s:
        assert names(s.scalars(stmt)) == first
        assert names(s.execute(stmt).scalars()) == first
        assert s.scalar(stmt).name == first[0]  # type: ignore[union-attr]
    assert calls.executes == 0
    assert len(calls.reads) == 3
    assert env.log.statements == []
    assert len(first) >= 2


def test_params_values_key_the_short_way(env: Env) -> None:
    base = select(User).where(User.id == sa.bindparam("uid")).options(with_cache())
    for _ in range(2):  # misses, then hits
        with env.Session() as s:
            got = [s.scalars(base.params(uid=i)).one().id for i in (1, 2, 3)]
        assert got == [1, 2, 3]
        env.cache.wait_for_fills()
    env.log.clear()
    with env.Session() as s:
        assert [s.scalars(base.params(uid=i)).one().id for i in (3, 1)] == [3, 1]
    assert env.log.statements == []


def test_another_orm_execute_listener_keeps_the_ordinary_way(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listeners run in order and a hit returned by one ends the run, so the short way
    is taken only when ours is the only listener: what others see does not change. (A
    listener must run before ours, ``insert=True``, for the cache to serve at all.)"""
    seen: list[object] = []
    factory = sessionmaker(env.engine, class_=sa_cache.CachingSession, cache=env.cache)
    event.listen(factory, "do_orm_execute", lambda state: seen.append(state.statement), insert=True)
    stmt = by_country("DE")
    with factory() as s:
        expected = names(s.scalars(stmt))
    env.cache.wait_for_fills()
    calls = Calls(monkeypatch, env.cache)
    with factory() as s:
        assert names(s.scalars(stmt)) == expected
    assert calls.executes == 1  # Session.execute ran, and our hook answered it
    assert env.cache.stats["query.hit"] == 1
    assert seen == [stmt, stmt]  # as without the short way: it saw both executions


@pytest.mark.parametrize(
    "call",
    [
        lambda s, stmt: s.scalars(stmt, execution_options={"populate_existing": False}),
        lambda s, stmt: s.scalars(stmt, {}),
        lambda s, stmt: s.execute(stmt, bind_arguments={}).scalars(),
    ],
    ids=["execution-options", "parameters", "bind-arguments"],
)
def test_calls_with_arguments_take_the_ordinary_way(
    env: Env, monkeypatch: pytest.MonkeyPatch, call: Any
) -> None:
    stmt = by_country("DE")
    with env.Session() as s:
        expected = names(s.scalars(stmt))
    env.cache.wait_for_fills()
    calls = Calls(monkeypatch, env.cache)
    env.log.clear()
    with env.Session() as s:
        assert names(call(s, stmt)) == expected
    assert calls.executes == 1  # Session.execute answered, from the cache
    assert env.log.statements == []


def test_session_execution_options_take_the_ordinary_way(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    stmt = by_country("DE")
    with env.Session() as s:
        names(s.scalars(stmt))
    env.cache.wait_for_fills()
    calls = Calls(monkeypatch, env.cache)
    factory = sessionmaker(
        env.engine,
        class_=sa_cache.CachingSession,
        cache=env.cache,
        execution_options={"populate_existing": True},
    )
    with factory() as s:
        names(s.scalars(stmt))
    assert calls.executes == 1
    assert env.cache.stats["query.hit"] == 0  # populate_existing bypasses the cache


def test_own_uncommitted_write_is_read_from_the_database(env: Env) -> None:
    stmt = select(User).where(User.id == 1).options(with_cache())
    with env.Session() as s:
        assert s.scalars(stmt).one().name == "user1"
    env.cache.wait_for_fills()
    with env.Session() as s:
        s.execute(sa.update(User).where(User.id == 1).values(name="mine"))
        env.log.clear()
        assert s.scalars(stmt).one().name == "mine"  # rule 2: not the cached row
        assert len(env.log.selects) == 1
        s.rollback()
    with env.Session() as s:
        assert s.scalars(stmt).one().name == "user1"


def test_autoflush_runs_before_the_short_way(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pending changes are flushed before a hit as ``Session.execute`` would flush them
    before its query; a pending row of a table the query reads sends it to the database
    (the flush is an uncommitted write)."""
    stmt = by_country("DE")
    with env.Session() as s:
        before = names(s.scalars(stmt))
    env.cache.wait_for_fills()
    calls = Calls(monkeypatch, env.cache)
    with env.Session() as s:
        s.add(Country(code="IT", name="Italy"))  # a table this query does not read
        env.log.clear()
        assert names(s.scalars(stmt)) == before
        assert not s.new  # flushed by the query, as without the cache
        assert [st.split()[0] for st in env.log.statements] == ["INSERT"]  # no SELECT
        assert calls.executes == 0
        s.add(new_user(900, "new"))  # a table it reads: the database answers
        assert names(s.scalars(stmt)) == [*before, "new"]
        s.rollback()
    with env.Session() as s:
        assert names(s.scalars(stmt)) == before


def new_user(id_: int, name: str) -> User:
    return User(
        id=id_,
        name=name,
        country_code="DE",
        created=datetime.datetime(2024, 2, 1),
        balance=decimal.Decimal("1.00"),
    )


def test_a_new_key_version_or_cache_is_not_served_an_old_key(env: Env) -> None:
    stmt = by_country("DE")
    with env.Session() as s:
        names(s.scalars(stmt))
    env.cache.wait_for_fills()
    env.cache.use_version("v-next")  # entries of the old version are not read
    try:
        env.log.clear()
        with env.Session() as s:
            names(s.scalars(stmt))
        assert len(env.log.selects) == 1
    finally:
        env.cache.use_version(sa_cache.cache.DEFAULT_VERSION)
    other = sa_cache.Cache.from_url("memory://", namespace=env.cache.namespace + "-other")
    try:
        factory = sessionmaker(env.engine, class_=sa_cache.CachingSession, cache=other)
        env.log.clear()
        with factory() as s:
            names(s.scalars(stmt))  # the same statement object, another cache: a miss
        assert len(env.log.selects) == 1
    finally:
        other.close()


def test_joined_entity_select_takes_the_short_way(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    stmt = (
        select(User)
        .join(User.addresses)
        .where(Address.email.like("%b@%"))
        .order_by(User.id)
        .options(with_cache())
    )
    with env.Session() as s:
        expected = names(s.scalars(stmt))
    env.cache.wait_for_fills()
    calls = Calls(monkeypatch, env.cache)
    with env.Session() as s:
        assert names(s.scalars(stmt)) == expected
    assert calls.executes == 0
    assert query_fast._memos[stmt].direct is not None


def test_sessions_with_per_mapper_binds_take_the_ordinary_way(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``binds=`` (or a ``get_bind`` override) may route a statement anywhere: only
    ``Session.get_bind`` knows, so the ordinary way asks it."""
    from models import Base

    stmt = by_country("DE")
    with env.Session() as s:
        expected = names(s.scalars(stmt))
    env.cache.wait_for_fills()
    calls = Calls(monkeypatch, env.cache)
    factory = sessionmaker(
        binds={Base: env.engine}, class_=sa_cache.CachingSession, cache=env.cache
    )
    with factory() as s:
        assert names(s.scalars(stmt)) == expected
    assert calls.executes == 1
    assert env.cache.stats["query.hit"] == 1


def test_primary_key_select_of_a_registered_model_takes_the_short_way(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``select(Model).where(Model.pk == v)`` of a registered model is answered from its
    entity entry as ``session.get`` is: no ``Session.execute``, no SQL; a miss reads the
    entry once."""
    env.cache.register(Country, ttl=60)
    stmt = select(Country).where(Country.code == "DE")
    calls = Calls(monkeypatch, env.cache)
    with env.Session() as s:
        assert s.scalars(stmt).one().name == "Germany"  # a miss: loaded and filled
    entity_reads = [r for r in calls.reads if r[0].split(":")[2] == "e"]
    assert len(entity_reads) == 1
    env.cache.wait_for_fills()
    calls.clear()
    env.log.clear()
    with env.Session() as s:
        country = s.scalars(stmt).one()
        assert country.name == "Germany"
        assert sa.inspect(country).persistent
    with env.Session() as s:
        assert s.execute(stmt).scalar_one().code == "DE"
    assert calls.executes == 0
    assert env.log.statements == []
    with env.Session() as s:
        country = s.scalars(stmt).one()
        calls.clear()
        assert s.scalars(stmt).one() is country  # in the identity map: the ORM answers
        assert calls.executes == 1
        assert env.log.statements == []


def test_primary_key_select_sees_the_sessions_own_change(env: Env) -> None:
    env.cache.register(Country, ttl=60)
    stmt = select(Country).where(Country.code == "FR")
    with env.Session() as s:
        assert s.scalars(stmt).one().name == "France"
    env.cache.wait_for_fills()
    with env.Session() as s:
        s.execute(sa.update(Country).where(Country.code == "FR").values(name="Frankreich"))
        assert s.scalars(stmt).one().name == "Frankreich"  # rule 2: the database answers
        s.rollback()
    with env.Session() as s:
        assert s.scalars(stmt).one().name == "France"


def test_statements_without_the_option_are_left_alone(env: Env) -> None:
    """A select with no `with_cache` (of no registered model) is neither compiled for a
    key nor kept: it cannot crowd out the shapes of cached statements."""
    from sa_cache import query_shape

    stmt = select(User).where(User.country_code == "DE").order_by(User.id)
    shapes = len(query_shape._shapes)
    with env.Session() as s:
        assert names(s.scalars(stmt))
    assert len(query_shape._shapes) == shapes
    assert stmt not in query_fast._memos


class Ahead:
    """Twelve addresses, a cached select of them with one hit behind it, and the sizes of
    the batches of objects made ahead of a read (`query_fast.blank_objects`)."""

    def __init__(self, env: Env, monkeypatch: pytest.MonkeyPatch, cache_url: str) -> None:
        self.made: list[int] = []
        make = query_fast.blank_objects

        def counting(*args: Any) -> Any:
            found = make(*args)
            self.made.append(len(found))
            return found

        monkeypatch.setattr(query_fast, "blank_objects", counting)
        with env.Session() as s:
            s.add_all(Address(id=100 + i, user_id=1, email=f"x{i}@e.com") for i in range(6))
            s.commit()
        self.stmt = select(Address).order_by(Address.id).options(with_cache())
        with env.Session() as s:
            self.expected = [(a.id, a.email) for a in s.scalars(self.stmt)]  # a miss
        env.cache.wait_for_fills()
        with env.Session() as s:
            s.scalars(self.stmt).all()  # the first hit: learns how many rows
        self.networked = cache_url.startswith("redis")

    def batches(self, *sizes: int) -> list[int]:
        """What was made ahead: ``sizes`` on Redis, nothing on ``memory://``."""
        return list(sizes) if self.networked else []


def test_objects_are_made_while_the_read_travels(
    env: Env, monkeypatch: pytest.MonkeyPatch, cache_url: str
) -> None:
    """From 8 rows in its last hit, a statement's objects are made while its read is on
    the way to Redis (not on ``memory://``), and become the hit's objects."""
    ahead = Ahead(env, monkeypatch, cache_url)
    assert query_fast._memos[ahead.stmt].rows == len(ahead.expected) == 12
    assert ahead.made == []
    env.log.clear()
    with env.Session() as s:
        addresses = s.scalars(ahead.stmt).all()
        assert [(a.id, a.email) for a in addresses] == ahead.expected
        assert len(s.identity_map) == 12
        for a in addresses:
            state = sa.inspect(a)
            assert state.persistent
            assert state.key[1] == (a.id,)
            assert s.identity_map.get(state.key) is a
        addresses[0].email = "changed"
        assert list(s.dirty) == [addresses[0]]
    assert env.log.statements == []
    assert ahead.made == ahead.batches(12)


def test_objects_made_ahead_and_not_needed_are_dropped(
    env: Env, monkeypatch: pytest.MonkeyPatch, cache_url: str
) -> None:
    """Fewer rows than last time, or rows already in the identity map: the objects made
    for them are never registered; after a miss none are made for the next read."""
    ahead = Ahead(env, monkeypatch, cache_url)
    stmt = ahead.stmt
    with env.Session() as s:
        s.execute(sa.delete(Address).where(Address.id >= 102))
        s.commit()
    with env.Session() as s:
        assert len(s.scalars(stmt).all()) == 8  # a miss: no objects ahead on the next read
    assert query_fast._memos[stmt].rows == 0
    env.cache.wait_for_fills()
    query_fast._memos[stmt].rows = 12  # as if the last hit had 12 rows
    ahead.made.clear()
    with env.Session() as s:
        got = s.scalars(stmt).all()
        assert [a.id for a in got] == [i for i, _ in ahead.expected if i < 102]
        assert len(s.identity_map) == 8  # 4 made, not used, never registered
    assert ahead.made == ahead.batches(12)
    assert query_fast._memos[stmt].rows == 8
    ahead.made.clear()
    with env.Session() as s:  # a row already loaded: that object, as it is
        first = s.get(Address, 11)
        assert first is not None
        got = s.scalars(stmt).all()
        assert got[0] is first
        assert len(s.identity_map) == 8
    assert ahead.made == ahead.batches(8)


def test_an_attached_sessionmaker_takes_the_short_way_too(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cache.attach(sessionmaker)`` sets the short way on the class that sessionmaker
    generated for itself: hits and ``get`` skip ``Session.execute``; the user's Session
    class, other factories and Session itself keep their methods."""
    from sqlalchemy.orm import scoped_session

    class Mine(Session):
        pass

    factory = sessionmaker(env.engine, class_=Mine)
    env.cache.attach(factory)
    scoped = scoped_session(sessionmaker(env.engine))
    env.cache.attach(scoped)
    env.cache.register(Country, ttl=60)
    stmt = by_country("DE")
    with factory() as s:
        expected = names(s.scalars(stmt))
        assert s.get(Country, "DE") is not None
    env.cache.wait_for_fills()
    calls = Calls(monkeypatch, env.cache)
    env.log.clear()
    for make in (factory, scoped):
        with make() as s:
            assert names(s.scalars(stmt)) == expected
            assert names(s.execute(stmt).scalars()) == expected
            assert s.get(Country, "DE").name == "Germany"  # type: ignore[union-attr]
    scoped.remove()
    assert calls.executes == 0
    assert env.log.statements == []
    for name in ("execute", "scalars", "scalar", "get"):
        assert getattr(Mine, name) is getattr(Session, name)  # the user's class: untouched
        assert getattr(sessionmaker(env.engine).class_, name) is getattr(Session, name)


def test_an_attached_class_with_its_own_execute_keeps_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Session class with its own ``execute`` (logging, tenancy...) is called for every
    statement: hits come from the hook, through it."""
    seen: list[object] = []

    class Logging(Session):
        def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            seen.append(statement)
            return super().execute(statement, *args, **kwargs)

    factory = sessionmaker(env.engine, class_=Logging)
    env.cache.attach(factory)
    stmt = by_country("DE")
    for _ in range(2):  # a miss, then a hit
        with factory() as s:
            assert names(s.execute(stmt).scalars())
        env.cache.wait_for_fills()
    assert seen == [stmt, stmt]
    assert env.cache.stats["query.hit"] == 1


def test_kept_rows_are_handed_out_as_copies(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """On ``memory://`` a statement's last hit is kept decoded (the next hit of the same
    entry does not decode it again). A JSON value changed in place on one hit's object
    must not show in the next hit's: each hit gets its own copies of such values."""
    stmt = by_country("DE")
    decodes: list[bytes] = []
    unpack = env.cache.unpack

    def counting_unpack(raw: bytes) -> Any:
        decodes.append(raw)
        return unpack(raw)

    monkeypatch.setattr(env.cache, "unpack", counting_unpack)

    def read() -> list[User]:
        with env.Session() as s:
            users = list(s.scalars(stmt))
            env.cache.wait_for_fills()
            return users

    read()  # the miss, filled
    first = read()
    first[0].prefs["tags"].append("changed in place")  # type: ignore[index]
    first[0].prefs["n"] = -1  # type: ignore[index]
    decodes.clear()
    again = read()
    assert [u.prefs for u in again] == [{"n": 1, "tags": ["x", "y"]}, {"n": 3, "tags": ["x", "y"]}]
    assert again[0].prefs is not first[0].prefs
    assert env.cache.stats["query.hit"] == 2
    assert len(decodes) == (0 if env.cache.in_process else 1)
    with env.Session() as s:  # a commit moves the entry: the next hit is of new bytes
        s.get(User, 1).name = "renamed"  # type: ignore[union-attr]
        s.commit()
    read()
    assert [u.name for u in read()] == ["renamed", "user3"]
