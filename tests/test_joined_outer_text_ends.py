"""A Session joined to an outer Connection's transaction (the test-fixture recipe) on
MariaDB: its writes wait for the outer COMMIT (`outer_commit`). A failed statement that
commits first (DDL) must invalidate them too, and text taken for a transaction end that
is none (``CREATE TEMPORARY TABLE``) must not use up the waiting invalidation before
the real COMMIT (regression audit rh)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from models import User
from sqlalchemy import text
from test_text_transaction_end import _database_name, _rename, _views

import sa_cache


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=300)
    yield from make_env(engine, cache)


# rh-01: a joined Session's write waits for the outer COMMIT; a failing DDL on the
# outer Connection commits it on MariaDB (before the DDL runs), but no after_execute
# fires for a failed statement: the outer listeners never see it, and the outer
# rollback then drops the waiting invalidation.
@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("via", ["outer_connection", "joined_session"])
def test_joined_write_committed_by_failed_outer_ddl(env: Env, via: str) -> None:
    assert _views(env) == ("user1", "user1")
    conn = env.engine.connect()
    try:
        outer = conn.begin()
        with sa_cache.CachingSession(bind=conn, cache=env.cache) as s:  # joins `outer`
            _rename(s, "outer")
            s.commit()  # not the database's: the invalidation waits for the outer COMMIT
            if via == "joined_session":
                with pytest.raises(sa.exc.DatabaseError):
                    s.execute(text("DROP TABLE sac_rh_missing"))
        if via == "outer_connection":
            with pytest.raises(sa.exc.DatabaseError):
                conn.exec_driver_sql("DROP TABLE sac_rh_missing")  # MariaDB commits first
        outer.rollback()  # takes nothing back
    finally:
        conn.close()
    assert _database_name(env) == "outer"
    assert _views(env) == ("outer", "outer")


# rh-02: text on the outer Connection that is read as a possible end but ends nothing
# (MariaDB's CREATE TEMPORARY TABLE commits nothing; EXECUTE of a prepared SELECT)
# runs the invalidation waiting for the outer COMMIT at once and takes it off: a reader
# before the real COMMIT stores the old row under the new generations, and nothing
# invalidates at the COMMIT.
NOT_COMMITTING = {
    "create_temporary_table": ["CREATE TEMPORARY TABLE sac_rh_tmp (id INT)"],
    "execute_prepared_select": ["PREPARE sac_rh_stmt FROM 'SELECT 1'", "EXECUTE sac_rh_stmt"],
    "analyze_select": ["ANALYZE SELECT 1"],  # MariaDB's EXPLAIN ANALYZE, not ANALYZE TABLE
    "drop_temporary_table": [
        "CREATE TEMPORARY TABLE sac_rh_tmp2 (id INT)",
        "DROP TEMPORARY TABLE sac_rh_tmp2",
    ],
}


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("how", list(NOT_COMMITTING))
def test_false_end_on_outer_connection_takes_the_waiting_invalidation(env: Env, how: str) -> None:
    assert _views(env) == ("user1", "user1")
    conn = env.engine.connect()
    try:
        outer = conn.begin()
        with sa_cache.CachingSession(bind=conn, cache=env.cache) as s:  # joins `outer`
            _rename(s, "outer")
            s.commit()  # not the database's: the invalidation waits for the outer COMMIT
        for sql in NOT_COMMITTING[how]:
            conn.exec_driver_sql(sql)  # commits nothing
        assert _database_name(env) == "user1"  # still uncommitted
        assert _views(env) == ("user1", "user1")  # a reader meanwhile: right, for now
        outer.commit()
    finally:
        conn.close()
    assert _database_name(env) == "outer"
    assert _views(env) == ("outer", "outer")
