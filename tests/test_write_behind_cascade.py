"""Rows the database changes on its own when the worker applies write-behind changes:
foreign-key actions (``ON DELETE CASCADE`` / ``SET NULL``, ``ON UPDATE CASCADE``) of
other tables referring to a write-behind table. Their entity entries and the cached
queries over them are invalidated, as when a Session's own statement sets them off."""

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
from sa_cache.backends.base import BackendError
from sa_cache.write_behind import WriteBehind, write_behind_for
from sa_cache.write_behind_worker import WriteBehindWorker


class CascadeBase(DeclarativeBase):
    pass


class Parent(CascadeBase):  # write-behind
    __tablename__ = "sac_wbc_parents"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(sa.String(20), unique=True)
    n: Mapped[int] = mapped_column(default=0)


class Child(CascadeBase):  # write-through; deleted with its parent
    __tablename__ = "sac_wbc_children"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_wbc_parents.id", ondelete="CASCADE"))


class Orphan(CascadeBase):  # write-through; its reference is cleared with the parent
    __tablename__ = "sac_wbc_orphans"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("sac_wbc_parents.id", ondelete="SET NULL")
    )


class Label(CascadeBase):  # write-through; follows its parent's code
    __tablename__ = "sac_wbc_labels"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[str | None] = mapped_column(
        sa.ForeignKey("sac_wbc_parents.code", onupdate="CASCADE")
    )


def _foreign_keys_on(dbapi_conn: Any, record: Any) -> None:
    dbapi_conn.execute("PRAGMA foreign_keys=ON")  # SQLite checks them only when asked


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]

    def drain(self) -> WriteBehindWorker:
        runner = WriteBehindWorker(self.cache, self.engine, **FAST)
        runner.run(drain=True)
        assert runner.dead == 0
        return runner


@pytest.fixture
def env(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _foreign_keys_on)
        engine.dispose()
    CascadeBase.metadata.drop_all(engine)
    CascadeBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=2)
    cache.register(Parent, ttl=60, write="behind")
    for model in (Child, Orphan, Label):
        cache.register(model, ttl=60)
    factory = sessionmaker(
        engine, class_=sa_cache.CachingSession, cache=cache, expire_on_commit=False
    )
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        CascadeBase.metadata.drop_all(engine)


def _family(env: Env) -> None:
    """Parents 1 and 2 (in the database); the child and orphan of 1, the label of 2; all
    in the cache."""
    with env.Session() as s:
        s.add_all([Parent(id=1, code="one"), Parent(id=2, code="two")])
        s.commit()
    env.drain()
    with env.Session() as s:
        s.add_all([Child(id=1, parent_id=1), Orphan(id=1, parent_id=1), Label(id=1, code="two")])
        s.commit()
    with env.Session() as s:  # read: entity entries and a cached query of each
        assert s.get(Child, 1) is not None
        assert s.get(Orphan, 1) is not None
        assert s.get(Label, 1) is not None
        assert _cached_queries(s) == ([1], [(1, 1)], [(1, "two")])


def _cached_queries(s: Session) -> tuple[list[int], list[tuple[int, Any]], list[tuple[int, Any]]]:
    opt = sa_cache.with_cache(ttl=60)
    children = list(s.scalars(sa.select(Child.id).options(opt)))
    orphans = [tuple(r) for r in s.execute(sa.select(Orphan.id, Orphan.parent_id).options(opt))]
    labels = [tuple(r) for r in s.execute(sa.select(Label.id, Label.code).options(opt))]
    return children, orphans, labels


def _delete_of_parent_one_seen(env: Env) -> None:
    """What the delete of parent 1 set off happened — the child is gone (ON DELETE
    CASCADE), the orphan's reference cleared (SET NULL) — in the database and in what
    the cache serves (by primary key and by cached queries)."""
    with env.engine.connect() as conn:
        assert conn.execute(sa.select(Child.id)).all() == []
        assert [tuple(r) for r in conn.execute(sa.select(Orphan.id, Orphan.parent_id))] == [
            (1, None)
        ]
    with env.Session() as s:
        assert s.get(Child, 1) is None
        orphan = s.get(Orphan, 1)
        assert orphan is not None
        assert orphan.parent_id is None
        assert _cached_queries(s) == ([], [(1, None)], [(1, "two")])


def test_the_workers_delete_invalidates_rows_its_foreign_key_actions_changed(env: Env) -> None:
    """The worker deletes a write-behind parent: the database deletes its child (ON
    DELETE CASCADE) and clears the orphan's reference (SET NULL); neither is served
    from the cache afterwards, by primary key or by a cached query."""
    _family(env)
    with env.Session() as s:
        s.delete(s.get(Parent, 1))
        s.commit()
    env.drain()
    _delete_of_parent_one_seen(env)


def test_a_synchronous_write_after_a_failed_confirm_invalidates_the_cascade(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails after the COMMIT: the delete is written to the database before
    ``commit()`` returns, and the rows its foreign-key actions changed are invalidated
    as the worker's would be."""
    _family(env)

    def down(self: WriteBehind, *args: Any, **kwargs: Any) -> None:
        raise BackendError("Redis went away")

    monkeypatch.setattr(WriteBehind, "confirm", down)
    with env.Session() as s:
        s.connection()  # database work: prepared before the COMMIT, confirmed after it
        s.delete(s.get(Parent, 1))
        s.commit()
    monkeypatch.undo()
    _delete_of_parent_one_seen(env)  # (written before commit() returned)


def test_the_workers_update_invalidates_rows_its_on_update_action_changed(env: Env) -> None:
    """The worker changes a parent's code, which a label refers to with ON UPDATE
    CASCADE: the label's new code is served, not the cached old one."""
    _family(env)
    with env.Session() as s:
        parent = s.get(Parent, 2)
        assert parent is not None
        parent.code = "deux"
        s.commit()
    env.drain()
    with env.Session() as s:
        label = s.get(Label, 1)
        assert label is not None
        assert label.code == "deux"
        assert _cached_queries(s) == ([1], [(1, 1)], [(1, "deux")])


def test_an_update_of_other_columns_keeps_the_referring_rows_entries(env: Env) -> None:
    """An update of a column no foreign key refers to sets off no action: the label's
    entry and cached query stay (served without a statement on its table)."""
    _family(env)
    with env.Session() as s:
        parent = s.get(Parent, 2)
        assert parent is not None
        parent.n = 5
        s.commit()
    env.drain()
    sent: list[str] = []

    def log(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    event.listen(env.engine, "before_cursor_execute", log)
    try:
        with env.Session() as s:
            label = s.get(Label, 1)
            assert label is not None
            assert label.code == "two"
            assert _cached_queries(s)[2] == [(1, "two")]
    finally:
        event.remove(env.engine, "before_cursor_execute", log)
    assert not [q for q in sent if "sac_wbc_labels" in q]


def _readded_parent_checks(env: Env) -> None:
    """Parent 1 is back, and what its delete set off happened: the child is gone (ON
    DELETE CASCADE), the orphan's reference cleared (SET NULL) — in the database and
    in what the cache serves."""
    with env.engine.connect() as conn:
        found = conn.execute(sa.select(Parent.id, Parent.code).order_by(Parent.id)).all()
        assert found == [(1, "uno"), (2, "two")]
    _delete_of_parent_one_seen(env)


def test_a_delete_and_re_add_coalesced_by_the_worker_runs_the_on_delete_actions(
    env: Env,
) -> None:
    """Parent 1 deleted in one commit and added again in the next: the worker applies
    both in one batch (one image), and deletes the row before writing it, so that the
    database's ON DELETE actions run as they would have without write-behind."""
    _family(env)
    with env.Session() as s:
        s.delete(s.get(Parent, 1))
        s.commit()
    with env.Session() as s:
        s.add(Parent(id=1, code="uno"))
        s.commit()
    env.drain()
    _readded_parent_checks(env)


@pytest.mark.parametrize("updated_first", [False, True], ids=["deleted", "updated-deleted"])
def test_a_delete_and_re_add_in_one_transaction_runs_the_on_delete_actions(
    env: Env, updated_first: bool
) -> None:
    """Within one transaction (the row updated first, or not): deleted, flushed, added
    again — one queued image, applied after a delete."""
    _family(env)
    with env.Session() as s:
        parent = s.get(Parent, 1)
        assert parent is not None
        if updated_first:
            parent.n = 5
            s.flush()
        s.delete(parent)
        s.flush()
        s.add(Parent(id=1, code="uno"))
        s.commit()
    env.drain()
    _readded_parent_checks(env)


def test_a_synchronous_delete_and_re_add_runs_the_on_delete_actions(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails after the COMMIT: the synchronous write of a row deleted and added
    again in the transaction deletes it first too."""
    _family(env)

    def down(self: WriteBehind, *args: Any, **kwargs: Any) -> None:
        raise BackendError("Redis went away")

    monkeypatch.setattr(WriteBehind, "confirm", down)
    with env.Session() as s:
        s.connection()
        s.delete(s.get(Parent, 1))
        s.flush()
        s.add(Parent(id=1, code="uno"))
        s.commit()
    monkeypatch.undo()
    _readded_parent_checks(env)
