"""Actions sa_cache runs right after a DBAPI COMMIT (`commit_hook.after_commit`), for a
COMMIT that never ran: a ``commit`` listener after sa_cache's raised, so the dialect's
COMMIT was never called. The actions are keyed by the connection's pool proxy; left
behind, they would run at that connection's next COMMIT (another transaction's), or at
the COMMIT of another proxy that reuses the address."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from models import User

import sa_cache
from sa_cache import commit_hook


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=300)
    yield from make_env(engine, cache)


def test_a_commit_listener_raising_after_sa_caches_leaves_the_cache_as_the_database(
    env: Env,
) -> None:
    """A ``commit`` listener after sa_cache's raises: SQLAlchemy's commit fails before
    the DBAPI COMMIT, which never runs (the transaction is left open on the pooled
    connection until it is closed: disposed here). The cache shows what the database
    holds, and sa_cache's actions for that COMMIT are never run for another one."""
    with env.Session() as s:  # (sa_cache's engine listeners are in place from here on)
        assert s.get(User, 1) is not None
    refused: list[bool] = [True]

    def refuse(conn: sa.Connection) -> None:
        if refused:
            refused.clear()
            raise RuntimeError("refused by the application")

    sa.event.listen(env.engine, "commit", refuse)
    try:
        with env.Session() as s:
            user = s.get(User, 1)
            assert user is not None
            user.name = "refused commit"
            proxy = s.connection().connection
            with pytest.raises(RuntimeError, match="refused"):
                s.commit()
            assert id(proxy) in commit_hook._after_commit  # (registered, not run yet)
    finally:
        sa.event.remove(env.engine, "commit", refuse)
    env.engine.dispose()  # (the server rolls the open transaction back)
    with env.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT name FROM sac_users WHERE id = 1")) == "user1"
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        assert user.name == "user1"
        user.name = "committed"
        s.commit()
    with env.Session() as s:
        assert s.get(User, 1).name == "committed"  # type: ignore[union-attr]


def test_a_new_transaction_drops_the_actions_of_a_commit_that_never_ran(env: Env) -> None:
    ran: list[object] = []
    with env.Session() as s:  # (sa_cache's engine listeners in place)
        s.get(User, 1)
    with env.engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        assert commit_hook.after_commit(conn, ran.append)  # as the commit event does
        conn.rollback()  # ... and then the COMMIT never ran
        conn.exec_driver_sql("SELECT 1")  # a new transaction begins
        conn.commit()
    assert ran == []


def test_actions_are_run_for_their_own_proxy_only() -> None:
    """An entry left for a proxy that is gone is not run for another object that got
    its address."""

    class Proxy:
        pass

    gone, other = Proxy(), Proxy()
    ran: list[object] = []
    commit_hook._after_commit[id(other)] = (weakref.ref(gone), [ran.append])
    commit_hook._run_after_commit(other, None)
    assert ran == []
    assert id(other) not in commit_hook._after_commit
    commit_hook._after_commit[id(other)] = (weakref.ref(other), [ran.append])
    commit_hook._run_after_commit(other, None)
    assert ran == [None]
