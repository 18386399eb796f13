"""The order in which a coalesced write-behind batch is written (`write_behind_order`,
`write_behind_apply.apply_in_order`): by the worker, the synchronous fallback (Redis
down at the commit: ``prepare``) and the late write (Redis down after it: ``confirm``).

The batch keeps each row's last image or delete, not the order of the application's
flushes; a valid transaction must still end in the database as it would without the
queue (regression audit ra: RA-02, RA-03, RA-04, RA-09)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
from sa_cache.write_behind_apply import apply_in_order
from sa_cache.write_behind_order import parent_layers
from sa_cache.write_behind_worker import WriteBehindWorker


class OBase(DeclarativeBase):
    pass


class Node(OBase):  # write-behind, self-referencing, ON DELETE CASCADE; another unique key
    __tablename__ = "sac_wao_nodes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("sac_wao_nodes.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(sa.String(20), default="")
    code: Mapped[str | None] = mapped_column(sa.String(20), unique=True)


class Box(OBase):  # write-behind; its delete sets off an action (Slip: CASCADE)
    __tablename__ = "sac_wao_boxes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20), default="")
    n: Mapped[int] = mapped_column(default=0)


class Slip(OBase):  # write-through, goes with its box
    __tablename__ = "sac_wao_slips"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    box_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_wao_boxes.id", ondelete="CASCADE"))


class Crate(OBase):  # write-behind; refers to a box (NO ACTION); its delete acts (Label)
    __tablename__ = "sac_wao_crates"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    box_id: Mapped[int | None] = mapped_column(sa.ForeignKey("sac_wao_boxes.id"))
    name: Mapped[str] = mapped_column(sa.String(20), default="")


class Label(OBase):  # write-through, goes with its crate
    __tablename__ = "sac_wao_labels"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    crate_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_wao_crates.id", ondelete="CASCADE"))


class Person(OBase):  # write-behind, another unique key
    __tablename__ = "sac_wao_people"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(20), unique=True)


class Shelf(OBase):  # write-behind parent, no ON DELETE action
    __tablename__ = "sac_wao_shelves"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Book(OBase):  # write-behind child (NO ACTION)
    __tablename__ = "sac_wao_books"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    shelf_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_wao_shelves.id"))


def _foreign_keys_on(dbapi_conn: Any, record: Any) -> None:
    dbapi_conn.execute("PRAGMA foreign_keys=ON")


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]

    def worker(self, **settings: Any) -> WriteBehindWorker:
        config = {**FAST, "max_attempts": 3, "foreign_key_wait": 0.0, **settings}
        return WriteBehindWorker(self.cache, self.engine, **config)

    def drain(self, **settings: Any) -> WriteBehindWorker:
        runner = self.worker(**settings)
        runner.run(drain=True)
        return runner

    def rows(self, query: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query)]


@pytest.fixture
def env(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _foreign_keys_on)
        engine.dispose()
    OBase.metadata.drop_all(engine)
    OBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=1)  # one batch holds every row
    for model in (Node, Box, Crate, Person, Shelf, Book):
        cache.register(model, ttl=60, write="behind")
    for model in (Slip, Label):
        cache.register(model, ttl=60)
    factory = sessionmaker(
        engine, class_=sa_cache.CachingSession, cache=cache, expire_on_commit=False
    )
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        OBase.metadata.drop_all(engine)


@pytest.fixture(autouse=True)
def renewals_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queue renewals here: a transaction renewing a row whose delete sets off actions
    is written at its COMMIT (`test_write_behind_renewal_partitions`), but the worker
    still gets such renewals — changes flushed after the queue write, a commit that
    skipped before_commit, a producer of an earlier version — and must write them as
    these tests say."""
    monkeypatch.setattr("sa_cache.write_behind_commit._renews_with_actions", lambda c: False)


PATHS = ["worker", "prepare", "confirm"]
"""Who writes the transaction: the worker, or its producer with Redis down at the
commit (rows written in the committing transaction) or after it (the late write)."""


def _commit_by(
    env: Env, monkeypatch: pytest.MonkeyPatch, path: str, work: Callable[[Session], None]
) -> None:
    """Run ``work`` in one Session and commit it, written as ``path`` says."""
    if path != "worker":

        def down(self: WriteBehind, *args: Any, **kwargs: Any) -> None:
            raise BackendError("Redis went away")

        monkeypatch.setattr(WriteBehind, path, down)
    with env.Session() as s:
        s.connection()
        work(s)
        s.commit()
    monkeypatch.undo()
    assert env.drain().dead == 0, "a valid transaction's change was dead-lettered"


def _nodes(env: Env) -> list[Any]:
    return env.rows(sa.select(Node.id, Node.parent_id, Node.name).order_by(Node.id))


def _old_nodes(env: Env) -> None:
    with env.Session() as s:
        s.add(Node(id=1, parent_id=None, name="old1"))
        s.flush()
        s.add(Node(id=2, parent_id=1, name="old2"))
        s.commit()
    assert env.drain().dead == 0


def _renew_nodes(s: Session) -> None:
    """Both nodes deleted (child first), then added again (parent first): valid."""
    s.delete(s.get(Node, 2))
    s.delete(s.get(Node, 1))
    s.flush()
    s.add(Node(id=1, parent_id=None, name="new1"))
    s.flush()
    s.add(Node(id=2, parent_id=1, name="new2"))


# -- RA-02: a self-referencing table ------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_self_referencing_renewed_parent_and_child_are_both_written(
    env: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Nodes 1 and 2 (child of 1, ON DELETE CASCADE) deleted and added again in one
    transaction: both renewed, deleted early, then written — parent first. Written in
    slot order (child first) the child's INSERT failed; the worker then bisected, wrote
    the child alone, and the parent's early delete cascaded it away (no dead letter)."""
    _old_nodes(env)
    _commit_by(env, monkeypatch, path, _renew_nodes)
    assert _nodes(env) == [(1, None, "new1"), (2, 1, "new2")]


def test_bisection_applies_a_renewed_parent_before_its_renewed_child(env: Env) -> None:
    """The same renewal in a batch with a row that fails (a person whose e-mail another
    row holds): the worker bisects it. The parent node must be applied with its child
    or before it, never after: its early delete would cascade the new child away."""
    _old_nodes(env)
    with env.engine.begin() as conn:
        conn.execute(sa.insert(Person), {"id": 8, "email": "taken"})

    def work(s: Session) -> None:
        _renew_nodes(s)
        s.add(Person(id=9, email="taken"))

    with env.Session() as s:
        work(s)
        s.commit()
    runner = env.drain()
    assert runner.dead == 1  # the person, alone
    assert _nodes(env) == [(1, None, "new1"), (2, 1, "new2")]


def test_images_wait_for_a_renewed_parent_that_failed(env: Env) -> None:
    """A renewed parent node fails (its new code is held by another row, freed later);
    its renewed child must not be applied before it: the parent's early delete, once
    it goes through, would cascade the child away. The child waits, uncounted."""
    _old_nodes(env)
    with env.engine.begin() as conn:
        conn.execute(sa.insert(Node), {"id": 9, "parent_id": None, "name": "", "code": "x"})

    def work(s: Session) -> None:
        s.delete(s.get(Node, 2))
        s.delete(s.get(Node, 1))
        s.flush()
        s.add(Node(id=1, parent_id=None, name="new1", code="x"))
        s.flush()
        s.add(Node(id=2, parent_id=1, name="new2"))

    with env.Session() as s:
        work(s)
        s.commit()
    runner = env.worker(max_attempts=10)
    runner.start()
    runner.step(force=True)  # the parent fails; the child waits for it
    assert _nodes(env)[:2] == [(1, None, "old1"), (2, 1, "old2")]
    with env.engine.begin() as conn:
        conn.execute(sa.delete(Node).where(Node.id == 9))
    runner.run(drain=True)
    assert runner.dead == 0
    assert _nodes(env) == [(1, None, "new1"), (2, 1, "new2")]


@pytest.mark.parametrize("path", PATHS)
def test_a_node_moved_to_a_renewed_node_away_from_one_deleted_keeps_its_subtree(
    env: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Node 1 deleted and added again (renewed, deleted early); node 4 (with child 5)
    moved from node 3 to node 1, then node 3 deleted. Node 3's delete must come after
    the move (late: it refers to its table with CASCADE, so nothing of it stands in
    the way of node 1's early delete); early, it would cascade away nodes 4 and 5."""
    with env.Session() as s:
        s.add_all([Node(id=1, name="one"), Node(id=3, name="three")])
        s.flush()
        s.add(Node(id=4, parent_id=3, name="four"))
        s.flush()
        s.add(Node(id=5, parent_id=4, name="five"))
        s.commit()
    assert env.drain().dead == 0

    def work(s: Session) -> None:
        s.delete(s.get(Node, 1))
        s.flush()
        s.add(Node(id=1, name="uno"))
        s.flush()
        moved = s.get(Node, 4)
        assert moved is not None
        moved.parent_id = 1
        s.flush()
        s.delete(s.get(Node, 3))

    _commit_by(env, monkeypatch, path, work)
    assert _nodes(env) == [(1, None, "uno"), (4, 1, "four"), (5, 4, "five")]


def test_parent_layers_put_parents_first() -> None:
    """Rows given children first come out parents first; a cycle goes last."""
    spec: Any = type("S", (), {})()
    table = Node.__table__
    spec.mapper = type("M", (), {"local_table": table})()
    spec.columns = tuple(table.c)
    rows = [[4, 3, "", None], [3, 2, "", None], [2, 1, "", None], [1, None, "", None]]
    assert parent_layers(spec, rows, lambda r: r) == [[r] for r in reversed(rows)]
    cycle = [[5, 6, "", None], [6, 5, "", None], [7, None, "", None]]
    assert parent_layers(spec, cycle, lambda r: r) == [[cycle[2]], cycle[:2]]
    assert parent_layers(spec, rows[:1], lambda r: r) == [rows[:1]]


# -- RA-03: a renewed table that refers to another renewed table ------------------------


@pytest.mark.parametrize("path", PATHS)
def test_plain_deletes_of_a_renewed_child_table_go_before_its_parents_early_delete(
    env: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Box 1 (its delete cascades to slips); crates 1, 2 of box 1 (NO ACTION; a crate's
    delete cascades to labels, so crates are renewed roots too). One transaction
    deletes crate 2, deletes and adds again crate 1 (without a box), deletes and adds
    again box 1. Crate 2's plain delete must go before box 1's early delete (it was
    sent after the images: the early delete found crate 2 in the way)."""
    with env.Session() as s:
        s.add(Box(id=1, name="b"))
        s.commit()
    with env.Session() as s:
        s.add_all([Crate(id=1, box_id=1, name="c1"), Crate(id=2, box_id=1, name="c2")])
        s.commit()
    assert env.drain().dead == 0

    def work(s: Session) -> None:
        c2, c1, box = s.get(Crate, 2), s.get(Crate, 1), s.get(Box, 1)
        s.delete(c2)
        s.delete(c1)
        s.flush()
        s.add(Crate(id=1, box_id=None, name="c1new"))
        s.flush()
        s.delete(box)
        s.flush()
        s.add(Box(id=1, name="bnew"))

    _commit_by(env, monkeypatch, path, work)
    assert env.rows(sa.select(Box.id, Box.name)) == [(1, "bnew")]
    assert env.rows(sa.select(Crate.id, Crate.box_id, Crate.name)) == [(1, None, "c1new")]


# -- RA-04: a renewed row with a column written synchronously since ------------------------


def _redis_down(monkeypatch: pytest.MonkeyPatch, env: Env, n: int) -> None:
    """A Session with Redis down at its commit sets box 1's n: written synchronously,
    its column marked newer than the queued renewal."""
    with monkeypatch.context() as m:

        def down(self: WriteBehind, *args: Any, **kwargs: Any) -> None:
            raise BackendError("Redis went away")

        m.setattr(WriteBehind, "prepare", down)
        with env.Session() as s:
            s.connection()
            box = s.get(Box, 1)
            assert box is not None
            box.n = n
            s.commit()


def test_renewed_row_keeps_a_column_written_synchronously_since(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Box 1 deleted and added again (queued: name 'renew', n=1); later n=7 written
    synchronously. The worker leaves n out of the renewal but deletes the row first
    (ON DELETE action): it must insert n=7, read from the row before that delete, not
    the older n=1 of its image."""
    with env.Session() as s:
        s.add(Box(id=1, name="b", n=0))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.delete(s.get(Box, 1))
        s.flush()
        s.add(Box(id=1, name="renew", n=1))
        s.commit()
    _redis_down(monkeypatch, env, 7)
    assert env.drain().dead == 0
    assert env.rows(sa.select(Box.id, Box.name, Box.n)) == [(1, "renew", 7)]
    with env.Session() as s:
        box = s.get(Box, 1)
        assert box is not None
        assert (box.name, box.n) == ("renew", 7)


def test_late_renewal_keeps_a_column_written_synchronously_since(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through the late write: the renewal's confirm fails after its COMMIT,
    and meanwhile another Session wrote n=7 synchronously. The late write leaves n out
    (the mark is newer) and must keep n=7 across its early delete."""
    with env.Session() as s:
        s.add(Box(id=1, name="b", n=0))
        s.commit()
    assert env.drain().dead == 0

    def confirm_fails(self: WriteBehind, *args: Any, **kwargs: Any) -> None:
        monkeypatch.undo()  # (the other Session's commit needs the real methods)
        _redis_down(monkeypatch, env, 7)
        raise BackendError("Redis went away")

    monkeypatch.setattr(WriteBehind, "confirm", confirm_fails)
    with env.Session() as s:
        s.connection()  # (database work: a prepare, a COMMIT, then the confirm)
        s.delete(s.get(Box, 1))
        s.flush()
        s.add(Box(id=1, name="renew", n=1))
        s.commit()
    monkeypatch.undo()
    assert env.drain().dead == 0
    assert env.rows(sa.select(Box.id, Box.name, Box.n)) == [(1, "renew", 7)]


# -- RA-09: deletes and images of one transaction, in the order it needs ------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_deleted_rows_unique_value_taken_by_another_row(
    env: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Person 1 holds a@x; one transaction deletes person 1, flushes, adds person 2
    with a@x (plain SQLAlchemy commits it). Images first collide with person 1: the
    deletes go first then (in a SAVEPOINT's place in the committing transaction; the
    worker runs its batch again), with no dead letter."""
    with env.Session() as s:
        s.add(Person(id=1, email="a@x"))
        s.commit()
    assert env.drain().dead == 0

    def work(s: Session) -> None:
        s.delete(s.get(Person, 1))
        s.flush()
        s.add(Person(id=2, email="a@x"))

    _commit_by(env, monkeypatch, path, work)
    assert env.rows(sa.select(Person.id, Person.email)) == [(2, "a@x")]


@pytest.mark.parametrize("path", PATHS)
def test_a_child_moved_away_from_a_parent_then_deleted(
    env: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A book moved from shelf 1 to shelf 2, then shelf 1 deleted (NO ACTION): the
    book's image must go before the shelf's delete — the order deletes-first cannot
    write, which is why images go first."""
    with env.Session() as s:
        s.add_all([Shelf(id=1), Shelf(id=2)])
        s.commit()
    with env.Session() as s:
        s.add(Book(id=1, shelf_id=1))
        s.commit()
    assert env.drain().dead == 0

    def work(s: Session) -> None:
        book = s.get(Book, 1)
        assert book is not None
        book.shelf_id = 2
        s.flush()
        s.delete(s.get(Shelf, 1))

    _commit_by(env, monkeypatch, path, work)
    assert env.rows(sa.select(Shelf.id)) == [(2,)]
    assert env.rows(sa.select(Book.id, Book.shelf_id)) == [(1, 2)]


def test_the_images_first_savepoint_stays_in_the_callers_transaction(env: Env) -> None:
    """`apply_in_order` in a transaction of the caller's, images first in a SAVEPOINT
    that goes through: rolling that transaction back leaves nothing (pysqlite sends its
    BEGIN only before a write: a SAVEPOINT first would have been the transaction, and
    its RELEASE a COMMIT)."""
    with env.engine.begin() as conn:
        conn.execute(sa.insert(Person), {"id": 1, "email": "a@x"})
    spec = env.cache.entities[sa.inspect(Person)]
    with env.engine.connect() as conn:
        conn.begin()
        apply_in_order(conn, {spec: [((1,), None, None, False), ((3,), [3, "c@x"], None, False)]})
        conn.rollback()
    assert env.rows(sa.select(Person.id, Person.email)) == [(1, "a@x")]
