"""A SERIALIZABLE transaction is served no hits: a read answered from the cache never
reaches the database, which then tracks no read of it (PostgreSQL's SSI takes no SIREAD
lock, InnoDB no shared lock), and two transactions that read the same rows could both
commit a write skew the database refuses. Their reads go to the database — from the
first one, before the Session holds a connection, however the level is set — and fill
the cache as REPEATABLE READ reads do. Other Sessions keep their hits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, StatementLog, make_env
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sa_cache


class Base(DeclarativeBase):
    pass


class Doctor(Base):
    __tablename__ = "sac_ser_doctors"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    on_call: Mapped[bool]
    note: Mapped[str] = mapped_column(sa.String(30))


def _seed(session: Any) -> None:
    session.add_all([Doctor(id=1, on_call=True, note="a"), Doctor(id=2, on_call=True, note="b")])
    session.commit()


def _short_lock_waits(engine: sa.Engine) -> None:
    """MariaDB: a lock wait ends at once, not after 50 s (the write skew's loser would
    wait for a lock the other transaction holds until it ends: no point waiting)."""

    @event.listens_for(engine, "connect")
    def _short(dbapi_conn: Any, record: Any) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 0")


@pytest.fixture(params=["through", "invalidate"])
def env(
    engine: sa.Engine, cache_url: str, namespace: str, request: pytest.FixtureRequest
) -> Iterator[Env]:
    if engine.dialect.name in ("mysql", "mariadb"):
        _short_lock_waits(engine)
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Doctor, ttl=600, write=request.param)
    yield from make_env(engine, cache, Base.metadata, _seed)


def _write_skew(factory: Callable[[], Session]) -> list[str]:
    """The on-call rule (at least one doctor on call) checked by two SERIALIZABLE
    transactions at once, each taking a different doctor off call. How each ended."""
    t1, t2 = factory(), factory()
    out = []
    try:
        for s in (t1, t2):  # both check the rule first
            assert s.get(Doctor, 1).on_call  # type: ignore[union-attr]
            assert s.get(Doctor, 2).on_call  # type: ignore[union-attr]
        t1.get(Doctor, 1).on_call = False  # type: ignore[union-attr]
        t2.get(Doctor, 2).on_call = False  # type: ignore[union-attr]
        for s in (t1, t2):
            try:
                s.commit()
                out.append("committed")
            except sa.exc.DBAPIError as exc:
                out.append(f"failed: {str(exc.orig).splitlines()[0][:60]}")
                s.rollback()
    finally:
        t1.close()
        t2.close()
    return out


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
def test_serializable_transactions_reading_registered_rows_cannot_write_skew(env: Env) -> None:
    """Without the cache SERIALIZABLE refuses one of the two commits (PostgreSQL: 40001
    at the COMMIT, checked here as the control; MariaDB: the reads take shared locks, so
    the first UPDATE waits for the other transaction and times out): the rule holds. It
    must hold with the rows' entries in the cache too (both committed, nobody on call)."""
    ser = env.engine.execution_options(isolation_level="SERIALIZABLE")
    with env.Session() as s:  # the entries are filled
        s.get(Doctor, 1), s.get(Doctor, 2)
    if env.engine.dialect.name == "postgresql":
        plain = _write_skew(lambda: Session(ser))  # the database alone
        assert plain.count("committed") == 1, plain
        with Session(ser) as s:  # back to both on call
            for d in s.scalars(sa.select(Doctor)):
                d.on_call = True
            s.commit()
        env.cache.invalidate(Doctor)
        with env.Session() as s:
            s.get(Doctor, 1), s.get(Doctor, 2)
    cached = _write_skew(lambda: env.Session(bind=ser))
    with env.engine.connect() as conn:
        on_call = conn.scalar(sa.select(sa.func.count()).where(Doctor.on_call))
    assert (cached.count("committed"), on_call) == (1, 1), cached
    with env.Session() as s:  # the entries agree with the database
        assert [s.get(Doctor, i).on_call for i in (1, 2)].count(True) == 1  # type: ignore[union-attr]


def _serializable_engine(env: Env, how: str) -> sa.Engine:
    """An engine of the database under test whose Sessions are SERIALIZABLE ``how``
    (some of them set it per Session: `_begin`)."""
    if how == "create_engine":
        return sa.create_engine(env.engine.url, isolation_level="SERIALIZABLE")
    engine = sa.create_engine(env.engine.url)
    if how == "connect":  # a connect listener (or the server's default) sets it

        @event.listens_for(engine, "connect")
        def _serializable(dbapi_conn: Any, record: Any) -> None:
            with dbapi_conn.cursor() as cursor:
                if engine.dialect.name == "postgresql":
                    cursor.execute(
                        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"
                    )
                else:
                    cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            if engine.dialect.name == "postgresql":
                dbapi_conn.commit()

    return engine


def _begin(session: Session, how: str) -> None:
    if how == "connection":
        session.connection(execution_options={"isolation_level": "SERIALIZABLE"})
    elif how == "sql":
        session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
@pytest.mark.parametrize(
    "how", ["create_engine", "execution_options", "connection", "sql", "connect"]
)
def test_a_serializable_transaction_reads_the_database_and_fills(env: Env, how: str) -> None:
    """``session.get`` (first thing, before any connection) and a cached query of a
    SERIALIZABLE transaction send their SELECT; their loads fill the entries, which
    Sessions of other levels are then served."""
    engine = _serializable_engine(env, how)
    bind = engine
    if how == "execution_options":
        bind = engine.execution_options(isolation_level="SERIALIZABLE")
    factory = sessionmaker(bind, class_=sa_cache.CachingSession, cache=env.cache)
    seen = StatementLog()
    event.listen(engine, "before_cursor_execute", seen)
    query = sa.select(Doctor).where(Doctor.on_call).options(sa_cache.with_cache())
    try:
        if how == "connect":  # known from the engine's first transaction on
            with factory() as s:
                s.execute(sa.text("SELECT 1"))
        with env.Session() as s:  # the entries
            s.get(Doctor, 1)
            assert len(s.scalars(query).all()) == 2
        env.log.clear()
        with env.Session() as s:  # served to the engine's own Sessions
            assert s.get(Doctor, 1).note == "a"  # type: ignore[union-attr]
            assert len(s.scalars(query).all()) == 2
        assert env.log.selects == []
        for _ in range(2):
            seen.clear()
            with factory() as s:
                _begin(s, how)
                assert s.get(Doctor, 1).note == "a"
                assert len(s.scalars(query).all()) == 2
                s.commit()
            assert len(seen.selects) == 2, seen.selects
        env.cache.invalidate(Doctor)
        with factory() as s:  # misses: the loads fill
            _begin(s, how)
            s.get(Doctor, 2)
            assert len(s.scalars(query).all()) == 2
            s.commit()
        env.cache.wait_for_fills()
        env.log.clear()
        with env.Session() as s:
            assert s.get(Doctor, 2).note == "b"  # type: ignore[union-attr]
            assert len(s.scalars(query).all()) == 2
        assert env.log.selects == []
    finally:
        event.remove(engine, "before_cursor_execute", seen)
        engine.dispose()


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb", "sqlite"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
def test_other_isolation_levels_keep_their_hits(env: Env) -> None:
    """READ COMMITTED, REPEATABLE READ (and SQLite, which SQLAlchemy reports as
    SERIALIZABLE: its driver begins no transaction before a SELECT) are served."""
    levels = ["READ COMMITTED", "REPEATABLE READ"]
    if env.engine.dialect.name == "sqlite":
        levels = ["SERIALIZABLE", "READ UNCOMMITTED"]
    with env.Session() as s:
        s.get(Doctor, 1)
    for level in levels:
        factory = sessionmaker(
            env.engine.execution_options(isolation_level=level),
            class_=sa_cache.CachingSession,
            cache=env.cache,
        )
        env.log.clear()
        with factory() as s:
            assert s.get(Doctor, 1).note == "a"
        assert env.log.selects == [], level


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
def test_a_queued_write_behind_change_is_served_to_a_serializable_transaction(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """A write-behind row is what its queued change says until the worker applied it
    (the database has the older row): that is served under SERIALIZABLE too."""
    from test_write_behind import Counter, wb_env

    with wb_env(engine, redis_url, namespace) as wb:
        with wb.Session() as s:
            s.add(Counter(id=1, n=7))
            s.commit()
        ser = engine.execution_options(isolation_level="SERIALIZABLE")
        with wb.Session(bind=ser) as s:
            assert s.get(Counter, 1).n == 7  # type: ignore[union-attr]
        wb.drain()
        assert wb.db() == {1: (7, "new")}


@pytest.fixture(params=["through", "invalidate"])
def ser_env(
    engine: sa.Engine, cache_url: str, namespace: str, request: pytest.FixtureRequest
) -> Iterator[Env]:
    """Sessions of a SERIALIZABLE engine."""
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Doctor, ttl=600, write=request.param)
    ser = engine.execution_options(isolation_level="SERIALIZABLE")
    yield from make_env(ser, cache, Base.metadata, _seed)


def _on_call(s: Session) -> int:
    count = s.scalar(sa.select(sa.func.count()).select_from(Doctor).where(Doctor.on_call))
    assert count is not None
    return count


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_write_skew_fails_at_commit_and_the_retry_leaves_the_cache_right(ser_env: Env) -> None:
    """PostgreSQL refuses the second COMMIT (40001); the usual retry (rollback, run
    again) sees the first one's commit, and the failed attempt's images are never
    stored."""
    env = ser_env
    with env.Session() as s:  # both entries cached
        assert s.get(Doctor, 1).on_call  # type: ignore[union-attr]
        assert s.get(Doctor, 2).on_call  # type: ignore[union-attr]
    t1, t2 = env.Session(), env.Session()
    try:
        assert _on_call(t1) == 2
        assert _on_call(t2) == 2
        d1, d2 = t1.get(Doctor, 1), t2.get(Doctor, 2)
        d1.on_call, d1.note = False, "t1"  # type: ignore[union-attr]
        d2.on_call, d2.note = False, "t2"  # type: ignore[union-attr]
        t1.flush()
        t2.flush()
        t1.commit()
        with pytest.raises(sa.exc.OperationalError) as raised:
            t2.commit()
        assert "40001" in str(raised.value) or "serialize" in str(raised.value)
        t2.rollback()
    finally:
        t1.close()
        t2.close()
    with env.Session() as s:  # the retry sees t1's commit and gives up
        assert _on_call(s) == 1
        assert s.get(Doctor, 2).on_call  # type: ignore[union-attr]
        assert s.get(Doctor, 2).note == "b"  # type: ignore[union-attr]
        assert s.get(Doctor, 1).note == "t1"  # type: ignore[union-attr]
    with env.engine.connect() as conn:
        db = dict(conn.execute(sa.select(Doctor.id, Doctor.note)).all())
    assert db == {1: "t1", 2: "b"}


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_write_behind_change_of_an_attempt_that_failed_at_commit_is_applied_once(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """The write-behind changes of an attempt PostgreSQL refused at the COMMIT (40001)
    are aborted; the retry's are applied, once."""
    from test_write_behind import Counter, Order, wb_env

    ser = engine.execution_options(isolation_level="SERIALIZABLE")
    with wb_env(ser, redis_url, namespace, prepare_timeout=0.3) as wb:
        with wb.Session() as s:
            s.add_all([Order(id=1, note="a"), Order(id=2, note="b"), Counter(id=1, n=1)])
            s.commit()
        wb.drain()
        t1, t2 = wb.Session(), wb.Session()
        try:
            count = sa.select(sa.func.count()).select_from(Order).where(Order.note != "off")
            assert t1.scalar(count) == 2
            assert t2.scalar(count) == 2
            t1.get(Order, 1).note = "off"  # type: ignore[union-attr]
            t2.get(Order, 2).note = "off"  # type: ignore[union-attr]
            t2.get(Counter, 1).n = 50  # type: ignore[union-attr]  # queued with t2
            t2.add(Counter(id=2, n=2))
            t1.flush()
            t2.flush()
            t1.commit()
            with pytest.raises(sa.exc.OperationalError):
                t2.commit()
            t2.rollback()
        finally:
            t1.close()
            t2.close()
        with wb.Session() as s:  # what the queue shows: t2's changes never happened
            assert s.get(Counter, 1).n == 1  # type: ignore[union-attr]
            assert s.get(Counter, 2) is None
        with wb.Session() as s:  # the retry, as the application runs it
            s.get(Counter, 1).n = 60  # type: ignore[union-attr]
            s.commit()
        wb.drain()
        assert wb.db() == {1: (60, "new")}
        assert wb.queue.dead_letters() == []
        with wb.Session() as s:
            assert s.get(Counter, 1).n == 60  # type: ignore[union-attr]
