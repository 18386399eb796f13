"""Write-behind changes the worker cannot apply as they are: a record of another shape
(the model changed while it was queued), an unexpected error of one row, and rows that
need a row of another partition (foreign keys)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from test_write_behind import FAST, PARTITIONS, WB, Counter, cleanup, wb_env

import sa_cache
from sa_cache import write_behind_apply
from sa_cache.write_behind import WriteBehind, write_behind_for
from sa_cache.write_behind_leases import Leases
from sa_cache.write_behind_records import partition_of_key
from sa_cache.write_behind_worker import WriteBehindWorker


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


# -- a record of another shape -----------------------------------------------------------


class GainedBase(DeclarativeBase):
    pass


class CounterGained(GainedBase):  # the table after a migration added a column
    __tablename__ = "sac_wb_counters"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(default=0)
    label: Mapped[str] = mapped_column(sa.String(30), default=lambda: "new")
    extra: Mapped[str | None] = mapped_column(sa.String(10))


class LostBase(DeclarativeBase):
    pass


class CounterLost(LostBase):  # the table after a migration dropped a column
    __tablename__ = "sac_wb_counters"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(default=0)


MIGRATIONS: dict[str, tuple[type[Any], str]] = {
    "gained": (CounterGained, "ALTER TABLE sac_wb_counters ADD COLUMN extra VARCHAR(10)"),
    "lost": (CounterLost, "ALTER TABLE sac_wb_counters DROP COLUMN label"),
}


@pytest.mark.parametrize("change", sorted(MIGRATIONS))
def test_a_record_of_another_shape_is_dead_lettered_and_the_rest_applied(
    wb_db: WB, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Changes queued by code whose model had other columns, then the table migrated
    (without draining first): the worker of the new code dead-letters them, saying why,
    and applies the others; it used to crash on them at every restart."""
    wb = wb_db
    with wb.Session() as s:  # the old code queues three rows
        s.add_all([Counter(id=i, n=i) for i in (1, 2, 3)])
        s.commit()
    model, ddl = MIGRATIONS[change]
    with wb.engine.begin() as conn:
        conn.exec_driver_sql(ddl)
    new = sa_cache.Cache.from_url(wb.url, namespace=wb.cache.namespace)
    try:
        queue = write_behind_for(new)
        queue.configure(partitions=PARTITIONS)
        new.register(model, ttl=60, write="behind")
        with sessionmaker(wb.engine, class_=sa_cache.CachingSession, cache=new)() as s:
            s.add_all([model(id=i, n=i) for i in (4, 5)])  # the new code queues two
            s.commit()
        runner = WriteBehindWorker(new, wb.engine, **FAST)
        with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
            runner.run(drain=True)  # returns: the queue is empty
        assert runner.dead == 3
        assert not queue.pending()
        letters = queue.dead_letters()
        assert sorted(letter.image[0] for letter in letters if letter.image) == [1, 2, 3]
        for letter in letters:
            assert (letter.table, letter.op, letter.attempts) == ("sac_wb_counters", "i", 1)
            assert "sac_wb_counters" in letter.error
            assert "does not fit the model" in letter.error
            assert "an image of 3 columns" in letter.error
        with wb.engine.connect() as conn:
            ids = conn.execute(sa.text("SELECT id, n FROM sac_wb_counters ORDER BY id")).all()
        assert [tuple(row) for row in ids] == [(4, 4), (5, 5)]
    finally:
        new.close()


def test_an_unexpected_error_of_one_row_is_dead_lettered_not_fatal(
    wb_db: WB, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is not the database's (a bug in applying one row) fails that row,
    logged with its traceback, and dead-letters it after ``max_attempts``: it never
    stops the worker nor holds up the other rows."""
    wb = wb_db
    real = write_behind_apply.apply_in_order  # (called in every batch's transaction)

    def buggy(conn: sa.Connection, by_spec: Any, *order: Any) -> None:
        if any(image and image[1] == 13 for rows in by_spec.values() for _, image, _, _ in rows):
            raise RuntimeError("cannot apply n=13")
        real(conn, by_spec, *order)

    monkeypatch.setattr(write_behind_apply, "apply_in_order", buggy)
    with wb.Session() as s:
        s.add_all([Counter(id=i, n=i) for i in range(1, 6)])
        s.add(Counter(id=6, n=13))
        s.commit()
    with caplog.at_level(logging.ERROR, logger="sa_cache"):
        runner = wb.drain(max_attempts=2)
    assert runner.dead == 1
    assert wb.db() == {i: (i, "new") for i in range(1, 6)}
    (letter,) = wb.queue.dead_letters()
    assert letter.error == "RuntimeError: cannot apply n=13"
    assert letter.attempts == 2
    logged = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert len(logged) == 2  # each failed attempt, with its traceback: not swallowed
    assert all(r.exc_info is not None for r in logged)


# -- foreign keys between write-behind rows -------------------------------------------


class FKBase(DeclarativeBase):
    pass


class Parent(FKBase):
    __tablename__ = "sac_wb_parents"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Child(FKBase):
    __tablename__ = "sac_wb_children"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_wb_parents.id"))


@dataclass
class FK:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]

    @property
    def queue(self) -> WriteBehind:
        return write_behind_for(self.cache)

    def worker(self, **settings: Any) -> WriteBehindWorker:
        return WriteBehindWorker(self.cache, self.engine, **{**FAST, **settings})

    def partition(self, model: type[Any], id_: int) -> int:
        return partition_of_key(self.cache.entities[sa.inspect(model)].key(self.cache, [id_]))

    def ids(self, model: type[Any], partition: int) -> int:
        """A primary key of ``model`` whose row goes to ``partition``."""
        return next(i for i in range(1, 1000) if self.partition(model, i) == partition)

    def rows(self) -> tuple[list[int], list[tuple[int, int]]]:
        with self.engine.connect() as conn:
            parents = conn.execute(sa.select(Parent.id).order_by(Parent.id)).scalars().all()
            query = sa.select(Child.id, Child.parent_id).order_by(Child.id)
            children = [(r.id, r.parent_id) for r in conn.execute(query)]
        return list(parents), children

    def waits(self) -> int:
        return self.cache.stats.snapshot().get("write_behind.foreign_key_wait", 0)


def _foreign_keys_on(dbapi_conn: Any, record: Any) -> None:
    dbapi_conn.execute("PRAGMA foreign_keys=ON")  # SQLite checks them only when asked


@pytest.fixture
def fk(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[FK]:
    """Write-behind parents and children (a plain foreign-key column), 2 partitions."""
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        event.listen(engine, "connect", _foreign_keys_on)
        engine.dispose()
    FKBase.metadata.drop_all(engine)
    FKBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    try:
        write_behind_for(cache).configure(partitions=2)
        cache.register(Parent, write="behind")
        cache.register(Child, write="behind")
        yield FK(engine, cache, sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache))
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        FKBase.metadata.drop_all(engine)
        if sqlite:
            event.remove(engine, "connect", _foreign_keys_on)


@pytest.mark.parametrize("op", ["insert", "delete"])
def test_a_row_waits_for_the_row_it_needs_from_a_dead_workers_partition(
    fk: FK, op: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A parent and its child committed together land in different partitions; the
    worker holding the one applied first (the parent's for an insert, the child's for a
    delete) died and keeps its lease until it expires. The other row is retried, not
    counted, far beyond ``max_attempts``, and applied once the partition is taken over:
    it used to be dead-lettered (with the defaults, before the lease expired)."""
    pid, cid = fk.ids(Parent, 0), fk.ids(Child, 1)
    if op == "delete":
        with fk.Session() as s:
            s.add_all([Parent(id=pid), Child(id=cid, parent_id=pid)])
            s.commit()
        fk.worker().run(drain=True)
        before, after = ([pid], [(cid, pid)]), ([], [])
    else:
        before, after = ([], []), ([pid], [(cid, pid)])
    held = 0 if op == "insert" else 1  # the partition of the row applied first
    dead = Leases(fk.queue, "a-worker-that-died", 60.0)
    assert dead.acquire(held)
    with fk.Session() as s:
        if op == "insert":
            s.add_all([Parent(id=pid), Child(id=cid, parent_id=pid)])
        else:
            s.delete(s.get(Child, cid))
            s.delete(s.get(Parent, pid))
        s.commit()
    runner = fk.worker(max_attempts=2, max_backoff=0.01)
    try:
        runner.start()
        with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
            for _ in range(30):
                runner.step(force=True)
                time.sleep(0.02)  # past each retry's delay (at most max_backoff)
            assert runner.dead == 0
            assert fk.queue.dead_letters() == []
            assert fk.waits() > 2  # retried more often than max_attempts allows
            assert fk.rows() == before
            dead.release(held)  # its lease expired: a live worker takes the partition
            runner.run(drain=True)
    finally:
        runner.close()
    assert runner.dead == 0
    assert fk.queue.dead_letters() == []
    assert fk.rows() == after


def test_a_row_whose_reference_never_comes_is_dead_lettered_after_the_wait(
    fk: FK, caplog: pytest.LogCaptureFixture
) -> None:
    """``foreign_key_wait`` bounds the uncounted retries: then the failures count, and
    the change ends in the dead-letter stream with the database's error."""
    with fk.Session() as s:
        s.add(Child(id=1, parent_id=404))
        s.commit()
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
        runner = fk.worker(max_attempts=2, max_backoff=0.05, foreign_key_wait=0.2)
        runner.run(drain=True)
    assert fk.waits() >= 1
    assert runner.dead == 1
    (letter,) = fk.queue.dead_letters()
    assert (letter.table, letter.op, letter.attempts) == ("sac_wb_children", "i", 2)
    assert "foreign key" in letter.error.lower()
    assert fk.rows() == ([], [])
    with fk.Session() as s:
        assert s.get(Child, 1) is None


def test_one_batch_writes_parents_first_and_deletes_children_first(
    fk: FK, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows of both tables in one batch are applied in foreign-key order, as the ORM's
    flush would, whatever order they were queued in: nothing fails (here a failure would
    be dead-lettered at once)."""
    pid = fk.ids(Parent, 0)
    cid = fk.ids(Child, 0)  # the same partition: queued, read and batched in this order
    settings: dict[str, Any] = {"max_attempts": 1, "foreign_key_wait": 0}
    with fk.Session() as s:
        s.add(Child(id=cid, parent_id=pid))
        s.add(Parent(id=pid))
        s.commit()
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
        fk.worker(**settings).run(drain=True)
        assert fk.queue.dead_letters() == []
        assert fk.rows() == ([pid], [(cid, pid)])
        with fk.Session() as s:
            s.delete(s.get(Parent, pid))
            s.delete(s.get(Child, cid))
            s.commit()
        runner = fk.worker(**settings)
        runner.run(drain=True)
    assert runner.dead == 0
    assert fk.queue.dead_letters() == []
    assert fk.rows() == ([], [])
    assert fk.waits() == 0
