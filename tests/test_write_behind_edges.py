"""Write-behind at its edges: backlogs, redelivery, Redis failing mid-commit, late
listeners, a busy database."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from redis_servers import RedisServer
from sqlalchemy import event
from test_write_behind import FAST, WB, Counter, Order, wb_env

from sa_cache.backends.base import BackendError
from sa_cache.write_behind import WriteBehind, WriteBehindUnavailable
from sa_cache.write_behind_coalesce import Partition
from sa_cache.write_behind_records import prepare_record, queued_entry, read_prepare
from sa_cache.write_behind_worker import FENCE, WriteBehindWorker


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


# -- 1. a backlog older than prepare_timeout ------------------------------------------


def test_a_backlog_older_than_prepare_timeout_is_applied(wb_sqlite: WB) -> None:
    """A worker catching up reads a transaction's prepare records in one read and its
    commit record in a later one: old records are not "outcome unknown" for that."""
    wb = wb_sqlite
    wb.queue.configure(prepare_timeout=0.3)
    for i in range(10):  # database work: prepare records, then the commit record
        with wb.Session() as s:
            s.add_all([Counter(id=2 * i, n=i), Counter(id=2 * i + 1, n=i), Order(id=i, note="")])
            s.commit()
    time.sleep(0.4)  # the worker was down longer than prepare_timeout
    runner = wb.drain(batch_size=2)
    assert wb.queue.dead_letters() == []
    assert runner.dead == 0
    assert wb.db() == {2 * i + j: (i, "new") for i in range(10) for j in (0, 1)}


# -- 2. a redelivered insert, then a delete -------------------------------------------


def test_a_delete_after_a_redelivered_insert_is_applied(wb_db: WB) -> None:
    """A worker dies after its database COMMIT, before acknowledging an insert; the row
    is then deleted. The next worker must delete it, not cancel insert and delete."""
    wb = wb_db
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    dead = wb.worker(lease_ttl=0.2, max_delay=10.0)
    dead.start()
    dead.step()
    assert dead._apply_due(force=True) == 1  # committed; never acknowledged (it "dies")
    assert wb.db() == {1: (1, "new")}
    with wb.Session() as s:
        s.delete(s.get(Counter, 1))
        s.commit()
    time.sleep(0.3)  # its lease expires: the next worker claims its records
    runner = wb.drain()
    assert runner.dead == 0
    assert wb.db() == {}
    with wb.Session() as s:
        assert s.get(Counter, 1) is None


def test_an_insert_deleted_before_it_was_read_cancels_out(wb_sqlite: WB) -> None:
    wb = wb_sqlite
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    with wb.Session() as s:
        s.delete(s.get(Counter, 1))
        s.commit()
    wb.log.clear()
    wb.drain()
    dml = [st for st in wb.log.statements if not st.lstrip().upper().startswith("SELECT")]
    assert [st for st in dml if "sac_wb_counters" in st] == []
    assert wb.db() == {}


# -- 3. the synchronous fallback and older queued images ------------------------------


def _redis_fails(where: str, mp: pytest.MonkeyPatch) -> None:
    def down(self: WriteBehind, *args: Any, **kwargs: Any) -> Any:
        raise BackendError("Redis went away")

    mp.setattr(WriteBehind, "prepare" if where == "prepare" else "confirm", down)


@pytest.mark.parametrize("where", ["prepare", "confirm"])
def test_an_older_queued_image_never_follows_a_synchronous_write(wb_db: WB, where: str) -> None:
    wb = wb_db
    with wb.Session() as s:
        s.add(Counter(id=1, n=1, label="v1"))
        s.commit()  # queued; the worker has not run yet
    with wb.Session() as s, pytest.MonkeyPatch.context() as mp:
        row = s.get(Counter, 1)
        assert row is not None
        row.n, row.label = 2, "v2"
        s.add(Order(id=1, note="same transaction"))
        _redis_fails(where, mp)
        s.commit()  # written to the database before commit() returned
    assert wb.db() == {1: (2, "v2")}
    wb.drain()
    assert wb.db() == {1: (2, "v2")}  # not the older image still queued
    assert wb.queue.dead_letters() == []
    with wb.Session() as s:
        assert s.get(Counter, 1).label == "v2"  # type: ignore[union-attr]
        s.get(Counter, 1).n = 3  # type: ignore[union-attr]
        s.commit()  # a newer queued image is applied as usual
    wb.drain()
    assert wb.db() == {1: (3, "v2")}
    # The marker goes by age only (an older change of the row may still be on its way):
    # once older than prepare_timeout before the worker last read to the stream's end.
    wb.queue.configure(prepare_timeout=0.05)
    time.sleep(0.1)
    runner = wb.worker()
    runner.start()
    try:
        for _ in range(50):
            runner._next_gc = 0.0
            runner.step()
            if not _sync_markers(wb):
                break
            time.sleep(0.05)
    finally:
        runner.close()
    assert _sync_markers(wb) == []


def _sync_markers(wb: WB) -> list[str]:
    with wb.engine.connect() as conn:
        query = sa.select(FENCE.c.stream).where(FENCE.c.stream.contains(":sync:"))
        return list(conn.execute(query).scalars())


# -- 4. confirm fails after the COMMIT, and so does the late write ----------------------


def test_a_committed_change_that_could_not_be_confirmed_nor_written_is_kept(
    tmp_path: Path, redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "busy.db"
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    holder: list[sqlite3.Connection] = []
    original = WriteBehind.confirm

    def confirm_fails(self: WriteBehind, queued: Any) -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the database meanwhile
        holder.append(other)
        raise BackendError("Redis went away")

    try:
        with wb_env(engine, redis_url, namespace, prepare_timeout=0.2) as wb:
            with wb.Session() as s, pytest.MonkeyPatch.context() as mp:
                s.add_all([Counter(id=1, n=5, label="committed"), Order(id=1, note="")])
                mp.setattr(WriteBehind, "confirm", confirm_fails)
                with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
                    s.commit()
            holder[0].rollback()
            assert WriteBehind.confirm is original
            time.sleep(0.25)
            with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
                wb.drain()
            (letter,) = wb.queue.dead_letters()  # not dropped: for the operator to replay
            assert "outcome unknown" in letter.error
            assert letter.op == "i"
            assert wb.queue.replay() == 1
            streams = [wb.queue.stream(p) for p in range(wb.queue.config.partitions)]
            client = wb.queue.client
            replayed = [
                read_prepare(fields[b"c"])
                for stream in streams
                for _, fields in client.xrange(stream, "-", "+")
                if fields.get(b"t") == b"p"
            ]
            # an insert whose outcome was unknown may be in the database: it comes back
            # as an update, so that a later delete of the row is applied, not cancelled
            assert [(change[1], change[2]) for change in replayed] == [(letter.key, "u")]
            wb.drain()
            assert wb.db() == {1: (5, "committed")}
    finally:
        for conn in holder:
            conn.close()
        engine.dispose()


# -- 5. on_queue_error="raise": a failed commit persists nothing ------------------------


@contextmanager
def stalled(server: RedisServer) -> Iterator[None]:
    """Redis stops answering (SIGSTOP) but keeps what it was sent, then resumes."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def test_raise_mode_a_commit_that_timed_out_is_never_applied(
    engine: sa.Engine, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        RedisServer() as server,
        wb_env(engine, server.url, namespace, on_queue_error="raise", prepare_timeout=0.2) as wb,
    ):
        with wb.Session() as s:
            s.add(Counter(id=1, n=1, label="v1"))
            s.commit()
        wb.drain()
        with wb.Session() as s:
            row = s.get(Counter, 1)  # from the cache: no database work in this transaction
            assert row is not None
            row.n, row.label = 2, "v2"
            with (
                stalled(server),
                caplog.at_level(logging.CRITICAL, logger="sa_cache"),
                pytest.raises(WriteBehindUnavailable, match="nothing was committed"),
            ):
                s.commit()
            s.rollback()
        assert wb.db() == {1: (1, "v1")}
        time.sleep(0.3)  # what Redis was sent while stopped has run by now
        with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
            wb.drain()
        assert wb.db() == {1: (1, "v1")}  # not applied
        # The abort could not be sent while Redis was stopped either: the prepare record
        # that ran late is at most an "outcome unknown" dead letter, never applied.
        assert all("outcome unknown" in d.error for d in wb.queue.dead_letters())


def test_an_abort_record_read_before_its_prepare_records_drops_them() -> None:
    """A prepare that timed out may run after the abort the producer sent next."""
    part = Partition(0, "s", 1)
    entry = queued_entry([1, 2, "x"], time.time(), "tx1")
    fields = {"t": b"p", "x": b"tx1", "c": prepare_record("sac_wb_counters", "k", "i", entry, [1])}
    assert part.feed("1-0", {"t": b"a", "x": b"tx1"}, {}) is None
    assert part.feed("2-0", fields, {}) is None
    assert part.prepared == {}
    assert part.acks == ["1-0", "2-0"]
    assert list(part.expired(time.time() * 1000 + 1)) == []  # nothing to dead-letter
    assert part.aborted == {}


# -- 6. a before_commit listener changes a write-behind object ---------------------------


@pytest.mark.parametrize("database_work", [True, False])
@pytest.mark.parametrize("new_row", [True, False])
def test_a_before_commit_listener_change_is_queued(
    wb_sqlite: WB, database_work: bool, new_row: bool
) -> None:
    wb = wb_sqlite
    if not new_row:
        with wb.Session() as s:
            s.add(Counter(id=1, n=1, label="v1"))
            s.commit()
        wb.drain()

    def stamp(session: Any) -> None:  # e.g. a "last modified by" stamp
        for obj in [*session.identity_map.values(), *session.new]:
            if isinstance(obj, Counter) and obj.label != "stamped":
                obj.label = "stamped"

    event.listen(wb.Session, "before_commit", stamp)  # after sa_cache's own listener
    try:
        with wb.Session() as s:
            row = Counter(id=1, n=2) if new_row else s.get(Counter, 1)
            assert row is not None
            row.n = 2
            s.add(row)  # held here: the identity map is weak
            if database_work:
                s.add(Order(id=1, note=""))
            s.commit()
    finally:
        event.remove(wb.Session, "before_commit", stamp)
    assert 1 not in wb.db() or not new_row  # queued, not written by the flush
    with wb.Session() as s:
        again = s.get(Counter, 1)
        assert again is not None
        assert (again.n, again.label) == (2, "stamped")
    wb.drain()
    assert wb.db() == {1: (2, "stamped")}


# -- 7. lock contention is transient ---------------------------------------------------


def _impatient_engine(engine: sa.Engine) -> sa.Engine:
    """The worker's engine: gives up on a lock quickly."""
    url = engine.url.render_as_string(hide_password=False)
    name = engine.dialect.name
    if name == "sqlite":
        return sa.create_engine(url, connect_args={"timeout": 0.05})
    if name == "postgresql":
        return sa.create_engine(url, connect_args={"options": "-c lock_timeout=100"})
    init = "SET SESSION innodb_lock_wait_timeout = 0"  # (1205 at once)
    return sa.create_engine(url, connect_args={"init_command": init})


@contextmanager
def locked(wb: WB) -> Iterator[None]:
    """Another transaction holds the rows (the whole file on SQLite) the worker writes."""
    if wb.engine.dialect.name == "sqlite":
        path = wb.engine.url.database
        assert path is not None
        raw = sqlite3.connect(path, isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            raw.rollback()
            raw.close()
        return
    with wb.engine.connect() as conn, conn.begin() as tx:
        mine = FENCE.c.stream.startswith(f"{wb.cache.namespace}:")
        conn.execute(FENCE.update().where(mine).values(token=FENCE.c.token))
        yield
        tx.rollback()


def test_lock_contention_is_retried_not_dead_lettered(
    wb_db: WB, caplog: pytest.LogCaptureFixture
) -> None:
    wb = wb_db
    engine = _impatient_engine(wb.engine)
    settings = {**FAST, "max_attempts": 1, "max_backoff": 0.05}  # a counted failure is fatal
    runner = WriteBehindWorker(wb.cache, engine, **settings)
    try:
        runner.start()
        runner.step()  # owns the partitions: their fence rows exist
        with wb.Session() as s:
            s.add(Counter(id=1, n=1))
            s.commit()
        with caplog.at_level(logging.CRITICAL, logger="sa_cache"), locked(wb):
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                runner.step(force=True)
                time.sleep(0.01)
        assert runner.dead == 0
        runner.run(drain=True)
        assert runner.dead == 0
        assert wb.queue.dead_letters() == []
        assert wb.db() == {1: (1, "new")}
    finally:
        engine.dispose()


# -- listeners that only database loads run ----------------------------------------------


@pytest.mark.parametrize("kind", ["load", "loaded_as_persistent"])
def test_a_queued_change_is_read_back_with_load_listeners(wb_sqlite: WB, kind: str) -> None:
    """A ``load`` (model) or ``loaded_as_persistent`` (Session) listener makes reads go
    the ORM's way; a row whose change is still queued is read back all the same (the
    database does not have it yet: read-your-writes)."""
    wb = wb_sqlite
    seen: list[Any] = []
    factory = wb.Session
    target: Any = Counter if kind == "load" else factory

    def listener(*args: Any) -> None:
        seen.append(args)

    event.listen(target, kind, listener)
    try:
        with factory() as s:
            s.add(Counter(id=1, n=1))
            s.commit()
        wb.drain()
        with factory() as s:
            counter = s.get(Counter, 1)
            assert counter is not None
            counter.n = 2
            s.commit()  # queued, not applied: the worker does not run
        with factory() as s:
            counter = s.get(Counter, 1)
            assert counter is not None
            assert counter.n == 2
        assert wb.db() == {1: (1, "new")}
    finally:
        event.remove(target, kind, listener)


def test_a_queued_entry_of_another_shape_is_not_used_to_refresh(wb_sqlite: WB) -> None:
    """Refreshing an expired write-behind object reads its queued image; an entry that
    is not an image of the model (foreign or corrupt) leaves it to the database."""
    wb = wb_sqlite
    with wb.Session() as s:
        s.add(Counter(id=1, n=3))
        s.commit()
    wb.drain()
    key = wb.cache.entities[sa.inspect(Counter)].key(wb.cache, [1])
    with wb.Session() as s:
        counter = s.get(Counter, 1)
        assert counter is not None
        wb.cache.wait_for_fills()
        wb.cache.backend.set_many({key: queued_entry([1], time.time(), "foreign")})
        s.expire(counter)
        assert counter.n == 3  # from the database, no error


def test_first_reads_a_queued_change(wb_sqlite: WB) -> None:
    """``query(...).filter_by(pk=...).first()`` reads its own queued write, as
    ``session.get`` does (the database does not have it yet)."""
    wb = wb_sqlite
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    wb.drain()
    with wb.Session() as s:
        counter = s.get(Counter, 1)
        assert counter is not None
        counter.n = 2
        s.commit()  # queued
    with wb.Session() as s:
        first = s.query(Counter).filter_by(id=1).first()
        assert first is not None
        assert first.n == 2
    assert wb.db() == {1: (1, "new")}


def test_an_image_the_database_stores_otherwise_is_not_kept(wb_db: WB) -> None:
    """A queued value the database keeps in another form ("8" for an Integer) is applied,
    and then the entry is dropped: reads load the row as the database holds it."""
    wb = wb_db
    with wb.Session() as s:
        s.add(Counter(id=1, n="8"))  # type: ignore[arg-type]
        s.commit()
    wb.drain()
    assert wb.db() == {1: (8, "new")}
    with wb.Session() as s:
        counter = s.get(Counter, 1)
        assert counter is not None
        assert counter.n == 8
        assert type(counter.n) is int
