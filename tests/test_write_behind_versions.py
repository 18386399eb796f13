"""Write-behind while two key versions are live (a rolling deploy: old and new code on
one namespace and Redis), sync marks across versions, changes of another shape, and
the synchronous fallback with foreign keys between write-behind models. Each test
failed before its fix (audit g1, section 2, and the follow-ups)."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from test_write_behind import (  # noqa: F401
    FAST,
    PARTITIONS,
    WB,
    Counter,
    WBBase,
    cleanup,
    store_url,
    wb_env,
)
from test_write_behind_poison import FK, Child, CounterGained, Parent, fk  # noqa: F401

import sa_cache
from sa_cache.backends.base import BackendError
from sa_cache.write_behind import WriteBehind, write_behind_for
from sa_cache.write_behind_worker import WriteBehindWorker


@pytest.fixture(autouse=True)
def fresh_live_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every commit and batch reads the live versions afresh (a version that goes live
    is then used after 0.5 s, not 2.5 s): no test depends on when a read was cached."""
    module = importlib.import_module("sa_cache.version_registry")
    monkeypatch.setattr(module, "LIVE_REFRESH", 0.0)


class OtherBase(DeclarativeBase):
    pass


class CounterOtherShape(OtherBase):
    """The same table as the new code declares it: a column of another type (a wider
    string), so its queued entries are not the old code's."""

    __tablename__ = "sac_wb_counters"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(default=0)
    label: Mapped[str] = mapped_column(sa.String(40), default=lambda: "new")


@dataclass
class Code:
    """One release's cache (its key version) and Sessions."""

    cache: sa_cache.Cache
    Session: sessionmaker[Session]
    model: Any

    def n(self, id_: int = 1) -> int | None:
        with self.Session() as s:
            row = s.get(self.model, id_)
            value = None if row is None else row.n
        self.cache.wait_for_fills()  # (a fill left to the background is stored now)
        return value

    def set_n(self, n: int, id_: int = 1) -> None:
        with self.Session() as s:
            s.get(self.model, id_).n = n
            s.commit()


@dataclass
class Deploy:
    engine: sa.Engine
    url: str
    namespace: str
    made: list[sa_cache.Cache]

    def code(self, version: str | None, model: Any = Counter, url: str | None = None) -> Code:
        cache = sa_cache.Cache.from_url(url or self.url, namespace=self.namespace, version=version)
        self.made.append(cache)
        write_behind_for(cache).configure(partitions=PARTITIONS)
        cache.register(model, ttl=60, write="behind")
        return Code(
            cache, sessionmaker(self.engine, class_=sa_cache.CachingSession, cache=cache), model
        )

    def drain(self, code: Code) -> WriteBehindWorker:
        runner = WriteBehindWorker(code.cache, self.engine, **FAST)
        runner.run(drain=True)
        return runner

    def db_n(self, id_: int = 1) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(Counter.n).where(Counter.id == id_)).scalar_one())


@pytest.fixture
def deploy(engine: sa.Engine, store_url: str, namespace: str) -> Iterator[Deploy]:  # noqa: F811
    """Caches of one namespace on Redis standalone or Cluster (the commit script sets a
    row's key under every version: one hash slot), and the tables; cleaned up after."""
    WBBase.metadata.drop_all(engine)
    WBBase.metadata.create_all(engine)
    made: list[sa_cache.Cache] = []
    try:
        yield Deploy(engine, store_url, namespace, made)
    finally:
        for cache in made:
            cache.close()
        cleanup(store_url, namespace, engine)
        WBBase.metadata.drop_all(engine)


def seeded(deploy: Deploy, old: Code, n: int = 0) -> None:
    """Row 1 with ``n`` in the database, nothing queued."""
    with old.Session() as s:
        s.add(Counter(id=1, n=n))
        s.commit()
    deploy.drain(old)
    assert deploy.db_n() == n


# -- two live versions, one table shape --------------------------------------------------


def test_the_last_commit_wins_whichever_version_made_it(deploy: Deploy) -> None:
    """Old, new, then old code again update one row while it is queued: the worker
    applies the changes in commit order (it used to coalesce each version's key apart
    and apply the old code's slot first: the database ended at the new code's n=2)."""
    old, new = deploy.code("old"), deploy.code("new")
    seeded(deploy, old)
    old.set_n(1)
    new.set_n(2)
    old.set_n(3)
    deploy.drain(new)
    assert deploy.db_n() == 3
    assert old.n() == new.n() == 3


def test_a_change_queued_by_one_version_is_read_by_the_other(deploy: Deploy) -> None:
    """While queued, the other live version's ``session.get`` sees it (its own key gets
    the queued entry: the same shape of the table), also over a row it had cached."""
    old, new = deploy.code("old"), deploy.code("new")
    seeded(deploy, old)
    assert new.n() == 0  # cached by the new code
    old.set_n(1)
    assert new.n() == 1
    new.set_n(new.n() + 1)  # an increment by the new code, over the old code's change
    assert old.n() == 2
    deploy.drain(old)
    assert deploy.db_n() == 2
    assert old.n() == new.n() == 2
    # Once applied, no version's key holds a queued entry any more (which would be the
    # row whatever happened to it since): a change outside the queue reaches both.
    with deploy.engine.begin() as conn:
        conn.execute(sa.update(Counter).values(n=7))
    old.cache.invalidate(Counter)
    assert old.n() == new.n() == 7


def test_a_version_that_went_live_while_a_change_was_queued_reads_it_once_applied(
    deploy: Deploy,
) -> None:
    """The new code went live after the old code queued a change: it loads the row from
    the database, which trails the queue; once applied, the worker drops what the new
    code cached then (it used to stay, stale, until its TTL)."""
    old = deploy.code("old")
    seeded(deploy, old)
    old.set_n(1)
    new = deploy.code("new")
    assert new.n() == 0  # the database, behind the queue
    deploy.drain(old)
    assert deploy.db_n() == 1
    assert new.n() == 1


def test_a_version_with_another_shape_of_the_table_never_caches_a_queued_row_stale(
    deploy: Deploy,
) -> None:
    """The new code's model of the table has another shape: it cannot read the old
    code's queued entries, so its reads of a queued row go to the database without
    caching what they load, and read the applied row once the worker is done (they
    used to serve the entry cached before the change until its TTL)."""
    old, new = deploy.code("old"), deploy.code("new", CounterOtherShape)
    seeded(deploy, old)
    assert new.n() == 0
    old.set_n(1)
    assert new.n() == 0  # the database: the change is queued
    deploy.drain(old)
    assert new.n() == 1
    assert old.n() == 1


# -- sync marks ------------------------------------------------------------------------


def test_a_synchronous_write_fences_a_change_queued_by_another_version(
    deploy: Deploy, caplog: pytest.LogCaptureFixture
) -> None:
    """The old code queued n=1; the new code, its Redis unreachable, writes n=5 to the
    database synchronously with a sync mark. The mark names the row, not the new code's
    key, so the worker skips the older queued image (it used to apply it: n=1)."""
    old = deploy.code("old")
    seeded(deploy, old)
    old.set_n(1)
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
        new = deploy.code("new", url="redis://127.0.0.1:1/0")  # nothing listens there
        new.set_n(5)
    assert deploy.db_n() == 5
    deploy.drain(old)
    assert deploy.db_n() == 5


# -- a change of another shape over a queued one -------------------------------------------


def _queue_then_migrate(wb: WB, engine: sa.Engine) -> None:
    """Row 1 applied with n=1; the old code queues n=2; the table gains a column."""
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    wb.drain()
    with wb.Session() as s:
        s.get(Counter, 1).n = 2  # type: ignore[union-attr]
        s.commit()
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE sac_wb_counters ADD COLUMN extra VARCHAR(10)")


@pytest.mark.parametrize("filled", [False, True])
def test_an_update_of_another_shape_never_mixes_with_the_queued_one(
    engine: sa.Engine,
    redis_url: str,
    namespace: str,
    filled: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The old code queued n=2; the table gained a column (not drained first); the new
    code updates the new column. The worker applies the new change alone and
    dead-letters the old one, which does not fit (it used to crash on the overlay, or,
    once the new code had cached the row from the database, write its n=1 silently)."""
    with wb_env(engine, redis_url, namespace) as wb:
        _queue_then_migrate(wb, engine)
        new = sa_cache.Cache.from_url(redis_url, namespace=namespace)
        try:
            queue = write_behind_for(new)
            queue.configure(partitions=PARTITIONS)
            new.register(CounterGained, ttl=60, write="behind")
            with sessionmaker(engine, class_=sa_cache.CachingSession, cache=new)() as s:
                row = s.get(CounterGained, 1)
                if filled:
                    new.wait_for_fills()
                row.extra = "x"
                s.commit()
            with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
                WriteBehindWorker(new, engine, **FAST).run(drain=True)
            with engine.connect() as conn:
                n, extra = conn.execute(sa.text("SELECT n, extra FROM sac_wb_counters")).one()
            assert extra == "x"
            kept = [d.image for d in queue.dead_letters() if d.image and d.image[1] == 2]
            assert n == 2 or kept, "the old code's n=2 was lost without a dead letter"
        finally:
            new.close()


# -- the synchronous fallback with foreign keys ------------------------------------------


class OrderBase(DeclarativeBase):
    pass


class OrderRow(OrderBase):  # an ordinary table: the transaction does database work
    __tablename__ = "sac_wbv_orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(sa.String(50))


@pytest.fixture
def fk_db(fk: FK, engine: sa.Engine) -> Iterator[FK]:  # noqa: F811
    """Write-behind parents and children, and an ordinary table."""
    OrderBase.metadata.create_all(engine)
    try:
        yield fk
    finally:
        OrderBase.metadata.drop_all(engine)


@pytest.mark.parametrize("when", ["at commit", "after commit"])
def test_the_synchronous_fallback_writes_parents_first(
    fk_db: FK, monkeypatch: pytest.MonkeyPatch, when: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis fails at the commit (the queue write) or just after it (the confirmation):
    the rows go to the database synchronously, parents before children whatever order
    the Session changed them in (a child first used to fail on its foreign key)."""

    def down(*args: Any, **kwargs: Any) -> Any:
        raise BackendError("write-behind queue: Redis is down")

    monkeypatch.setattr(WriteBehind, "prepare" if when == "at commit" else "confirm", down)
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"), fk_db.Session() as s:
        s.add(Child(id=1, parent_id=1))
        s.flush()
        s.add(Parent(id=1))
        s.add(OrderRow(id=1, note="database work"))
        s.commit()
    assert fk_db.rows() == ([1], [(1, 1)])


def test_a_read_of_another_shape_never_replaces_a_queued_change(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """A queued entry the reader's model cannot use (the table gained a column while
    it was queued) is a miss, but the load from the database (which trails the queue)
    is not stored over it: the queued change stays for the worker and other readers."""
    with wb_env(engine, redis_url, namespace) as wb:
        _queue_then_migrate(wb, engine)
        new = sa_cache.Cache.from_url(redis_url, namespace=namespace)
        try:
            write_behind_for(new).configure(partitions=PARTITIONS)
            new.register(CounterGained, ttl=60, write="behind")
            key = new.entities[sa.inspect(CounterGained)].key(new, [1])
            client: Any = new.backend.client  # type: ignore[attr-defined]
            queued = client.get(key)
            assert queued is not None
            with sessionmaker(engine, class_=sa_cache.CachingSession, cache=new)() as s:
                assert s.get(CounterGained, 1) is not None  # from the database
            new.wait_for_fills()
            assert client.get(key) == queued
            with wb.Session() as s:  # the old code still reads its change
                assert s.get(Counter, 1).n == 2  # type: ignore[union-attr]
        finally:
            new.close()
