"""A statement's error after which the database rolled back the whole transaction, not
only the statement: InnoDB's deadlock (MySQL / MariaDB error 1213; a lock wait timeout,
1205, too on a server with ``innodb_rollback_on_timeout``). The connection goes on in a
new implicit transaction, and an application that catches the error and commits
commits only what ran after it. The cache must end up agreeing with the database: what
the transaction wrote before the error is never written through (nor put back as if
committed: what ran after it may be committed), and its write-behind changes are
aborted as a rolled-back transaction's are. PostgreSQL's failed transaction (a deadlock
there, 40P01) rolls back at the COMMIT (see test_failed_transaction)."""

from __future__ import annotations

import threading
import time
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
    __tablename__ = "sac_srb_accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


class Other(Base):
    __tablename__ = "sac_srb_other"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int]


def _seed(session: Any) -> None:
    session.add_all([Account(id=1, balance=100), Account(id=2, balance=100)])
    session.add_all([Other(id=i, n=0) for i in range(1, 6)])
    session.commit()


@pytest.fixture(params=["through", "invalidate"])
def env(
    engine: sa.Engine, cache_url: str, namespace: str, request: pytest.FixtureRequest
) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Account, ttl=600, write=request.param)
    yield from make_env(engine, cache, Base.metadata, _seed)


def deadlock_victim(engine: sa.Engine, s: Any, locked: str, theirs: str, mine: str) -> None:
    """Make ``s`` (which holds the row ``locked`` — an UPDATE's WHERE of it — locked by a
    flush) the victim of a deadlock: another transaction updates ``theirs`` (more rows
    than ``s`` wrote: InnoDB rolls back the transaction with less undo), then waits for
    ``locked``, while ``s`` runs ``mine``, which waits for one of ``theirs``."""
    ready = threading.Event()
    done: list[BaseException | None] = []
    postgresql = engine.dialect.name == "postgresql"
    whose: list[int] = []  # PostgreSQL: the other connection's backend

    def other() -> None:
        try:
            with engine.connect() as conn:
                if postgresql:  # the Session detects it first
                    conn.exec_driver_sql("SET deadlock_timeout = '10s'")
                    whose.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
                conn.exec_driver_sql(theirs)
                ready.set()
                conn.exec_driver_sql(locked)
                conn.rollback()
            done.append(None)
        except BaseException as exc:
            done.append(exc)

    t = threading.Thread(target=other)
    t.start()
    assert ready.wait(10)
    wait_for_lock_wait(engine, whose)  # the other transaction now waits for the locked row
    if postgresql:  # (the default 1 s before PostgreSQL looks for a deadlock: no need here)
        with s.connection().connection.dbapi_connection.cursor() as cursor:
            cursor.execute("SET LOCAL deadlock_timeout = '100ms'")  # (not seen by the cache)
    with pytest.raises(sa.exc.OperationalError) as raised:
        s.execute(sa.text(mine))
    assert "1213" in str(raised.value) or "deadlock" in str(raised.value).lower()
    t.join(20)
    assert done == [None]


def wait_for_lock_wait(engine: sa.Engine, whose: list[int], timeout: float = 30.0) -> None:
    """Until the server says the other connection waits for a row lock (PostgreSQL: the
    backend in ``whose``; MariaDB: a transaction waiting for a lock on a table of this
    database, the only one there: INNODB_TRX's thread id can be another connection's)."""
    if engine.dialect.name == "postgresql":
        query = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {int(whose[0])}"
        query += " AND wait_event_type = 'Lock'"
    else:
        query = (
            "SELECT COUNT(*) FROM information_schema.INNODB_TRX t"
            " JOIN information_schema.INNODB_LOCKS l ON l.lock_id = t.trx_requested_lock_id"
            " WHERE t.trx_state = 'LOCK WAIT' AND l.lock_table LIKE CONCAT('`', DATABASE(), '`.%%')"
        )
    deadline = time.monotonic() + timeout
    with engine.connect() as probe:
        while not probe.exec_driver_sql(query).scalar_one():
            assert time.monotonic() < deadline, "the other transaction never waited for the lock"
            probe.rollback()  # (a fresh snapshot of the server's view)
            time.sleep(0.01)


def _victim(env: Env, s: Any) -> None:
    deadlock_victim(
        env.engine,
        s,
        "UPDATE sac_srb_accounts SET balance = balance WHERE id = 1",
        "UPDATE sac_srb_other SET n = n + 1 WHERE id >= 2",
        "UPDATE sac_srb_other SET n = n + 1 WHERE id = 2",
    )


def _database(env: Env) -> dict[int, int]:
    with env.engine.connect() as conn:
        return dict(conn.execute(sa.select(Account.id, Account.balance)).all())


def _cached(env: Env) -> dict[int, int]:
    """What ``session.get`` and a cached query serve (asserted to agree)."""
    with env.Session() as s:
        got = {i: s.get(Account, i).balance for i in (1, 2)}  # type: ignore[union-attr]
    with env.Session() as s:
        rows = s.scalars(sa.select(Account).options(sa_cache.with_cache())).all()
        assert {a.id: a.balance for a in rows} == got
    return got


@pytest.mark.parametrize("dialect_name", ["mariadb", "postgresql"])
def test_a_commit_after_a_caught_deadlock_leaves_the_cache_as_the_database(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    assert _cached(env) == {1: 100, 2: 100}  # the entries
    with env.Session() as s:
        s.get(Account, 1).balance = 50  # type: ignore[union-attr]
        s.flush()  # the row is locked
        _victim(env, s)  # the database rolled the whole transaction back
        s.commit()  # the application goes on (a best-effort statement failed)
    assert _database(env) == {1: 100, 2: 100}
    assert _cached(env) == {1: 100, 2: 100}  # (50, written through, was served)
    assert "made the database roll it back" in caplog.text or "rolled it" in caplog.text


def _deadlock_in_a_savepoint(env: Env, s: Any) -> None:
    """A deadlock in a SAVEPOINT, a write after it, then the application leaves the
    SAVEPOINT with an error: its ROLLBACK TO fails, the deadlock erased the savepoint."""
    with s.begin_nested():
        _victim(env, s)
        s.get(Account, 2).balance = 80
        s.flush()  # in the new transaction, not in a savepoint
        raise RuntimeError("the application gives up the savepoint")


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_what_runs_after_a_deadlock_is_committed_and_invalidated(env: Env) -> None:
    """After the deadlock the connection is in a new transaction, which the COMMIT
    commits: what the Session writes then is neither lost nor hidden by an entry put
    back, also in a SAVEPOINT whose rollback fails (the deadlock erased it)."""
    assert _cached(env) == {1: 100, 2: 100}
    with env.Session() as s:
        s.get(Account, 1).balance = 50  # type: ignore[union-attr]
        s.flush()
        _victim(env, s)
        s.get(Account, 2).balance = 70  # type: ignore[union-attr]
        s.flush()  # in the new transaction
        s.commit()
    assert _database(env) == {1: 100, 2: 70}
    assert _cached(env) == {1: 100, 2: 70}
    with env.Session() as s:
        s.get(Account, 1).balance = 40  # type: ignore[union-attr]
        s.flush()
        with pytest.raises(sa.exc.OperationalError, match="1305"):  # no such SAVEPOINT
            _deadlock_in_a_savepoint(env, s)
        s.commit()
    assert _database(env) == {1: 100, 2: 80}
    assert _cached(env) == {1: 100, 2: 80}


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_rollback_after_a_deadlock_keeps_the_entries(env: Env) -> None:
    assert _cached(env) == {1: 100, 2: 100}
    with env.Session() as s:
        s.get(Account, 1).balance = 50  # type: ignore[union-attr]
        s.flush()
        _victim(env, s)
        s.get(Account, 2).balance = 70  # type: ignore[union-attr]
        s.flush()
        s.rollback()
        assert s.get(Account, 1).balance == 100  # type: ignore[union-attr]
        s.get(Account, 1).balance = 60  # type: ignore[union-attr]  # the retry
        s.commit()
    assert _database(env) == {1: 60, 2: 100}
    assert _cached(env) == {1: 60, 2: 100}


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_lock_wait_timeout_is_followed_as_the_server_handles_it(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """1205 undoes only the statement unless the server runs with
    ``innodb_rollback_on_timeout`` (read from the server): either way the cache agrees."""
    with env.engine.connect() as conn:
        whole = bool(conn.scalar(sa.text("SELECT @@innodb_rollback_on_timeout")))
    assert _cached(env) == {1: 100, 2: 100}
    with env.engine.connect() as holder, env.Session() as s:
        holder.exec_driver_sql("UPDATE sac_srb_other SET n = n + 1 WHERE id = 2")
        s.get(Account, 1).balance = 50  # type: ignore[union-attr]
        s.flush()
        s.execute(sa.text("SET SESSION innodb_lock_wait_timeout = 1"))
        with pytest.raises(sa.exc.OperationalError, match="1205"):
            s.execute(sa.text("UPDATE sac_srb_other SET n = n + 1 WHERE id = 2"))
        holder.rollback()
        s.commit()
    assert _database(env) == {1: 100 if whole else 50, 2: 100}
    assert _cached(env) == _database(env)
    assert "innodb_rollback_on_timeout" not in caplog.text  # (it was read)


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_write_behind_changes_of_a_transaction_a_deadlock_rolled_back_are_aborted(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """The transaction's database work (an Order) was rolled back by the deadlock: its
    queued Counter change is aborted, never applied alone, nor dead-lettered "outcome
    unknown"."""
    from test_write_behind import Counter, Order, wb_env

    with wb_env(engine, redis_url, namespace, prepare_timeout=0.3) as wb:
        with wb.Session() as s:
            s.add_all([Order(id=i, note="seed") for i in range(2, 6)])
            s.add(Counter(id=2, n=5))
            s.commit()
        with wb.Session() as s:
            s.add(Counter(id=1, n=1))  # write-behind
            s.get(Counter, 2).n = 6  # type: ignore[union-attr]
            s.add(Order(id=1, note="with the counter"))
            s.flush()  # the Order row is locked
            deadlock_victim(
                engine,
                s,
                "UPDATE sac_wb_orders SET note = 'y' WHERE id = 1",
                "UPDATE sac_wb_orders SET note = 'x' WHERE id >= 2",
                "UPDATE sac_wb_orders SET note = 'z' WHERE id = 2",
            )
            s.commit()  # the application goes on
        with wb.Session() as s:  # what the queue shows: the changes never happened
            assert s.get(Counter, 1) is None
            assert s.get(Counter, 2).n == 5  # type: ignore[union-attr]
        wb.drain()
        with engine.connect() as conn:
            assert conn.scalars(sa.select(Order.id).where(Order.id == 1)).all() == []
        assert wb.db() == {2: (5, "new")}
        assert wb.queue.dead_letters() == []
        assert wb.queue.pending() == {}
