"""Warming benchmark: a 100,000-row reference table, warmed vs loaded one by one.

Run: ``.venv/bin/python benchmarks/warming.py [--pg URL] [--redis URL] [--rows N]
[--sample N] [--repeats R] [--quick] [--json PATH]``

On a real PostgreSQL and Redis, with a table of mixed column types created for the run
(and dropped after it), each round times:

1. ``Warmer.reference(Model, all_rows=False)`` on an empty namespace: every row as an
   entity entry, in guarded pipelined batches (scan, MGET, lease, load, CAS);
2. the same run again over the entries it wrote (the refresh a schedule does);
3. ``Warmer.reference(Model)`` with the cached all-rows ``select(Model)`` as well (one
   ORM load of the whole table and one large entry on top of 1.);
4. the naive way to warm: ``session.get(Model, pk)`` one by one through a
   ``CachingSession`` (each a miss that loads and fills), on ``--sample`` rows;
5. for scale, ``session.get`` one by one on a plain Session (no cache).

and prints rows/s and ratios from the one run, the median over ``--repeats`` rounds
(the variants alternate inside a round, so a slow moment of the machine hits all of
them). Issue 8's target, warming >= 20x faster than one-by-one ``session.get``
through the cache, is reported, not asserted. The run fails (exit 1) if a sample of
reads after warming is not served from the cache without SQL.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import redis
import sqlalchemy as sa
from _common import (
    Target,
    base_parser,
    cannot_reach,
    delete_namespace_keys,
    environment,
    fmt_ratio,
    print_table,
    print_targets,
    redact_url,
    run_id,
    write_json,
)
from _items import fill_table
from sqlalchemy import DateTime, Numeric, String, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sa_cache
from sa_cache.warming import Warmer

RUN = run_id()
TABLE = f"bench_warm_{RUN}"
NAMESPACE = f"sa_cache_bench_warm_{RUN}"
DEFAULT_ROWS, QUICK_ROWS = 100_000, 20_000
DEFAULT_SAMPLE, QUICK_SAMPLE = 10_000, 2_000
TIMEOUTS = {"socket_timeout": 5.0, "connect_timeout": 2.0}


class Base(DeclarativeBase):
    pass


class Country(Base):
    """A wide-ish reference row: ids, names, codes, money, dates, flags."""

    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(12))
    name: Mapped[str] = mapped_column(String(64))
    region: Mapped[str] = mapped_column(String(16))
    rate: Mapped[Decimal] = mapped_column(Numeric(10, 4))
    population: Mapped[int]
    active: Mapped[bool]
    updated_at: Mapped[datetime] = mapped_column(DateTime)


def country_rows(count: int) -> Iterator[dict[str, Any]]:
    rnd = random.Random(8)
    start = datetime(2024, 1, 1, 6, 0)
    regions = ["africa", "americas", "asia", "europe", "oceania"]
    for i in range(1, count + 1):
        yield {
            "id": i,
            "code": f"C{i:07d}",
            "name": f"place {i} " + "".join(rnd.choices("abcdefghij", k=10)),
            "region": regions[i % len(regions)],
            "rate": Decimal(rnd.randrange(1, 10**8)) / 10**4,
            "population": rnd.randrange(10**3, 10**9),
            "active": i % 9 != 0,
            "updated_at": start + timedelta(seconds=37 * i),
        }


def seed(engine: sa.Engine, rows: int) -> None:
    """Create the table with ``rows`` rows, inserted 10,000 at a time."""
    fill_table(engine, Country.__table__, country_rows(rows), batch=10_000)


class Bench:
    def __init__(self, pg: str, redis_url: str, rows: int, sample: int) -> None:
        self.engine = sa.create_engine(pg, pool_size=5)
        self.redis_url = redis_url
        self.rows = rows
        self.sample = sample
        self.namespaces: list[str] = []
        self.statements = 0
        event.listen(self.engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        self.statements += 1

    def cache(self, label: str) -> sa_cache.Cache:
        namespace = f"{NAMESPACE}_{label}_{len(self.namespaces)}"
        self.namespaces.append(namespace)
        cache = sa_cache.Cache.from_url(self.redis_url, namespace=namespace, **TIMEOUTS)
        cache.register(Country, ttl=3600)
        return cache

    def factory(self, cache: sa_cache.Cache) -> sessionmaker[Session]:
        return sessionmaker(self.engine, class_=sa_cache.CachingSession, cache=cache)

    def warm(self, all_rows: bool, again: bool) -> tuple[float, int]:
        """Seconds and rows of one reference() run (``again``: over its own entries)."""
        cache = self.cache("warm")
        try:
            warmer = Warmer(cache, self.factory(cache))
            warmer.reference(Country, all_rows=all_rows)
            if again:
                assert warmer.run().ok
            started = time.perf_counter()
            report = warmer.run()
            seconds = time.perf_counter() - started
            if not report.ok:
                raise RuntimeError(f"warming failed: {report.failed[0].error}")
            self.check_hits(cache)
            return seconds, report.rows
        finally:
            self.drop(cache)

    def one_by_one(self, cached: bool) -> tuple[float, int]:
        """Seconds and rows of ``session.get`` one by one over a random sample."""
        ids = random.Random(len(self.namespaces)).sample(range(1, self.rows + 1), self.sample)
        cache = self.cache("get") if cached else None
        make: Callable[[], Session] = (
            self.factory(cache) if cache is not None else sessionmaker(self.engine)
        )
        try:
            started = time.perf_counter()
            with make() as session:
                for i in ids:
                    assert session.get(Country, i) is not None
            if cache is not None:
                cache.wait_for_fills()  # the last fill is stored in the background
            seconds = time.perf_counter() - started
            if cache is not None and cache.stats["entity.fill"] != len(ids):
                raise RuntimeError("the one-by-one reads did not each fill an entry")
            return seconds, len(ids)
        finally:
            if cache is not None:
                self.drop(cache)

    def check_hits(self, cache: sa_cache.Cache) -> None:
        ids = random.Random(1).sample(range(1, self.rows + 1), 200)
        hits = cache.stats["entity.hit"]
        before = self.statements
        with self.factory(cache)() as session:
            for i in ids:
                assert session.get(Country, i) is not None
        if self.statements != before or cache.stats["entity.hit"] - hits != len(ids):
            raise RuntimeError("reads after warming were not all served from the cache")

    def drop(self, cache: sa_cache.Cache) -> None:
        client = redis.Redis.from_url(self.redis_url)
        try:
            delete_namespace_keys(client, [cache.namespace])
        finally:
            client.close()
            cache.close()

    def close(self) -> None:
        Base.metadata.drop_all(self.engine)
        self.engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_ROWS, QUICK_ROWS)
    parser.add_argument("--rows", type=int, help=f"rows in the table (default {DEFAULT_ROWS})")
    parser.add_argument(
        "--sample", type=int, help=f"rows read one by one per round (default {DEFAULT_SAMPLE})"
    )
    args = parser.parse_args(argv)
    rows = args.rows or args.n or (QUICK_ROWS if args.quick else DEFAULT_ROWS)
    sample = min(rows, args.sample or (QUICK_SAMPLE if args.quick else DEFAULT_SAMPLE))
    repeats = args.repeats or (1 if args.quick else 3)
    bench = Bench(args.pg, args.redis, rows, sample)
    try:
        print(f"seeding {rows:,} rows into {TABLE} ...", flush=True)
        seed(bench.engine, rows)
    except (redis.ConnectionError, sa.exc.OperationalError) as exc:
        return cannot_reach(exc)
    variants: dict[str, Callable[[], tuple[float, int]]] = {
        "warm (entities, empty cache)": lambda: bench.warm(all_rows=False, again=False),
        "warm again (entities, refresh)": lambda: bench.warm(all_rows=False, again=True),
        "warm (entities + all-rows query)": lambda: bench.warm(all_rows=True, again=False),
        "session.get one by one, CachingSession": lambda: bench.one_by_one(cached=True),
        "session.get one by one, no cache": lambda: bench.one_by_one(cached=False),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for round_no in range(repeats):
            order = list(variants)
            random.Random(round_no).shuffle(order)
            for name in order:
                print(f"round {round_no + 1}/{repeats}: {name} ...", flush=True)
                took, done = variants[name]()
                seconds[name].append(took)
                rates[name].append(done / took)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    median = {name: statistics.median(r) for name, r in rates.items()}
    baseline = median["session.get one by one, CachingSession"]
    table = []
    for name in variants:
        n = rows if name.startswith("warm") else sample
        table.append(
            [
                name,
                f"{n:,}",
                f"{statistics.median(seconds[name]):.2f}",
                f"{median[name]:,.0f}",
                f"{rows / median[name]:.1f}",
                fmt_ratio(median[name] / baseline),
            ]
        )
    print()
    print(
        f"warming benchmark: {rows:,} rows on PostgreSQL + Redis, {repeats} round(s), "
        f"one-by-one reads on {sample:,} random rows per round; medians"
    )
    headers = ["variant", "rows", "s", "rows/s", f"s for {rows:,}", "vs one by one"]
    print_table(headers, table, right=range(1, 6))
    target = Target(
        "warming vs session.get one by one through the cache",
        median["warm (entities, empty cache)"] / baseline,
        ">=",
        20.0,
        min(rates["warm (entities, empty cache)"]) / max(rates[list(variants)[3]]),
        max(rates["warm (entities, empty cache)"]) / min(rates[list(variants)[3]]),
    )
    print()
    print_targets([target])
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "warming",
                "settings": {
                    "rows": rows,
                    "sample": sample,
                    "repeats": repeats,
                    "postgres": redact_url(args.pg),
                    "redis": redact_url(args.redis),
                },
                "rows_per_second": {k: round(v, 1) for k, v in median.items()},
                "targets": [target.as_dict()],
                "environment": environment(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
