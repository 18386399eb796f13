"""A write-behind row whose other unique column collides with another row's.

PostgreSQL and SQLite upsert by primary key (``ON CONFLICT (pk)``): the collision
raises, and the worker dead-letters the change. MySQL / MariaDB's ``ON DUPLICATE KEY
UPDATE`` would instead update the row holding the unique value — another row —
and report the write done; on tables with another unique key the worker (and the
synchronous write) uses UPDATE and INSERT there, so that the collision raises too."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from test_write_behind import FAST, cleanup

import sa_cache
from sa_cache.write_behind import write_behind_for
from sa_cache.write_behind_worker import WriteBehindWorker


class UniqueBase(DeclarativeBase):
    pass


class Member(UniqueBase):  # a unique column in the model
    __tablename__ = "sac_wbu_members"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(50), unique=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class Account(UniqueBase):  # a unique index the database has, the model does not declare
    __tablename__ = "sac_wbu_accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(50))
    name: Mapped[str] = mapped_column(sa.String(50))


class Note(UniqueBase):  # no unique key but the primary key
    __tablename__ = "sac_wbu_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(sa.String(50))


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]

    def drain(self) -> WriteBehindWorker:
        runner = WriteBehindWorker(self.cache, self.engine, **{**FAST, "max_attempts": 2})
        runner.run(drain=True)
        return runner

    def rows(self, model: type[Member] | type[Account]) -> list[tuple[int, str, str]]:
        with self.engine.connect() as conn:
            query = sa.select(model.id, model.email, model.name).order_by(model.id)
            return [(r.id, r.email, r.name) for r in conn.execute(query)]


@pytest.fixture
def env(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    UniqueBase.metadata.drop_all(engine)
    UniqueBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE UNIQUE INDEX sac_wbu_accounts_email ON sac_wbu_accounts (email)"
        )
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=2)
    for model in (Member, Account, Note):
        cache.register(model, ttl=60, write="behind")
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        UniqueBase.metadata.drop_all(engine)


@pytest.mark.parametrize("model", [Member, Account], ids=["in_the_model", "in_the_database"])
def test_an_insert_colliding_on_another_unique_key_is_dead_lettered(
    env: Env, model: type[Member] | type[Account]
) -> None:
    """Row 1 holds a@x; a queued insert of row 2 with a@x fails and is dead-lettered:
    row 1 keeps its values (MariaDB's upsert gave it row 2's name, reported applied),
    and row 2 is not served from the cache."""
    with env.Session() as s:
        s.add(model(id=1, email="a@x", name="alice"))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.add(model(id=2, email="a@x", name="mallory"))
        s.commit()
    runner = env.drain()
    assert (runner.applied, runner.dead) == (0, 1)
    assert env.rows(model) == [(1, "a@x", "alice")]
    (letter,) = write_behind_for(env.cache).dead_letters()
    assert letter.error.startswith("IntegrityError")
    with env.Session() as s:
        first = s.get(model, 1)
        assert first is not None
        assert first.name == "alice"
        assert s.get(model, 2) is None


def test_a_synchronous_write_colliding_on_another_unique_key_raises(env: Env) -> None:
    """A Session joined to an outer transaction writes its write-behind rows in it, with
    the same function as the worker: the collision raises at its commit, and row 1 is
    left alone."""
    with env.Session() as s:
        s.add(Member(id=1, email="a@x", name="alice"))
        s.commit()
    env.drain()
    with env.engine.connect() as conn:
        outer = conn.begin()
        s = sa_cache.CachingSession(
            bind=conn, cache=env.cache, join_transaction_mode="rollback_only"
        )
        s.add(Member(id=2, email="a@x", name="mallory"))
        with pytest.raises(sa.exc.IntegrityError):
            s.commit()
        s.close()
        outer.rollback()
    assert env.rows(Member) == [(1, "a@x", "alice")]


def test_rows_of_other_tables_and_updates_are_written_as_before(env: Env) -> None:
    """A table with no other unique key keeps the upsert (one statement per batch on
    MySQL / MariaDB); the UPDATE and INSERT of a table with one write new and existing
    rows alike."""
    with env.Session() as s:
        s.add_all([Note(id=1, text="one"), Member(id=1, email="a@x", name="alice")])
        s.commit()
    env.drain()
    sent: list[str] = []

    def log(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    with env.Session() as s:
        s.add_all([Note(id=2, text="two"), Member(id=2, email="b@x", name="bob")])
        member = s.get(Member, 1)
        assert member is not None
        member.email = "c@x"
        s.commit()
    event.listen(env.engine, "before_cursor_execute", log)
    try:
        assert env.drain().dead == 0
    finally:
        event.remove(env.engine, "before_cursor_execute", log)
    assert env.rows(Member) == [(1, "c@x", "alice"), (2, "b@x", "bob")]
    notes = [q for q in sent if "sac_wbu_notes" in q and q.lstrip().upper().startswith("INSERT")]
    members = [q for q in sent if "sac_wbu_members" in q]
    if env.engine.dialect.name in ("mysql", "mariadb"):
        assert notes
        assert all("ON DUPLICATE KEY UPDATE" in q for q in notes)
        assert not any("ON DUPLICATE KEY UPDATE" in q for q in members)
