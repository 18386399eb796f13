"""SQLite's default driver (pysqlite) and a SAVEPOINT that starts the transaction.

pysqlite sends no BEGIN before a SAVEPOINT (only before DML). So a ``begin_nested()``
that is a Session's first statement starts SQLite's transaction with the SAVEPOINT
itself, and its RELEASE commits it: the Session's later ``rollback()`` takes nothing
back (SQLAlchemy documents the quirk and a recipe). sa_cache must follow the database,
not the Session: the entries of what the RELEASE committed may not be put back.
SQLite only: the other databases send BEGIN first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import Env, make_env, transactional_engine
from models import User
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

import sa_cache
from sa_cache import with_cache


@pytest.fixture
def env(tmp_path: Path, cache_url: str, namespace: str) -> Iterator[Env]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/sp.db")  # the driver's defaults
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=3600)
    try:
        yield from make_env(engine, cache)
    finally:
        engine.dispose()


def _in_database(env: Env) -> str:
    with env.engine.connect() as conn:
        return str(conn.scalar(sa.text("SELECT name FROM sac_users WHERE id = 1")))


NAMES = select(User.name).where(User.id == 1).options(with_cache(ttl=600))


def _cached_views(env: Env) -> tuple[str, str]:
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        return user.name, str(s.scalar(NAMES))


def test_a_released_first_savepoint_commits_and_the_cache_follows(env: Env) -> None:
    assert _cached_views(env) == ("user1", "user1")  # both entries filled
    with env.Session() as s:
        user = s.get(User, 1)  # a hit: no statement, so the SAVEPOINT comes first
        assert user is not None
        savepoint = s.begin_nested()
        user.name = "released"
        s.flush()
        savepoint.commit()  # RELEASE SAVEPOINT: SQLite commits here
        s.rollback()  # nothing left to roll back
    assert _in_database(env) == "released"
    assert _cached_views(env) == ("released", "released")


def test_a_first_savepoint_released_by_text_commits_and_the_cache_follows(env: Env) -> None:
    """The same with the SAVEPOINT and its RELEASE sent as SQL text."""
    assert _cached_views(env) == ("user1", "user1")
    with env.Session() as s:
        conn = s.connection()
        conn.exec_driver_sql("SAVEPOINT by_hand")
        s.execute(sa.update(User).where(User.id == 1).values(name="by text"))
        conn.exec_driver_sql("RELEASE SAVEPOINT by_hand")
        s.rollback()
    assert _in_database(env) == "by text"
    assert _cached_views(env) == ("by text", "by text")


def test_a_savepoint_inside_a_begun_transaction_is_rolled_back_as_usual(env: Env) -> None:
    """The control: after a write pysqlite has begun the transaction, the RELEASE
    commits nothing, and the rollback takes everything back (entries as they were)."""
    assert _cached_views(env) == ("user1", "user1")
    with env.Session() as s:
        s.execute(sa.update(User).where(User.id == 2).values(name="other"))  # BEGIN sent
        user = s.get(User, 1)
        assert user is not None
        savepoint = s.begin_nested()
        user.name = "released"
        s.flush()
        savepoint.commit()
        s.rollback()
    assert _in_database(env) == "user1"
    assert _cached_views(env) == ("user1", "user1")


def test_the_savepoint_recipe_is_a_transaction_not_autocommit(env: Env) -> None:
    """pysqlite's SAVEPOINT recipe (``isolation_level = None`` and a BEGIN at each
    SQLAlchemy begin) runs real transactions: a flush is not committed as it runs, and
    a rollback puts the entries back — it used to be taken for AUTOCOMMIT (invalidated
    at each flush: correct, but misses after every rolled-back transaction)."""
    recipe = transactional_engine(env.engine)
    factory = sessionmaker(recipe, class_=sa_cache.CachingSession, cache=env.cache)
    try:
        assert _cached_views(env) == ("user1", "user1")
        with factory() as s:
            user = s.get(User, 1)
            assert user is not None
            user.name = "never"
            s.flush()
            assert _in_database(env) == "user1"  # not committed by the flush
            s.rollback()
        env.log.clear()
        assert _cached_views(env) == ("user1", "user1")
        assert env.log.selects == []  # the entries were put back, not invalidated
        with factory() as s:  # and a commit is written through
            user = s.get(User, 1)
            assert user is not None
            user.name = "recipe"
            s.commit()
        env.log.clear()
        assert _cached_views(env) == ("recipe", "recipe")
        assert len(env.log.selects) == 1  # the entry written through; the query reloaded
    finally:
        recipe.dispose()
