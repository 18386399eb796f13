"""The query cache under REPEATABLE READ (MariaDB's default): a transaction reading an
older snapshot is neither served rows newer than its snapshot nor shares its own
(older) rows with another caller's concurrent miss."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_cache

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])


class SBase(DeclarativeBase):
    pass


class Note(SBase):
    __tablename__ = "sac_snap_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))


class Other(SBase):
    __tablename__ = "sac_snap_other"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


NOTES = select(Note).where(Note.name != "").order_by(Note.id).options(sa_cache.with_cache())


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache, SBase.metadata)


def names(session: Session) -> list[str]:
    return [n.name for n in session.scalars(NOTES)]


def repeatable_read(env: Env) -> Session:
    """A cached Session whose transactions read the snapshot of their first statement."""
    return env.Session(bind=env.engine.execution_options(isolation_level="REPEATABLE READ"))


def rename(env: Env, name: str) -> None:
    with env.Session() as writer:
        writer.execute(sa.update(Note).where(Note.id == 1).values(name=name))
        writer.commit()


@contextmanager
def reading_before_rename(env: Env) -> Iterator[Session]:
    """A REPEATABLE READ Session whose snapshot has Note 1 named "old", taken before
    another Session renamed it "new" (committed)."""
    with Session(env.engine) as plain:
        plain.add(Note(id=1, name="old"))
        plain.commit()
    with repeatable_read(env) as reader:
        reader.execute(select(Other.id)).all()  # the snapshot is taken here
        rename(env, "new")
        yield reader


def test_a_transaction_is_not_served_rows_newer_than_its_snapshot(env: Env) -> None:
    with reading_before_rename(env) as reader:
        with env.Session() as other:
            assert names(other) == ["new"]  # the entry now holds the new rows
        env.cache.wait_for_fills()
        env.log.clear()
        assert names(reader) == ["old"]  # its snapshot, as without the cache
        assert len(env.log.statements) == 1
    with env.Session() as later:
        env.log.clear()
        assert names(later) == ["new"]
        assert env.log.statements == []  # the entry was kept: a hit


def test_an_older_snapshot_shares_no_load_with_a_concurrent_miss(env: Env) -> None:
    """The reader on the older snapshot misses and runs the query; another Session
    missing the same entry meanwhile must run its own (it used to wait for the
    reader's and get its old rows)."""
    with Session(env.engine) as plain:
        plain.add(Note(id=1, name="old"))
        plain.commit()
    with env.Session() as warm:  # the shape's result metadata is known in this process
        assert names(warm) == ["old"]
    follower_done = threading.Event()
    reader_thread: list[threading.Thread] = []

    @event.listens_for(env.engine, "before_cursor_execute")
    def hold(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        mine = bool(reader_thread) and threading.current_thread() is reader_thread[0]
        if mine and "sac_snap_notes.name" in statement:
            follower_done.wait(2)  # the follower, meanwhile, must not wait for this

    got: dict[str, list[str]] = {}
    snapshot_taken, renamed = threading.Event(), threading.Event()

    def reader() -> None:
        with repeatable_read(env) as s:
            s.execute(select(Other.id)).all()
            snapshot_taken.set()
            renamed.wait(5)
            got["reader"] = names(s)

    try:
        reader_thread.append(threading.Thread(target=reader))
        reader_thread[0].start()
        assert snapshot_taken.wait(5)
        rename(env, "new")  # bumps the generation: the entry is invalid, both miss
        renamed.set()
        with env.Session() as follower:
            got["follower"] = names(follower)
        follower_done.set()
        reader_thread[0].join(10)
    finally:
        follower_done.set()
        event.remove(env.engine, "before_cursor_execute", hold)
    assert got == {"reader": ["old"], "follower": ["new"]}


def test_snapshot_isolation_set_with_sql_is_honoured(env: Env) -> None:
    """``SET TRANSACTION ISOLATION LEVEL REPEATABLE READ`` sent as SQL on a READ
    COMMITTED engine: the transaction reads an older snapshot all the same, and its old
    rows must not become the entry (they did: only execution options were looked at)."""
    with Session(env.engine) as plain:
        plain.add(Note(id=1, name="old"))
        plain.commit()
    committed = env.Session(bind=env.engine.execution_options(isolation_level="READ COMMITTED"))
    with env.Session() as warm:
        assert names(warm) == ["old"]
    env.cache.wait_for_fills()
    with committed as reader:
        reader.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        reader.execute(select(Other.id)).all()  # the snapshot is taken here
        rename(env, "new")
        assert names(reader) == ["old"]  # its snapshot
        env.cache.wait_for_fills()
    with env.Session() as later:
        assert names(later) == ["new"]


def test_a_snapshot_taken_before_the_cached_reads_keeps_them_consistent(env: Env) -> None:
    """README's recipe (Known limits): a hit before a transaction's first statement is
    the latest committed state, newer than nothing; taking the snapshot first makes
    every later read — hits and database reads alike — one snapshot's."""
    with Session(env.engine) as plain:
        plain.add_all([Note(id=1, name="a"), Other(id=1)])
        plain.commit()
    others = select(Other.id).order_by(Other.id).options(sa_cache.with_cache())
    with env.Session() as s:  # both cached
        assert names(s) == ["a"]
        assert s.scalars(others).all() == [1]
    env.cache.wait_for_fills()
    first = "START TRANSACTION WITH CONSISTENT SNAPSHOT"
    if env.engine.dialect.name == "postgresql":
        first = "SELECT 1"
    with repeatable_read(env) as reader:
        reader.execute(sa.text(first))  # the snapshot: taken here
        rename(env, "b")  # a commit after the snapshot, to both tables
        with Session(env.engine) as plain:
            plain.add(Other(id=2))
            plain.commit()
        assert names(reader) == ["a"]  # its snapshot's, not the newer cached state
        assert reader.scalars(others).all() == [1]
        assert reader.scalars(select(Other.id).order_by(Other.id)).all() == [1]  # database


def test_a_savepoint_keeps_the_transactions_snapshot(env: Env) -> None:
    """``begin_nested()`` begins on the connection again (``after_begin``); the
    transaction's snapshot is still the one of its first statement. A load from it
    after the SAVEPOINT is not stored (it was, over the newer rows), and entries newer
    than it are not served inside the SAVEPOINT."""
    with reading_before_rename(env) as reader:
        with reader.begin_nested():
            assert names(reader) == ["old"]  # its snapshot's rows: a miss, not stored
        env.cache.wait_for_fills()
        with env.Session() as other:
            assert names(other) == ["new"]  # (was: the snapshot's rows, stored)
        env.cache.wait_for_fills()
        with reader.begin_nested():
            assert names(reader) == ["old"]  # (was: the newer entry, served)
