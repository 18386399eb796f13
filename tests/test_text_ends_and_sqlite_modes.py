"""More transaction ends sent as SQL text, and SQLite's recipe and autocommit
(regression audit rf of 2026-11-25): MariaDB statements that commit (``SET STATEMENT
... FOR`` DDL, a backquoted ``autocommit``, ``EXECUTE IMMEDIATE``, DDL that fails),
line comments that end only at ``\n`` on MariaDB and SQLite, a commented RELEASE that
commits on SQLite, flushes committed as they run after a text end under pysqlite's
SAVEPOINT recipe; and checks that genuine autocommit and tagged primary-key selects
keep working."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env, transactional_engine
from models import User
from sqlalchemy import select, text
from test_text_transaction_end import BY_ID, _database_name, _rename, _views

import sa_cache
from sa_cache import with_cache


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=300)
    yield from make_env(engine, cache)


# rf-01: MariaDB implicit commits the splitter does not see
MARIADB_MISSED = {
    "set_statement_for_ddl": (
        "SET STATEMENT lock_wait_timeout = 5 FOR CREATE TABLE sac_rf_scratch (id INT)"
    ),
    "backquoted_autocommit": "SET `autocommit` = 1",
    "execute_immediate_ddl": "EXECUTE IMMEDIATE 'CREATE TABLE sac_rf_scratch (id INT)'",
}


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("how", list(MARIADB_MISSED))
def test_mariadb_implicit_commit_spelling_missed(env: Env, how: str) -> None:
    _views(env)
    try:
        with env.Session() as s:
            _rename(s, "committed implicitly")
            s.execute(text(MARIADB_MISSED[how]))
            s.rollback()
    finally:
        env.engine.dispose()
        with env.engine.begin() as c:
            c.exec_driver_sql("DROP TABLE IF EXISTS sac_rf_scratch")
    assert _database_name(env) == "committed implicitly"
    assert _views(env) == ("committed implicitly", "committed implicitly")


# rf-02: SQLite recipe: after a text COMMIT, pysqlite (isolation_level None) runs every
# later statement in autocommit mode until SQLAlchemy's next begin.


@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
def test_sqlite_recipe_flush_after_text_commit_is_committed_at_once(env: Env) -> None:
    recipe = transactional_engine(env.engine)
    factory = sa_cache.CachingSession
    try:
        assert _views(env) == ("user1", "user1")
        with factory(bind=recipe, cache=env.cache) as s:
            s.execute(select(User.name).where(User.id == 2))
            s.execute(text("COMMIT"))
            _rename(s, "autocommitted")
            assert _database_name(env) == "autocommitted"  # committed as it ran
            mid = _views(env)
            s.rollback()  # takes nothing back
        assert _database_name(env) == "autocommitted"
        assert _views(env) == ("autocommitted", "autocommitted")
        assert mid == ("autocommitted", "autocommitted")
    finally:
        recipe.dispose()


def _autocommit_engine(engine: sa.Engine, how: str) -> sa.Engine:
    if how == "option":
        return sa.create_engine(engine.url, isolation_level="AUTOCOMMIT")
    out = sa.create_engine(engine.url)

    @sa.event.listens_for(out, "connect")
    def no_implicit(dbapi_conn: object, record: object) -> None:
        dbapi_conn.isolation_level = None  # type: ignore[attr-defined]

    return out


@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("how", ["option", "none_no_begin"])
def test_sqlite_genuine_autocommit(env: Env, how: str) -> None:
    auto = _autocommit_engine(env.engine, how)
    try:
        assert _views(env) == ("user1", "user1")
        with sa_cache.CachingSession(bind=auto, cache=env.cache) as s:
            _rename(s, "autocommitted")
            assert _database_name(env) == "autocommitted"
            mid = _views(env)
            s.rollback()
        assert _views(env) == ("autocommitted", "autocommitted")
        assert mid == ("autocommitted", "autocommitted")
    finally:
        auto.dispose()


@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("how", ["option", "none_no_begin"])
def test_sqlite_genuine_autocommit_savepoint_rolled_back(env: Env, how: str) -> None:
    auto = _autocommit_engine(env.engine, how)
    try:
        assert _views(env) == ("user1", "user1")
        with sa_cache.CachingSession(bind=auto, cache=env.cache) as s:
            sp = s.begin_nested()
            _rename(s, "undone")
            sp.rollback()
            _rename(s, "kept")
            s.commit()
        assert _database_name(env) == "kept"
        assert _views(env) == ("kept", "kept")
    finally:
        auto.dispose()


@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
def test_sqlite_recipe_read_only_snapshot_does_not_fill_old_rows(env: Env) -> None:
    with env.engine.connect() as c:
        c.exec_driver_sql("PRAGMA journal_mode=WAL")
    recipe = transactional_engine(env.engine)
    try:
        assert _views(env) == ("user1", "user1")
        with sa_cache.CachingSession(bind=recipe, cache=env.cache) as s:
            assert s.scalar(select(User.name).where(User.id == 2)) == "user2"  # snapshot
            with env.Session() as other:
                _rename(other, "renamed")
                other.commit()
            assert s.scalar(BY_ID) == "user1"  # its snapshot
            assert s.get(User, 1).name == "user1"  # type: ignore[union-attr]
            env.cache.wait_for_fills()
            s.commit()
        assert _database_name(env) == "renamed"
        assert _views(env) == ("renamed", "renamed")
    finally:
        recipe.dispose()


def _joined_rename(env: Env, conn: sa.Connection, name: str) -> None:
    with sa_cache.CachingSession(
        bind=conn, cache=env.cache, join_transaction_mode="create_savepoint"
    ) as s:
        _rename(s, name)
        s.commit()


@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
def test_sqlite_recipe_joined_write_after_outer_text_commit(env: Env) -> None:
    """The test-fixture recipe on SQLite's recipe engine: the outer code commits by
    text, a joined Session then writes (its SAVEPOINT starts, its RELEASE commits a
    transaction of its own: pysqlite has isolation_level None), and the outer
    transaction is rolled back, which takes nothing back."""
    assert _views(env) == ("user1", "user1")
    recipe = transactional_engine(env.engine)
    conn = recipe.connect()
    try:
        outer = conn.begin()
        _joined_rename(env, conn, "one")
        conn.exec_driver_sql("COMMIT")
        assert _views(env) == ("one", "one")
        _joined_rename(env, conn, "two")
        outer.rollback()
    finally:
        conn.close()
        recipe.dispose()
    assert _database_name(env) == "two"
    assert _views(env) == ("two", "two")


# rf-03: MariaDB runs text the splitter takes for a ROLLBACK TO SAVEPOINT as a full
# ROLLBACK: a line comment ends at "\n" only, a versioned executable comment of a MySQL
# 5.7+ / later version is not run.
MARIADB_FULL_ROLLBACK = {
    "cr_line_comment": "ROLLBACK # undo the step\rTO SAVEPOINT sp_rf",
}


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("how", list(MARIADB_FULL_ROLLBACK))
def test_mariadb_text_read_as_savepoint_rollback_is_a_full_rollback(env: Env, how: str) -> None:
    assert _views(env) == ("user1", "user1")
    with env.Session() as s:
        _rename(s, "rolled back")
        s.execute(text("SAVEPOINT sp_rf"))
        s.execute(text(MARIADB_FULL_ROLLBACK[how]))
        s.commit()  # commits a new, empty transaction
    assert _database_name(env) == "user1"
    assert _views(env) == ("user1", "user1")


@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
def test_sqlite_cr_line_comment_rollback_is_a_full_rollback(env: Env) -> None:
    """SQLite's ``--`` comment also runs to a "\\n" (0x0a) only."""
    assert _views(env) == ("user1", "user1")
    with env.Session() as s:
        _rename(s, "rolled back")
        s.execute(text("SAVEPOINT sp_rf"))
        s.execute(text("ROLLBACK -- undo the step\rTO SAVEPOINT sp_rf"))
        s.commit()
    assert _database_name(env) == "user1"
    assert _views(env) == ("user1", "user1")


# checks (pass): entity_served: a tagged / relationships=True primary-key select cached as a query
from models import Address  # noqa: E402

TAGGED = select(User).where(User.id == 1).options(with_cache(tags=["rf"]))
RELS = select(User).where(User.id == 1).options(with_cache(relationships=True))


@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("stmt", ["tagged", "rels"])
def test_tagged_pk_select_follows_writes(env: Env, stmt: str) -> None:
    q = TAGGED if stmt == "tagged" else RELS

    def read() -> tuple[str, list[str]]:
        env.cache.wait_for_fills()
        with env.Session() as s:
            u = s.scalars(q).one()
            return u.name, [a.email for a in u.addresses] if hasattr(Address, "email") else []

    first = read()
    with env.Session() as s:
        _rename(s, "orm")
        s.commit()
    assert read()[0] == "orm"
    with env.Session() as s:
        s.execute(sa.update(User).where(User.id == 1).values(name="core"))
        s.commit()
    assert read()[0] == "core"
    with env.Session() as s:  # a write-through image then a rollback
        _rename(s, "undone")
        s.rollback()
    assert read()[0] == "core"
    assert first[0] == "user1"


# rf-06: the CLI's cwd on sys.path
def test_cli_load_target_in_a_removed_directory(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command started in a directory removed since (a cron job, a deploy that
    swapped the release directory): an installed target still loads, as before the
    cwd was added to sys.path."""
    import os
    import sys

    from sa_cache.cli_common import load_target

    gone = os.path.join(str(tmp_path), "gone")
    os.mkdir(gone)
    monkeypatch.chdir(gone)
    os.rmdir(gone)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", gone)])
    assert load_target("json:dumps") is __import__("json").dumps


# rf-04: SQLite: a RELEASE that commits, with a comment before it
@pytest.mark.parametrize("dialect_name", ["sqlite"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize(
    "release", ["/* done */ RELEASE SAVEPOINT by_hand", "-- done\nRELEASE by_hand"]
)
def test_sqlite_commented_release_that_commits(env: Env, release: str) -> None:
    assert _views(env) == ("user1", "user1")
    with env.Session() as s:
        user = s.get(User, 1)  # a hit: no statement, no BEGIN
        assert user is not None
        conn = s.connection()
        conn.exec_driver_sql("SAVEPOINT by_hand")
        user.name = "released"
        s.flush()
        conn.exec_driver_sql(release)  # SQLite commits here
        s.rollback()  # takes nothing back
    assert _database_name(env) == "released"
    assert _views(env) == ("released", "released")


# rf-05: MariaDB commits before a DDL statement runs, also when the DDL then fails
@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("cache_url", ["memory"], indirect=True)
@pytest.mark.parametrize("how", ["text", "compiled"])
def test_mariadb_failed_ddl_still_commits(env: Env, how: str) -> None:
    assert _views(env) == ("user1", "user1")
    with env.Session() as s:
        _rename(s, "committed before the DDL")
        missing = sa.Table("sac_rf_missing", sa.MetaData(), sa.Column("id", sa.Integer))
        ddl = text("DROP TABLE sac_rf_missing") if how == "text" else sa.schema.DropTable(missing)
        with pytest.raises(sa.exc.DatabaseError):
            s.execute(ddl)
        s.rollback()
    assert _database_name(env) == "committed before the DDL"
    assert _views(env) == ("committed before the DDL", "committed before the DDL")
