"""A Session joined to an outer transaction (the "join a Session into an external
transaction" recipe): what it wrote is invalidated *after* the outer COMMIT.

SQLAlchemy's Connection ``commit`` event runs just before the DBAPI COMMIT. An
invalidation run there alone leaves a window: another Session reads the rows (the
database still holds the old ones), stores them under the new generations, and the
cache serves them after the outer ``commit()`` returned. Each test opens that window on
purpose, with a ``commit`` listener that runs such a reader.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env, transactional_engine
from models import User
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

import sa_cache
from sa_cache import with_cache

BY_ID = select(User.name).where(User.id == 1).options(with_cache())


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=300)
    yield from make_env(engine, cache)


def _views(env: Env) -> tuple[str, str]:
    """(the cached query's answer, ``session.get``'s name) in a fresh Session, after the
    fills of earlier reads have landed."""
    env.cache.wait_for_fills()
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        return str(s.scalar(BY_ID)), user.name


def _rename_joined(env: Env, conn: sa.Connection) -> None:
    """User 1 renamed "outer" by a Session joined to ``conn``'s transaction."""
    with sa_cache.CachingSession(
        bind=conn, cache=env.cache, join_transaction_mode="create_savepoint"
    ) as s:
        user = s.get(User, 1)
        assert user is not None
        user.name = "outer"
        s.commit()


def _outer_commit_with_reader(env: Env, write: Callable[[Session], None]) -> list[tuple[str, str]]:
    """Run ``write`` in a Session joined to an outer transaction, then commit the outer
    transaction with a reader in the window before its COMMIT; what the reader saw."""
    engine = transactional_engine(env.engine)
    conn = engine.connect()
    seen: list[tuple[str, str]] = []
    try:
        outer = conn.begin()
        joined = sessionmaker(
            bind=conn,
            class_=sa_cache.CachingSession,
            cache=env.cache,
            join_transaction_mode="create_savepoint",
        )
        with joined() as s:
            write(s)
            s.commit()  # a SAVEPOINT release: sa_cache waits for the outer commit

        @event.listens_for(conn, "commit")  # after sa_cache's own listener
        def reader_in_the_window(c: sa.Connection) -> None:
            seen.append(_views(env))  # the old rows, loaded and stored meanwhile
            env.cache.wait_for_fills()

        outer.commit()
    finally:
        conn.close()
        if engine is not env.engine:
            engine.dispose()
    return seen


def test_an_update_is_not_served_stale_after_the_outer_commit(env: Env) -> None:
    assert _views(env) == _views(env) == ("user1", "user1")  # both cached

    def rename(s: Session) -> None:
        user = s.get(User, 1)
        assert user is not None
        user.name = "outer"

    seen = _outer_commit_with_reader(env, rename)
    assert seen == [("user1", "user1")]  # the window was open: old rows read
    assert _views(env) == ("outer", "outer")
    assert _views(env) == ("outer", "outer")  # (and what the last read stored)


def test_a_core_update_is_not_served_stale_after_the_outer_commit(env: Env) -> None:
    assert _views(env) == _views(env) == ("user1", "user1")

    def core_update(s: Session) -> None:
        s.execute(sa.update(User).where(User.id == 1).values(name="core"))

    seen = _outer_commit_with_reader(env, core_update)
    assert seen == [("user1", "user1")]
    assert _views(env) == ("core", "core")
    assert _views(env) == ("core", "core")


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])  # (a server to drop it)
def test_a_failed_outer_commit_still_invalidates(env: Env) -> None:
    """A COMMIT that raised may have been applied: what the window's reader stored is
    invalidated after it all the same (the next reads go to the database)."""
    dialect = env.engine.dialect.name
    assert _views(env) == _views(env) == ("user1", "user1")
    conn = env.engine.connect()
    try:
        outer = conn.begin()
        pid_sql = "SELECT pg_backend_pid()" if dialect == "postgresql" else "SELECT CONNECTION_ID()"
        pid = conn.exec_driver_sql(pid_sql).scalar()
        _rename_joined(env, conn)

        @event.listens_for(conn, "commit")
        def reader_then_drop(c: sa.Connection) -> None:
            assert _views(env) == ("user1", "user1")
            env.cache.wait_for_fills()
            kill = (
                f"SELECT pg_terminate_backend({pid})" if dialect == "postgresql" else f"KILL {pid}"
            )
            with env.engine.connect() as other:
                other.exec_driver_sql(kill)

        with pytest.raises(sa.exc.DBAPIError):
            outer.commit()
    finally:
        conn.close()
    env.log.clear()
    assert _views(env) == ("user1", "user1")  # (the COMMIT never reached the server)
    assert len(env.log.selects) == 2  # both reads missed: the window's fills are gone


@pytest.mark.parametrize("dialect_name", ["mariadb"])  # (XA; PostgreSQL here allows none)
def test_a_joined_session_under_a_two_phase_outer_transaction(env: Env) -> None:
    """The outer transaction is two-phase (``begin_twophase``): its COMMIT fires
    ``commit_twophase``, not ``commit`` — what the joined Session wrote was never
    invalidated."""
    assert _views(env) == _views(env) == ("user1", "user1")
    conn = env.engine.connect()
    seen: list[tuple[str, str]] = []
    try:
        outer = conn.begin_twophase()
        _rename_joined(env, conn)

        @event.listens_for(conn, "commit_twophase")
        def reader_in_the_window(c: sa.Connection, xid: object, prepared: bool) -> None:
            seen.append(_views(env))
            env.cache.wait_for_fills()

        outer.prepare()
        outer.commit()
    finally:
        conn.close()
    assert seen == [("user1", "user1")]
    assert _views(env) == ("outer", "outer")
    assert _views(env) == ("outer", "outer")


def test_listeners_do_not_pile_up_on_a_long_lived_connection(env: Env) -> None:
    """A job holding one Connection and running ``with conn.begin(): <joined Session>``
    in a loop: the invalidations waiting for each outer COMMIT share one set of
    Connection listeners (a set per joined commit, never removed, made every later
    COMMIT walk them all and kept their tables and keys alive), and each outer commit
    still invalidates what its joined Session wrote."""
    engine = transactional_engine(env.engine)
    conn = engine.connect()
    names = ("commit", "rollback", "commit_twophase", "rollback_twophase")
    counts: list[dict[str, int]] = []
    try:
        for i in range(50):
            with (
                conn.begin(),
                sa_cache.CachingSession(
                    bind=conn, cache=env.cache, join_transaction_mode="create_savepoint"
                ) as s,
            ):
                s.execute(sa.update(User).where(User.id == 1).values(name=f"n{i}"))
                s.commit()
            assert _views(env) == (f"n{i}", f"n{i}")
            counts.append({name: len(getattr(conn.dispatch, name)) for name in names})
    finally:
        conn.close()
        if engine is not env.engine:
            engine.dispose()
    assert counts[-1] == counts[0], (counts[0], counts[-1])
