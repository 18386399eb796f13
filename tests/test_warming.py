"""The warming runner: reference, hot, query and predictive targets, schedules, commits, CLI.

Runs on SQLite + memory:// and on PostgreSQL + Redis. The tables are this file's own
(``sacw_*``), so other test files can run against the same databases at once.
"""

from __future__ import annotations

import datetime
import decimal
import logging
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from conftest import _connect_args, database_url
from helpers import StatementLog
from sqlalchemy import ForeignKey, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

import sa_cache
from sa_cache import access_stats, query
from sa_cache.backends.base import NO_VALUE
from sa_cache.cli_warm import warm
from sa_cache.entity import LEASE_PREFIX
from sa_cache.tokens import TOMBSTONE_PREFIX
from sa_cache.warming import REFRESH_OPTION, Warmer
from sa_cache.warming_schedule import Cron, Interval, parse_schedule


class WBase(DeclarativeBase):
    pass


class Country(WBase):
    __tablename__ = "sacw_countries"
    code: Mapped[str] = mapped_column(sa.String(3), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class Customer(WBase):
    __tablename__ = "sacw_customers"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50))
    country_code: Mapped[str] = mapped_column(ForeignKey("sacw_countries.code"))
    last_login: Mapped[datetime.datetime] = mapped_column(sa.DateTime())
    country: Mapped[Country] = relationship()
    orders: Mapped[list[Order]] = relationship(back_populates="customer", order_by="Order.id")


class Order(WBase):
    __tablename__ = "sacw_orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(ForeignKey("sacw_customers.id"))
    total: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2))
    customer: Mapped[Customer] = relationship(back_populates="orders")


class Price(WBase):
    __tablename__ = "sacw_prices"
    region: Mapped[str] = mapped_column(sa.String(5), primary_key=True)
    sku: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    amount: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(8, 2))


class Missing(DeclarativeBase):
    pass


class Ghost(Missing):
    """A mapped table that is never created: selecting it fails."""

    __tablename__ = "sacw_ghosts"
    id: Mapped[int] = mapped_column(primary_key=True)


COUNTRIES = 30
CUSTOMERS = 20


def seed(session: sa.orm.Session) -> None:
    session.add_all(Country(code=f"C{i:02d}", name=f"country {i}") for i in range(COUNTRIES))
    base = datetime.datetime(2024, 1, 1, 8, 0, 0)
    for i in range(1, CUSTOMERS + 1):
        session.add(
            Customer(
                id=i,
                name=f"customer {i}",
                country_code=f"C{i % 3:02d}",
                last_login=base + datetime.timedelta(hours=i),
                orders=[
                    Order(id=i * 10 + k, total=decimal.Decimal(i * 10 + k) / 4) for k in (1, 2)
                ],
            )
        )
    session.add_all(
        Price(region=r, sku=s, amount=decimal.Decimal(s) + 1)
        for r in ("eu", "us")
        for s in range(5)
    )
    session.commit()


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sa.orm.sessionmaker[sa.orm.Session]
    log: StatementLog
    url: str

    def warmer(self, **kwargs: Any) -> Warmer:
        return Warmer(self.cache, self.Session, **kwargs)

    def entry(self, model: Any, *pk: Any) -> bytes | None:
        spec = self.cache.entities[sa.inspect(model)]
        raw = self.cache.fetch([spec.key(self.cache, pk)])[0]
        return None if raw is NO_VALUE else raw


def _drop_namespace(url: str, namespace: str) -> None:
    if not url.startswith("redis"):
        return
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()


@pytest.fixture(params=["sqlite+memory", "postgresql+redis"])
def env(request: pytest.FixtureRequest, tmp_path: Any, namespace: str) -> Iterator[Env]:
    if request.param == "sqlite+memory":
        engine = sa.create_engine(f"sqlite:///{tmp_path}/warm.db")

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_conn: Any, record: Any) -> None:
            dbapi_conn.execute("PRAGMA journal_mode=WAL")

        url = "memory://"
    else:
        db = database_url("postgresql")
        engine = sa.create_engine(db, connect_args=_connect_args(db))
        url = str(request.getfixturevalue("redis_url"))
    cache = sa_cache.Cache.from_url(url, namespace=namespace)
    for model in (Country, Customer, Order, Price):
        cache.register(model, ttl=600)
    WBase.metadata.drop_all(engine)
    WBase.metadata.create_all(engine)
    with sa.orm.Session(engine) as s:
        seed(s)
    log = StatementLog()
    sa.event.listen(engine, "before_cursor_execute", log)
    factory = sa.orm.sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        yield Env(engine, cache, factory, log, url)
    finally:
        sa.event.remove(engine, "before_cursor_execute", log)
        WBase.metadata.drop_all(engine)
        engine.dispose()
        cache.close()
        _drop_namespace(url, namespace)


# -- reference, hot, query ------------------------------------------------------------------


def test_reference_warms_every_row_and_the_all_rows_query(env: Env) -> None:
    warmer = env.warmer(batch_size=7)  # several keyset batches, the last one short
    target = warmer.reference(Country)
    assert warmer.reference(Country) is target  # declaring twice is harmless
    report = warmer.run()
    assert report.ok, report.failed
    (result,) = report.results
    assert (result.rows, result.entries, result.skipped) == (COUNTRIES, COUNTRIES + 1, 0)
    assert result.bytes > 0
    env.log.clear()
    with env.Session() as s:
        for i in range(COUNTRIES):
            country = s.get(Country, f"C{i:02d}")
            assert country is not None
            assert country.name == f"country {i}"
        assert target.statement is not None
        assert len(s.scalars(target.statement).all()) == COUNTRIES
    assert env.log.selects == []


def test_reference_with_a_composite_key_and_without_the_query(env: Env) -> None:
    warmer = env.warmer(batch_size=3)
    warmer.reference(Price, all_rows=False)
    (result,) = warmer.run().results
    assert (result.rows, result.entries) == (10, 10)
    env.log.clear()
    with env.Session() as s:
        price = s.get(Price, ("us", 4))
        assert price is not None
        assert price.amount == decimal.Decimal("5.00")
        assert s.get(Price, {"region": "eu", "sku": 0}) is not None
    assert env.log.selects == []


def test_hot_warms_the_rows_it_returns_and_its_cached_result(env: Env) -> None:
    hot = (
        select(Customer)
        .order_by(Customer.last_login.desc())
        .limit(5)
        .options(selectinload(Customer.orders), sa_cache.with_cache(ttl=60))
    )
    warmer = env.warmer()
    warmer.hot(hot)
    (result,) = warmer.run().results
    assert result.ok, result.error
    assert result.rows == 5
    assert result.entries == 1 + 5 + 10  # the query, 5 customers, their 10 orders
    env.log.clear()
    with env.Session() as s:
        assert [c.id for c in s.scalars(hot)] == [20, 19, 18, 17, 16]
        assert [s.get(Customer, i).name for i in (16, 20)] == ["customer 16", "customer 20"]  # type: ignore[union-attr]
        assert s.get(Order, 161) is not None
    assert env.log.selects == []
    with env.Session() as s:
        assert s.get(Customer, 1) is not None  # not a hot row: read from the database
    assert len(env.log.selects) == 1


def test_hot_that_can_warm_nothing_says_so(env: Env, namespace: str) -> None:
    """``hot()`` warms the registered rows a statement loads (and its result if it carries
    ``with_cache``). Given rows of no registered model and no ``with_cache``, it warmed
    nothing and reported "ok" (README audit rc-06: the README example used an
    unregistered model): now the target fails, naming what to do. An empty result
    warms nothing and is fine."""
    warmer = env.warmer()
    warmer.hot(select(Customer.name).order_by(Customer.id).limit(3), name="names")
    warmer.hot(select(Customer.name).where(Customer.id < 0), name="none")
    names, empty = warmer.run().results
    assert not names.ok
    assert "loaded no row of a registered model" in str(names.error)
    assert empty.ok, empty.error
    assert (empty.rows, empty.entries) == (0, 0)
    other = sa_cache.Cache.from_url("memory://", namespace=f"{namespace}-other")
    try:
        other.register(Country, ttl=600)  # not Customer
        factory = sa.orm.sessionmaker(env.engine, class_=sa_cache.CachingSession, cache=other)
        unregistered = Warmer(other, factory)
        unregistered.hot(select(Customer).order_by(Customer.id).limit(3))
        (result,) = unregistered.run().results
        assert not result.ok
        assert "register the model, or add with_cache()" in str(result.error)
    finally:
        other.close()


def test_a_tagged_primary_key_query_is_warmed_as_a_query(env: Env) -> None:
    """A primary-key select given ``with_cache(tags=...)`` is cached as a query, not by
    the entity entry (so ``invalidate_tags`` reaches it): its warmed entry is the
    query's, read back by the next select with no SQL."""
    tagged = select(Customer).where(Customer.id == 7).options(sa_cache.with_cache(tags=("vip",)))
    warmer = env.warmer()
    (result,) = warmer.run([warmer.query(tagged, name="vip-7")]).results
    assert result.ok, result.error
    assert result.entries == 1
    env.log.clear()
    with env.Session() as s:
        assert s.scalars(tagged).one().id == 7
    assert env.log.selects == []
    env.cache.invalidate_tags("vip")
    with env.Session() as s:
        assert s.scalars(tagged).one().id == 7
    assert len(env.log.selects) == 1  # the tag reached what was warmed


def test_query_targets_fill_named_results(env: Env) -> None:
    big = select(Order).where(Order.total > 40).options(sa_cache.with_cache(name="big-orders"))
    warmer = env.warmer()
    named = warmer.query(big)
    plain = warmer.query(select(Country.code).where(Country.code < "C05"), name="few-codes")
    assert named.name == "big-orders"
    report = warmer.run()
    assert report.ok, report.failed
    assert [r.entries for r in report.results] == [1, 1]
    by_key = select(Customer).where(Customer.id == 7).options(sa_cache.with_cache())
    assert warmer.run([warmer.query(by_key, name="one")]).ok  # served by the entity entry
    env.log.clear()
    with env.Session() as s:
        assert len(s.scalars(big).all()) == 10
        assert len(s.execute(plain.statement).all()) == 5  # type: ignore[attr-defined]
        assert s.scalars(by_key).one().name == "customer 7"
    assert env.log.selects == []


def test_warming_is_idempotent_and_keeps_committed_values(env: Env) -> None:
    warmer = env.warmer(batch_size=8)
    warmer.reference(Country)
    first = warmer.run()
    with env.Session() as s:
        s.get(Country, "C03").name = "renamed"  # type: ignore[union-attr]
        s.commit()
    second = warmer.run()
    assert [(r.rows, r.entries, r.skipped) for r in first.results] == [(30, 31, 0)]
    assert [(r.rows, r.entries, r.skipped) for r in second.results] == [(30, 31, 0)]
    env.log.clear()
    with env.Session() as s:
        assert s.get(Country, "C03").name == "renamed"  # type: ignore[union-attr]
        assert s.get(Country, "C04").name == "country 4"  # type: ignore[union-attr]
    assert env.log.selects == []


@pytest.mark.parametrize("before", ["absent", "present"])
@pytest.mark.parametrize("kind", ["reference", "hot"])
def test_a_commit_racing_the_warmer_is_never_overwritten(env: Env, before: str, kind: str) -> None:
    """The warmer has loaded the old row; a commit writes it through; then the warmer
    tries to store what it loaded. Its compare-and-set must lose."""
    if before == "present":
        with env.Session() as s:
            assert s.get(Country, "C07") is not None  # a fill: the entry holds the old row
    assert (env.entry(Country, "C07") is None) == (before == "absent")
    loads: list[str] = []
    fired: list[bool] = []
    window = 1 if kind == "reference" else 2  # a hot statement runs first, then the load

    def commit_in_the_window(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = " ".join(statement.split()).lower()
        if "sacw_countries.name" not in text or "from sacw_countries" not in text:
            return
        loads.append(statement)
        if fired or len(loads) != window:
            return
        fired.append(True)
        assert env.entry(Country, "C07") is not None  # observed, or leased by the warmer
        with env.Session() as w:
            w.get(Country, "C07").name = "committed during the run"  # type: ignore[union-attr]
            w.commit()

    warmer = env.warmer()
    if kind == "reference":
        warmer.reference(Country, all_rows=False)
    else:
        warmer.hot(select(Country).where(Country.code.in_(["C06", "C07", "C08"])))
    sa.event.listen(env.engine, "after_cursor_execute", commit_in_the_window)
    try:
        (result,) = warmer.run().results
    finally:
        sa.event.remove(env.engine, "after_cursor_execute", commit_in_the_window)
    assert fired
    assert result.ok, result.error
    assert result.skipped == 1
    # The commit wrote its image through, or — when the entry held a lease rather than
    # the row the committing Session had loaded — left a tombstone; never the warmer's row.
    raw = env.entry(Country, "C07")
    assert raw is not None
    assert not raw.startswith(LEASE_PREFIX)
    written = not raw.startswith(TOMBSTONE_PREFIX)
    if written:
        assert env.cache.unpack(raw).value[1] == "committed during the run"  # type: ignore[union-attr]
    env.log.clear()
    with env.Session() as s:
        assert s.get(Country, "C07").name == "committed during the run"  # type: ignore[union-attr]
        assert s.get(Country, "C06").name == "country 6"  # type: ignore[union-attr]
    assert len(env.log.selects) == (0 if written else 1)


# -- on_commit --------------------------------------------------------------------------------


def test_on_commit_warms_after_the_outermost_commit_only(env: Env) -> None:
    seen: list[int] = []

    def related(order: Order) -> list[Any]:
        seen.append(order.id)
        mine = select(Order).where(Order.customer_id == order.customer_id)
        return [order.customer, mine.options(sa_cache.with_cache())]

    warmer = env.warmer()
    warmer.on_commit(Order, related)

    def new_order(s: sa.orm.Session, oid: int, customer: int = 3) -> None:
        s.add(Order(id=oid, customer_id=customer, total=1))

    with env.Session() as s:
        new_order(s, 1000)
        s.commit()
    assert seen == [1000]
    env.log.clear()
    with env.Session() as s:
        assert s.get(Customer, 3) is not None
        mine = select(Order).where(Order.customer_id == 3).options(sa_cache.with_cache())
        assert 1000 in [o.id for o in s.scalars(mine)]
    assert env.log.selects == []

    with env.Session() as s:  # a rolled-back transaction
        new_order(s, 1001)
        s.flush()
        s.rollback()
    with env.Session() as s:  # a closed one
        new_order(s, 1001)
        s.flush()
    with env.Session() as s:  # rolled-back and released SAVEPOINTs in a committed one
        new_order(s, 1002)
        savepoint = s.begin_nested()
        new_order(s, 1003)
        s.get(Order, 1000).total = decimal.Decimal(2)  # type: ignore[union-attr]
        s.flush()
        savepoint.rollback()
        with s.begin_nested():
            new_order(s, 1004)
        outer = s.begin_nested()
        inner = s.begin_nested()
        new_order(s, 1005)
        inner.commit()
        outer.rollback()
        assert seen == [1000]  # nothing before the outermost commit
        s.commit()
    assert sorted(seen) == [1000, 1002, 1004]
    with env.Session() as s:  # updates count, unchanged dirty objects do not
        order = s.get(Order, 1002)
        assert order is not None
        order.total = decimal.Decimal(5)
        s.get(Order, 1004).total = s.get(Order, 1004).total  # type: ignore[union-attr]
        s.commit()
    assert sorted(seen) == [1000, 1002, 1002, 1004]


@pytest.mark.parametrize("outcome", ["rollback", "commit"])
def test_on_commit_rules_do_not_run_for_a_session_joined_to_an_outer_transaction(
    env: Env, outcome: str
) -> None:
    """Its commit is not the database's (the outer transaction may roll back), and
    nothing runs after the outer COMMIT: the rules do not run (they used to run at the
    joined Session's commit, for work then rolled back)."""
    seen: list[int] = []
    env.warmer().on_commit(Order, lambda o: seen.append(o.id))
    with env.engine.connect() as conn:
        outer = conn.begin()
        s = env.Session(bind=conn, join_transaction_mode="create_savepoint")
        s.add(Order(id=1000, customer_id=3, total=1))
        s.commit()
        s.close()
        assert seen == []
        getattr(outer, outcome)()
    assert seen == []
    assert env.cache.stats["warm.on_commit_joined"] == 1
    with env.Session() as s:  # an ordinary Session still runs them
        s.add(Order(id=1001, customer_id=3, total=1))
        s.commit()
    assert seen == [1001]


def test_on_commit_failures_never_fail_the_commit(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    deleted: list[int] = []
    warmer = env.warmer()
    warmer.on_commit(Customer, lambda c: 1 / 0)
    warmer.on_commit(Order, lambda o: deleted.append(o.id), deleted=True)
    with caplog.at_level(logging.ERROR, logger="sa_cache"), env.Session() as s:
        s.get(Customer, 2).name = "changed"  # type: ignore[union-attr]
        s.delete(s.get(Order, 21))
        s.commit()
    assert "on_commit warming failed" in caplog.text
    assert env.cache.stats["warm.on_commit_error"] == 1
    assert deleted == [21]
    with env.Session() as s:
        assert s.get(Customer, 2).name == "changed"  # type: ignore[union-attr]


def test_on_commit_needs_the_cache_listeners_first(env: Env) -> None:
    plain = sa.orm.sessionmaker(env.engine)
    with pytest.raises(ValueError, match="after the cache's write-through"):
        Warmer(env.cache, plain).on_commit(Order, lambda o: None)
    env.cache.attach(plain)
    Warmer(env.cache, plain).on_commit(Order, lambda o: None)


# -- predictive -------------------------------------------------------------------------------

DAY0 = datetime.datetime(2024, 3, 4, tzinfo=datetime.timezone.utc).timestamp()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_predictive_warms_what_is_read_most_in_the_coming_bucket(env: Env) -> None:
    clock = FakeClock(DAY0 + 10 * 3600 + 20 * 60)  # 10:20 UTC
    stats = access_stats.configure(env.cache, sample_every=1, clock=clock)
    countries = env.cache.entities[sa.inspect(Country)].table
    for code, reads in (("C01", 5), ("C02", 3), ("C03", 1)):
        for _ in range(reads):
            access_stats.record_entity(env.cache, countries, (code,))
    for _ in range(4):
        access_stats.record_query(env.cache, "big-orders")
    access_stats.record_query(env.cache, "nobody-declared-this")
    clock.now += 3600  # 11:20: another bucket
    for _ in range(10):
        access_stats.record_entity(env.cache, countries, ("C09",))
    stats.flush()

    clock.now = DAY0 + 86400 + 9 * 3600 + 55 * 60  # the next day, 09:55
    warmer = env.warmer(clock=clock)
    big = select(Order).where(Order.total > 40).options(sa_cache.with_cache(name="big-orders"))
    query = warmer.query(big)
    predictive = warmer.predictive(top=3)  # 10:05 is in the 10:00 bucket
    (result,) = warmer.run([predictive]).results
    assert result.ok, result.error
    assert (result.entries, result.skipped) == (3, 0)  # C01, big-orders, C02
    assert env.entry(Country, "C01") is not None
    assert env.entry(Country, "C02") is not None
    assert env.entry(Country, "C03") is None  # fourth: beyond top=3
    assert env.entry(Country, "C09") is None  # read at another time of day
    env.log.clear()
    with env.Session() as s:
        assert len(s.scalars(big).all()) == 10
    assert env.log.selects == []
    assert query.name == "big-orders"


def test_reads_feed_the_access_statistics(env: Env) -> None:
    """What the read paths record: entity keys and named queries (sampled)."""
    stats = access_stats.configure(env.cache, sample_every=1, flush_every=10_000)
    big = select(Order).where(Order.total > 40).options(sa_cache.with_cache(name="big-orders"))
    with env.Session() as s:
        for _ in range(3):
            assert s.get(Country, "C05") is not None
            assert len(s.scalars(big).all()) == 10
    stats.flush()
    top = {(m.kind, m.name, m.pk): n for m, n in stats.top(stats.bucket_of(time.time()), 10)}
    assert top[("e", "sacw_countries", ("C05",))] == 3
    assert top[("q", "big-orders", ())] == 3


def test_a_second_run_renews_query_entries(env: Env) -> None:
    assert query.REFRESH_OPTION == REFRESH_OPTION  # the option the query cache honours
    warmer = env.warmer()
    target = warmer.reference(Country)
    warmer.run()
    assert target.statement is not None
    with env.Session() as s:
        bind = s.get_bind(mapper=sa.inspect(Country))
    key = query.query_key(env.cache, target.statement, bind)
    first = env.cache.unpack(env.cache.fetch([key])[0])
    warmer.run()
    second = env.cache.unpack(env.cache.fetch([key])[0])
    assert first is not NO_VALUE
    assert second is not NO_VALUE
    assert second.created_at > first.created_at  # stored again, not served


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_access_stats_decay_sample_and_stay_bounded(
    store: str, namespace: str, request: Any
) -> None:
    url = "memory://" if store == "memory" else str(request.getfixturevalue("redis_url"))
    cache = sa_cache.Cache.from_url(url, namespace=namespace)
    clock = FakeClock(DAY0 + 3600)
    try:
        stats = access_stats.configure(
            cache, sample_every=1, capacity=4, half_life_days=1, flush_every=1000, clock=clock
        )
        for _ in range(8):
            access_stats.record_entity(cache, "t", (1,))
        stats.flush()
        clock.now += 86400
        for _ in range(5):
            access_stats.record_entity(cache, "t", (2,))
        stats.flush()
        ranked = [(m.pk, round(score, 3)) for m, score in stats.top(1, 10)]
        assert ranked == [((2,), 5.0), ((1,), 4.0)]  # yesterday's 8 reads count half
        for i in range(100, 110):
            stats.record(access_stats.Member("e", "t", (i,)), weight=1 + i)
        stats.flush()
        top = stats.top(1, 100)
        assert len(top) <= 5  # capacity 4, trimmed past capacity + 25 %
        assert top[0][0].pk == (109,)

        sampled = access_stats.configure(cache, sample_every=16, flush_every=10_000, clock=clock)
        for _ in range(1600):
            access_stats.record_query(cache, "q")
        sampled.flush()
        (member, score), *_ = [m for m in sampled.top(1, 10) if m[0].kind == "q"]
        assert member.name == "q"
        assert 800 <= score <= 2400  # 1600 reads, estimated from about 100 samples
        assert cache.stats["access_stats.dropped"] == 0
    finally:
        access_stats.stats_for(cache).forget()
        cache.close()
        _drop_namespace(url, namespace)


# -- scheduling -------------------------------------------------------------------------------


def test_schedules_parse_cron_and_intervals() -> None:
    assert parse_schedule(90) == Interval(90.0)
    assert parse_schedule("15m") == Interval(900.0)
    assert parse_schedule(datetime.timedelta(hours=2)) == Interval(7200.0)
    hourly = parse_schedule("0 * * * *")
    assert isinstance(hourly, Cron)
    assert hourly.next_after(DAY0 + 10 * 3600 + 1) == DAY0 + 11 * 3600
    with pytest.raises(ValueError, match="not a cron expression"):
        parse_schedule("every tuesday")
    with pytest.raises(ValueError, match="positive"):
        parse_schedule(0)


def test_scheduler_fires_on_a_fake_clock_and_survives_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = sa_cache.Cache.from_url("memory://")
    factory = sa.orm.sessionmaker(
        sa.create_engine("sqlite://"), class_=sa_cache.CachingSession, cache=cache
    )
    clock = FakeClock(DAY0 + 9 * 3600 + 58 * 60)  # 09:58
    fired: dict[str, list[float]] = {"minutely": [], "hourly": [], "broken": []}

    def job(name: str, fail: bool = False) -> Any:
        def run() -> None:
            fired[name].append(clock.now)
            if fail:
                raise RuntimeError("the database is on fire")

        run.__name__ = name
        return run

    warmer = Warmer(cache, factory, clock=clock)
    warmer.every(60, job("minutely"))
    warmer.every("0 * * * *", job("hourly"))
    warmer.every("*/5 * * * *", job("broken", fail=True))
    scheduler = warmer.scheduler(sleep=clock.sleep)
    with caplog.at_level(logging.ERROR, logger="sa_cache"):
        ran = scheduler.run_forever(max_runs=10)
    assert ran == 10
    minute = 60.0
    start = DAY0 + 9 * 3600 + 58 * minute
    assert fired["minutely"] == [start + k * minute for k in range(1, 8)]  # 09:59 to 10:05
    assert fired["hourly"] == [DAY0 + 10 * 3600]
    assert fired["broken"] == [DAY0 + 10 * 3600, DAY0 + 10 * 3600 + 5 * minute]
    assert "warming job 'broken' failed: the database is on fire" in caplog.text
    broken = next(j for j in warmer.jobs if j.name == "broken")
    assert (broken.runs, broken.failures) == (2, 2)
    assert broken.next_run == DAY0 + 10 * 3600 + 10 * minute
    assert max(clock.slept) <= scheduler.tick


# -- bad input and a store that is down ---------------------------------------------------------


def test_declarations_are_checked(env: Env) -> None:
    warmer = env.warmer()
    with pytest.raises(ValueError, match="Ghost is not registered"):
        warmer.reference(Ghost)
    with pytest.raises(TypeError, match="select"):
        warmer.hot(sa.text("SELECT 1"))
    warmer.query(select(Country), name="all")
    with pytest.raises(ValueError, match="already declared"):
        warmer.query(select(Customer), name="all")
    with pytest.raises(KeyError, match="no warming target named 'nope'"):
        warmer.every(60, "nope")
    with pytest.raises(ValueError, match="batch_size"):
        env.warmer(batch_size=0)
    scoped = sa.orm.scoped_session(env.Session)
    assert Warmer(env.cache, scoped).session_factory is env.Session  # never the thread's own


def test_an_unreachable_store_fails_the_target_not_the_caller(env: Env, namespace: str) -> None:
    down = sa_cache.Cache.from_url("redis://127.0.0.1:1/0", namespace=namespace)
    down.register(Country)
    factory = sa.orm.sessionmaker(env.engine, class_=sa_cache.CachingSession, cache=down)
    warmer = Warmer(down, factory)
    warmer.reference(Country)
    try:
        report = warmer.run()
    finally:
        down.close()
    assert not report.ok
    assert "did not answer" in str(report.failed[0].error)


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture
def app(env: Env, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("sacw_app")
    warmer = env.warmer()
    warmer.reference(Country)
    warmer.hot(select(Customer).order_by(Customer.last_login.desc()).limit(3))
    module.warmer = warmer  # type: ignore[attr-defined]
    broken = env.warmer()
    broken.reference(Country)
    broken.hot(select(Ghost), name="ghosts")
    module.broken = broken  # type: ignore[attr-defined]
    module.make = lambda url: warmer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sacw_app", module)
    return module


def test_cli_warms_then_reads_hit_without_sql(env: Env, app: types.ModuleType) -> None:
    result = CliRunner().invoke(warm, ["sacw_app:warmer", "--url", env.url])
    assert result.exit_code == 0, result.output
    for label in ("reference:Country", "hot:Customer", "rows", "entries", "bytes", "rows/s"):
        assert label in result.output
    assert "total" in result.output
    env.log.clear()
    with env.Session() as s:
        assert s.get(Country, "C12") is not None
        assert [s.get(Customer, i).name for i in (18, 19, 20)]  # type: ignore[union-attr]
        assert len(s.scalars(app.warmer.target("reference:Country").statement).all()) == 30
    assert env.log.selects == []


def test_cli_dry_run_touches_nothing(env: Env, app: types.ModuleType) -> None:
    result = CliRunner().invoke(warm, ["sacw_app:make", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "reference:Country" in result.output
    assert "every Country row" in result.output
    assert env.entry(Country, "C00") is None
    assert env.log.statements == []


def test_cli_names_the_failed_target(env: Env, app: types.ModuleType) -> None:
    result = CliRunner().invoke(warm, ["sacw_app:broken"])
    assert result.exit_code == 1
    assert "warming failed for 1 target(s): ghosts:" in result.output
    assert env.entry(Country, "C00") is not None  # the other target still ran
    bad = CliRunner().invoke(warm, ["sacw_app:nothing"])
    assert bad.exit_code == 2
    assert "cannot load sacw_app:nothing" in bad.output


def test_cli_schedule_keeps_running_past_failures(env: Env, app: types.ModuleType) -> None:
    app.broken.every("0.01s", "ghosts")
    app.broken.every("0.01s", "reference:Country")
    result = CliRunner().invoke(warm, ["sacw_app:broken", "--schedule", "--max-runs", "4"])
    assert result.exit_code == 0, result.output
    assert "ghosts failed" in result.output
    assert "reference:Country: 30 rows, 31 entries" in result.output
    assert "4 runs, 2 failed" in result.output
    assert CliRunner().invoke(warm, ["sacw_app:warmer", "--schedule"]).exit_code == 2
