"""Write-behind in a Session joined to an outer Connection transaction (the
"join a Session into an external transaction" recipe, ``join_transaction_mode``).

Its commit is not the database's: the outer transaction may still roll back, and a
queue write cannot be taken back then. So its write-behind changes go to the
database in that transaction, and their entries are invalidated when it commits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from test_write_behind import WB, Counter, Order, wb_env

import sa_cache
from sa_cache.write_behind_fence import ensure_fence_table


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


def _orders(wb: WB) -> list[int]:
    with wb.engine.connect() as conn:
        return list(conn.execute(sa.select(Order.id)).scalars())


def _served(wb: WB) -> int | None:
    with wb.Session() as s:
        got = s.get(Counter, 1)
        return None if got is None else got.n


@pytest.mark.parametrize("mode", ["create_savepoint", "rollback_only", "conditional_savepoint"])
@pytest.mark.parametrize("outcome", ["rollback", "commit"])
def test_a_joined_sessions_changes_follow_the_outer_transaction(
    wb_db: WB, mode: str, outcome: str
) -> None:
    """The Session commits, then the outer transaction rolls back (or commits): the
    write-behind row goes (or stays) with the ordinary row of the same commit, and
    nothing is ever queued (it was queued and applied after the rollback)."""
    wb = wb_db
    with wb.engine.connect() as conn:
        outer = conn.begin()
        s = sa_cache.CachingSession(bind=conn, cache=wb.cache, join_transaction_mode=mode)
        s.add(Counter(id=1, n=1))
        s.add(Order(id=1, note="same commit"))
        s.commit()
        s.close()
        assert wb.queue.pending() == {}
        getattr(outer, outcome)()
    assert wb.queue.pending() == {}
    wb.drain()
    kept = _orders(wb) == [1]  # the ordinary row: the outer transaction's outcome
    if wb.engine.dialect.name != "sqlite":  # (pysqlite's SAVEPOINTs need a recipe)
        assert kept == (outcome == "commit")
    assert wb.db() == ({1: (1, "new")} if kept else {})
    assert _served(wb) == (1 if kept else None)


@pytest.mark.parametrize("outcome", ["rollback", "commit"])
def test_a_joined_update_invalidates_the_entry_when_the_outer_transaction_commits(
    wb_db: WB, outcome: str
) -> None:
    """A row whose entry other Sessions read: a joined Session's update is served to
    them only once the outer transaction committed, and never if it rolled back."""
    wb = wb_db
    with wb.Session() as s:
        s.add(Counter(id=1, n=0))
        s.commit()
    wb.drain()
    assert _served(wb) == 0  # its entry is in the cache
    with wb.engine.connect() as conn:
        outer = conn.begin()
        s = sa_cache.CachingSession(
            bind=conn, cache=wb.cache, join_transaction_mode="conditional_savepoint"
        )
        s.get(Counter, 1).n = 5  # type: ignore[union-attr]
        s.commit()
        s.close()
        assert _served(wb) == 0  # not committed in the database yet
        getattr(outer, outcome)()
    assert wb.queue.pending() == {}
    assert _served(wb) == (5 if outcome == "commit" else 0)
    wb.drain()
    assert wb.db() == {1: (5 if outcome == "commit" else 0, "new")}


def _waiting_to_write_counters(engine: sa.Engine) -> bool:
    """Is a statement writing table sac_wb_counters waiting (for a row lock) now?"""
    query = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database() AND query LIKE 'INSERT INTO sac_wb_counters%%'",
        "mysql": "SELECT count(*) FROM information_schema.processlist WHERE command = 'Query' "
        "AND time_ms > 100 AND info LIKE 'INSERT INTO sac_wb_counters%%'",
    }[engine.dialect.name]
    with engine.connect() as conn:
        return bool(conn.exec_driver_sql(query).scalar_one())


def test_an_older_queued_change_waiting_for_a_joined_write_does_not_overwrite_it(
    wb_db: WB,
) -> None:
    """An older change of a row is queued; a joined Session writes the row again in an
    outer transaction that stays open. A worker applying the queued change waits for
    the row lock; the outer transaction commits, with the row's sync mark, which the
    worker could not see when its batch began. The newer value stays."""
    wb = wb_db
    ensure_fence_table(wb.engine)  # (else the worker would wait for its creation)
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()  # queued, not applied
    failures: list[BaseException] = []

    def drain() -> None:
        try:
            wb.drain()
        except BaseException as exc:  # reported below
            failures.append(exc)

    with wb.engine.connect() as conn:
        outer = conn.begin()
        s = sa_cache.CachingSession(bind=conn, cache=wb.cache)
        s.add(Counter(id=1, n=5))  # (not in the database yet: an insert, an upsert)
        s.commit()  # written in the outer transaction, with its sync mark
        s.close()
        worker = threading.Thread(target=drain)
        worker.start()
        if wb.engine.dialect.name == "sqlite":  # one writer: it waits for the whole file
            time.sleep(0.3)
        else:  # the worker's write of the older image waits for the row lock
            deadline = time.monotonic() + 10
            while not _waiting_to_write_counters(wb.engine):
                assert time.monotonic() < deadline, f"the worker never waited: {failures}"
                time.sleep(0.02)
        outer.commit()
    worker.join(30)
    assert not worker.is_alive()
    assert not failures
    assert wb.db() == {1: (5, "new")}
    assert _served(wb) == 5
