"""Which locking statements are refused for write-behind tables, and SERIALIZABLE per-mapper
binds beside a Session bind.

A row lock on a write-behind table protects nothing: its rows in the database trail the
queue, so a locked read-modify-write reads an older row and loses the queued change
(`WriteBehindLockError`). The refusal follows what the databases lock, checked on
PostgreSQL 15 and MariaDB 10.11 with a second connection: a locking clause locks the rows
of the tables in its own FROM list (joined tables; on PostgreSQL also the tables of a FROM
subquery), never those of a sub-select in WHERE or in the columns, nor of a CTE. One
decision serves ``Session.execute`` and the SQL sent on the Session's connection, so
they cannot disagree.

A Session whose ``binds`` give a mapper a SERIALIZABLE engine beside its plain ``bind``
is served no hits for it, as a Session bound to that engine alone is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, StatementLog, make_env
from models import User
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker
from test_write_behind import WB, Counter, Order, wb_env

import sa_cache

LOCKING = ["postgresql", "mariadb"]  # (SQLite has no row locks)


@pytest.fixture
def queued_seven(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Counter rows 1 and 2 in the database with n=0, then n=7 for row 2 still queued;
    Order row 2."""
    with wb_env(engine, redis_url, namespace) as wb:
        with wb.Session() as s:
            s.add_all([Counter(id=1, n=0), Counter(id=2, n=0)])
            s.commit()
        wb.drain()
        with wb.Session() as s:
            s.get(Counter, 2).n = 7  # type: ignore[union-attr]
            s.commit()
        assert wb.db()[2] == (0, "new")  # the worker has not applied it
        with Session(engine) as plain:
            plain.add(Order(id=2, note="a"))
            plain.commit()
        yield wb


def _both_ways(wb: WB, stmt: Any) -> list[str]:
    """How ``stmt`` ends through ``Session.execute`` and on the Session's connection."""
    out = []
    for run in (lambda s: s.execute(stmt).all(), lambda s: s.connection().execute(stmt).all()):
        with wb.Session() as s:
            try:
                run(s)
                out.append("ran")
            except sa_cache.WriteBehindLockError:
                out.append("refused")
    return out


@pytest.mark.parametrize("dialect_name", LOCKING)
def test_a_locking_select_on_the_sessions_connection_is_refused(queued_seven: WB) -> None:
    """``session.connection().execute(select(...).with_for_update())`` locks and reads the
    database row (n=0) while n=7 is queued, as ``session.execute`` of it would: refused
    the same (regression audit RA-06); so is the lock as SQL text, however sent. A lock
    of an ordinary table on that connection still runs."""
    wb = queued_seven
    table = Counter.__table__
    share = "FOR SHARE" if wb.engine.dialect.name == "postgresql" else "LOCK IN SHARE MODE"
    sql = f"SELECT n FROM sac_wb_counters WHERE id = 2 {share}"
    rows = f"SELECT * FROM sac_wb_counters WHERE id = 2 {share}"
    runs: list[Callable[[Session], Any]] = [
        lambda s: s.connection().execute(
            sa.select(table.c.n).where(table.c.id == 2).with_for_update()
        ),
        lambda s: s.connection().execute(sa.select(Counter).with_for_update(read=True)),
        lambda s: s.connection().exec_driver_sql(sql),
        lambda s: s.connection().execute(sa.text(sql)),
        lambda s: s.execute(sa.text(sql)),
        lambda s: s.execute(sa.select(Counter).from_statement(sa.text(rows))),
    ]
    for run in runs:
        with wb.Session() as s, pytest.raises(sa_cache.WriteBehindLockError):
            run(s)
    with wb.Session() as s:
        locked = sa.select(Order.note).where(Order.id == 2).with_for_update()
        assert s.connection().execute(locked).scalar_one() == "a"
        assert (
            s.connection()
            .exec_driver_sql("SELECT note FROM sac_wb_orders WHERE id = 2 FOR UPDATE")
            .scalar_one()
            == "a"
        )
        s.get(Counter, 2).n += 1  # type: ignore[union-attr]  # (unlocked: from the queue)
        s.commit()
    wb.drain()
    assert wb.db()[2] == (8, "new")


@pytest.mark.parametrize("dialect_name", LOCKING)
def test_a_nested_lock_under_a_lock_of_another_table_is_refused(queued_seven: WB) -> None:
    """The claim-rows pattern under a statement that locks the ordinary table (``of=``):
    the subquery's or CTE's own lock takes write-behind rows whatever the outer lock
    names (regression audit RA-07); in an UPDATE too."""
    claim = sa.select(Counter.id).where(Counter.id == 2).with_for_update()
    cte = claim.cte("claim")
    statements = [
        sa.select(Order).where(Order.id.in_(claim.scalar_subquery())).with_for_update(of=Order),
        sa.select(Order).where(Order.id.in_(sa.select(cte.c.id))).with_for_update(of=Order),
        sa.select(Order).where(Order.id.in_(claim.scalar_subquery())).with_for_update(),
        sa.update(Order).where(Order.id.in_(claim.scalar_subquery())).values(note="b"),
    ]
    for stmt in statements:
        assert _both_ways(queued_seven, stmt) == ["refused", "refused"], stmt


@pytest.mark.parametrize("dialect_name", LOCKING)
def test_a_lock_of_an_ordinary_table_filtered_by_a_write_behind_read_runs(
    queued_seven: WB,
) -> None:
    """``SELECT ... FROM orders WHERE id IN (SELECT id FROM counters) FOR UPDATE`` locks
    order rows only: neither database locks the rows of a sub-select in WHERE or in the
    columns, nor those of a CTE the statement reads. Such statements run (regression
    audit RA-08), as they do with ``exists()``; what the lock reaches through its FROM
    list — a join, a FROM subquery (PostgreSQL locks its rows; MariaDB does not, but the
    statement is refused everywhere alike) — is refused."""
    subq = sa.select(Counter.id).where(Counter.n >= 0)
    cte = subq.cte("seen")
    derived = subq.subquery()
    harmless = [
        sa.select(Order).where(Order.id.in_(subq)).with_for_update(),
        sa.select(Order).where(sa.exists().where(Counter.id == Order.id)).with_for_update(),
        sa.select(
            Order.id, sa.select(Counter.n).where(Counter.id == Order.id).scalar_subquery()
        ).with_for_update(),
        sa.select(Order.id).join(cte, cte.c.id == Order.id).with_for_update(),
        sa.select(Order).join(derived, derived.c.id == Order.id).with_for_update(of=Order),
    ]
    for stmt in harmless:
        assert _both_ways(queued_seven, stmt) == ["ran", "ran"], stmt
    locking = [
        sa.select(Order).join(Counter, Counter.id == Order.id).with_for_update(),
        sa.select(Order.id).where(Order.id == Counter.id).with_for_update(),  # (FROM both)
        sa.select(Order).join(derived, derived.c.id == Order.id).with_for_update(),
        sa.select(derived.c.id).with_for_update(of=derived),
    ]
    for stmt in locking:
        assert _both_ways(queued_seven, stmt) == ["refused", "refused"], stmt
    with queued_seven.Session() as s:
        stmt = sa.select(Order).where(Order.id.in_(subq)).with_for_update()
        assert [o.id for o in s.scalars(stmt)] == [2]


@pytest.mark.parametrize("dialect_name", LOCKING)
def test_sql_text_naming_a_write_behind_table_with_a_lock_is_refused(queued_seven: WB) -> None:
    """SQL text is not parsed: a lock in text that names a write-behind table anywhere
    is refused, even where only a sub-select reads it (README, Write-behind)."""
    sql = "SELECT id FROM sac_wb_orders WHERE id IN (SELECT id FROM sac_wb_counters) FOR UPDATE"
    with queued_seven.Session() as s, pytest.raises(sa_cache.WriteBehindLockError):
        s.execute(sa.text(sql))
    with queued_seven.Session() as s:  # text that does not name it runs
        assert s.execute(sa.text("SELECT id FROM sac_wb_orders FOR UPDATE")).all() == [(2,)]


# -- SERIALIZABLE per-mapper binds ----------------------------------------------------------


@pytest.fixture
def users(engine: sa.Engine, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    cache.register(User, ttl=300)
    yield from make_env(engine, cache)


def _cached(env: Env) -> None:
    """User 1's entry, filled and seen served."""
    with env.Session() as s:
        s.get(User, 1)
    env.cache.wait_for_fills()
    env.log.clear()
    with env.Session() as s:
        assert s.get(User, 1).name == "user1"  # type: ignore[union-attr]
    assert env.log.selects == []


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
@pytest.mark.parametrize("how", ["create_engine", "execution_options"])
def test_a_serializable_mapper_bind_beside_a_session_bind_is_served_no_hits(
    users: Env, how: str
) -> None:
    """``sessionmaker(engine, binds={User: serializable})``: User's reads run SERIALIZABLE,
    so ``session.get`` must send its SELECT (the database then tracks the read), first
    thing and after the Session took a connection of its other bind (regression audit
    rb-06). A plain mapper bind beside it keeps the hits."""
    env = users
    if how == "create_engine":
        ser = sa.create_engine(env.engine.url, isolation_level="SERIALIZABLE")
    else:
        ser = sa.create_engine(env.engine.url).execution_options(isolation_level="SERIALIZABLE")
    other = sa.create_engine(env.engine.url)
    seen, seen_other = StatementLog(), StatementLog()
    event.listen(ser, "before_cursor_execute", seen)
    event.listen(other, "before_cursor_execute", seen_other)
    try:
        _cached(env)
        factory = sessionmaker(
            env.engine, binds={User: ser}, class_=sa_cache.CachingSession, cache=env.cache
        )
        with factory() as s:
            assert s.get(User, 1).name == "user1"  # type: ignore[union-attr]
            s.commit()
        assert len(seen.selects) == 1, "served from the cache under SERIALIZABLE"
        seen.clear()
        with factory() as s:
            s.execute(sa.text("SELECT 1"))  # a connection of the Session's own bind
            assert s.get(User, 1).name == "user1"  # type: ignore[union-attr]
            s.commit()
        assert len(seen.selects) == 1, "served from the cache under SERIALIZABLE"
        plain = sessionmaker(
            env.engine, binds={User: other}, class_=sa_cache.CachingSession, cache=env.cache
        )
        with plain() as s:
            assert s.get(User, 1).name == "user1"  # type: ignore[union-attr]
        assert seen_other.selects == []
    finally:
        event.remove(ser, "before_cursor_execute", seen)
        ser.dispose()
        other.dispose()
