"""A transaction that renews a write-behind row whose delete sets off ON DELETE actions
is written in its own COMMIT (`write_behind_commit._renews_with_actions`) — under a
SAVEPOINT, queued as before where the database refuses the order a batch gives it (a
row in the way that a change still queued deletes). A row moved away from the renewed
row in the same batch is written before its early delete. Regression audit `re`: such
valid commits failed with an IntegrityError, and the worker dead-lettered them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker
from test_write_behind import cleanup
from test_write_behind_apply_order import (
    Book,
    Box,
    Crate,
    Env,
    Node,
    OBase,
    Person,
    Shelf,
    Slip,
    _foreign_keys_on,
)

import sa_cache
from sa_cache.backends.base import BackendError
from sa_cache.write_behind import WriteBehind, write_behind_for


@pytest.fixture
def env(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _foreign_keys_on)
        engine.dispose()
    OBase.metadata.drop_all(engine)
    OBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=1)
    for model in (Node, Box, Crate, Person, Shelf, Book):
        cache.register(model, ttl=60, write="behind")
    cache.register(Slip, ttl=60)
    from test_write_behind_apply_order import Label

    cache.register(Label, ttl=60)
    factory = sessionmaker(
        engine, class_=sa_cache.CachingSession, cache=cache, expire_on_commit=False
    )
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        OBase.metadata.drop_all(engine)


def _down(monkeypatch: pytest.MonkeyPatch, name: str = "prepare") -> None:
    def down(self: WriteBehind, *args: Any, **kwargs: Any) -> None:
        raise BackendError("Redis went away")

    monkeypatch.setattr(WriteBehind, name, down)


# -- collation peers in a table in the way of a renewed row's early delete ----------------


class RBase(sa.orm.DeclarativeBase):
    pass


class RBox(RBase):  # write-behind; its delete sets off an action (RSlip: CASCADE)
    __tablename__ = "sac_re_boxes"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    name: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.String(20), default="")


class RSlip(RBase):  # write-through, goes with its box
    __tablename__ = "sac_re_slips"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    box_id: sa.orm.Mapped[int] = sa.orm.mapped_column(
        sa.ForeignKey("sac_re_boxes.id", ondelete="CASCADE")
    )


class RTag(RBase):  # write-behind, a string key; refers to a box (NO ACTION): in the way
    __tablename__ = "sac_re_tags"
    code: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.String(20), primary_key=True)
    box_id: sa.orm.Mapped[int | None] = sa.orm.mapped_column(sa.ForeignKey("sac_re_boxes.id"))


@pytest.fixture
def renv(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _foreign_keys_on)
        engine.dispose()
    RBase.metadata.drop_all(engine)
    RBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=1)
    cache.register(RBox, ttl=60, write="behind")
    cache.register(RTag, ttl=60, write="behind")
    cache.register(RSlip, ttl=60)
    factory = sessionmaker(
        engine, class_=sa_cache.CachingSession, cache=cache, expire_on_commit=False
    )
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        RBase.metadata.drop_all(engine)


def _tag_and_box_renewal(s: Session) -> None:
    """Tag 'a' (of box 1) deleted, tag 'A' added without a box, box 1 deleted and added
    again: valid (plain SQLAlchemy commits it on every database)."""
    s.delete(s.get(RTag, "a"))
    s.flush()
    s.add(RTag(code="A", box_id=None))
    s.flush()
    s.delete(s.get(RBox, 1))
    s.flush()
    s.add(RBox(id=1, name="new"))


def _tag_setup(renv: Env) -> None:
    with renv.engine.begin() as conn:
        conn.execute(sa.insert(RBox), {"id": 1, "name": "old"})
        conn.execute(sa.insert(RTag), {"code": "a", "box_id": 1})


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_renewal_with_a_collation_peer_delete_in_the_way_commits(renv: Env) -> None:
    """Redis up: the renewal is written in the transaction's COMMIT (`_renews_with_actions`).
    On MariaDB tag 'a' and tag 'A' are one row's spellings (`collation_peers`): taken
    out of the early deletes, tag 'a' still refers to box 1 when box 1's early delete
    runs, and the application's valid commit fails with an IntegrityError."""
    _tag_setup(renv)
    with renv.Session() as s:
        s.connection()
        _tag_and_box_renewal(s)
        s.commit()
    assert renv.drain().dead == 0
    assert renv.rows(sa.select(RBox.id, RBox.name)) == [(1, "new")]
    assert renv.rows(sa.select(RTag.code, RTag.box_id)) == [("A", None)]


# -- a synchronous renewal behind older queued changes -------------------------------------


@pytest.mark.parametrize("how", ["deleted", "moved"])
def test_renewal_after_a_queued_change_of_a_row_in_its_way_commits(env: Env, how: str) -> None:
    """Crate 2 refers to box 1 (NO ACTION). One transaction deletes crate 2 (or moves it
    away from box 1): queued, not applied yet. A later transaction deletes box 1 and
    adds it again (valid: crate 2 no longer refers to it). Written in its own COMMIT
    (`_renews_with_actions`), box 1's delete finds crate 2 still in the database — the
    application's commit fails with an IntegrityError. Queued, the worker's batch had
    crate 2's change first (the early deletes)."""
    with env.Session() as s:
        s.add(Box(id=1, name="b"))
        s.commit()
    with env.Session() as s:
        s.add(Crate(id=2, box_id=1, name="c2"))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        crate = s.get(Crate, 2)
        if how == "deleted":
            s.delete(crate)
        else:
            crate.box_id = None
        s.commit()  # queued
    with env.Session() as s:
        s.connection()
        s.delete(s.get(Box, 1))
        s.flush()
        s.add(Box(id=1, name="new"))
        s.commit()
    assert env.drain().dead == 0
    assert env.rows(sa.select(Box.id, Box.name)) == [(1, "new")]
    expected = [] if how == "deleted" else [(2, None)]
    assert env.rows(sa.select(Crate.id, Crate.box_id)) == expected


@pytest.mark.parametrize("path", ["renewal"])  # (Redis down: a known limit)
def test_a_transaction_needing_images_first_and_deletes_first(
    env: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """One transaction moves book 1 from shelf 1 to shelf 2 and deletes shelf 1 (needs
    the images first), and deletes person 1 (a@x) and adds person 2 with a@x (needs the
    deletes first). Plain SQLAlchemy commits it. Neither whole-batch order fits; with
    Redis down at the commit (`prepare`) the application's commit fails."""
    with env.Session() as s:
        s.add_all([Shelf(id=1), Shelf(id=2), Person(id=1, email="a@x"), Box(id=1, name="b")])
        s.commit()
    with env.Session() as s:
        s.add(Book(id=1, shelf_id=1))
        s.commit()
    assert env.drain().dead == 0
    if path == "prepare":
        _down(monkeypatch)
    with env.Session() as s:
        s.connection()
        s.get(Book, 1).shelf_id = 2
        s.flush()
        s.delete(s.get(Shelf, 1))
        s.delete(s.get(Person, 1))
        s.flush()
        s.add(Person(id=2, email="a@x"))
        if path == "renewal":  # (Redis up: written in its COMMIT, `_renews_with_actions`)
            s.delete(s.get(Box, 1))
            s.flush()
            s.add(Box(id=1, name="new"))
        s.commit()
    monkeypatch.undo()
    assert env.drain().dead == 0
    assert env.rows(sa.select(Shelf.id)) == [(2,)]
    assert env.rows(sa.select(Book.id, Book.shelf_id)) == [(1, 2)]
    assert env.rows(sa.select(Person.id, Person.email)) == [(2, "a@x")]


# -- a row moved out of the renewed row's way in the same transaction --------------------


def _move_crate_then_renew_box(env: Env, new_crate: bool = False) -> None:
    """Box 1 with crate 2 (NO ACTION), written; then one transaction moves crate 2 away
    from box 1 (box_id None), deletes box 1 and adds it again (``new_crate``: and adds
    crate 3 under the new box 1, whose image must stay after it): valid, plain
    SQLAlchemy commits it."""
    with env.Session() as s:
        s.add(Box(id=1, name="b"))
        s.commit()
    with env.Session() as s:
        s.add(Crate(id=2, box_id=1, name="c2"))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.get(Crate, 2).box_id = None
        s.flush()
        s.delete(s.get(Box, 1))
        s.flush()
        s.add(Box(id=1, name="new"))
        if new_crate:
            s.flush()
            s.add(Crate(id=3, box_id=1, name="c3"))
        s.commit()


@pytest.mark.parametrize("new_crate", [False, True])
def test_renewal_after_moving_a_row_out_of_its_way_commits(env: Env, new_crate: bool) -> None:
    """Redis up: written in the transaction's COMMIT (`_renews_with_actions`). Box 1's
    early delete ran before crate 2's image moved it away, and NO ACTION refused it: the
    application's valid commit failed (or, queued, went to the worker, which failed the
    same way). Crate 2's image, which refers to no row the batch writes, goes first."""
    _move_crate_then_renew_box(env, new_crate)
    assert env.drain().dead == 0
    assert env.rows(sa.select(Box.id, Box.name)) == [(1, "new")]
    crates = [(2, None), (3, 1)] if new_crate else [(2, None)]
    assert env.rows(sa.select(Crate.id, Crate.box_id).order_by(Crate.id)) == crates


def test_queued_renewal_after_moving_a_row_out_of_its_way_is_written(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same transaction queued (`_renews_with_actions` off, as for the renewals the
    worker still gets: a late flush, an older producer). The worker's batch deleted box 1
    before crate 2's image: refused; bisected, box 1 failed alone again and `hold_back`
    held back exactly crate 2's image, the one that would unblock it — box 1's renewal
    ended in the dead letters and the box stayed old."""
    monkeypatch.setattr("sa_cache.write_behind_commit._renews_with_actions", lambda c: False)
    _move_crate_then_renew_box(env)
    assert env.drain(max_attempts=5).dead == 0, "a valid transaction's change was dead-lettered"
    assert env.rows(sa.select(Box.id, Box.name)) == [(1, "new")]
    assert env.rows(sa.select(Crate.id, Crate.box_id)) == [(2, None)]


def test_hold_back_lets_through_an_image_that_refers_to_no_row() -> None:
    """A renewed box whose early delete failed holds back the images of the tables its
    delete reaches (`hold_back`) — but not a crate image that refers to no box (moved
    away: no delete can reach it; it may be what the box's delete waits for). A crate
    under a box, or one whose box_id is not written, still waits."""
    from sa_cache.entity import EntitySpec
    from sa_cache.write_behind_coalesce import Slot
    from sa_cache.write_behind_holds import not_held

    spec = EntitySpec(sa.inspect(Crate), 60, "behind")
    box_id = spec.columns.index(Crate.__table__.c.box_id)

    def slot(n: int, box: int | None, cols: frozenset[int] | None = None) -> Any:
        out = Slot(f"k:({n},)", Crate.__tablename__, "u")
        out.spec, out.cols = spec, cols
        out.image = [None] * len(spec.columns)
        out.image[box_id] = box
        return out

    items = [(None, slot(2, None)), (None, slot(3, 1)), (None, slot(4, None, frozenset()))]
    passed = not_held({Crate.__table__: 1e18}, items)
    assert [s for _, s in passed] == [items[0][1]]
