"""Snapshots sa_cache must recognise, or a transaction's rows from an older snapshot are
stored under newer generations (served stale to everyone until their TTL), and the
statements the unit of work runs that it must tell from others.

Each stale-fill test: a reader's transaction takes its snapshot in some way, a writer
commits, the reader's cached query misses and reads its (older) snapshot — which must
not be stored; a fresh Session afterwards must see the commit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from models import User
from sqlalchemy import event, select, text, update
from sqlalchemy.orm import Session, sessionmaker

import sa_cache
from sa_cache import with_cache

BY_ID = select(User.name).where(User.id == 1).options(with_cache())


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache)


def _rename(env: Env, name: str) -> None:
    with env.Session() as writer:
        writer.execute(update(User).where(User.id == 1).values(name=name))
        writer.commit()


def _old_snapshot_not_stored(
    env: Env, take_snapshot: Callable[[Session], None], factory: Any = None
) -> None:
    factory = factory or env.Session
    with factory() as warm:
        assert warm.scalar(BY_ID) == "user1"  # cached
    with factory() as reader:
        take_snapshot(reader)
        _rename(env, "new")
        assert reader.scalar(BY_ID) == "user1"  # its snapshot: right for it, not to store
    env.cache.wait_for_fills()
    with factory() as fresh:
        assert fresh.scalar(BY_ID) == "new"


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_consistent_snapshot_started_with_driver_sql(env: Env) -> None:
    def start(reader: Session) -> None:
        reader.connection().exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT")

    _old_snapshot_not_stored(env, start)


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("how", ["text", "driver_sql"])
def test_a_first_read_that_failed_took_the_snapshot(env: Env, how: str) -> None:
    """MariaDB keeps the transaction after a failed statement: its read view too."""
    failing = "SELECT (SELECT name FROM sac_users) AS x"  # more than one row

    def read_and_fail(reader: Session) -> None:
        run: Callable[[], Any] = (
            (lambda: reader.execute(text(failing)).all())
            if how == "text"
            else (lambda: reader.connection().exec_driver_sql(failing).all())
        )
        with pytest.raises(sa.exc.DBAPIError, match="more than 1 row"):
            run()

    _old_snapshot_not_stored(env, read_and_fail)


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
def test_isolation_set_by_a_connect_listener(env: Env) -> None:
    """SQLAlchemy reads the default isolation level before the application's ``connect``
    listeners run: one that sets REPEATABLE READ there must be seen."""
    kind = env.engine.dialect.name
    # (MariaDB's own default is REPEATABLE READ already: the engine asks READ COMMITTED)
    engine = sa.create_engine(
        env.engine.url, **({"isolation_level": "READ COMMITTED"} if kind == "mariadb" else {})
    )
    sql = (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ"
        if kind == "postgresql"
        else "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ"
    )

    @event.listens_for(engine, "connect")
    def repeatable_read(dbapi_conn: Any, record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute(sql)
        cursor.close()
        dbapi_conn.commit()

    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=env.cache)
    try:

        def first_read(reader: Session) -> None:
            reader.execute(select(User.name).where(User.id == 2)).all()  # snapshot

        _old_snapshot_not_stored(env, first_read, factory)
    finally:
        engine.dispose()


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_an_imported_snapshot_is_older_than_its_transaction(env: Env) -> None:
    """``SET TRANSACTION SNAPSHOT``: the snapshot of another, older transaction."""
    with env.Session() as warm:
        assert warm.scalar(BY_ID) == "user1"
    exporter = env.engine.connect().execution_options(isolation_level="REPEATABLE READ")
    try:
        exporter.begin()
        snapshot = exporter.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
        _rename(env, "new")  # committed before the importing transaction begins
        with env.Session() as reader:
            reader.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            reader.execute(text(f"SET TRANSACTION SNAPSHOT '{snapshot}'"))
            assert reader.scalar(BY_ID) == "user1"  # the exported snapshot's row
    finally:
        exporter.close()
    env.cache.wait_for_fills()
    with env.Session() as fresh:
        assert fresh.scalar(BY_ID) == "new"


def test_flush_event_dml_on_an_engine_with_its_own_compiled_cache(env: Env) -> None:
    """An engine's ``compiled_cache`` execution option (None here) is not the unit of
    work's: DML a mapper event runs during the flush names no rows and must invalidate
    the entity entries of its table."""
    env.cache.register(User, ttl=300)
    engine = sa.create_engine(env.engine.url, execution_options={"compiled_cache": None})
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=env.cache)

    def touch_user_2(mapper: Any, connection: sa.Connection, target: User) -> None:
        if target.id == 1:
            connection.execute(update(User).where(User.id == 2).values(name="by event"))

    event.listen(User, "after_update", touch_user_2)
    try:
        with factory() as s:
            assert s.get(User, 2).name == "user2"  # type: ignore[union-attr]
        env.cache.wait_for_fills()
        with factory() as s:
            s.get(User, 1).name = "changed"  # type: ignore[union-attr]
            s.commit()
        with factory() as s:
            assert s.get(User, 2).name == "by event"  # type: ignore[union-attr]
    finally:
        event.remove(User, "after_update", touch_user_2)
        engine.dispose()


@pytest.mark.parametrize("dialect_name", ["mariadb"])  # (XA; PostgreSQL here allows none)
def test_a_two_phase_commit_whose_outcome_is_unknown_invalidates(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``twophase=True``: the XA COMMIT was applied, then the client heard an error. It
    is no rollback: the entries the flush tombstoned must not be put back."""
    env.cache.register(User, ttl=300)
    factory = sessionmaker(
        env.engine, class_=sa_cache.CachingSession, cache=env.cache, twophase=True
    )
    with factory() as s:
        assert s.get(User, 1).name == "user1"  # type: ignore[union-attr]
    env.cache.wait_for_fills()
    dialect = env.engine.dialect
    real = dialect.do_commit_twophase

    def commit_then_fail(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        raise dialect.loaded_dbapi.OperationalError(2013, "connection lost after COMMIT")

    with factory() as s:
        s.get(User, 1).name = "committed"  # type: ignore[union-attr]
        monkeypatch.setattr(dialect, "do_commit_twophase", commit_then_fail)
        with pytest.raises(sa.exc.OperationalError, match="connection lost"):
            s.commit()
        monkeypatch.undo()
        s.rollback()
    with env.Session() as s:
        assert s.get(User, 1).name == "committed"  # type: ignore[union-attr]


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_two_phase_session_that_wrote_nothing_invalidates_nothing(env: Env) -> None:
    """SQLAlchemy sends ``XA START`` ... ``XA COMMIT`` as text: taken for DML text, they
    invalidated every entry of the namespace at each two-phase commit."""
    factory = sessionmaker(
        env.engine, class_=sa_cache.CachingSession, cache=env.cache, twophase=True
    )
    with factory() as s:
        assert s.scalar(BY_ID) == "user1"
        s.commit()
    env.cache.wait_for_fills()
    for _ in range(2):
        with factory() as s:
            before = env.cache.stats["query.hit"]
            assert s.scalar(BY_ID) == "user1"
            assert env.cache.stats["query.hit"] == before + 1
            s.commit()


@pytest.mark.parametrize("dialect_name", ["postgresql"])  # (one call, several statements)
@pytest.mark.parametrize("first", ["SAVEPOINT a", "BEGIN"])
def test_driver_sql_that_starts_with_transaction_control_still_writes(env: Env, first: str) -> None:
    env.cache.register(User, ttl=300)
    with env.Session() as s:
        assert s.scalar(BY_ID) == "user1"
        assert s.get(User, 1).name == "user1"  # type: ignore[union-attr]
    env.cache.wait_for_fills()
    with env.Session() as s:
        sql = f"{first}; UPDATE sac_users SET name = 'v2' WHERE id = 1"
        if first.startswith("SAVEPOINT"):
            sql += "; RELEASE SAVEPOINT a"
        s.connection().exec_driver_sql(sql)
        s.commit()
    with env.Session() as s:
        assert s.scalar(BY_ID) == "v2"
        assert s.get(User, 1).name == "v2"  # type: ignore[union-attr]
