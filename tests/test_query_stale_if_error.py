"""Stale-if-error on queries, inside the caller's transaction.

A query's reload runs on the caller's Session. If that Session's transaction already
did database work, the failed statement may have taken it down (PostgreSQL aborts the
transaction, and its COMMIT then rolls back without an error): serving the entry
stale would hide that, so the error is raised. A Session that had done no database
work yet is served the entry stale."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sa_cache

TTL = 0.2  # the entry is stale after it, for STALE more seconds


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "sac_sie_accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]


class Report(Base):
    __tablename__ = "sac_sie_reports"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(sa.String(30))


def _seed(session: Any) -> None:
    session.add_all([Account(id=1, balance=100), Report(id=1, title="r1")])
    session.commit()


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Account, ttl=600)
    yield from make_env(engine, cache, Base.metadata, _seed)


REPORTS = select(Report.title).options(sa_cache.with_cache(ttl=TTL, stale_ttl=60))


class Refused(Exception):
    """The database refusing the reload (injected: see `failing_reports`)."""


def stale_entry(env: Env) -> None:
    """The reports' entry, filled and then past its TTL (inside its stale window)."""
    with env.Session() as s:
        assert s.scalars(REPORTS).all() == ["r1"]
    env.cache.wait_for_fills()
    time.sleep(TTL * 1.5)


def failing_reports(env: Env) -> Any:
    """A cursor listener that makes every SELECT of the reports table fail."""

    def refuse(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "sac_sie_reports" in statement and statement.lstrip().upper().startswith("SELECT"):
            raise Refused("the reports table is locked")

    event.listen(env.engine, "before_cursor_execute", refuse)
    return refuse


def test_a_failed_reload_after_database_work_raises(env: Env) -> None:
    stale_entry(env)
    refuse = failing_reports(env)
    try:
        with env.Session() as s:
            account = s.get(Account, 1)
            assert account is not None
            account.balance = 50
            s.flush()  # database work in this transaction
            with pytest.raises(Refused):
                s.scalars(REPORTS).all()
            s.rollback()
        assert env.cache.stats["query.stale.if_error"] == 0
        with env.Session() as s:  # no database work yet: served stale
            assert s.scalars(REPORTS).all() == ["r1"]
        assert env.cache.stats["query.stale.if_error"] == 1
    finally:
        event.remove(env.engine, "before_cursor_execute", refuse)
    with env.Session() as s:
        assert s.get(Account, 1).balance == 100  # type: ignore[union-attr]


@pytest.mark.parametrize("dialect_name", ["postgresql"])
@pytest.mark.parametrize("cache_url", ["redis"], indirect=True)
def test_a_lock_timeout_in_a_postgresql_transaction_is_not_hidden(env: Env) -> None:
    """The real thing: the reload times out on a table lock, which aborts the
    transaction. Served stale, the application committed, PostgreSQL rolled the
    COMMIT back without an error and the flushed update was lost, while the cache
    held it (written through)."""
    stale_entry(env)
    with env.engine.connect() as locker:
        locker.exec_driver_sql("LOCK TABLE sac_sie_reports IN ACCESS EXCLUSIVE MODE")
        with env.Session() as s:
            s.execute(sa.text("SET LOCAL lock_timeout = '100ms'"))
            account = s.get(Account, 1)
            assert account is not None
            account.balance = 50
            s.flush()
            with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
                s.scalars(REPORTS).all()
            s.rollback()
        locker.rollback()
    with env.Session() as s:
        assert s.get(Account, 1).balance == 100  # type: ignore[union-attr]
    with env.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT balance FROM sac_sie_accounts")) == 100
