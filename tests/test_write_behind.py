"""Write-behind: register(write="behind"), the Redis Streams queue, the worker, crash safety."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import StatementLog
from redis_servers import RedisServer
from sqlalchemy import event
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    mapped_column,
    relationship,
    sessionmaker,
)

import sa_cache
from sa_cache.backends.base import BackendError
from sa_cache.cli_worker import worker as worker_command
from sa_cache.write_behind import WriteBehind, WriteBehindUnavailable, write_behind_for
from sa_cache.write_behind_worker import FENCE, WriteBehindWorker

PARTITIONS = 4
FAST = {"max_delay": 0.01, "lease_ttl": 1.0, "poll_interval": 0.005, "backoff": 0.01}


class WBBase(DeclarativeBase):
    pass


class Counter(WBBase):
    __tablename__ = "sac_wb_counters"
    __table_args__ = (sa.CheckConstraint("n >= 0", name="sac_wb_n_nonneg"),)
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(default=0)
    label: Mapped[str] = mapped_column(sa.String(30), default=lambda: "new")


class Ticket(WBBase):
    __tablename__ = "sac_wb_tickets"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    title: Mapped[str] = mapped_column(sa.String(50))


class Order(WBBase):  # an ordinary table written in the same transactions
    __tablename__ = "sac_wb_orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(sa.String(50))


@dataclass
class WB:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]
    log: StatementLog
    url: str

    @property
    def queue(self) -> WriteBehind:
        return write_behind_for(self.cache)

    def db(self) -> dict[int, tuple[int, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(Counter.id, Counter.n, Counter.label)).all()
        return {r.id: (r.n, r.label) for r in rows}

    def worker(self, **settings: Any) -> WriteBehindWorker:
        return WriteBehindWorker(self.cache, self.engine, **{**FAST, **settings})

    @contextmanager
    def running(self, **settings: Any) -> Iterator[WriteBehindWorker]:
        runner = self.worker(**settings)
        stop = threading.Event()
        thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
        thread.start()
        try:
            yield runner
        finally:
            stop.set()
            thread.join(10)
            assert not thread.is_alive()

    def drain(self, **settings: Any) -> WriteBehindWorker:
        runner = self.worker(**settings)
        runner.run(drain=True)
        return runner


def make_cache(url: str, namespace: str, **config: Any) -> sa_cache.Cache:
    cache = sa_cache.Cache.from_url(url, namespace=namespace)
    write_behind_for(cache).configure(partitions=PARTITIONS, **config)
    cache.register(Counter, ttl=60, write="behind")
    cache.register(Ticket, write="behind")
    return cache


def cleanup(url: str, namespace: str, engine: sa.Engine) -> None:
    """Delete this test's keys (never FLUSHDB) and fence rows."""
    cache = sa_cache.Cache.from_url(url, namespace=namespace)
    try:
        cache.backend.unlink_many(cache.backend.scan_keys(f"{namespace}:*"))  # type: ignore[attr-defined]
    finally:
        cache.close()
    with engine.begin() as conn:
        if sa.inspect(conn).has_table(FENCE.name):
            conn.execute(FENCE.delete().where(FENCE.c.stream.startswith(f"{namespace}:")))
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("DROP FUNCTION IF EXISTS sac_wb_order() CASCADE")


@contextmanager
def wb_env(engine: sa.Engine, url: str, namespace: str, **config: Any) -> Iterator[WB]:
    WBBase.metadata.drop_all(engine)
    WBBase.metadata.create_all(engine)
    cache = make_cache(url, namespace, **config)
    log = StatementLog()
    event.listen(engine, "before_cursor_execute", log)
    try:
        yield WB(
            engine,
            cache,
            sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache),
            log,
            url,
        )
    finally:
        event.remove(engine, "before_cursor_execute", log)
        cache.close()
        cleanup(url, namespace, engine)
        WBBase.metadata.drop_all(engine)


@pytest.fixture(params=["redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Redis standalone and Redis Cluster."""
    name = "redis_url" if request.param == "redis" else "redis_cluster_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def wb(engine: sa.Engine, store_url: str, namespace: str) -> Iterator[WB]:
    with wb_env(engine, store_url, namespace) as env:
        yield env


@pytest.fixture
def wb1(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis only."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


# -- register ---------------------------------------------------------------------------


def test_register_refuses_what_the_queue_cannot_carry(redis_url: str, namespace: str) -> None:
    with pytest.raises(ValueError, match="needs a Redis cache URL"):
        sa_cache.Cache.from_url("memory://").register(Counter, write="behind")

    class Local(DeclarativeBase):
        pass

    class Serial(Local):
        __tablename__ = "sac_wb_serial"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Stamped(Local):
        __tablename__ = "sac_wb_stamped"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        at: Mapped[int] = mapped_column(server_default="0")

    class Parent(Local):
        __tablename__ = "sac_wb_parent"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        kids: Mapped[list[Kid]] = relationship()

    class Kid(Local):
        __tablename__ = "sac_wb_kid"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        parent_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_wb_parent.id"))

    class Shouting(Local):
        __tablename__ = "sac_wb_shouting"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(20))
        loud: Mapped[str] = column_property(sa.func.upper(name))

    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    try:
        with pytest.raises(ValueError, match="generated by the database"):
            cache.register(Serial, write="behind")
        with pytest.raises(ValueError, match="server-side default"):
            cache.register(Stamped, write="behind")
        with pytest.raises(ValueError, match="relationship"):
            cache.register(Parent, write="behind")
        with pytest.raises(ValueError, match=r"relationship Parent\.kids"):
            cache.register(Kid, write="behind")  # the target of one
        with pytest.raises(ValueError, match="'loud' is a SQL expression"):
            cache.register(Shouting, write="behind")
        cache.register(Ticket, write="behind")  # a client-generated UUID key is fine
        with pytest.raises(ValueError, match="on_queue_error"):
            cache.write_behind.configure(on_queue_error="ignore")
    finally:
        cache.close()


# -- the producer: commit queues, reads see the writes, the worker applies ---------------


def test_commit_queues_and_reads_see_the_writes(wb: WB, namespace: str) -> None:
    with wb.Session() as s:
        s.add_all([Counter(id=1), Counter(id=2, n=5), Order(id=1, note="same commit")])
        s.commit()
        assert s.get(Counter, 1) is not None
    assert [st for st in wb.log.statements if "sac_wb_counters" in st] == []
    assert wb.db() == {}  # the database trails the queue
    with wb.engine.connect() as conn:  # the ordinary row went to the database in that commit
        assert conn.execute(sa.select(Order.note)).scalar_one() == "same commit"
    other = make_cache(wb.url, namespace)  # another process: its own client, same namespace
    try:
        factory = sessionmaker(wb.engine, class_=sa_cache.CachingSession, cache=other)
        wb.log.clear()
        with factory() as s:
            one, two = s.get(Counter, 1), s.get(Counter, 2)
            assert one is not None
            assert two is not None
            assert (one.n, one.label, two.n) == (0, "new", 5)  # Python defaults applied
            assert s.scalars(sa.select(Counter).where(Counter.id == 2)).one() is two
            two.n += 1
            s.commit()
        assert wb.log.statements == []  # no SQL at all: reads from the cache, writes queued
    finally:
        other.close()
    with wb.Session() as s:
        assert s.get(Counter, 2).n == 6  # type: ignore[union-attr]
    with wb.running():
        wb.queue.flush(timeout=10)
    assert wb.db() == {1: (0, "new"), 2: (6, "new")}
    assert wb.queue.pending() == {}
    with wb.Session() as s:  # after the worker: ordinary entries with the model's TTL
        assert s.get(Counter, 2).n == 6  # type: ignore[union-attr]


def test_expired_objects_reload_the_queued_image(wb1: WB) -> None:
    wb = wb1
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    with wb.Session() as s:  # expire_on_commit=True: the refresh must not read the database
        c = s.get(Counter, 1)
        assert c is not None
        c.n = 2
        s.commit()
        wb.log.clear()
        assert c.n == 2
        s.refresh(c)
        assert c.n == 2
        assert wb.log.statements == []
    with wb.Session() as s:
        ticket = Ticket(title="uuid from the Python default")
        s.add(ticket)
        s.flush()
        assert isinstance(ticket.id, uuid.UUID)
        s.commit()
        assert s.get(Ticket, ticket.id) is ticket
    with wb.running():
        wb.queue.flush(timeout=10)
    with wb.engine.connect() as conn:
        assert conn.execute(sa.select(Ticket.id)).scalar_one() == ticket.id
    assert wb.db() == {1: (2, "new")}


def test_cached_queries_follow_the_database(wb1: WB) -> None:
    """Other queries read the database (it trails); the worker's batches invalidate them."""
    wb = wb1
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    wb.drain()
    query = sa.select(Counter.n).where(Counter.label == "new").options(sa_cache.with_cache())
    with wb.Session() as s:
        assert s.scalars(query).all() == [1]
    with wb.Session() as s:
        s.get(Counter, 1).n = 2  # type: ignore[union-attr]
        s.commit()
    with wb.Session() as s:
        assert s.scalars(query).all() == [1]  # the database trails the queue
        assert s.get(Counter, 1).n == 2  # type: ignore[union-attr]  # the row does not
    wb.drain()
    with wb.Session() as s:
        assert s.scalars(query).all() == [2]


def test_rollback_and_savepoints(wb1: WB) -> None:
    wb = wb1
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.flush()
        s.rollback()
        assert s.get(Counter, 1) is None  # nothing queued, nothing cached
    with wb.Session() as s:
        with s.begin_nested():
            s.add(Counter(id=2, n=2))
        sp = s.begin_nested()
        s.add(Counter(id=3, n=3))
        s.get(Counter, 2).n = 20  # type: ignore[union-attr]
        s.flush()
        sp.rollback()
        assert s.get(Counter, 3) is None
        assert s.get(Counter, 2).n == 2  # type: ignore[union-attr]  # restored by the rollback
        s.commit()
    with wb.Session() as s:
        s.delete(s.get(Counter, 2))
        s.flush()
        assert s.get(Counter, 2) is None  # deleted in this transaction, not yet queued
        assert s.scalars(sa.select(Counter).where(Counter.id == 2)).all() == []
        s.rollback()
        assert s.get(Counter, 2) is not None
    assert wb.queue.pending() != {}
    with wb.running():
        wb.queue.flush(timeout=10)
    assert wb.db() == {2: (2, "new")}


def test_delete_coalesce_and_cancel(wb1: WB) -> None:
    wb = wb1
    with wb.Session() as s:
        s.add_all([Counter(id=i) for i in range(1, 12)])
        s.commit()
    with wb.Session() as s:
        s.delete(s.get(Counter, 11))  # an insert deleted before the worker ran: no SQL at all
        s.commit()
    wb.drain()
    assert sorted(wb.db()) == list(range(1, 11))
    for step in range(1, 21):  # 20 commits over 10 rows
        with wb.Session() as s:
            s.get(Counter, step % 10 + 1).n = step  # type: ignore[union-attr]
            s.commit()
    with wb.Session() as s:
        s.delete(s.get(Counter, 1))
        s.add(Counter(id=99))  # inserted ...
        s.commit()
        assert s.get(Counter, 1) is None  # a tombstone until the worker deletes the row
    with wb.Session() as s:
        s.delete(s.get(Counter, 99))  # ... and deleted again before the worker ran
        s.commit()
    worker_log = StatementLog()
    engine = sa.create_engine(wb.engine.url)  # the worker's own engine, to count its SQL
    event.listen(engine, "before_cursor_execute", worker_log)
    try:
        WriteBehindWorker(wb.cache, engine, **FAST, batch_size=100).run(drain=True)
    finally:
        engine.dispose()
    assert wb.db() == {i: (i + 9, "new") for i in range(2, 11)}
    dml = [st.upper() for st in worker_log.statements if "sac_wb_counters" in st]
    # 23 queued changes: at most one upsert (executemany) per partition, one DELETE, and
    # nothing for row 99 (inserted, then deleted)
    assert len([st for st in dml if st.startswith("INSERT")]) <= PARTITIONS, dml
    assert len([st for st in dml if st.startswith("DELETE")]) == 1, dml
    assert len(dml) <= PARTITIONS + 1


def test_poison_entry_is_dead_lettered_without_blocking(
    wb1: WB, caplog: pytest.LogCaptureFixture
) -> None:
    wb = wb1
    with wb.Session() as s:
        s.add_all([Counter(id=i, n=i) for i in range(1, 6)])
        s.add(Counter(id=6, n=-1))  # violates CHECK (n >= 0) in the database only
        s.commit()
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
        runner = wb.drain(max_attempts=2)
    assert runner.dead == 1
    assert wb.db() == {i: (i, "new") for i in range(1, 6)}
    (letter,) = wb.queue.dead_letters()
    assert (letter.table, letter.op, letter.attempts) == ("sac_wb_counters", "i", 2)
    assert letter.image is not None
    assert -1 in letter.image
    assert "sac_wb_n_nonneg" in letter.error  # the constraint, named in every dialect
    with wb.Session() as s:  # the queued entry no longer claims a row the database lacks
        assert s.get(Counter, 6) is None
    result = CliRunner().invoke(
        worker_command, ["--url", wb.url, "--namespace", wb.cache.namespace, "--dead-letters"]
    )
    assert result.exit_code == 0, result.output
    assert "sac_wb_counters" in result.output
    assert "attempts" in result.output


# -- Redis unavailable, and the window between the queue write and the COMMIT ----------


@pytest.mark.parametrize("mode", ["sync", "raise"])
def test_redis_down_at_commit(engine: sa.Engine, namespace: str, mode: str) -> None:
    with RedisServer() as server, wb_env(engine, server.url, namespace, on_queue_error=mode) as wb:
        server.kill()
        with wb.Session() as s:
            s.add_all([Counter(id=1, n=7), Order(id=1, note="with it")])
            if mode == "raise":
                with pytest.raises(WriteBehindUnavailable):
                    s.commit()
                s.rollback()
            else:
                s.commit()
        with engine.connect() as conn:
            orders = conn.execute(sa.select(Order.note)).scalars().all()
        if mode == "raise":  # the commit failed before anything was persisted
            assert wb.db() == {}
            assert orders == []
        else:  # written synchronously, in the same transaction, before commit() returned
            assert wb.db() == {1: (7, "new")}
            assert orders == ["with it"]
        server.start()  # Redis back: a new commit is queued again
        with wb.Session() as s:
            s.add(Counter(id=2, n=1))
            s.commit()
        assert 2 not in wb.db()
        wb.drain()
        assert 2 in wb.db()


class ProducerDied(Exception):
    """Stands for the process dying at this point (no Python code after it runs)."""


def test_window_end_commit_failed(wb_sqlite: WB, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued, then the COMMIT fails: the abort record makes the worker drop the changes."""
    wb = wb_sqlite
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()

    def fail(conn: Any) -> None:
        raise RuntimeError("COMMIT failed")

    with wb.Session() as s:
        s.get(Counter, 1).n = 2  # type: ignore[union-attr]
        s.add(Order(id=1, note="rolled back"))
        event.listen(wb.engine, "commit", fail)
        try:
            with pytest.raises(RuntimeError, match="COMMIT failed"):
                s.commit()
        finally:
            event.remove(wb.engine, "commit", fail)
        s.rollback()
    # A failed commit event leaves the DBAPI transaction open on the pooled connection
    # (SQLAlchemy's quirk, not ours): close it, as the failing process would.
    wb.engine.dispose()
    with wb.engine.connect() as conn:
        assert conn.execute(sa.select(Order.id)).all() == []
    with wb.Session() as s:
        assert s.get(Counter, 1).n == 1  # type: ignore[union-attr]
    wb.drain()
    assert wb.db() == {1: (1, "new")}
    assert wb.queue.dead_letters() == []


@pytest.mark.parametrize("where", ["before COMMIT", "after COMMIT"])
def test_window_end_producer_died(
    wb_sqlite: WB, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """The producer dies between the prepare record and its commit record: the changes are
    never applied blindly; they are dead-lettered as "outcome unknown" and can be replayed."""
    wb = wb_sqlite
    wb.queue.configure(prepare_timeout=0.2)

    def die(*args: Any) -> None:
        raise ProducerDied

    monkeypatch.setattr(WriteBehind, "abort", lambda self, queued: True)  # dead: no abort either
    if where == "before COMMIT":
        event.listen(wb.engine, "commit", die)
    else:
        monkeypatch.setattr(WriteBehind, "confirm", die)
    try:
        with wb.Session() as s:
            s.add_all([Counter(id=1, n=1), Order(id=1, note="x")])
            with pytest.raises(ProducerDied):
                s.commit()
    finally:
        if where == "before COMMIT":
            event.remove(wb.engine, "commit", die)
    monkeypatch.undo()
    wb.engine.dispose()  # the dead process's connections are gone
    with wb.engine.connect() as conn:
        committed = conn.execute(sa.select(Order.id)).all() != []
    assert committed == (where == "after COMMIT")
    time.sleep(0.25)
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
        wb.drain()
    assert wb.db() == {}  # not applied without a commit record
    (letter,) = wb.queue.dead_letters()
    assert "outcome unknown" in letter.error
    if committed:  # the operator checks the database and replays
        result = CliRunner().invoke(
            worker_command,
            ["--url", wb.url, "--namespace", wb.cache.namespace, "--replay", "all"],
        )
        assert result.exit_code == 0, result.output
        assert "replayed 1" in result.output
        wb.drain()
        assert wb.db() == {1: (1, "new")}


def test_redis_fails_between_prepare_and_confirm(
    wb_sqlite: WB, monkeypatch: pytest.MonkeyPatch
) -> None:
    wb = wb_sqlite

    def down(self: WriteBehind, queued: Any) -> None:
        raise BackendError("Redis went away")

    monkeypatch.setattr(WriteBehind, "confirm", down)
    with wb.Session() as s:
        s.add_all([Counter(id=1, n=3), Order(id=1, note="database work: two-phase")])
        s.commit()
    assert wb.db() == {1: (3, "new")}  # written before commit() returned
    monkeypatch.undo()
    wb.drain()  # the prepared record got an abort record: dropped, not dead-lettered
    assert wb.queue.dead_letters() == []
    assert wb.db() == {1: (3, "new")}


def test_redis_down_without_database_work_writes_through(wb_sqlite: WB) -> None:
    """A commit of write-behind rows only (no connection: the queue write is the commit)."""
    wb = wb_sqlite

    def down(self: WriteBehind, changes: Any, commit: bool = False) -> Any:
        raise BackendError("Redis went away")

    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(WriteBehind, "prepare", down)
            s.commit()
    assert wb.db() == {1: (1, "new")}


def test_queue_survives_a_redis_crash_with_aof(
    tmp_path: Path, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/aof.db")
    args = ["--appendonly", "yes", "--appendfsync", "always"]
    with RedisServer(args=args) as server, wb_env(engine, server.url, namespace) as wb:
        client: Any = wb.queue.client
        with wb.Session() as s:
            s.add_all([Counter(id=1, n=1), Counter(id=2, n=2)])
            s.commit()
        server.kill()  # SIGKILL: queued, not yet applied
        server.start()
        client.connection_pool.disconnect()
        with caplog.at_level(logging.ERROR, logger="sa_cache"), wb.running() as runner:
            with wb.Session() as s:  # the queued images survived, in the cache too
                assert s.get(Counter, 2).n == 2  # type: ignore[union-attr]
            wb.queue.flush(timeout=10)
            assert wb.db() == {1: (1, "new"), 2: (2, "new")}
            server.kill()  # the worker survives Redis going away
            with wb.Session() as s:
                s.add(Counter(id=3, n=3))
                s.commit()  # written synchronously: Redis is down
            server.start()
            client.connection_pool.disconnect()
            with wb.Session() as s:
                s.add(Counter(id=4, n=4))
                s.commit()
            wb.queue.flush(timeout=20)
            assert runner.applied >= 3
        assert sorted(wb.db()) == [1, 2, 3, 4]
    engine.dispose()


def test_flush_times_out_without_a_worker(wb_sqlite: WB) -> None:
    with wb_sqlite.Session() as s:
        s.add(Counter(id=1))
        s.commit()
    assert wb_sqlite.queue.pending() != {}
    with pytest.raises(TimeoutError, match="is a worker running"):
        wb_sqlite.queue.flush(timeout=0.1)


def test_durability_warning(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    try:
        caplog.set_level(logging.WARNING, logger="sa_cache")
        info = cache.backend.server_info("persistence")  # type: ignore[attr-defined]
        durable = write_behind_for(cache).check_durability()
        assert durable == bool(int(info["aof_enabled"]))
        assert ("appendonly no" in caplog.text) == (not durable)
    finally:
        cache.close()
    caplog.clear()
    with RedisServer(args=["--appendonly", "yes"]) as server:
        cache = sa_cache.Cache.from_url(server.url, namespace=namespace)
        try:
            assert write_behind_for(cache).check_durability()
        finally:
            cache.close()
    assert "appendonly no" not in caplog.text


# -- several workers, the fence, crashes -----------------------------------------------


def out_of_order_trigger(engine: sa.Engine) -> None:
    """Make the database refuse any update that lowers n: an older image after a newer."""
    with engine.begin() as conn:
        name = engine.dialect.name
        if name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER sac_wb_order BEFORE UPDATE ON sac_wb_counters "
                "WHEN NEW.n < OLD.n BEGIN SELECT RAISE(ABORT, 'out of order'); END"
            )
        elif name == "postgresql":
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION sac_wb_order() RETURNS trigger AS $$ BEGIN "
                "IF NEW.n < OLD.n THEN RAISE EXCEPTION 'out of order'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER sac_wb_order BEFORE UPDATE ON sac_wb_counters "
                "FOR EACH ROW EXECUTE FUNCTION sac_wb_order()"
            )
        else:
            conn.exec_driver_sql(
                "CREATE TRIGGER sac_wb_order BEFORE UPDATE ON sac_wb_counters FOR EACH ROW "
                "IF NEW.n < OLD.n THEN SIGNAL SQLSTATE '45000' "
                "SET MESSAGE_TEXT = 'out of order'; END IF"
            )


class Writer(threading.Thread):
    """Steady writes: each commit raises one hot row's n and inserts one new row, so a
    lost change shows as a missing row and an older image as a lower n."""

    HOT = 20

    def __init__(self, factory: sessionmaker[Session]) -> None:
        super().__init__(daemon=True)
        self.factory = factory
        self.last: dict[int, int] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.factory() as s:
                s.add_all([Counter(id=i, n=0) for i in range(self.HOT)])
                s.commit()
            self.last = dict.fromkeys(range(self.HOT), 0)
            step = 0
            while not self.stop.is_set():
                step += 1
                key = random.randrange(self.HOT)
                with self.factory() as s:
                    row = s.get(Counter, key)
                    assert row is not None
                    row.n = step
                    s.add(Counter(id=1000 + step, n=step))
                    s.commit()
                self.last[key] = self.last[1000 + step] = step
                time.sleep(0.001)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> dict[int, int]:
        self.stop.set()
        self.join(10)
        assert self.error is None, self.error
        return self.last


def test_several_workers_never_apply_an_older_image(
    wb1: WB, caplog: pytest.LogCaptureFixture
) -> None:
    wb = wb1
    out_of_order_trigger(wb.engine)
    writer = Writer(wb.Session)
    writer.start()
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"), wb.running(lease_ttl=0.3) as a:
        time.sleep(0.3)
        with wb.running(lease_ttl=0.3) as b, wb.running(lease_ttl=0.3) as c:
            time.sleep(0.8)
            owners = [set(w.parts) for w in (a, b, c)]
        last = writer.finish()
        wb.queue.flush(timeout=20)
    assert sum(1 for o in owners if o) >= 2  # the partitions were shared out
    assert wb.queue.dead_letters() == []
    assert {k: v[0] for k, v in wb.db().items()} == last


def test_fence_stops_a_worker_that_lost_its_lease(
    wb_sqlite: WB, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker A reads k=1, then pauses past its lease; B takes over and applies k=2; when A
    wakes up, its batch must not commit (it would put the older image back)."""
    wb = wb_sqlite
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    a = wb.worker(lease_ttl=0.2, max_delay=10.0)
    a.start()
    a.step()
    assert [len(p.ready) for p in a.parts.values() if p.ready] == [1]
    with wb.Session() as s:
        s.get(Counter, 1).n = 2  # type: ignore[union-attr]
        s.commit()
    time.sleep(0.3)  # A's lease expires while it holds k=1 unapplied
    b = wb.worker(lease_ttl=5.0)
    b.run(drain=True)
    assert wb.db() == {1: (2, "new")}
    with caplog.at_level(logging.WARNING, logger="sa_cache"):
        a._apply_due(force=True)  # A wakes up and tries to commit k=1
    assert "newer owner" in caplog.text
    assert wb.db() == {1: (2, "new")}
    a.close()


def app_module(tmp_path: Path) -> Path:
    (tmp_path / "wbapp.py").write_text(
        textwrap.dedent(
            f"""
            import os
            import sqlalchemy as sa
            from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
            import sa_cache
            from sa_cache.write_behind import write_behind_for

            class Base(DeclarativeBase):
                pass

            class Counter(Base):
                __tablename__ = "sac_wb_counters"
                id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
                n: Mapped[int] = mapped_column(default=0)
                label: Mapped[str] = mapped_column(sa.String(30), default=lambda: "new")

            cache = sa_cache.Cache.from_url(
                os.environ["WB_REDIS_URL"], namespace=os.environ["WB_NAMESPACE"]
            )
            write_behind_for(cache).configure(partitions={PARTITIONS})
            cache.register(Counter, ttl=60, write="behind")
            """
        )
    )
    return tmp_path


def worker_process(wb: WB, tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(app_module(tmp_path)), os.getcwd()]),
        "WB_REDIS_URL": wb.url,
        "WB_NAMESPACE": wb.cache.namespace,
    }
    url = wb.engine.url.render_as_string(hide_password=False)
    command = [sys.executable, "-m", "sa_cache.cli_worker", "--app", "wbapp:cache"]
    command += ["--database-url", url, "--max-delay", "0.02", "--lease-ttl", "0.4", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def delivered(wb: WB) -> int:
    """Records delivered to workers so far, over all partitions (grows as they read)."""
    client: Any = wb.queue.client
    total = 0
    for p in range(PARTITIONS):
        stream = wb.queue.stream(p)
        for group in (
            client.execute_command("XINFO", "GROUPS", stream) if client.exists(stream) else []
        ):
            total += int(group[b"entries-read"] or 0)
    return total


def unacked(wb: WB) -> int:
    client: Any = wb.queue.client
    streams = [wb.queue.stream(p) for p in range(PARTITIONS)]
    return sum(int(client.xpending(s, "sa_cache")["pending"]) for s in streams if client.exists(s))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dialect_name", "store_url"),
    [("postgresql", "redis"), ("mariadb", "cluster"), ("sqlite", "redis")],
    indirect=True,
)
def test_crash_worker_killed_mid_batch_ten_times(wb: WB, tmp_path: Path) -> None:
    out_of_order_trigger(wb.engine)
    writer = Writer(wb.Session)
    writer.start()
    mid_batch = 0
    try:
        for _ in range(10):
            proc = worker_process(wb, tmp_path)
            try:
                seen = delivered(wb)
                deadline = time.monotonic() + 15
                while delivered(wb) == seen and time.monotonic() < deadline:
                    time.sleep(0.005)
                # within the batch just read: it is applied after --max-delay (20 ms)
                time.sleep(random.uniform(0.0, 0.02))
            finally:
                proc.kill()
                _, err = proc.communicate(timeout=10)
            assert proc.returncode == -signal.SIGKILL, err.decode()
            mid_batch += unacked(wb) > 0
    finally:
        last = writer.finish()
    proc = worker_process(wb, tmp_path, "--drain")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert mid_batch >= 5  # kills left records read (or applied) but not acknowledged
    assert len(last) > 200
    assert wb.queue.dead_letters() == []  # nothing out of order (the trigger), nothing poisoned
    assert {k: v[0] for k, v in wb.db().items()} == last  # the last write per key, none lost


def test_sigterm_drains_and_exits(wb_sqlite: WB, tmp_path: Path) -> None:
    wb = wb_sqlite
    with wb.Session() as s:
        s.add_all([Counter(id=i, n=i) for i in range(50)])
        s.commit()
    proc = worker_process(wb, tmp_path)
    try:
        deadline = time.monotonic() + 15
        while delivered(wb) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert len(wb.db()) == 50
    assert unacked(wb) == 0


def test_keys_follow_a_change_of_partitions_before_first_use(
    redis_url: str, namespace: str
) -> None:
    """Entity keys of write-behind models carry their partition's hash tag: keys
    remembered by reads before the queue was first used follow a change of partitions."""
    from sa_cache.write_behind_records import partition_of_key

    cache = make_cache(redis_url, namespace)
    try:
        spec = cache.entities[sa.inspect(Counter)]
        before = [spec.key(cache, [i]) for i in range(50)]  # remembered
        write_behind_for(cache).configure(partitions=PARTITIONS * 4)
        after = [spec.key(cache, [i]) for i in range(50)]
        assert after == [spec._make_key(cache, [i], None) for i in range(50)]
        assert before != after  # some rows moved to the new partitions
        assert max(partition_of_key(k) for k in after) >= PARTITIONS
    finally:
        cache.close()
