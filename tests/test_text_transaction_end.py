"""A transaction ended by SQL text — ``session.execute(text("COMMIT"))``, ``ROLLBACK``,
or the same through ``exec_driver_sql`` (e.g. before PostgreSQL's ``CREATE INDEX
CONCURRENTLY``). SQLAlchemy does not see it; the database has ended the transaction.

What the Session wrote before it is invalidated as the statement returns, and the
Session's own end later never writes images nor puts old entries back for it: after a
text ROLLBACK the commit would otherwise store rows the database never kept; after a
text COMMIT a Session that then just closes would leave the old rows cached."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from models import User
from sqlalchemy import select, text
from sqlalchemy.orm import Session

import sa_cache
from sa_cache import with_cache

BY_ID = select(User.name).where(User.id == 1).options(with_cache())


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=300)
    yield from make_env(engine, cache)


def _views(env: Env) -> tuple[str, str]:
    """(the cached query's answer, ``session.get``'s name) in a fresh Session."""
    env.cache.wait_for_fills()
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        return str(s.scalar(BY_ID)), user.name


def _database_name(env: Env) -> str:
    with env.engine.connect() as conn:
        return str(conn.scalar(select(User.name).where(User.id == 1)))


def _rename(s: Session, name: str) -> None:
    user = s.get(User, 1)
    assert user is not None
    user.name = name
    s.flush()


def _by_text(s: Session, sql: str) -> None:
    s.execute(text(sql))


def _by_driver(s: Session, sql: str) -> None:
    s.connection().exec_driver_sql(sql)


SENDERS = {"text": _by_text, "driver": _by_driver}


@pytest.fixture(params=list(SENDERS))
def send(request: pytest.FixtureRequest) -> Callable[[Session, str], None]:
    return SENDERS[request.param]


def test_a_text_rollback_then_commit_caches_nothing_it_rolled_back(
    env: Env, send: Callable[[Session, str], None]
) -> None:
    before = _views(env)  # cached
    old = before[1]
    with env.Session() as s:
        _rename(s, "rolled back")
        send(s, "ROLLBACK")
        s.commit()  # (an empty transaction now)
    assert _database_name(env) == old
    assert _views(env) == (old, old)


def test_a_text_commit_then_close_leaves_no_old_rows(
    env: Env, send: Callable[[Session, str], None]
) -> None:
    _views(env)
    with env.Session() as s:
        _rename(s, "committed")
        send(s, "COMMIT")
        # closed without commit(): SQLAlchemy rolls back an empty transaction
    assert _database_name(env) == "committed"
    assert _views(env) == ("committed", "committed")


def test_a_text_commit_is_invalidated_as_it_returns(
    env: Env, send: Callable[[Session, str], None]
) -> None:
    """Readers between the text COMMIT and the Session's end see the new row."""
    _views(env)
    with env.Session() as s:
        _rename(s, "committed")
        send(s, "COMMIT")
        assert _views(env) == ("committed", "committed")
        _rename(s, "later")  # a new database transaction, committed the usual way
        s.commit()
    assert _database_name(env) == "later"
    assert _views(env) == ("later", "later")


def test_a_rollback_to_savepoint_is_not_a_transaction_end(env: Env) -> None:
    """``ROLLBACK TO SAVEPOINT`` ends no transaction: the commit writes through as
    usual (the renamed row is served without a SELECT)."""
    _views(env)
    with env.Session() as s:
        _rename(s, "kept")
        s.execute(text("SAVEPOINT sp1"))
        s.execute(text("ROLLBACK TO SAVEPOINT sp1"))
        s.commit()
    env.cache.wait_for_fills()
    env.log.clear()
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        assert user.name == "kept"
    assert env.log.selects == []


def _create_scratch(s: Session) -> None:
    sa.Table("sac_scratch_ddl", sa.MetaData(), sa.Column("id", sa.Integer)).create(s.connection())


IMPLICIT: dict[str, Callable[[Session], None]] = {
    "create_table_text": lambda s: _by_text(s, "CREATE TABLE sac_scratch_ddl (id INT)"),
    "start_transaction": lambda s: _by_text(s, "START TRANSACTION"),
    "begin_driver": lambda s: _by_driver(s, "BEGIN"),
    "lock_tables": lambda s: _by_text(s, "LOCK TABLES sac_users READ"),
    "compiled_ddl": _create_scratch,
}


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("how", list(IMPLICIT))
def test_a_mariadb_implicit_commit_then_rollback_leaves_no_old_rows(env: Env, how: str) -> None:
    """MariaDB commits the open transaction on its own before DDL, ``BEGIN`` / ``START
    TRANSACTION``, ``LOCK TABLES``...: the Session's later ``rollback()`` must not put
    the old entries back (regression audit rf1-01)."""
    _views(env)
    try:
        with env.Session() as s:
            _rename(s, "committed implicitly")
            IMPLICIT[how](s)
            s.rollback()
            if how == "lock_tables":
                s.execute(text("UNLOCK TABLES"))
    finally:
        with env.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS sac_scratch_ddl")
    assert _database_name(env) == "committed implicitly"
    assert _views(env) == ("committed implicitly", "committed implicitly")
