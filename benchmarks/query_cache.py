"""Query cache benchmark: sa_cache hits and misses against the uncached ORM and dogpile.

Run: ``.venv/bin/python benchmarks/query_cache.py [--pg URL] [--redis URL] [--n N]
[--quick] [--json PATH] [--batched] [--new-statements] [--profile]``

On a real PostgreSQL and Redis, for a 1-row select by primary key and a 100-row range
select of an 11-column table of mixed types (created for the run, dropped after it),
in one reused Session and with a fresh Session per request, it times:

1. the uncached ORM query;
2. an sa_cache hit on Redis (L2);
3. an sa_cache hit on ``memory://``;
4. the approach of SQLAlchemy's ``examples/dogpile_caching``: a ``FrozenResult``
   pickled in Redis, replayed with ``merge_frozen_result(load=False)`` (written here);
5. a raw redis GET + decode of the very entry sa_cache reads (no Session at all),
   and, to show where a hit's time goes, a raw MGET of the keys a hit reads (entry,
   commit clock, generations) + decode; and for scale, a Redis PING and a PostgreSQL
   ``SELECT 1`` (the bare round trips);
6. an sa_cache miss (the table's generation is bumped, untimed, before each run).

and prints medians and ratios from the one run, then checks the targets of issue 3
(a missed target is reported, not an error). The run fails (exit 1) if an sa_cache or
dogpile run that should have been a hit was not, or a miss run was not a miss: then
the figures would not measure what they say.

The runs of all variants are interleaved in random order (see `_common.measure`):
on this kind of machine a loopback round trip costs 45 µs in a hot loop and 2-3x that
otherwise, and drifts between the two; ``--batched`` times each variant back to back
instead (hot loops: faster CPU-bound figures, much noisier ratios). ``--profile``
prints a cProfile of 1-row L2 hits in a reused Session instead of the table.

Policies, the same for every variant:

- Each run drops its references to the objects it loaded, so in a reused Session the
  identity map is empty again before the next run (it holds objects weakly) and every
  run builds its objects. Holding them would turn the runs after the first into
  identity-map lookups.
- Statements are built once and executed many times, so building a ``select()`` and
  its cache key (memoized on the statement) is not measured; ``--new-statements``
  builds them in every run instead.
- Each run touches one attribute of every row it got.
"""

from __future__ import annotations

import cProfile
import hashlib
import pickle
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
import sqlalchemy as sa
from _common import (
    Checks,
    Summary,
    Target,
    Variant,
    base_parser,
    cannot_reach,
    delete_namespaces_reported,
    environment,
    fmt_ratio,
    measure,
    print_floor,
    print_table,
    print_targets,
    ratio,
    redact_url,
    round_or_none,
    run_cleanup,
    run_id,
    summary_cells,
    write_json,
)
from _items import (
    MODES,
    RAW_SCENARIOS,
    ROUND_TRIPS,
    ROWS_IN_TABLE,
    TIMEOUTS,
    ItemColumns,
    StatsProbe,
    drop_table,
    get_entry,
    mget_entry,
    round_trip_variants,
    seed,
)
from redis.utils import HIREDIS_AVAILABLE
from sqlalchemy import event, select
from sqlalchemy.orm import (
    DeclarativeBase,
    ORMExecuteState,
    Session,
    UserDefinedOption,
    loading,
    sessionmaker,
)

import sa_cache
from sa_cache.invalidation import table_name
from sa_cache.query import query_key

RUN = run_id()
TABLE = f"bench_items_{RUN}"
NAMESPACE = f"sa_cache_bench_{RUN}"
MISS_NAMESPACE = f"{NAMESPACE}_miss"
ONE_ID = 500
RANGE_START = 301  # the 100-row select reads ids RANGE_START .. RANGE_START + 99

DEFAULT_N = 3000
QUICK_N = 300
ROWS100_DIVISOR = 5  # the 100-row variants run n // 5 times (each costs ~10x more)
PROFILE_RUNS = 2000


class Base(DeclarativeBase):
    pass


class Item(ItemColumns, Base):
    __tablename__ = TABLE


TABLE_T = Item.__table__
QTY_INDEX = list(TABLE_T.c.keys()).index("qty")


# -- the dogpile_caching example's approach, written for this benchmark -----------------


class FromRedis(UserDefinedOption):
    """Serve the statement from a pickled ``FrozenResult`` in Redis (dogpile-example style)."""

    def __init__(self, ttl: int = 600) -> None:
        super().__init__(payload=None)
        self.ttl = ttl


class FrozenResultSession(Session):
    """A Session whose ``do_orm_execute`` hook serves `FromRedis` statements."""


class FrozenResultStore:
    """What ``examples/dogpile_caching`` does, minus dogpile.cache itself.

    Key: the statement's offline string (SQL + bound values). Miss: run the statement,
    ``freeze()`` the result and pickle it to Redis. Hit: unpickle it and replay it into
    the Session with ``merge_frozen_result(..., load=False)``.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.sql_strings: dict[Any, str] = {}
        self.hits = 0
        self.misses = 0

    def key(self, state: ORMExecuteState) -> str:
        statement: Any = state.statement
        ck = statement._generate_cache_key()
        assert ck is not None
        offline = ck.to_offline_string(self.sql_strings, state.statement, state.parameters or {})
        return self.prefix + hashlib.sha1(offline.encode()).hexdigest()

    def on_execute(self, state: ORMExecuteState) -> Any:
        opt = next((o for o in state.user_defined_options if isinstance(o, FromRedis)), None)
        if opt is None or not state.is_select:
            return None
        key = self.key(state)
        raw = self.client.get(key)
        if isinstance(raw, bytes):
            self.hits += 1
            frozen = pickle.loads(raw)
            merge: Any = loading.merge_frozen_result
            return merge(state.session, state.statement, frozen, load=False)()
        self.misses += 1
        frozen = state.invoke_statement().freeze()
        self.client.set(key, pickle.dumps(frozen, pickle.HIGHEST_PROTOCOL), ex=opt.ttl)
        return frozen()


# -- checks around timed rounds -----------------------------------------------------------


class CacheProbe(StatsProbe):
    """Every timed run on ``cache`` was a hit (or, for the miss variants, a miss and a fill).

    One probe watches all the variants using one cache; the stats count them together.
    """

    def __init__(self, checks: Checks, label: str, cache: sa_cache.Cache, expect: str) -> None:
        super().__init__(checks, label, cache)
        self.expect = expect

    def stop(self, count: int) -> None:
        delta = self.delta()
        hits, misses = delta.get("query.hit", 0), delta.get("query.miss", 0)
        fills = delta.get("query.fill", 0)
        if self.expect == "hit":
            ok = hits == count and misses == 0
        else:
            ok = misses == count and hits == 0 and fills == count
        self.checks.tally(self.label, runs=count, hits=hits, misses=misses, fills=fills)
        if not ok:
            self.checks.failures.append(
                f"{self.label}: {count} runs expected to be {self.expect}s, got "
                f"{hits} hits, {misses} misses, {fills} fills ({delta})"
            )


class FrozenProbe:
    """Every timed run of the dogpile-style variants was served from Redis."""

    def __init__(self, checks: Checks, label: str, store: FrozenResultStore) -> None:
        self.checks, self.label, self.store = checks, label, store
        self.before = (0, 0)

    def start(self) -> None:
        self.before = (self.store.hits, self.store.misses)

    def stop(self, count: int) -> None:
        hits = self.store.hits - self.before[0]
        misses = self.store.misses - self.before[1]
        self.checks.tally(self.label, runs=count, hits=hits, misses=misses)
        if hits != count or misses:
            self.checks.failures.append(
                f"{self.label}: {count} runs expected to be hits, got {hits} hits, {misses} misses"
            )


class IdentityMapProbe:
    """Notes objects left in a reused Session's identity map after a round (should be none)."""

    def __init__(self, checks: Checks, label: str, session: Session) -> None:
        self.checks, self.label, self.session = checks, label, session

    def start(self) -> None:
        pass

    def stop(self, count: int) -> None:
        left = len(self.session.identity_map)
        if left:
            previous = self.checks.identity_map_leftovers.get(self.label, 0)
            self.checks.identity_map_leftovers[self.label] = max(previous, left)


# -- the operations ------------------------------------------------------------------------


def _touch(objs: Sequence[Item], expect: int) -> int:
    if len(objs) != expect:
        raise RuntimeError(f"expected {expect} rows, got {len(objs)}")
    return sum(o.qty for o in objs)


def reused_op(session: Session, make: Callable[[], Any], expect: int) -> Callable[[], int]:
    def op() -> int:
        return _touch(session.scalars(make()).all(), expect)

    return op


def fresh_op(factory: sessionmaker[Any], make: Callable[[], Any], expect: int) -> Callable[[], int]:
    def op() -> int:
        with factory() as session:
            return _touch(session.scalars(make()).all(), expect)

    return op


def stored_qty(value: Any, expect: int, what: str) -> int:
    """The sum of the ``qty`` column of a decoded query entry, as stored: a direct shape
    of 8 rows or more stores them by column (``["colm", codes, columns, zones]``; see
    ``sa_cache.direct_rows.pack_columns``), fewer as rows."""
    if value and value[0] == "colm":
        column = value[2][QTY_INDEX]
        count, total = len(column), int(sum(column))
    else:
        count, total = len(value), sum(row[QTY_INDEX] for row in value)
    if count != expect:
        raise RuntimeError(f"{what}: expected {expect} rows, got {count}")
    return total


def raw_op(client: redis.Redis, key: str, expect: int) -> Callable[[], int]:
    def op() -> int:
        return stored_qty(get_entry(client, key), expect, "raw GET")

    return op


def raw_mget_op(client: redis.Redis, keys: list[str], expect: int) -> Callable[[], int]:
    def op() -> int:
        # the clock may be absent (no commit yet), as on a hit
        return stored_qty(mget_entry(client, keys), expect, "raw MGET")

    return op


def statement(rows: int, *options: Any) -> Any:
    if rows == 1:
        return select(Item).where(Item.id == ONE_ID).options(*options)
    return select(Item).where(Item.id.between(RANGE_START, RANGE_START + 99)).options(*options)


def maker(rows: int, new_each_run: bool, *options: Any) -> Callable[[], Any]:
    """A function giving the statement to run: the same object, or a new one each call."""
    if new_each_run:
        return lambda: statement(rows, *options)
    built = statement(rows, *options)
    return lambda: built


# -- the benchmark ---------------------------------------------------------------------------

SCENARIOS = [
    ("uncached", "uncached ORM"),
    ("l2", "sa_cache hit, redis (L2)"),
    ("mem", "sa_cache hit, memory://"),
    ("dogpile", "dogpile example (pickle+merge)"),
    ("miss", "sa_cache miss, redis"),
]


class Bench:
    """Engine, caches, Session factories and the variants, with cleanup."""

    def __init__(self, pg_url: str, redis_url: str, new_statements: bool) -> None:
        self.redis_url = redis_url
        self.new_statements = new_statements
        # Enough pooled connections for every reused Session plus fresh ones: an
        # overflow connection would be closed on return and reopened on every run.
        self.engine = sa.create_engine(pg_url, pool_size=12, max_overflow=4)
        self.client = redis.Redis.from_url(redis_url)
        self.l2 = sa_cache.Cache.from_url(redis_url, namespace=NAMESPACE, **TIMEOUTS)
        self.mem = sa_cache.Cache.from_url("memory://", namespace=NAMESPACE)
        self.miss_cache = sa_cache.Cache.from_url(redis_url, namespace=MISS_NAMESPACE, **TIMEOUTS)
        self.frozen = FrozenResultStore(self.client, f"{NAMESPACE}:dogpile:")
        event.listen(FrozenResultSession, "do_orm_execute", self.frozen.on_execute)
        self.factories: dict[str, sessionmaker[Any]] = {
            "uncached": sessionmaker(self.engine),
            "l2": sessionmaker(self.engine, class_=sa_cache.CachingSession, cache=self.l2),
            "mem": sessionmaker(self.engine, class_=sa_cache.CachingSession, cache=self.mem),
            "dogpile": sessionmaker(self.engine, class_=FrozenResultSession),
            "miss": sessionmaker(
                self.engine, class_=sa_cache.CachingSession, cache=self.miss_cache
            ),
        }
        self.reused: dict[str, Session] = {}
        self.checks = Checks()
        self.seeded = False
        self.pg_conn: sa.Connection | None = None

    def options(self, kind: str) -> tuple[Any, ...]:
        if kind == "uncached":
            return ()
        if kind == "dogpile":
            return (FromRedis(),)
        return (sa_cache.with_cache(),)

    def setup(self) -> None:
        self.client.ping()
        self.seeded = True  # from here on, cleanup drops the table (if it exists)
        seed(self.engine, TABLE_T)
        self.reused = {kind: factory() for kind, factory in self.factories.items()}
        self.pg_conn = self.engine.connect()

    def entry_key(self, rows: int) -> str:
        return query_key(self.l2, statement(rows, sa_cache.with_cache()), self.engine)

    def variants(self, n: int, warmup: int) -> list[Variant]:
        checks = self.checks
        store_probes: dict[str, Any] = {
            "l2": CacheProbe(checks, "sa_cache hits, redis", self.l2, "hit"),
            "mem": CacheProbe(checks, "sa_cache hits, memory://", self.mem, "hit"),
            "miss": CacheProbe(checks, "sa_cache misses", self.miss_cache, "miss"),
            "dogpile": FrozenProbe(checks, "dogpile-style hits", self.frozen),
        }
        map_probes = {
            kind: IdentityMapProbe(checks, f"reused {kind} Session", session)
            for kind, session in self.reused.items()
        }
        out: list[Variant] = []
        for rows in (1, 100):
            count = n if rows == 1 else max(1, n // ROWS100_DIVISOR)
            wu = warmup if rows == 1 else max(2, warmup // ROWS100_DIVISOR)
            for mode, _ in MODES:
                for kind, _ in SCENARIOS:
                    make = maker(rows, self.new_statements, *self.options(kind))
                    probes: list[Any] = [store_probes[kind]] if kind in store_probes else []
                    if mode == "reused":
                        op = reused_op(self.reused[kind], make, rows)
                        probes.append(map_probes[kind])
                    else:
                        op = fresh_op(self.factories[kind], make, rows)
                    prepare = self._invalidate_miss_cache if kind == "miss" else None
                    label = f"{rows}/{mode}/{kind}"
                    out.append(Variant(label, op, count, wu, prepare, tuple(probes)))
            key = self.entry_key(rows)
            out.append(Variant(f"{rows}/-/raw", raw_op(self.client, key, rows), count, wu))
            # What a hit reads: the entry, the commit clock and the generations.
            hit_keys = [key, self.l2.clock_key, *self.l2.generation_keys([table_name(TABLE_T)])]
            mget = raw_mget_op(self.client, hit_keys, rows)
            out.append(Variant(f"{rows}/-/mget", mget, count, wu))
        out += round_trip_variants("rt/-/", self.client, self.pg_conn, n, warmup)
        return out

    def _invalidate_miss_cache(self) -> None:
        self.miss_cache.invalidate(Item)

    def close(self) -> None:
        """Drop the table and this run's Redis keys; report, never raise, a failed step."""
        steps: list[tuple[str, Callable[[], object]]] = [
            (f"close {kind} Session", session.close) for kind, session in self.reused.items()
        ]
        if self.pg_conn is not None:
            steps.append(("close the round-trip connection", self.pg_conn.close))
        steps += [
            ("remove the dogpile hook", self._remove_hook),
            ("delete Redis keys", self._delete_keys),
            *[
                (f"close cache {c.namespace}", c.close)
                for c in (self.l2, self.mem, self.miss_cache)
            ],
        ]
        if self.seeded:
            steps.append(("drop the table", self._drop_table))
        steps += [("close the Redis client", self.client.close), ("dispose", self.engine.dispose)]
        run_cleanup(steps)

    def _remove_hook(self) -> None:
        event.remove(FrozenResultSession, "do_orm_execute", self.frozen.on_execute)

    def _delete_keys(self) -> None:
        delete_namespaces_reported(self.client, [NAMESPACE, MISS_NAMESPACE])

    def _drop_table(self) -> None:
        drop_table(self.engine, TABLE_T)


# -- report ------------------------------------------------------------------------------------


def scenario_rows(
    results: dict[str, Summary],
) -> tuple[list[list[str]], list[dict[str, Any]]]:
    table: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for rows in (1, 100):
        if table:
            table.append([])
        raw = results[f"{rows}/-/raw"].median
        for mode, mode_label in MODES:
            uncached = results[f"{rows}/{mode}/uncached"].median
            dogpile = results[f"{rows}/{mode}/dogpile"].median
            for kind, label in SCENARIOS:
                s = results[f"{rows}/{mode}/{kind}"]
                speedup = ratio(uncached, s.median) if kind != "uncached" else None
                over_raw = ratio(s.median, raw) if kind in ("l2", "dogpile") else None
                dog_over = ratio(dogpile, s.median) if kind == "l2" else None
                table.append(row_cells(rows, mode_label, label, s, speedup, over_raw, dog_over))
                records.append(
                    {
                        "rows": rows,
                        "session": mode,
                        "scenario": kind,
                        "label": label,
                        **s.as_dict(),
                        "speedup_vs_uncached": round_or_none(speedup),
                        "over_raw_get": round_or_none(over_raw),
                        "dogpile_over_this": round_or_none(dog_over),
                    }
                )
        for kind, label in RAW_SCENARIOS:
            s = results[f"{rows}/-/{kind}"]
            over_raw = ratio(s.median, raw)
            table.append(row_cells(rows, "none", label, s, None, over_raw, None))
            records.append(
                {"rows": rows, "session": None, "scenario": kind, "label": label}
                | s.as_dict()
                | {"over_raw_get": round_or_none(over_raw)}
            )
    table.append([])
    for kind, label in ROUND_TRIPS:
        s = results[f"rt/-/{kind}"]
        table.append(row_cells(0, "none", label, s, None, None, None))
        table[-1][0] = "-"
        records.append(
            {"rows": None, "session": None, "scenario": kind, "label": label} | s.as_dict()
        )
    return table, records


def row_cells(
    rows: int,
    mode: str,
    label: str,
    s: Summary,
    speedup: float | None,
    over_raw: float | None,
    dog_over: float | None,
) -> list[str]:
    return [
        str(rows),
        mode,
        label,
        *summary_cells(s),
        fmt_ratio(speedup),
        fmt_ratio(over_raw),
        fmt_ratio(dog_over),
    ]


def targets(results: dict[str, Summary]) -> list[Target]:
    """The targets of issue 3, point 8; the first is ``value <= limit``, most ``>=``."""

    def t(name: str, num: str, den: str, op: str, limit: float) -> Target:
        return Target.ratio_of(name, results[num], results[den], op, limit)

    out = [
        t("1-row L2 hit / raw GET+decode (reused Session)", "1/reused/l2", "1/-/raw", "<=", 1.35)
    ]
    for mode, limit in (("reused", 1.5), ("fresh", 2.5)):
        out.append(
            t(
                f"1-row L2 hit speed-up vs uncached ({mode} Session)",
                f"1/{mode}/uncached",
                f"1/{mode}/l2",
                ">=",
                limit,
            )
        )
    for versus, limit in (("uncached", 1.6), ("dogpile", 4.0)):
        for mode in ("reused", "fresh"):
            out.append(
                t(
                    f"100-row L2 hit speed-up vs {versus} ({mode} Session)",
                    f"100/{mode}/{versus}",
                    f"100/{mode}/l2",
                    ">=",
                    limit,
                )
            )
    for mode in ("reused", "fresh"):
        out.append(
            t(
                f"1-row memory:// hit speed-up vs uncached ({mode} Session)",
                f"1/{mode}/uncached",
                f"1/{mode}/mem",
                ">=",
                10.0,
            )
        )
    for rows in (1, 100):
        for mode in ("reused", "fresh"):
            out.append(
                t(
                    f"{rows}-row miss / uncached ({mode} Session)",
                    f"{rows}/{mode}/miss",
                    f"{rows}/{mode}/uncached",
                    "<=",
                    1.10,
                )
            )
    return out


def report(
    bench: Bench, results: dict[str, Summary], settings: dict[str, Any], json_path: str | None
) -> int:
    table, records = scenario_rows(results)
    print()
    print(
        "Per operation, median µs (p25-p75; 'rounds' = spread of the per-round medians). "
        "'faster' = uncached ÷ this, same rows and Session mode; "
        "'÷ raw' = this ÷ raw GET+decode; 'dogpile ÷' = dogpile ÷ this."
    )
    print()
    print_table(
        [
            "rows",
            "session",
            "scenario",
            "median µs",
            "p25-p75",
            "rounds",
            "faster",
            "÷ raw",
            "dogpile ÷",
        ],
        table,
        right=(3, 4, 5, 6, 7, 8),
    )
    print()
    print("Targets (issue 3, point 8):")
    checked = targets(results)
    print_targets(checked)
    # A miss must read the entry and generations before the query (rule 3): one round
    # trip more than the uncached query, whatever the miss path's own code costs.
    for rows in (1, 100):
        for mode in ("reused", "fresh"):
            print_floor(
                f"of a {rows}-row miss / uncached ({mode} Session)",
                results[f"{rows}/{mode}/uncached"],
                results["rt/-/redis"],
            )
    print()
    checks = bench.checks
    verified = ", ".join(
        f"{label} {v['misses'] if label.endswith('misses') else v['hits']}/{v['runs']}"
        for label, v in checks.verified.items()
    )
    print(f"Served as claimed: {verified}")
    if checks.identity_map_leftovers:
        print(f"NOTE: objects left in reused identity maps: {checks.identity_map_leftovers}")
    else:
        print("Reused Sessions: identity maps empty after every round (references dropped).")
    checks.print_failures()
    if json_path:
        write_json(
            json_path,
            {
                "benchmark": "query_cache",
                "environment": environment(),
                "settings": settings,
                "scenarios": records,
                "targets": [t.as_dict() for t in checked],
                "checks": checks.as_dict(),
            },
        )
        print(f"wrote {json_path}")
    return 1 if checks.failures else 0


def profile(bench: Bench, runs: int, what: str) -> int:
    """cProfile ``runs`` hits (``what``: store:rows[:fresh], e.g. l2:1) in a reused
    Session, or with a fresh Session per hit."""
    kind, _, rest = what.partition(":")
    count, _, mode = rest.partition(":")
    rows = int(count or 1)
    if kind not in ("l2", "mem", "miss") or rows not in (1, 100) or mode not in ("", "fresh"):
        raise SystemExit(
            f"--profile takes KIND:ROWS[:fresh] (l2, mem or miss, 1 or 100), got {what!r}"
        )
    make = maker(rows, bench.new_statements, sa_cache.with_cache())
    if mode:
        op = fresh_op(bench.factories[kind], make, rows)
    else:
        op = reused_op(bench.reused[kind], make, rows)
    for _ in range(50):
        op()
    cache = {"l2": bench.l2, "mem": bench.mem, "miss": bench.miss_cache}[kind]
    counted = "query.miss" if kind == "miss" else "query.hit"
    before = cache.stats.snapshot().get(counted, 0)
    profiler = cProfile.Profile()
    for _ in range(runs):
        if kind == "miss":  # (untimed: the miss's fill is waited for here)
            bench._invalidate_miss_cache()
        profiler.enable()
        op()
        profiler.disable()
    found = cache.stats.snapshot().get(counted, 0) - before
    where = "a fresh Session each" if mode else "a reused Session"
    what = "misses" if kind == "miss" else "hits"
    print(f"{runs} {rows}-row {kind} {what} in {where} ({found} counted as {what})\n")
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(15)
    stats.print_callees("fast_result|on_orm_execute|_serve|_from_rows")
    stats.sort_stats("tottime").print_stats(15)
    return 0 if found == runs else 1


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_N, QUICK_N)
    parser.epilog = (
        f"The 100-row variants run n / {ROWS100_DIVISOR} times. A missed target is "
        "reported, not an error; exit status 1 means a run that should have been served "
        "from the cache was not (or a miss run was not a miss)."
    )
    parser.add_argument(
        "--new-statements",
        action="store_true",
        help="build the select() in every run (default: build once, execute many times)",
    )
    parser.add_argument(
        "--batched",
        action="store_true",
        help="time each variant's runs back to back (hot loops) instead of interleaved",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="l2:1",
        metavar="STORE:ROWS",
        help=f"instead: cProfile {PROFILE_RUNS} hits in a reused Session (l2:1, the default; "
        "l2:100, mem:1, mem:100) or misses (miss:1, miss:100), or with a fresh Session each "
        "(mem:1:fresh, ...)",
    )
    args = parser.parse_args(argv)
    n = args.n or (QUICK_N if args.quick else DEFAULT_N)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = max(10, n // 20)
    started = time.perf_counter()
    bench = Bench(args.pg, args.redis, args.new_statements)
    try:
        try:
            bench.setup()
        except (redis.ConnectionError, sa.exc.OperationalError) as exc:
            return cannot_reach(exc)
        if args.profile:
            return profile(bench, PROFILE_RUNS, args.profile)
        settings = {
            "n_1row": n,
            "n_100row": max(1, n // ROWS100_DIVISOR),
            "repeats": repeats,
            "warmup_1row": warmup,
            "new_statements": args.new_statements,
            "runs": "batched" if args.batched else "interleaved",
            "references": "dropped after every run",
            "table": TABLE,
            "rows_in_table": ROWS_IN_TABLE,
            "postgres": redact_url(args.pg),
            "redis": redact_url(args.redis),
            "redis_parser": "hiredis" if HIREDIS_AVAILABLE else "python",
        }
        print(
            f"query_cache benchmark: {n} runs per 1-row variant, {settings['n_100row']} per "
            f"100-row variant, in {repeats} rounds, "
            f"{'each variant back to back' if args.batched else 'all variants interleaved'}; "
            "statements "
            f"{'built every run' if args.new_statements else 'built once'}; "
            "references to loaded objects dropped after every run; redis-py parser: "
            f"{settings['redis_parser']}"
        )
        variants = bench.variants(n, warmup)
        results = measure(
            variants,
            repeats,
            progress=lambda s: print(f"  {s}", flush=True),
            interleave=not args.batched,
        )
        code = report(bench, results, settings, args.json)
    finally:
        bench.close()
        print(f"total time {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
