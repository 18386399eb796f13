"""SQL text that ends a transaction, continued (see test_text_transaction_end.py): the
spellings MySQL / MariaDB commit before, text that only looks like an end (a comment
inside ``ROLLBACK ... TO SAVEPOINT``, a literal holding ``;COMMIT``), an outer
Connection's transaction ended by text after a joined Session wrote, and a connection
that text put in autocommit mode.

Missing an end leaves rows the database committed served from the old entries; taking
for an end what is none costs invalidation only, unless it restarts the count of the
connection's statements under REPEATABLE READ: the next read is then taken for the one
that takes the snapshot, and the old snapshot's rows are stored as current."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env, transactional_engine
from models import User
from sqlalchemy import select, text
from test_text_transaction_end import BY_ID, _database_name, _rename, _views

import sa_cache
from sa_cache.transaction_text import transaction_end


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=300)
    yield from make_env(engine, cache)


# -- how text is read (no server) ------------------------------------------------------

READ_AS: dict[str, list[tuple[str, str | None]]] = {
    "postgresql": [
        ("COMMIT", "restarts"),
        ("/* why */ commit work and chain -- done", "restarts"),
        ("ROLLBACK", "rolls_back"),
        ("END", "restarts"),
        ("COMMIT; SELECT 1", "ends"),  # (the SELECT may take the new snapshot)
        ("SELECT 1; COMMIT", "ends"),
        ("ROLLBACK /* c */ TO SAVEPOINT sp", None),
        ("ROLLBACK -- c\nTO SAVEPOINT sp", None),
        ("/* a /* nested */ COMMIT */ SELECT 1", None),
        ("SELECT ';commit'", None),
        ('SELECT "a;"; SELECT 1', None),
        ("DO $$ BEGIN UPDATE t SET a = 1; END $$", None),
        ("DO $f$ BEGIN UPDATE t SET a = 1; END $f$; COMMIT", "ends"),
        ("COMMIT PREPARED 'x'", None),
        ("BEGIN", None),  # (PostgreSQL: a warning, the transaction goes on)
        # a backslash may escape the quote or not (standard_conforming_strings)
        ("SELECT 'a\\'; COMMIT; --'", "ends"),
        ("SELECT E'a\\'; COMMIT; --'", None),
    ],
    "mariadb": [
        ("SET SESSION autocommit = 1", "ends"),
        ("SET autocommit = TRUE", "ends"),
        ("SET autocommit = 'ON'", "ends"),
        ("SET @@local.autocommit = 1", "ends"),
        ("SET LOCAL autocommit=1", "ends"),
        ("SET @x = 1, autocommit = 1", "ends"),
        ("SET @@autocommit := @on", "ends"),  # (a variable: may be on)
        ("SET autocommit = 0", None),
        ("SET autocommit = OFF, @x = 1", None),
        ("SET GLOBAL autocommit = 1", None),  # (new sessions only)
        ("CHECK TABLE t", "ends"),
        ("CHECKSUM TABLE t", None),
        ("RESET QUERY CACHE", "ends"),
        ("SET PASSWORD = PASSWORD('x')", "ends"),
        ("BEGIN", "restarts"),
        ("START TRANSACTION READ ONLY", "restarts"),
        ("START TRANSACTION WITH CONSISTENT SNAPSHOT", "ends"),  # (takes the snapshot)
        ("CREATE TABLE t (a INT)", "ends"),
        ("ROLLBACK /* c */ TO SAVEPOINT sp", None),
        ("ROLLBACK # c\nTO SAVEPOINT sp", None),
        ("SELECT 'x;CREATE TABLE y'", None),
        ("SELECT 1--1; COMMIT", "ends"),  # (MySQL's -- needs a space after it)
        ("BEGIN NOT ATOMIC SELECT 1; UPDATE t SET a = 1; END", None),
        ("BEGIN NOT ATOMIC UPDATE t SET a = 1; COMMIT; END", "ends"),
        ("/*!50000 COMMIT */", "restarts"),  # (MySQL runs what it holds)
        ("SELECT 2*/* it's */3; COMMIT", "ends"),
    ],
    "sqlite": [
        ("END TRANSACTION", "restarts"),
        ("ROLLBACK TRANSACTION TO sp", None),
        ("SELECT [a;b]", None),
    ],
}


@pytest.mark.parametrize(
    ("dialect", "sql", "expected"),
    [(dialect, sql, expected) for dialect, cases in READ_AS.items() for sql, expected in cases],
)
def test_how_text_is_read(dialect: str, sql: str, expected: str | None) -> None:
    """Comments anywhere and literals change nothing; text that is more than a
    transaction end never restarts the statement count (regression audit rb-01, rb-03)."""
    conn: Any = SimpleNamespace(dialect=SimpleNamespace(name=dialect))
    assert transaction_end(conn, sql) == expected


# -- MariaDB's implicit commits --------------------------------------------------------

SPELLINGS = [
    "SET SESSION autocommit = 1",
    "SET autocommit = TRUE",
    "SET autocommit = 'ON'",
    "SET @@local.autocommit = 1",
    "SET @x = 1, autocommit = 1",
    "CHECK TABLE sac_users",
    "RESET QUERY CACHE",
]


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("sql", SPELLINGS)
def test_a_mariadb_implicit_commit_in_any_spelling_leaves_no_old_rows(env: Env, sql: str) -> None:
    """MariaDB commits the open transaction before each of these (the UPDATE is in the
    database after the Session's rollback): the rollback must not put the old entries
    back, and the cached query must not keep the old name (regression audit rb-01)."""
    _views(env)
    try:
        with env.Session() as s:
            _rename(s, "committed implicitly")
            s.execute(text(sql))
            s.rollback()
    finally:
        env.engine.dispose()  # (a pooled connection left in autocommit mode)
    assert _database_name(env) == "committed implicitly"
    assert _views(env) == ("committed implicitly", "committed implicitly")


# -- an outer Connection's transaction ended by text after a joined Session wrote -------

OUTER_ENDS: dict[str, Callable[[sa.Connection], Any]] = {
    "commit_text": lambda conn: conn.exec_driver_sql("COMMIT"),
    "commit_compiled_text": lambda conn: conn.execute(text("/* done */ COMMIT")),
}


def _mariadb_ddl(conn: sa.Connection) -> None:
    conn.exec_driver_sql("CREATE TABLE sac_scratch_outer (id INT)")


def _joined_rename(env: Env, conn: sa.Connection) -> None:
    """User 1 renamed "outer" by a Session joined to ``conn``'s transaction (its commit
    is a SAVEPOINT release: sa_cache waits for the outer COMMIT)."""
    with sa_cache.CachingSession(
        bind=conn, cache=env.cache, join_transaction_mode="create_savepoint"
    ) as s:
        _rename(s, "outer")
        s.commit()


@pytest.mark.parametrize("how", list(OUTER_ENDS))
def test_a_joined_write_committed_by_outer_text_is_invalidated(env: Env, how: str) -> None:
    """The test-fixture recipe: a joined Session writes, then the outer code's SQL text
    commits the outer transaction, and SQLAlchemy's outer transaction is then rolled
    back, which takes nothing back. The waiting invalidation must run at the text
    COMMIT, not be dropped at that rollback (regression audit rb-02)."""
    _joined_write_committed_by_outer_text(env, OUTER_ENDS[how])


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_joined_write_committed_by_outer_ddl_is_invalidated(env: Env) -> None:
    """As above, the outer transaction committed by MariaDB's implicit commit before
    DDL (rb-02)."""
    _joined_write_committed_by_outer_text(env, _mariadb_ddl)


def _joined_write_committed_by_outer_text(env: Env, end: Callable[[sa.Connection], Any]) -> None:
    assert _views(env) == ("user1", "user1")  # both cached
    engine = transactional_engine(env.engine)  # (SQLite: SAVEPOINTs in a transaction)
    conn = engine.connect()
    try:
        outer = conn.begin()
        _joined_rename(env, conn)
        end(conn)  # the database commits the rename here
        assert _views(env) == ("outer", "outer")  # (and at once)
        outer.rollback()
    finally:
        conn.close()
        if engine is not env.engine:
            engine.dispose()
        with env.engine.begin() as c:
            c.exec_driver_sql("DROP TABLE IF EXISTS sac_scratch_outer")
    assert _database_name(env) == "outer"
    assert _views(env) == ("outer", "outer")


def test_a_joined_write_rolled_back_by_outer_text_is_forgotten(env: Env) -> None:
    """A text ROLLBACK of the outer transaction: the rename is gone, what waited for
    the outer COMMIT is dropped (the COMMIT SQLAlchemy sends later commits a new, empty
    transaction), and the entries the joined flush swapped serve the old row again."""
    assert _views(env) == ("user1", "user1")
    engine = transactional_engine(env.engine)
    conn = engine.connect()
    try:
        outer = conn.begin()
        _joined_rename(env, conn)
        conn.exec_driver_sql("ROLLBACK")
        outer.commit()
    finally:
        conn.close()
        if engine is not env.engine:
            engine.dispose()
    assert _database_name(env) == "user1"
    assert _views(env) == ("user1", "user1")
    env.log.clear()
    with env.Session() as s:
        assert s.scalar(BY_ID) == "user1"
    assert env.log.selects == []  # the cached query was not invalidated for nothing


# -- text taken for an end that is none, under REPEATABLE READ ---------------------------

NOT_ENDS = {
    "block_comment": "ROLLBACK /* undo the step */ TO SAVEPOINT sp_more",
    "line_comment": "ROLLBACK -- undo the step\nTO SAVEPOINT sp_more",
}


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
@pytest.mark.parametrize("how", list(NOT_ENDS))
def test_a_rollback_to_savepoint_with_a_comment_keeps_the_snapshot_count(
    env: Env, how: str
) -> None:
    """Under REPEATABLE READ a Session reads (its snapshot), another commits a rename,
    then the first rolls back to a savepoint with a comment in the statement: its
    transaction and snapshot go on. Taken for a transaction end, its next cached read
    would count as the new snapshot's first and store the old row as current
    (regression audit rb-03)."""
    rr = env.engine.execution_options(isolation_level="REPEATABLE READ")
    assert _views(env) == ("user1", "user1")
    with env.Session(bind=rr) as s:
        assert s.execute(select(User.name).where(User.id == 2)).scalar() == "user2"
        s.execute(text("SAVEPOINT sp_more"))
        with env.Session() as other:
            _rename(other, "renamed")
            other.commit()
        s.execute(text(NOT_ENDS[how]))
        assert s.scalar(BY_ID) == "user1"  # its snapshot: right for it
        env.cache.wait_for_fills()
        s.rollback()
    assert _database_name(env) == "renamed"
    assert _views(env) == ("renamed", "renamed")


# -- autocommit turned on by text ------------------------------------------------------


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("level", [None, "READ COMMITTED"])
def test_flushes_after_a_text_set_autocommit_are_invalidated_as_they_run(
    env: Env, level: str | None
) -> None:
    """After ``SET autocommit = 1`` the connection commits each statement as it runs
    (as under ``isolation_level="AUTOCOMMIT"``): a later flush is in the database for
    every reader at once, and so must its invalidation be, not at the Session's end —
    also when the engine names another isolation level (regression audit rb-05)."""
    bind = env.engine if level is None else env.engine.execution_options(isolation_level=level)
    _views(env)
    try:
        with env.Session(bind=bind) as s:
            s.execute(text("SET autocommit = 1"))
            _rename(s, "autocommitted")
            assert _database_name(env) == "autocommitted"  # committed, for every reader
            assert _views(env) == ("autocommitted", "autocommitted")
            s.rollback()  # (takes nothing back)
        assert _views(env) == ("autocommitted", "autocommitted")
    finally:
        env.engine.dispose()  # (the pooled connection is left in autocommit mode)
