"""``sa-cache demo``: a small shop on SQLite, a read-heavy request mix, cached vs uncached."""

from __future__ import annotations

import datetime
import decimal
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, event, func, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

from .backends.base import BackendError
from .cache import Cache
from .query_option import with_cache
from .session import CachingSession
from .store_epoch import unwatch as unwatch_epoch
from .version_gc import Scanning

log = logging.getLogger("sa_cache")


class _Base(DeclarativeBase):
    pass


class Country(_Base):
    __tablename__ = "demo_countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Customer(_Base):
    __tablename__ = "demo_customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    country_code: Mapped[str] = mapped_column(ForeignKey("demo_countries.code"))
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(_Base):
    __tablename__ = "demo_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("demo_customers.id"))
    total: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2))
    placed: Mapped[datetime.datetime]
    customer: Mapped[Customer] = relationship(back_populates="orders")


@dataclass
class DemoResult:
    """Figures of one run of the request mix."""

    requests: int
    queries: int
    statements: int
    seconds: float


def _seed(session: Session, customers: int) -> None:
    rnd = random.Random(7)
    codes = ["DE", "FR", "IT", "ES", "NL", "PL", "SE", "AT"]
    session.add_all(Country(code=c, name=f"Country {c}") for c in codes)
    for i in range(1, customers + 1):
        session.add(Customer(id=i, name=f"customer {i}", country_code=rnd.choice(codes)))
    for i in range(1, customers * 5 + 1):
        session.add(
            Order(
                id=i,
                customer_id=rnd.randint(1, customers),
                total=decimal.Decimal(rnd.randint(100, 99_999)) / 100,
                placed=datetime.datetime(2026, 1, 1) + datetime.timedelta(minutes=i),
            )
        )
    session.commit()


def _request(session: Session, rnd: random.Random, customers: int, cached: bool) -> int:
    """One web request: a few reads, now and then a write. Returns queries run."""
    opts = (with_cache(ttl=300),) if cached else ()
    cid = min(int(rnd.paretovariate(1.2)), customers)
    session.scalars(select(Country).order_by(Country.code).options(*opts)).all()
    customer = session.scalars(select(Customer).where(Customer.id == cid).options(*opts)).one()
    session.scalars(
        select(Order)
        .where(Order.customer_id == customer.id)
        .order_by(Order.placed.desc())
        .limit(10)
        .options(*opts)
    ).all()
    session.execute(
        select(Customer.country_code, func.count(Customer.id))
        .group_by(Customer.country_code)
        .options(*opts)
    ).all()
    session.scalars(
        select(Customer)
        .where(Customer.country_code == customer.country_code)
        .order_by(Customer.id)
        .limit(5)
        .options(selectinload(Customer.orders), *opts)
    ).all()
    if rnd.random() < 0.05:  # a purchase: invalidates the orders queries
        session.add(
            Order(customer_id=cid, total=decimal.Decimal("9.99"), placed=datetime.datetime.now())
        )
        session.commit()
    return 5


def run_demo(
    url: str | None,
    requests: int = 2000,
    customers: int = 500,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[DemoResult, DemoResult, Cache]:
    """Run the same request mix uncached and cached; return both figures and the cache.

    ``progress(name, n)`` is told every ``n`` requests done; it adds up to ``requests``.
    """
    for name, value in (("requests", requests), ("customers", customers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cache = Cache.from_url(url, namespace=f"demo{random.randrange(10**6)}", default_ttl=300)
    results: list[DemoResult] = []
    for cached in (False, True):
        engine = sa.create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        _Base.metadata.create_all(engine)
        with Session(engine) as s:
            _seed(s, customers)
        count = [0]

        def counter(*args: object, _count: list[int] = count) -> None:
            _count[0] += 1

        event.listen(engine, "before_cursor_execute", counter)
        factory: sessionmaker[Session] = (
            sessionmaker(engine, class_=CachingSession, cache=cache)
            if cached
            else sessionmaker(engine)
        )
        rnd = random.Random(42)
        queries = 0
        started = time.perf_counter()
        for i in range(requests):
            with factory() as session:
                queries += _request(session, rnd, customers, cached)
            if progress is not None and ((i + 1) % 50 == 0 or i + 1 == requests):
                progress("cached" if cached else "uncached", i % 50 + 1)
        elapsed = time.perf_counter() - started
        results.append(DemoResult(requests, queries, count[0], elapsed))
        engine.dispose()
    cache._on_close.append(lambda: _drop_keys(cache))  # after its background work stops
    return results[0], results[1], cache


def _drop_keys(cache: Cache) -> None:
    """Delete every key of the demo's throwaway namespace from a Redis store: each run
    uses a new one, and generations have no TTL, so a run on a user's Redis would leave
    keys behind forever. (The memory store goes with the process.)"""
    backend = cache.backend
    if not isinstance(backend, Scanning):
        return
    unwatch_epoch(cache)  # a new connection must not write the namespace's epoch key back
    try:
        found = backend.scan_keys(f"{cache.namespace}:*", 1000)
        backend.unlink_many([k.decode() if isinstance(k, bytes) else k for k in found])
    except BackendError as exc:
        log.warning("sa_cache demo: could not delete its keys (%s)", exc)
