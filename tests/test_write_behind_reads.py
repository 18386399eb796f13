"""Reads of write-behind rows in a Session holding unflushed changes of that table.

Such changes never reach the database before the commit (the flush takes them out),
so they are no reason to read the database, which trails the queue: the read would
return a row older than a committed (queued) change, and an increment of it would
lose that change.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from test_write_behind import WB, Counter, Order, wb_env

import sa_cache


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


@pytest.fixture
def queued_seven(wb_db: WB) -> WB:
    """Rows 1 and 2 in the database with n=0; then n=7 for row 2, still queued."""
    with wb_db.Session() as s:
        s.add_all([Counter(id=1, n=0), Counter(id=2, n=0)])
        s.commit()
    wb_db.drain()
    with wb_db.Session() as s:
        s.get(Counter, 2).n = 7  # type: ignore[union-attr]
        s.commit()
    assert wb_db.db()[2] == (0, "new")  # the worker has not applied it
    return wb_db


def test_reads_in_a_no_autoflush_block_see_the_queue(queued_seven: WB) -> None:
    wb = queued_seven
    with wb.Session() as s, s.no_autoflush:
        s.get(Counter, 1).n = 5  # type: ignore[union-attr]  # unflushed: row 1
        assert s.get(Counter, 2).n == 7  # type: ignore[union-attr]
    with wb.Session() as s, s.no_autoflush:
        s.get(Counter, 1).n = 5  # type: ignore[union-attr]
        assert s.scalars(sa.select(Counter).where(Counter.id == 2)).one().n == 7


def test_an_increment_in_a_session_without_autoflush_keeps_the_queued_change(
    queued_seven: WB,
) -> None:
    wb = queued_seven
    factory = sessionmaker(wb.engine, class_=sa_cache.CachingSession, cache=wb.cache)
    with factory(autoflush=False) as s:
        s.get(Counter, 1).n = 6  # type: ignore[union-attr]
        row = s.get(Counter, 2)
        assert row is not None
        assert row.n == 7
        row.n += 1
        s.commit()
    wb.drain()
    assert wb.db() == {1: (6, "new"), 2: (8, "new")}


def test_unflushed_changes_of_an_ordinary_table_still_read_the_database(
    queued_seven: WB,
) -> None:
    """Rule 2 stands for other tables: a cached query of a table with unflushed changes
    goes to the database (here with autoflush off, so it does not see them: as without
    the cache)."""
    wb = queued_seven
    with Session(wb.engine) as plain:
        plain.add(Order(id=1, note="a"))
        plain.commit()
    stmt = sa.select(Order.note).where(Order.id == 1).options(sa_cache.with_cache())
    with wb.Session() as s:
        assert s.scalars(stmt).one() == "a"  # cached now
    with wb.Session() as s, s.no_autoflush:
        s.get(Order, 1).note = "b"  # type: ignore[union-attr]
        before = wb.cache.stats["query.own_writes"]
        assert s.scalars(stmt).one() == "a"
        assert wb.cache.stats["query.own_writes"] == before + 1


def test_a_locking_read_of_a_write_behind_model_is_refused(queued_seven: WB) -> None:
    """``with_for_update`` would lock the database row, which trails the queue: the
    locked read-modify-write pattern would read n=0 and lose the queued n=7. It raises
    instead, naming the model; ordinary tables still lock."""
    wb = queued_seven
    reads = [
        lambda s: s.get(Counter, 2, with_for_update=True),
        lambda s: s.scalars(sa.select(Counter).where(Counter.id == 2).with_for_update()).one(),
        lambda s: s.scalars(sa.select(Counter).with_for_update(read=True)).all(),
        lambda s: s.refresh(s.get(Counter, 2), with_for_update=True),
    ]
    for read in reads:
        with (
            wb.Session() as s,
            pytest.raises(sa_cache.WriteBehindLockError, match="Counter is registered"),
        ):
            read(s)
    with Session(wb.engine) as plain:
        plain.add(Order(id=1, note="a"))
        plain.commit()
    with wb.Session() as s:
        assert s.get(Order, 1, with_for_update=True).note == "a"  # type: ignore[union-attr]
        # a lock of the ordinary table only (of=), reading the write-behind one: allowed
        joined = (
            sa.select(Order, Counter.n)
            .join(Counter, Counter.id == Order.id)
            .with_for_update(of=Order)
        )
        s.execute(joined).all()
        with pytest.raises(sa_cache.WriteBehindLockError):
            s.execute(joined.with_for_update(of=Counter)).all()
        s.get(Counter, 2).n += 1  # type: ignore[union-attr]  # (unlocked: from the queue)
        s.commit()
    wb.drain()
    assert wb.db()[2] == (8, "new")


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])  # (SQLite locks nothing)
def test_a_lock_inside_a_statement_on_a_write_behind_model_is_refused(queued_seven: WB) -> None:
    """A lock the statement itself does not carry — a subquery's or CTE's
    ``with_for_update()`` (the "claim rows" pattern), ``suffix_with("FOR UPDATE")`` —
    would lock database rows that trail the queue just the same: refused as the
    statement is sent. Such locks on ordinary tables still run."""
    wb = queued_seven
    texts = [sa.select(Counter).where(Counter.id == 2).suffix_with("FOR UPDATE")]
    claim = sa.select(Counter.id).where(Counter.id == 2).with_for_update()
    cte = claim.cte("claim")
    reads = [
        sa.select(Counter).where(Counter.id.in_(claim.scalar_subquery())),
        sa.select(Counter.n).where(Counter.id.in_(sa.select(cte.c.id))),
        *texts,
    ]
    for stmt in reads:
        with (
            wb.Session() as s,
            pytest.raises(sa_cache.WriteBehindLockError, match="Counter is registered"),
        ):
            s.execute(stmt).all()
    with Session(wb.engine) as plain:
        plain.add(Order(id=1, note="a"))
        plain.commit()
    with wb.Session() as s:
        mine = sa.select(Order.id).where(Order.id == 1).with_for_update().scalar_subquery()
        assert s.scalars(sa.select(Order.note).where(Order.id.in_(mine))).all() == ["a"]


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
def test_a_locking_select_of_the_write_behind_table_is_refused(queued_seven: WB) -> None:
    """A locking read written against the Table (Core), not the model, would lock the
    database row just the same (n=0, while n=7 is queued): refused too (regression audit
    rf2-04)."""
    table = Counter.__table__
    stmt = sa.select(table.c.n).where(table.c.id == 2).with_for_update()
    with queued_seven.Session() as s, pytest.raises(sa_cache.WriteBehindLockError):
        s.execute(stmt).scalar_one()
