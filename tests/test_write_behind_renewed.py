"""A write-behind row deleted and added again is deleted first where its delete sets
off ON DELETE actions (`write_behind_apply.apply_in_order`) — and before it, children
first, what the batch deletes or renews in the tables referring to it: a child that
refers to the row with RESTRICT / NO ACTION and was deleted (or deleted and added
again) in the same transaction must be gone when the parent's delete runs, as in the
application's own transaction (a foreign-key violation dead-lettered the parent's new
row: regression audit rf2-01)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from test_write_behind import FAST, cleanup

import sa_cache
from sa_cache.backends.base import BackendError
from sa_cache.write_behind import WriteBehind, write_behind_for
from sa_cache.write_behind_worker import WriteBehindWorker


class RBase(DeclarativeBase):
    pass


class Order(RBase):  # write-behind parent
    __tablename__ = "sac_rf2_orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(sa.String(20))


class Item(RBase):  # write-through; deleted with its order (ON DELETE CASCADE)
    __tablename__ = "sac_rf2_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_rf2_orders.id", ondelete="CASCADE"))


class Payment(RBase):  # write-behind child, NO ACTION: must be gone before its order
    __tablename__ = "sac_rf2_payments"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_rf2_orders.id"))
    amount: Mapped[int] = mapped_column(default=0)


def _foreign_keys_on(dbapi_conn: Any, record: Any) -> None:
    dbapi_conn.execute("PRAGMA foreign_keys=ON")


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]

    def drain(self) -> WriteBehindWorker:
        runner = WriteBehindWorker(
            self.cache, self.engine, **{**FAST, "max_attempts": 2, "foreign_key_wait": 0.0}
        )
        runner.run(drain=True)
        return runner


@pytest.fixture
def env(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _foreign_keys_on)
        engine.dispose()
    RBase.metadata.drop_all(engine)
    RBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=1)  # one batch holds every row
    cache.register(Order, ttl=60, write="behind")
    cache.register(Payment, ttl=60, write="behind")
    cache.register(Item, ttl=60)
    factory = sessionmaker(
        engine, class_=sa_cache.CachingSession, cache=cache, expire_on_commit=False
    )
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        RBase.metadata.drop_all(engine)


def _setup(env: Env) -> None:
    with env.Session() as s:
        s.add(Order(id=1, code="one"))
        s.commit()
    with env.Session() as s:
        s.add(Payment(id=1, order_id=1, amount=10))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.add(Item(id=1, order_id=1))
        s.commit()


def _replace_order(env: Env, readd_payment: bool) -> None:
    """What the application's transaction does, valid without write-behind: the
    payment (RESTRICT child) deleted, the order deleted and added again (its item goes
    with it, ON DELETE CASCADE), optionally the payment added again."""
    with env.Session() as s:
        payment = s.get(Payment, 1)
        order = s.get(Order, 1)
        assert payment is not None
        assert order is not None
        s.delete(payment)
        s.flush()
        s.delete(order)
        s.flush()
        s.add(Order(id=1, code="uno"))
        if readd_payment:
            s.flush()
            s.add(Payment(id=1, order_id=1, amount=20))
        s.commit()


def _check(env: Env, readd_payment: bool) -> None:
    with env.engine.connect() as conn:
        assert conn.execute(sa.select(Order.id, Order.code)).all() == [(1, "uno")]
        payments = conn.execute(sa.select(Payment.id, Payment.amount)).all()
        assert payments == ([(1, 20)] if readd_payment else [])
        assert conn.execute(sa.select(Item.id)).all() == []


def test_worker_renewed_parent_with_a_restrict_child_renewed_in_the_same_transaction(
    env: Env,
) -> None:
    """Order and payment both deleted and added again in one transaction: the worker
    deletes the order first (it has an ON DELETE action: items), but not the renewed
    payment (its table has none), so the DELETE of the order hits the old payment,
    every attempt: the order's change is dead-lettered and its new row lost.
    (With the payment only deleted, the batch fails once, then the worker applies the
    payment's delete on its own and the order after it: that one holds.)"""
    readd_payment = True
    _setup(env)
    _replace_order(env, readd_payment)
    runner = env.drain()
    assert runner.dead == 0, "the worker dead-lettered a valid transaction's changes"
    _check(env, readd_payment)


@pytest.mark.parametrize("when", ["prepare", "confirm"])
def test_sync_fallback_redis_down_renewed_parent_with_restrict_child(
    env: Env, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Redis down at the commit (prepare: rows written in the committing transaction)
    or after it (confirm: late write): a valid transaction (payment deleted, its order
    deleted and added again) must commit and end in the database."""
    _setup(env)

    def down(self: WriteBehind, *args: Any, **kwargs: Any) -> None:
        raise BackendError("Redis went away")

    monkeypatch.setattr(WriteBehind, when, down)
    with env.Session() as s:
        s.connection()
        payment = s.get(Payment, 1)
        order = s.get(Order, 1)
        assert payment is not None
        assert order is not None
        s.delete(payment)
        s.flush()
        s.delete(order)
        s.flush()
        s.add(Order(id=1, code="uno"))
        s.commit()
    monkeypatch.undo()
    _check(env, False)
