"""A locking read is never served from the cache, wherever its lock is: a hit sends no
SQL, so the transaction would believe it holds row locks it never took (a lost update).

``with_for_update()`` on the statement itself always went to the database. A FOR UPDATE
in a subquery (the classic "claim rows" pattern, ``IN (SELECT ... FOR UPDATE SKIP
LOCKED)``), in a CTE, or given as text (``suffix_with("FOR UPDATE")``, a statement
hint) was served from the cache on both hit paths before the fix (audit d1-02).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_cache
from sa_cache import with_cache


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "sac_lock_jobs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(sa.String(10))


def seed(s: Session) -> None:
    s.add_all([Job(id=1, state="new"), Job(id=2, state="done")])
    s.commit()


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache, Base.metadata, seed)


def _subquery() -> Any:
    claim = select(Job.id).where(Job.state == "new").with_for_update().scalar_subquery()
    return select(Job).where(Job.id.in_(claim))


def _cte() -> Any:
    claim = select(Job.id).where(Job.state == "new").with_for_update().cte("claim")
    return select(Job).where(Job.id.in_(select(claim.c.id)))


def _suffix() -> Any:
    return select(Job).where(Job.state == "new").suffix_with("FOR UPDATE")


def _statement_hint() -> Any:
    return select(Job).where(Job.state == "new").with_statement_hint("FOR UPDATE")


LOCKING: dict[str, Callable[[], Any]] = {
    "subquery": _subquery,
    "cte": _cte,
    "suffix": _suffix,
    "statement_hint": _statement_hint,
}
CALLS: dict[str, Callable[[Session, Any], list[Job]]] = {
    "short_way": lambda s, stmt: list(s.scalars(stmt)),  # `query_fast`
    "hook": lambda s, stmt: list(s.scalars(stmt, {})),  # parameters: `query.on_orm_execute`
}


def _row_is_locked(engine: sa.Engine) -> bool:
    """Can another connection lock job 1 right now? (False: nobody holds it.) NOWAIT:
    a held lock is an error at once, not after a lock wait timeout (kept as a bound)."""
    with engine.connect() as other:
        if engine.dialect.name == "postgresql":
            other.exec_driver_sql("SET lock_timeout = '300ms'")
        else:
            other.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
        try:
            other.execute(select(Job.id).where(Job.id == 1).with_for_update(nowait=True)).all()
        except sa.exc.OperationalError:
            return True
        finally:
            other.rollback()
    return False


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])  # SQLite renders no lock
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("lock", list(LOCKING))
def test_a_locking_read_holds_its_locks(env: Env, lock: str, call: str) -> None:
    """After a cached read of the same statement, the locking read still takes its row
    locks: another connection cannot lock the row while the Session's transaction is
    open."""
    make, run = LOCKING[lock], CALLS[call]
    with Session(env.engine) as s:  # without the cache: the read holds the lock
        assert [j.id for j in run(s, make().options(with_cache()))] == [1]
        assert _row_is_locked(env.engine)
    for _ in range(2):
        with env.Session() as s:
            run(s, make().options(with_cache()))
        env.cache.wait_for_fills()
    with env.Session() as s:
        env.log.clear()
        assert [j.id for j in run(s, make().options(with_cache()))] == [1]
        sent = list(env.log.statements)  # (before the probe's own SELECT)
        locked = _row_is_locked(env.engine)
    assert locked, f"the locking read was served from the cache, no lock taken (SQL sent: {sent})"


def _always_to_the_database(env: Env, lock: str, call: str) -> None:
    make, run = LOCKING[lock], CALLS[call]
    for strict in (False, False, True):
        with env.Session() as s:
            env.log.clear()
            assert [j.id for j in run(s, make().options(with_cache(strict=strict)))] == [1]
            assert len(env.log.statements) == 1
        env.cache.wait_for_fills()
    assert env.cache.stats["query.fill"] == 0
    assert env.cache.stats["query.hit"] == 0


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("lock", ["subquery", "cte"])
def test_a_locking_read_always_goes_to_the_database(env: Env, lock: str, call: str) -> None:
    """Every execution of a statement with a lock anywhere in it is sent to the
    database and fills nothing, as one with ``with_for_update()`` of its own (SQLite,
    which renders no lock, included: the statement means one). Not `NotCacheable` with
    ``strict=True``: a lock is a reason to read the database, not a statement the cache
    cannot handle."""
    _always_to_the_database(env, lock, call)


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])  # (SQLite: a syntax error)
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("lock", ["suffix", "statement_hint"])
def test_a_lock_given_as_text_always_goes_to_the_database(env: Env, lock: str, call: str) -> None:
    """The same for a lock given as SQL text (a suffix, a statement hint)."""
    _always_to_the_database(env, lock, call)
