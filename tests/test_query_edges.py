"""Query-cache edges an audit found: statements and writes the cache must not get wrong.

Each test here failed before its fix (the audit's repro, made a regression test).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import database_url
from helpers import Env, make_env, schemas, transactional_engine
from models import Address, Country, User
from sqlalchemy import event, select, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    sessionmaker,
    with_loader_criteria,
)

import sa_cache
from sa_cache import with_cache


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache)


def user_name(engine: sa.Engine, uid: int) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(select(User.name).where(User.id == uid)))


def test_callable_bindparam_is_taken_at_each_execution(env: Env) -> None:
    current = {"id": 1}
    stmt = (
        select(User)
        .where(User.id == sa.bindparam("uid", callable_=lambda: current["id"]))
        .options(with_cache())
    )
    for uid in (1, 2, 3, 1):
        current["id"] = uid
        with env.Session() as s:
            assert [u.id for u in s.scalars(stmt)] == [uid]
        env.cache.wait_for_fills()


def test_core_selects_through_the_session_hit(env: Env) -> None:
    """Table-column selects, aggregates and EXISTS: a hit is a Core result, as a load."""
    users = User.__table__
    statements = [
        select(users.c.name).order_by(users.c.id).options(with_cache()),
        select(sa.func.count()).select_from(users).options(with_cache()),
        select(sa.exists().where(Address.user_id == User.id)).options(with_cache()),
    ]
    expected = []
    with Session(env.engine) as plain:
        expected = [plain.execute(stmt).all() for stmt in statements]
    for _ in range(3):
        with env.Session() as s:
            assert [s.execute(stmt).all() for stmt in statements] == expected
        env.cache.wait_for_fills()
    assert env.cache.stats["query.hit"] >= 2 * len(statements)


def test_textual_select_bypasses_or_raises_when_strict(env: Env) -> None:
    textual = sa.text("SELECT id FROM sac_users ORDER BY id").columns(sa.column("id", sa.Integer))
    with env.Session() as s:
        assert s.execute(textual.options(with_cache())).scalars().all() == [1, 2, 3]
        with pytest.raises(sa_cache.NotCacheable):
            s.execute(textual.options(with_cache(strict=True)))
    assert env.cache.stats["query.fill"] == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: select(User.id).where(
            sa.text("EXISTS (SELECT 1 FROM sac_addresses a WHERE a.user_id = sac_users.id)")
        ),
        lambda: select(sa.table("sac_addresses", sa.column("id")).c.id),
    ],
    ids=["text-fragment", "table-construct"],
)
def test_sources_whose_tables_are_unknown_are_not_cached(env: Env, make: Any) -> None:
    """A ``text()`` fragment or a ``table()`` can read any table: no entry could be
    invalidated by writes to it, so none is made (strict: `NotCacheable`)."""
    stmt = make().order_by(sa.text("1")).options(with_cache())
    with env.Session() as s:
        before = s.execute(stmt).all()
        with pytest.raises(sa_cache.NotCacheable, match="cannot all be known"):
            s.execute(make().options(with_cache(strict=True)))
    with env.Session() as s:
        s.add(User(id=9, name="nine", balance=1, created=sa.func.now()))
        s.add(Address(id=91, user_id=9, email="n@example.com"))
        s.commit()
    with env.Session() as s:
        after = s.execute(stmt).all()
    assert len(after) == len(before) + 1
    assert env.cache.stats["query.fill"] == 0


def test_pickle_columns_are_never_cached(engine: sa.Engine, cache_url: str, namespace: str) -> None:
    """A hit would run ``pickle.loads`` on bytes read from the store (DESIGN rule 7)."""

    class Base(DeclarativeBase):
        pass

    class Blob(Base):
        __tablename__ = "sac_edge_blobs"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        data: Mapped[Any] = mapped_column(sa.PickleType)

    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        with factory() as s:
            s.add(Blob(id=1, data={"a": 1}))
            s.commit()
        for stmt in (select(Blob), select(Blob.data), select(Blob.id, Blob.data)):
            for _ in range(2):
                with factory() as s:
                    rows = s.execute(stmt.options(with_cache())).all()
                    assert len(rows) == 1
                cache.wait_for_fills()
            with factory() as s, pytest.raises(sa_cache.NotCacheable, match="PickleType"):
                s.execute(stmt.options(with_cache(strict=True)))
        assert cache.stats["query.fill"] == 0
        assert pickle.dumps(1)  # (pickle itself is fine: only never on cached bytes)
    finally:
        cache.close()
        Base.metadata.drop_all(engine)


# -- writes the Session runs that are not ORM flushes ---------------------------------------


def _driver_update(s: Session) -> None:
    s.connection().exec_driver_sql("UPDATE sac_users SET name = 'changed' WHERE id = 1")


def _commented_text(s: Session) -> None:
    s.execute(sa.text("-- a comment\nUPDATE sac_users SET name = 'changed' WHERE id = 1"))


def _bulk_mappings(s: Session) -> None:
    s.bulk_update_mappings(User, [{"id": 1, "name": "changed"}])  # type: ignore[arg-type]


WRITES = [_driver_update, _commented_text, _bulk_mappings]


@pytest.mark.parametrize("write", WRITES, ids=["exec_driver_sql", "text-comment", "bulk-mappings"])
def test_writes_outside_flushes_are_seen(env: Env, write: Any) -> None:
    """Own uncommitted writes read from the database (rule 2); after the commit, a cached
    query and an entity entry of the table are stale no more (rule 3)."""
    env.cache.register(User, ttl=300)
    by_id = select(User.name).where(User.id == 1).options(with_cache())
    with env.Session() as s:
        assert s.scalar(by_id) == "user1"
        assert s.get(User, 1) is not None
    env.cache.wait_for_fills()
    with env.Session() as s:
        write(s)
        assert s.scalar(by_id) == "changed"
        s.commit()
    assert user_name(env.engine, 1) == "changed"
    with env.Session() as s:
        assert s.scalar(by_id) == "changed"
        user = s.get(User, 1)
        assert user is not None
        assert user.name == "changed"


@pytest.fixture
def pg_env(cache_url: str, namespace: str) -> Iterator[Env]:
    """PostgreSQL alone: the one database here that runs DML inside a SELECT's CTE."""
    engine = sa.create_engine(database_url("postgresql"))
    try:
        yield from make_env(engine, sa_cache.Cache.from_url(cache_url, namespace=namespace))
    finally:
        engine.dispose()


def test_data_modifying_cte_in_a_select_is_a_write(pg_env: Env) -> None:
    env = pg_env
    by_id = select(User.name).where(User.id == 1).options(with_cache())
    with env.Session() as s:
        assert s.scalar(by_id) == "user1"
    env.cache.wait_for_fills()
    changed = update(User).where(User.id == 1).values(name="via-cte").returning(User.id).cte()
    with env.Session() as s:
        s.execute(select(changed.c.id)).all()
        assert s.scalar(by_id) == "via-cte"
        s.commit()
    with env.Session() as s:
        assert s.scalar(by_id) == "via-cte"


def test_a_cached_select_over_a_data_modifying_cte_is_never_served(pg_env: Env) -> None:
    """``select(update(...).returning(...).cte())`` with ``with_cache()``: a hit would skip
    the UPDATE (a lost write), and a rolled-back execution's rows would be stored. It is
    not cached (strict: `NotCacheable`)."""
    env = pg_env
    bump = update(User).where(User.id == 1).values(balance=User.balance + 1).returning(User.balance)
    stmt = select(bump.cte().c.balance).options(with_cache())
    with env.Session() as s:
        start = s.scalar(select(User.balance).where(User.id == 1))
        first = s.scalar(stmt)
        s.rollback()
    with env.Session() as s:
        second = s.scalar(stmt)  # runs the UPDATE again: never a hit
        s.commit()
    assert first == second == start + 1
    with env.Session() as s:
        assert s.scalar(select(User.balance).where(User.id == 1)) == start + 1
        with pytest.raises(sa_cache.NotCacheable, match="data-modifying UPDATE"):
            s.execute(select(bump.cte().c.balance).options(with_cache(strict=True)))


# -- who decides what a statement reads --------------------------------------------------------


def test_a_listener_after_ours_turns_the_cache_off(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``with_loader_criteria`` recipe: a listener after sa_cache's changes the
    statement after its key was made (and would never run on a hit), so the cache
    steps aside; registered with ``insert=True`` it runs first and the key sees it."""
    monkeypatch.setattr(sa_cache.query, "_warned_listeners", set())  # warned once a process
    for insert in (False, True):
        tenant = {"country": "DE"}
        factory = sessionmaker(env.engine, class_=sa_cache.CachingSession, cache=env.cache)

        def only_tenant(state: Any, tenant: dict[str, str] = tenant) -> None:
            if state.is_select:
                state.statement = state.statement.options(
                    with_loader_criteria(User, User.country_code == tenant["country"])
                )

        event.listen(factory, "do_orm_execute", only_tenant, insert=insert)
        stmt = select(User.id).order_by(User.id).options(with_cache())
        with caplog.at_level(logging.WARNING, logger="sa_cache"):
            for country, ids in [("DE", [1, 3]), ("FR", [2]), ("DE", [1, 3]), ("FR", [2])]:
                tenant["country"] = country
                with factory() as s:
                    assert s.scalars(stmt).all() == ids, (insert, country)
                env.cache.wait_for_fills()
        bypassed = env.cache.stats["query.bypass_listener"]
        if insert:
            assert env.cache.stats["query.hit"] >= 2
        else:
            assert bypassed == 4
            assert "register it with insert=True" in caplog.text


def test_schema_translate_map_of_an_engine_is_part_of_the_key(
    engine: sa.Engine, cache_url: str, namespace: str, tmp_path: Path
) -> None:
    """Tenant engines (``engine.execution_options(schema_translate_map=...)``) over one
    cache: each reads its own schema's rows, on hits too, and entity reads as well."""

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "sac_edge_tenant_items"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        owner: Mapped[str] = mapped_column(sa.String(20))

    tenants = ["sac_tenant_a", "sac_tenant_b"]
    base = schemas(engine, tenants, tmp_path)
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Item, ttl=300)
    engines = {t: base.execution_options(schema_translate_map={None: t}) for t in tenants}
    try:
        for tenant, bound in engines.items():
            Base.metadata.drop_all(bound)
            Base.metadata.create_all(bound)
            with bound.begin() as conn:
                conn.execute(sa.insert(Item), [{"id": 1, "owner": tenant}])
        stmt = select(Item.owner).where(Item.id == 1).options(with_cache())
        for _ in range(2):
            for tenant, bound in engines.items():
                factory = sessionmaker(bound, class_=sa_cache.CachingSession, cache=cache)
                with factory() as s:
                    assert s.scalar(stmt) == tenant
                    assert s.scalars(select(Item).options(with_cache())).one().owner == tenant
                    item = s.get(Item, 1)
                    assert item is not None
                    assert item.owner == tenant
                cache.wait_for_fills()
        assert cache.stats["query.hit"] >= 4
    finally:
        for bound in engines.values():
            Base.metadata.drop_all(bound)
        cache.close()
        if base is not engine:
            base.dispose()


def test_background_refresh_keeps_the_call_s_schema_translate_map(
    engine: sa.Engine, namespace: str, tmp_path: Path
) -> None:
    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "sac_edge_refresh_items"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        owner: Mapped[str] = mapped_column(sa.String(20))

    base = schemas(engine, ["sac_tenant_b"], tmp_path)
    for schema, owner in [(None, "default"), ("sac_tenant_b", "tenant-b")]:
        bound = base.execution_options(schema_translate_map={None: schema})
        Base.metadata.drop_all(bound)
        Base.metadata.create_all(bound)
        with bound.begin() as conn:
            conn.execute(sa.insert(Item), [{"id": 1, "owner": owner}])
    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    factory = sessionmaker(base, class_=sa_cache.CachingSession, cache=cache)
    stmt = select(Item.owner).where(Item.id == 1)
    options = {"schema_translate_map": {None: "sac_tenant_b"}}
    try:
        # ttl 2 s, refreshed when less than 90 % of it remains: from 0.2 s on
        opt = with_cache(ttl=2, refresh_ahead=0.9)

        def read() -> Any:
            with factory() as s:
                return s.execute(stmt.options(opt), execution_options=options).scalar()

        assert read() == "tenant-b"  # miss: filled
        cache.wait_for_fills()
        time.sleep(0.3)
        assert read() == "tenant-b"  # a hit that starts the background refresh
        deadline = time.monotonic() + 10
        while not cache.stats["query.refresh.done"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache.stats["query.refresh.done"] == 1, cache.stats.snapshot()
        assert read() == "tenant-b"  # the refreshed entry
        assert cache.stats["query.hit"] == 2
    finally:
        for schema in (None, "sac_tenant_b"):
            Base.metadata.drop_all(base.execution_options(schema_translate_map={None: schema}))
        cache.close()
        if base is not engine:
            base.dispose()


def test_sqlite_read_transaction_snapshot_is_not_stored_as_fresh(
    tmp_path: Path, namespace: str
) -> None:
    """pysqlite's documented recipe (explicit BEGIN) in WAL mode: a read transaction
    keeps the snapshot of its first SELECT; rows read later in it may predate a commit
    the generations read before them already stand for."""
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    plain = sa.create_engine(url)
    with plain.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    recipe = sa.create_engine(url)

    @event.listens_for(recipe, "connect")
    def no_implicit(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(recipe, "begin")
    def begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    made = make_env(plain, cache)  # (kept: its cleanup runs when it is closed)
    env = next(made)
    readers = sessionmaker(recipe, class_=sa_cache.CachingSession, cache=cache)
    stmt = select(User.name).where(User.id == 1).options(with_cache())
    try:
        with readers() as r:
            r.execute(select(Country.code)).all()  # the snapshot is taken here
            with env.Session() as w:
                user = w.get(User, 1)
                assert user is not None
                user.name = "new"
                w.commit()
            assert r.scalar(stmt) == "user1"  # its snapshot: right for it, not to store
        cache.wait_for_fills()
        with readers() as s:
            assert s.scalar(stmt) == "new"
    finally:
        recipe.dispose()
        made.close()
        plain.dispose()


@pytest.mark.parametrize("outcome", ["rollback", "commit"])
def test_a_session_joined_to_an_outer_transaction(env: Env, outcome: str) -> None:
    """The test-fixture recipe: Sessions bound to a Connection in a transaction
    (``join_transaction_mode="create_savepoint"``). Their commits are SAVEPOINT releases:
    nothing reaches the cache until the outer transaction commits, nothing after it
    rolls back, and inside it they read their own writes (rule 1, rule 2)."""
    env.cache.register(User, ttl=300)
    by_id = select(User.name).where(User.id == 1).options(with_cache())

    def committed_view() -> tuple[str, str]:
        env.cache.wait_for_fills()
        with env.Session() as s:
            user = s.get(User, 1)
            assert user is not None
            return str(s.scalar(by_id)), user.name

    assert committed_view() == committed_view() == ("user1", "user1")  # cached
    engine = transactional_engine(env.engine)
    conn = engine.connect()
    outer = conn.begin()
    joined = sessionmaker(
        bind=conn,
        class_=sa_cache.CachingSession,
        cache=env.cache,
        join_transaction_mode="create_savepoint",
    )
    try:
        with joined() as s:
            user = s.get(User, 1)
            assert user is not None
            user.name = "outer"
            s.commit()
        with joined() as s:  # another Session in the same outer transaction
            assert s.scalar(by_id) == "outer"
            user = s.get(User, 1)
            assert user is not None
            assert user.name == "outer"
        assert committed_view() == ("user1", "user1")  # not committed yet
        if outcome == "commit":
            outer.commit()
        else:
            outer.rollback()
    finally:
        conn.close()
        if engine is not env.engine:
            engine.dispose()
    expected = "outer" if outcome == "commit" else "user1"
    assert user_name(env.engine, 1) == expected
    assert committed_view() == (expected, expected)
