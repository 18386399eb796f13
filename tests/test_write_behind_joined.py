"""Write-behind in a Session joined to an outer Connection transaction (the
"join a Session into an external transaction" recipe, ``join_transaction_mode``).

Its commit is not the database's: the outer transaction may still roll back, and a
queue write cannot be taken back then. So its write-behind changes go to the
database in that transaction, and their entries are invalidated when it commits.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from test_write_behind import WB, Counter, Order, wb_env

import sa_cache


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
