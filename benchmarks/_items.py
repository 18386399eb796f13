"""The ``Item`` table of the cache-hit benchmarks, and what they share around it.

``query_cache.py`` and ``entity_cache.py`` each create an 11-column table of mixed types
(`ItemColumns`) with the same 1,000 rows (`seed`), compare sa_cache hits with a raw
read of the entry they serve (`get_entry`, `mget_entry`) and the bare round trips
(`round_trip_variants`), and check what each timed run did with probes on the cache's
stats (`StatsProbe`). `fill_table` creates and fills any benchmark's table.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import redis
import sqlalchemy as sa
from _common import Checks, Variant
from sqlalchemy import JSON, DateTime, Numeric, String
from sqlalchemy.orm import Mapped, mapped_column

import sa_cache
from sa_cache.codec import decode

ROWS_IN_TABLE = 1000
# Longer than the defaults (0.25 s) so a scheduler hiccup is not a miss that fails the
# run; the timeouts do not change the cost of a hit.
TIMEOUTS = {"socket_timeout": 2.0, "connect_timeout": 2.0}

RAW_SCENARIOS = [
    ("raw", "raw redis GET + decode"),
    ("mget", "raw MGET of a hit's keys + decode"),
]
ROUND_TRIPS = [
    ("redis", "Redis PING (round trip)"),
    ("pg", "PG SELECT 1 (round trip, Core)"),
]
MODES = [("reused", "reused"), ("fresh", "fresh")]


# -- the table -------------------------------------------------------------------------------


class ItemColumns:
    """The columns of ``Item``, in table order: a declarative mixin. Each script maps it::

        class Base(DeclarativeBase):
            pass


        class Item(ItemColumns, Base):
            __tablename__ = TABLE

    at module level, with a MetaData of its own (the table is the only one `fill_table` and
    `drop_table` create and drop), and where pickle finds it: query_cache.py pickles
    loaded ``Item`` objects (its dogpile-style variant), which a class made inside a
    function would not allow.
    """

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(64))
    category: Mapped[str] = mapped_column(String(32))
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    qty: Mapped[int]
    rating: Mapped[float]
    active: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    note: Mapped[str | None] = mapped_column(String(200))
    attrs: Mapped[dict[str, Any]] = mapped_column(JSON)


def item_rows(count: int) -> Iterator[dict[str, Any]]:
    """Rows 1 .. ``count`` of mixed types (some NULLs), the same in every run."""
    rnd = random.Random(42)
    start = datetime(2024, 1, 1, 9, 30)
    categories = ["books", "games", "garden", "kitchen", "music", "tools"]
    for i in range(1, count + 1):
        yield {
            "id": i,
            "name": f"item {i:04d} " + "".join(rnd.choices("abcdefghij", k=12)),
            "category": categories[i % len(categories)],
            "price": Decimal(rnd.randrange(100, 100_000)) / 100,
            "qty": rnd.randrange(0, 500),
            "rating": round(rnd.uniform(0, 5), 3),
            "active": i % 7 != 0,
            "created_at": start + timedelta(minutes=17 * i, microseconds=i),
            "updated_at": (start + timedelta(hours=i)).replace(tzinfo=timezone.utc)
            if i % 3
            else None,
            "note": None if i % 2 else f"note for item {i}",
            "attrs": {"color": rnd.choice(["red", "green", "blue"]), "tags": [i % 5, i % 11]},
        }


def seed(engine: sa.Engine, table: sa.FromClause, rows: int = ROWS_IN_TABLE) -> None:
    """Create the ``Item`` table ``table`` with ``rows`` rows of `item_rows`."""
    fill_table(engine, table, item_rows(rows))


def _table(table: sa.FromClause) -> sa.Table:
    """``table`` (a mapped class's ``__table__``, typed as a FromClause) as the Table it is."""
    if not isinstance(table, sa.Table):
        raise TypeError(f"expected a Table, got {table!r}")
    return table


def fill_table(
    engine: sa.Engine, table: sa.FromClause, rows: Iterable[dict[str, Any]], batch: int = 10_000
) -> None:
    """Drop and create ``table`` (its MetaData), insert ``rows`` ``batch`` at a time in one
    transaction, and ANALYZE it."""
    table = _table(table)
    table.metadata.drop_all(engine)
    table.metadata.create_all(engine)
    pending = iter(rows)
    with engine.begin() as conn:
        while chunk := list(itertools.islice(pending, batch)):
            conn.execute(table.insert(), chunk)
        conn.exec_driver_sql(f"ANALYZE {table.name}")


def drop_table(engine: sa.Engine, table: sa.FromClause) -> None:
    """Drop ``table`` (its MetaData) and say so."""
    table = _table(table)
    table.metadata.drop_all(engine)
    print(f"cleanup: dropped table {table.name}")


# -- raw reads and round trips, for scale -------------------------------------------------


def get_entry(client: redis.Redis, key: str) -> Any:
    """The decoded value of the sa_cache entry at ``key``: a redis GET, no Session."""
    raw = client.get(key)
    if not isinstance(raw, bytes):
        raise RuntimeError(f"raw GET: no entry at {key}")
    return decode(raw).value


def mget_entry(client: redis.Redis, keys: Sequence[str]) -> Any:
    """The decoded value of the entry at ``keys[0]``, read in one MGET with ``keys[1:]``."""
    raws = client.mget(keys)
    if not isinstance(raws[0], bytes):
        raise RuntimeError(f"raw MGET: no entry at {keys[0]}")
    return decode(raws[0]).value


def round_trip_variants(
    prefix: str, client: redis.Redis, pg_conn: sa.Connection | None, n: int, warmup: int
) -> list[Variant]:
    """A Redis PING and a PostgreSQL ``SELECT 1``: the round trips everything is built on."""
    assert pg_conn is not None
    return [
        Variant(f"{prefix}redis", client.ping, n, warmup),
        Variant(f"{prefix}pg", lambda: pg_conn.exec_driver_sql("SELECT 1").scalar(), n, warmup),
    ]


# -- checks around timed rounds -----------------------------------------------------------


def stats_delta(cache: sa_cache.Cache, before: dict[str, int]) -> dict[str, int]:
    """How ``cache``'s stats changed since the snapshot ``before`` (after this thread's
    background fills are stored: they count their fills when they land)."""
    cache.wait_for_fills()
    after = cache.stats.snapshot()
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


class StatsProbe:
    """A probe on ``cache``'s stats: `start` takes a snapshot, `delta` is the change since.

    Subclasses check the change in ``stop`` and record it in ``checks``.
    """

    def __init__(self, checks: Checks, label: str, cache: sa_cache.Cache) -> None:
        self.checks, self.label, self.cache = checks, label, cache
        self.before: dict[str, int] = {}

    def start(self) -> None:
        self.cache.wait_for_fills()  # misses store their fills in the background
        self.before = self.cache.stats.snapshot()

    def delta(self) -> dict[str, int]:
        self.cache.wait_for_fills()
        return stats_delta(self.cache, self.before)

    def stop(self, count: int) -> None:
        raise NotImplementedError
