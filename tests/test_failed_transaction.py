"""An application that catches a statement's error and commits anyway: the cache must
end up agreeing with the database. On PostgreSQL the failed statement aborted the
transaction, and its COMMIT rolls back without an error. MariaDB and SQLite undo only
the statement for most errors (a duplicate key, as here), and the COMMIT keeps the
rest — but an InnoDB deadlock rolls back the whole transaction, and the COMMIT keeps
only what ran after it (see test_server_rollback)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sa_cache


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "sac_failed_accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


def _seed(session: Any) -> None:
    session.add(Account(id=1, balance=100))
    session.commit()


@pytest.fixture(params=["through", "invalidate"])
def env(
    engine: sa.Engine, cache_url: str, namespace: str, request: pytest.FixtureRequest
) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Account, ttl=600, write=request.param)
    yield from make_env(engine, cache, Base.metadata, _seed)


def test_a_commit_after_an_ignored_error_leaves_the_cache_as_the_database(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    with env.Session() as s:
        assert s.get(Account, 1).balance == 100  # type: ignore[union-attr]  # its entry
    with env.Session() as s:
        s.get(Account, 1).balance = 50  # type: ignore[union-attr]
        s.flush()
        with pytest.raises(sa.exc.IntegrityError):  # a duplicate key: refused
            s.execute(sa.text("INSERT INTO sac_failed_accounts (id, balance) VALUES (1, 0)"))
        s.commit()  # the application goes on
    with env.engine.connect() as conn:
        stored = conn.scalar(sa.text("SELECT balance FROM sac_failed_accounts WHERE id = 1"))
    assert stored == (100 if env.engine.dialect.name == "postgresql" else 50)
    with env.Session() as s:
        assert s.get(Account, 1).balance == stored  # type: ignore[union-attr]
    rolled_back = "the database rolled it (and so did the cache)" in caplog.text
    assert rolled_back == (env.engine.dialect.name == "postgresql")


class Item(Base):
    __tablename__ = "sac_failed_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]


@pytest.mark.parametrize("dialect_name", ["postgresql"])
@pytest.mark.parametrize("cache_url", ["redis"], indirect=True)
def test_a_session_over_two_connections_keeps_what_the_other_one_committed(
    env: Env,
) -> None:
    """Two binds: one connection's transaction fails (rolled back at the COMMIT), the
    other's commits. What the Session wrote is invalidated, not put back: the old
    image of the committed row was served again."""
    env.cache.register(Item, ttl=600)
    other = sa.create_engine(env.engine.url)
    try:
        with env.Session() as s:
            s.add(Item(id=1, n=5))
            s.commit()
        with env.Session(binds={Account: env.engine, Item: other}) as s:
            assert s.get(Item, 1).n == 5  # type: ignore[union-attr]  # its entry
            s.get(Item, 1).n = 6  # type: ignore[union-attr]
            s.flush()  # on the other connection
            with pytest.raises(sa.exc.IntegrityError):
                s.execute(
                    sa.text("INSERT INTO sac_failed_accounts (id, balance) VALUES (1, 0)"),
                    bind_arguments={"mapper": sa.inspect(Account)},
                )
            s.commit()
        with env.Session() as s:
            assert s.get(Item, 1).n == 6  # type: ignore[union-attr]
    finally:
        other.dispose()


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_write_behind_changes_of_a_transaction_postgresql_rolled_back_are_aborted(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """Every COMMIT went to a failed transaction: the outcome is a known rollback, so
    the queued changes are aborted (they were left "outcome unknown" and
    dead-lettered, with advice to check the database and replay them)."""
    from test_write_behind import Counter, Order, wb_env

    with wb_env(engine, redis_url, namespace, prepare_timeout=0.3) as wb:
        with wb.Session() as s:
            s.add(Order(id=1, note="first"))
            s.commit()
        with wb.Session() as s:
            s.add(Counter(id=1, n=1))
            with pytest.raises(sa.exc.IntegrityError):
                s.execute(sa.text("INSERT INTO sac_wb_orders (id, note) VALUES (1, 'again')"))
            s.commit()  # the application goes on; PostgreSQL rolls it back
        wb.drain()
        assert wb.db() == {}
        assert wb.queue.dead_letters() == []
        assert wb.queue.pending() == {}


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_a_commit_postgresql_refused_is_a_known_rollback(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """A COMMIT that raised while the connection stayed open and idle (a deferred unique
    constraint) was rolled back for certain: the queued changes are aborted, not left
    "outcome unknown" (dead-lettered after ``prepare_timeout``, with ``flush()`` blocked
    until then), and no error is logged for them."""
    from test_write_behind import Counter, wb_env

    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS sac_deferred")
        conn.exec_driver_sql(
            "CREATE TABLE sac_deferred (id int PRIMARY KEY, u int, "
            "CONSTRAINT sac_deferred_u UNIQUE (u) DEFERRABLE INITIALLY DEFERRED)"
        )
    try:
        with wb_env(engine, redis_url, namespace, prepare_timeout=0.3) as wb:
            with wb.Session() as s:
                s.add(Counter(id=1, n=1))
                s.execute(sa.text("INSERT INTO sac_deferred VALUES (1, 1), (2, 1)"))
                with pytest.raises(sa.exc.IntegrityError):
                    s.commit()
            wb.drain()
            wb.queue.flush(timeout=0.2)  # nothing committed is waiting
            assert wb.db() == {}
            assert wb.queue.dead_letters() == []
            assert wb.queue.pending() == {}
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS sac_deferred")
