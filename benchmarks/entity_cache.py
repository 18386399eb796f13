"""Entity cache benchmark: ``session.get`` served from the entry, and write-through commits.

Run: ``.venv/bin/python benchmarks/entity_cache.py [--pg URL] [--redis URL] [--n N]
[--quick] [--json PATH] [--batched] [--profile]``

On a real PostgreSQL and Redis, with an 11-column table of mixed types (1,000 rows,
created for the run, dropped after it) registered with ``cache.register(Item, ttl=300)``:

1. **Reads.** ``session.get(Item, pk)`` over 200 primary keys in turn, in one reused
   Session and with a fresh Session per request:

   - uncached (a plain Session: a SELECT by primary key);
   - an sa_cache hit on Redis (L2), and on ``memory://``;
   - for reference, without any Session: a raw redis GET + decode of the very entry
     a hit reads, a raw MGET of everything a hit reads (entry, commit clock,
     generations) + decode, a Redis PING and a PostgreSQL ``SELECT 1``.

2. **Commits.** A fresh Session loads 10 existing rows (untimed), then the timed part
   sets one attribute of each and commits: a plain Session without sa_cache, a
   CachingSession with the model registered ``write="through"`` (the default), and one
   registered ``write="invalidate"``. Each variant updates its own 100 rows, 10 at a
   time in turn, whose entries were filled (read through the cache) before the run.

It prints medians and ratios from the one run and checks the targets of issue 4
(a missed target is reported, not an error). The run fails (exit 1) when the figures
would not measure what they say: a timed sa_cache ``session.get`` that was not an
entity hit (or ran SQL), a reused Session whose identity map was not empty before a
run, a write-through commit that did not write all its rows through (or an entry
that differs from its row afterwards), or an invalidating commit that wrote through.

The runs of all variants of a scenario are interleaved in random order (see
`_common.measure`): the cost of a loopback round trip on this kind of machine drifts
by 2-3x from one second to the next. ``--batched`` times each variant back to back
instead. ``--profile`` prints a cProfile of 2,000 L2 hits in a reused Session and of
200 write-through commits instead of the table.

Policies, the same for every variant:

- Each read drops its reference to the object it loaded, so a reused Session's
  identity map is empty before the next run (checked before every run); otherwise
  ``session.get`` would answer from the identity map and reach neither cache nor
  database.
- The plain variants use an engine of their own, on which sa_cache never installs its
  statement listener, so "without sa_cache" pays nothing for it.
- Each read touches one attribute of the object it got.
"""

from __future__ import annotations

import cProfile
import itertools
import pstats
import sys
import time
from collections.abc import Callable, Iterator
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
    stats_delta,
)
from sqlalchemy import event, inspect, select
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

import sa_cache
from sa_cache.codec import decode
from sa_cache.entity import EntitySpec
from sa_cache.tokens import TOMBSTONE_PREFIX

RUN = run_id()
TABLE = f"bench_entity_{RUN}"
NAMESPACE = f"sa_cache_bench_entity_{RUN}"
INVALIDATE_NAMESPACE = f"{NAMESPACE}_inv"
GET_IDS = tuple(range(1, 201))  # session.get reads these in turn
COMMIT_ROWS = 10
COMMIT_RANGE = 100  # each commit variant updates its own 100 rows, 10 at a time
COMMIT_FIRST_ID = {"plain": 701, "through": 801, "invalidate": 901}

DEFAULT_N = 3000
QUICK_N = 300
COMMIT_DIVISOR = 3  # the commit variants run n // 3 times (each costs ~10x a read)
PROFILE_GETS = 2000
PROFILE_COMMITS = 200
TTL = 300


class Base(DeclarativeBase):
    pass


class Item(ItemColumns, Base):
    __tablename__ = TABLE


TABLE_T = Item.__table__
QTY_INDEX = [p.key for p in inspect(Item).column_attrs].index("qty")


def entity_spec(cache: sa_cache.Cache) -> EntitySpec:
    spec: EntitySpec = cache.entities[inspect(Item)]
    return spec


# -- checks around timed rounds -----------------------------------------------------------


class EntityHitProbe(StatsProbe):
    """Every timed ``session.get`` on ``cache`` was an entity hit (no miss, fill or error)."""

    def stop(self, count: int) -> None:
        delta = self.delta()
        hits, misses = delta.get("entity.hit", 0), delta.get("entity.miss", 0)
        fills, errors = delta.get("entity.fill", 0), delta.get("store.error", 0)
        self.checks.tally(self.label, runs=count, hits=hits, misses=misses, fills=fills)
        if hits != count or misses or fills or errors:
            self.checks.failures.append(
                f"{self.label}: {count} session.get runs expected to be entity hits, got "
                f"{hits} hits, {misses} misses, {fills} fills, {errors} store errors ({delta})"
            )


class StatementProbe:
    """No SQL reached the database on ``engine`` while the hit variants ran."""

    def __init__(self, checks: Checks, label: str, engine: sa.Engine) -> None:
        self.checks, self.label = checks, label
        self.count = 0
        self.before = 0
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *args: Any) -> None:
        self.count += 1

    def start(self) -> None:
        self.before = self.count

    def stop(self, count: int) -> None:
        statements = self.count - self.before
        self.checks.tally(self.label, runs=count, statements=statements)
        if statements:
            self.checks.failures.append(
                f"{self.label}: {statements} SQL statements during {count} runs (expected 0)"
            )


class CommitProbe(StatsProbe):
    """Write-through commits wrote every row through; invalidating ones wrote none."""

    def __init__(self, checks: Checks, label: str, cache: sa_cache.Cache, write: str) -> None:
        super().__init__(checks, label, cache)
        self.write = write

    def stop(self, count: int) -> None:
        delta = self.delta()
        through = delta.get("entity.write_through", 0)
        invalidations = delta.get("invalidate", 0)
        errors = delta.get("store.error", 0) + delta.get("invalidate.deferred", 0)
        self.checks.tally(
            self.label,
            commits=count,
            rows=count * COMMIT_ROWS,
            written_through=through,
            invalidations=invalidations,
        )
        if self.write == "through":
            ok = through == count * COMMIT_ROWS and not errors
        else:
            ok = through == 0 and invalidations >= count and not errors
        if not ok:
            self.checks.failures.append(
                f"{self.label}: {count} commits of {COMMIT_ROWS} rows (write={self.write!r}): "
                f"{through} rows written through, {invalidations} invalidations, "
                f"{errors} store errors ({delta})"
            )


def empty_map_guard(checks: Checks, label: str, session: Session) -> Callable[[], None]:
    """``prepare`` of a reused-Session read: its identity map must be empty (else noted)."""

    def prepare() -> None:
        left = len(session.identity_map)
        if left:
            checks.identity_map_leftovers[label] = checks.identity_map_leftovers.get(label, 0) + 1
            session.expunge_all()

    return prepare


# -- the operations ------------------------------------------------------------------------


def cycle_ids() -> Iterator[int]:
    return itertools.cycle(GET_IDS)


def reused_get(session: Session) -> Callable[[], int]:
    ids = cycle_ids()

    def op() -> int:
        return session.get(Item, next(ids)).qty  # type: ignore[union-attr]

    return op


def fresh_get(factory: sessionmaker[Any]) -> Callable[[], int]:
    ids = cycle_ids()

    def op() -> int:
        with factory() as session:
            item = session.get(Item, next(ids))
            assert item is not None
            return int(item.qty)

    return op


def raw_get(client: redis.Redis, keys: list[str]) -> Callable[[], int]:
    it = itertools.cycle(keys)

    def op() -> int:
        return int(get_entry(client, next(it))[QTY_INDEX])

    return op


def raw_mget(client: redis.Redis, keys: list[str], extra: list[str]) -> Callable[[], int]:
    it = itertools.cycle(keys)

    def op() -> int:
        return int(mget_entry(client, [next(it), *extra])[QTY_INDEX])

    return op


class CommitRunner:
    """A fresh Session per commit: ``prepare`` loads 10 rows, ``op`` changes and commits.

    The rows are the variant's own, 10 at a time in turn; the loading SELECT is the
    same for every variant and not timed. ``op`` sets ``qty`` of each row to a new
    value (a Python value, so write-through has the full image) and commits.
    """

    def __init__(self, factory: sessionmaker[Any], first_id: int) -> None:
        self.factory = factory
        blocks = [
            list(range(start, start + COMMIT_ROWS))
            for start in range(first_id, first_id + COMMIT_RANGE, COMMIT_ROWS)
        ]
        self.blocks = itertools.cycle(
            [(block, select(Item).where(Item.id.in_(block)).order_by(Item.id)) for block in blocks]
        )
        self.block: list[int] = []
        self.session: Session | None = None
        self.objects: list[Item] = []
        self.touched: set[int] = set()

    def prepare(self) -> None:
        self.finish()
        self.block, statement = next(self.blocks)
        session = self.factory()
        objects = list(session.scalars(statement).all())
        if len(objects) != COMMIT_ROWS:
            raise RuntimeError(f"expected {COMMIT_ROWS} rows, got {len(objects)}")
        self.session, self.objects = session, objects

    def op(self) -> int:
        session = self.session
        if session is None:
            raise RuntimeError("a commit run without its prepare")
        for obj in self.objects:
            obj.qty = (obj.qty + 1) % 500
        session.commit()
        self.touched.update(self.block)
        return COMMIT_ROWS

    def finish(self) -> None:
        """Close the last run's Session (untimed; its objects go with it)."""
        if self.session is not None:
            self.objects = []
            self.session.close()
            self.session = None


# -- the benchmark ---------------------------------------------------------------------------

GET_SCENARIOS = [
    ("uncached", "uncached session.get"),
    ("l2", "sa_cache hit, redis (L2)"),
    ("mem", "sa_cache hit, memory://"),
]
COMMIT_SCENARIOS = [
    ("plain", "plain Session, no sa_cache"),
    ("through", "sa_cache write='through'"),
    ("invalidate", "sa_cache write='invalidate'"),
]


class Bench:
    """Engines, caches, Session factories and the variants, with cleanup."""

    def __init__(self, pg_url: str, redis_url: str) -> None:
        # The plain variants get an engine sa_cache never touches (no statement listener).
        self.plain_engine = sa.create_engine(pg_url, pool_size=6, max_overflow=2)
        self.cached_engine = sa.create_engine(pg_url, pool_size=6, max_overflow=2)
        self.client = redis.Redis.from_url(redis_url)
        self.l2 = sa_cache.Cache.from_url(redis_url, namespace=NAMESPACE, **TIMEOUTS)
        self.mem = sa_cache.Cache.from_url("memory://", namespace=NAMESPACE)
        self.inv = sa_cache.Cache.from_url(redis_url, namespace=INVALIDATE_NAMESPACE, **TIMEOUTS)
        self.l2.register(Item, ttl=TTL)
        self.mem.register(Item, ttl=TTL)
        self.inv.register(Item, ttl=TTL, write="invalidate")
        cached = self.cached_engine
        self.factories: dict[str, sessionmaker[Any]] = {
            "uncached": sessionmaker(self.plain_engine),
            "plain": sessionmaker(self.plain_engine),
            "l2": sessionmaker(cached, class_=sa_cache.CachingSession, cache=self.l2),
            "through": sessionmaker(cached, class_=sa_cache.CachingSession, cache=self.l2),
            "mem": sessionmaker(cached, class_=sa_cache.CachingSession, cache=self.mem),
            "invalidate": sessionmaker(cached, class_=sa_cache.CachingSession, cache=self.inv),
        }
        self.reused: dict[str, Session] = {}
        self.committers: dict[str, CommitRunner] = {}
        self.checks = Checks()
        self.statements = StatementProbe(self.checks, "no SQL on hits", cached)
        self.seeded = False
        self.pg_conn: sa.Connection | None = None

    def setup(self) -> None:
        self.client.ping()
        self.seeded = True  # from here on, cleanup drops the table (if it exists)
        seed(self.plain_engine, TABLE_T)
        self.reused = {kind: self.factories[kind]() for kind in ("uncached", "l2", "mem")}
        self.pg_conn = self.plain_engine.connect()
        self.committers = {
            kind: CommitRunner(self.factories[kind], COMMIT_FIRST_ID[kind])
            for kind, _ in COMMIT_SCENARIOS
        }
        # Fill the entries the runs read (through the cache's own miss path), and the
        # entries of the rows the cached commit variants write: a read-mostly table.
        commit_ids = {
            kind: range(COMMIT_FIRST_ID[kind], COMMIT_FIRST_ID[kind] + COMMIT_RANGE)
            for kind in ("through", "invalidate")
        }
        for kind, cache, ids in (
            ("l2", self.l2, [*GET_IDS, *commit_ids["through"]]),
            ("mem", self.mem, GET_IDS),
            ("invalidate", self.inv, commit_ids["invalidate"]),
        ):
            self.prefill(kind, cache, ids)

    def prefill(self, kind: str, cache: sa_cache.Cache, ids: Any) -> None:
        before = cache.stats.snapshot()
        for pk in ids:
            with self.factories[kind]() as session:
                session.get(Item, pk)
        delta = stats_delta(cache, before)
        filled = delta.get("entity.fill", 0) + delta.get("entity.hit", 0)
        if filled != len(ids):
            raise RuntimeError(f"prefill of {cache.namespace}: {len(ids)} reads, {delta}")
        with self.factories[kind]() as session:  # the first id is now a hit
            before = cache.stats.snapshot()
            session.get(Item, ids[0])
            if stats_delta(cache, before).get("entity.hit", 0) != 1:
                raise RuntimeError(f"prefill of {cache.namespace}: no hit after the fill")

    def entry_keys(self) -> list[str]:
        spec = entity_spec(self.l2)
        return [spec.key(self.l2, (pk,)) for pk in GET_IDS]

    def read_variants(self, n: int, warmup: int) -> list[Variant]:
        checks = self.checks
        hit_probes = {
            "l2": EntityHitProbe(checks, "session.get entity hits, redis", self.l2),
            "mem": EntityHitProbe(checks, "session.get entity hits, memory://", self.mem),
        }
        out: list[Variant] = []
        for mode, _ in MODES:
            for kind, _ in GET_SCENARIOS:
                probes: list[Any] = []
                if kind in hit_probes:
                    probes += [hit_probes[kind], self.statements]
                prepare = None
                if mode == "reused":
                    session = self.reused[kind]
                    op = reused_get(session)
                    prepare = empty_map_guard(checks, f"reused {kind} Session", session)
                else:
                    op = fresh_get(self.factories[kind])
                out.append(Variant(f"{mode}/{kind}", op, n, warmup, prepare, tuple(probes)))
        keys = self.entry_keys()
        out.append(Variant("-/raw", raw_get(self.client, keys), n, warmup))
        # What a hit reads: the entry, the commit clock and the generations.
        extra = [self.l2.clock_key, *entity_spec(self.l2).gen_keys(self.l2)]
        out.append(Variant("-/mget", raw_mget(self.client, keys, extra), n, warmup))
        out += round_trip_variants("rt/", self.client, self.pg_conn, n, warmup)
        return out

    def commit_variants(self, n: int, warmup: int) -> list[Variant]:
        probes: dict[str, tuple[Any, ...]] = {
            "plain": (),
            "through": (CommitProbe(self.checks, "write-through commits", self.l2, "through"),),
            "invalidate": (
                CommitProbe(self.checks, "invalidating commits", self.inv, "invalidate"),
            ),
        }
        return [
            Variant(f"commit/{kind}", r.op, n, warmup, r.prepare, probes[kind])
            for kind, r in self.committers.items()
        ]

    def verify_commits(self) -> None:
        """Entries of the rows committed: equal to the rows (through), absent or a
        tombstone (invalidate)."""
        for runner in self.committers.values():
            runner.finish()
        rows: dict[int, dict[str, Any]] = {}
        with self.plain_engine.connect() as conn:
            for row in conn.execute(select(TABLE_T)):
                rows[row.id] = dict(row._mapping)
        for kind, cache in (("through", self.l2), ("invalidate", self.inv)):
            ids = sorted(self.committers[kind].touched)
            spec = entity_spec(cache)
            raws = self.client.mget([spec.key(cache, (pk,)) for pk in ids])
            bad: list[int] = []
            for pk, raw in zip(ids, raws, strict=True):
                assert raw is None or isinstance(raw, bytes)
                if kind == "invalidate":
                    if raw is not None and not raw.startswith(TOMBSTONE_PREFIX):
                        bad.append(pk)
                    continue
                if (
                    raw is None
                    or dict(zip(spec.attr_keys, decode(raw).value, strict=True)) != rows[pk]
                ):
                    bad.append(pk)
            label = f"entries after {kind} commits"
            self.checks.verified[label] = {"rows": len(ids), "as expected": len(ids) - len(bad)}
            if not ids:
                self.checks.failures.append(f"{label}: no rows were committed")
            if bad:
                want = "absent or tombstoned" if kind == "invalidate" else "equal to the row"
                self.checks.failures.append(
                    f"{label}: {len(bad)} of {len(ids)} entries not {want} (ids {bad[:10]})"
                )

    def close(self) -> None:
        """Drop the table and this run's Redis keys; report, never raise, a failed step."""
        steps: list[tuple[str, Callable[[], object]]] = [
            (f"close {kind} Session", session.close) for kind, session in self.reused.items()
        ]
        steps += [(f"close {kind} commit Session", r.finish) for kind, r in self.committers.items()]
        if self.pg_conn is not None:
            steps.append(("close the round-trip connection", self.pg_conn.close))
        steps += [
            ("delete Redis keys", self._delete_keys),
            *[(f"close cache {c.namespace}", c.close) for c in (self.l2, self.mem, self.inv)],
        ]
        if self.seeded:
            steps.append(("drop the table", self._drop_table))
        steps += [
            ("close the Redis client", self.client.close),
            ("dispose the plain engine", self.plain_engine.dispose),
            ("dispose the cached engine", self.cached_engine.dispose),
        ]
        run_cleanup(steps)

    def _delete_keys(self) -> None:
        delete_namespaces_reported(self.client, [NAMESPACE, INVALIDATE_NAMESPACE])

    def _drop_table(self) -> None:
        drop_table(self.plain_engine, TABLE_T)


# -- report ------------------------------------------------------------------------------------


def read_rows(results: dict[str, Summary]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    table: list[list[str]] = []
    records: list[dict[str, Any]] = []
    raw = results["-/raw"].median

    def add(session: str, kind: str, label: str, s: Summary, faster: float | None) -> None:
        over_raw = ratio(s.median, raw) if kind in ("l2", "raw", "mget") else None
        table.append([session, label, *summary_cells(s), fmt_ratio(faster), fmt_ratio(over_raw)])
        records.append(
            {"session": session, "scenario": kind, "label": label}
            | s.as_dict()
            | {
                "speedup_vs_uncached": round_or_none(faster),
                "over_raw_get": round_or_none(over_raw),
            }
        )

    for mode, mode_label in MODES:
        uncached = results[f"{mode}/uncached"].median
        for kind, label in GET_SCENARIOS:
            s = results[f"{mode}/{kind}"]
            add(
                mode_label,
                kind,
                label,
                s,
                ratio(uncached, s.median) if kind != "uncached" else None,
            )
    for kind, label in RAW_SCENARIOS:
        add("none", kind, label, results[f"-/{kind}"], None)
    table.append([])
    for kind, label in ROUND_TRIPS:
        add("none", kind, label, results[f"rt/{kind}"], None)
    return table, records


def commit_rows(results: dict[str, Summary]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    table: list[list[str]] = []
    records: list[dict[str, Any]] = []
    plain = results["commit/plain"].median
    for kind, label in COMMIT_SCENARIOS:
        s = results[f"commit/{kind}"]
        over = ratio(s.median, plain) if kind != "plain" else None
        extra = s.median - plain if kind != "plain" else None
        table.append(
            [
                label,
                *summary_cells(s),
                fmt_ratio(over),
                "" if extra is None else f"{extra:+,.0f}",
            ]
        )
        records.append(
            {"scenario": kind, "label": label, "rows": COMMIT_ROWS}
            | s.as_dict()
            | {"over_plain": round_or_none(over), "extra_us": round_or_none(extra, 1)}
        )
    return table, records


def targets(results: dict[str, Summary]) -> list[Target]:
    """The targets of issue 4, point 6."""
    out = [
        Target.ratio_of(
            f"session.get L2 hit speed-up vs uncached ({mode} Session)",
            results[f"{mode}/uncached"],
            results[f"{mode}/l2"],
            ">=",
            limit,
        )
        for mode, limit in (("reused", 1.6), ("fresh", 2.5))
    ]
    out.append(
        Target.ratio_of(
            f"{COMMIT_ROWS}-row commit, write-through / plain Session",
            results["commit/through"],
            results["commit/plain"],
            "<=",
            1.15,
        )
    )
    return out


def report(
    bench: Bench, results: dict[str, Summary], settings: dict[str, Any], json_path: str | None
) -> int:
    reads, read_records = read_rows(results)
    commits, commit_records = commit_rows(results)
    print()
    print(
        "1. session.get(Item, pk), per operation, median µs (p25-p75; 'rounds' = spread of "
        "the per-round medians). 'faster' = uncached ÷ this, same Session mode; "
        "'÷ raw' = this ÷ raw GET+decode."
    )
    print()
    print_table(
        ["session", "scenario", "median µs", "p25-p75", "rounds", "faster", "÷ raw"],
        reads,
        right=(2, 3, 4, 5, 6),
    )
    print()
    print(
        f"2. Update {COMMIT_ROWS} loaded rows (one attribute each) and commit, fresh Session, "
        "median µs. '÷ plain' = this ÷ plain Session; '+ µs' = this - plain Session."
    )
    print()
    print_table(
        ["scenario", "median µs", "p25-p75", "rounds", "÷ plain", "+ µs"],
        commits,
        right=(1, 2, 3, 4, 5),
    )
    print()
    print("Targets (issue 4, point 6):")
    checked = targets(results)
    print_targets(checked)
    # The images are written after the database's COMMIT and the commit waits for the
    # store's answer (a commit is never followed by a stale read): one round trip more.
    print_floor(
        f"of the {COMMIT_ROWS}-row write-through commit / plain Session",
        results["commit/plain"],
        results["rt/redis"],
    )
    print()
    checks = bench.checks
    leftovers = checks.identity_map_leftovers
    if leftovers:
        checks.failures.append(
            f"reused Sessions held objects before a run (runs affected, by Session): {leftovers}"
        )
    else:
        print("Reused Sessions: identity map empty before every run (references dropped).")
    print("Served as claimed:")
    for label, seen in checks.verified.items():
        print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in seen.items()))
    checks.print_failures()
    if json_path:
        write_json(
            json_path,
            {
                "benchmark": "entity_cache",
                "environment": environment(),
                "settings": settings,
                "reads": read_records,
                "commits": commit_records,
                "targets": [t.as_dict() for t in checked],
                "checks": checks.as_dict(),
            },
        )
        print(f"wrote {json_path}")
    return 1 if checks.failures else 0


def profile(bench: Bench, gets: int, commits: int) -> int:
    """cProfile ``gets`` L2 hits (reused Session) and ``commits`` write-through commits."""
    code = 0
    session = bench.reused["l2"]
    op = reused_get(session)
    for _ in range(50):
        op()
    before = bench.l2.stats.snapshot()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(gets):
        op()
    profiler.disable()
    hits = stats_delta(bench.l2, before).get("entity.hit", 0)
    print(f"{gets} session.get L2 hits in a reused Session ({hits} counted as entity hits)\n")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(12)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    code |= hits != gets

    runner = bench.committers["through"]
    for _ in range(10):
        runner.prepare()
        runner.op()
    before = bench.l2.stats.snapshot()
    profiler = cProfile.Profile()
    for _ in range(commits):
        runner.prepare()  # loading the rows is not profiled
        profiler.enable()
        runner.op()
        profiler.disable()
    runner.finish()
    through = stats_delta(bench.l2, before).get("entity.write_through", 0)
    print(
        f"{commits} write-through commits of {COMMIT_ROWS} rows "
        f"({through} rows counted as written through; the loading SELECT not profiled)\n"
    )
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(12)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    print("The same commits, sa_cache's functions only (cumulative):")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"sa_cache[/\\]", 12)
    code |= through != commits * COMMIT_ROWS
    return int(code)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_N, QUICK_N)
    parser.epilog = (
        f"The commit variants run n / {COMMIT_DIVISOR} times. A missed target is reported, "
        "not an error; exit status 1 means a run was not served or written as claimed."
    )
    parser.add_argument(
        "--batched",
        action="store_true",
        help="time each variant's runs back to back (hot loops) instead of interleaved",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help=f"instead: cProfile {PROFILE_GETS} L2 session.get hits in a reused Session "
        f"and {PROFILE_COMMITS} write-through commits",
    )
    args = parser.parse_args(argv)
    n = args.n or (QUICK_N if args.quick else DEFAULT_N)
    n_commit = max(1, n // COMMIT_DIVISOR)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = max(10, n // 20)
    warmup_commit = max(COMMIT_RANGE // COMMIT_ROWS, n_commit // 20)
    started = time.perf_counter()
    bench = Bench(args.pg, args.redis)
    try:
        try:
            bench.setup()
        except (redis.ConnectionError, sa.exc.OperationalError) as exc:
            return cannot_reach(exc)
        if args.profile:
            return profile(bench, PROFILE_GETS, PROFILE_COMMITS)
        settings = {
            "n_get": n,
            "n_commit": n_commit,
            "repeats": repeats,
            "warmup_get": warmup,
            "warmup_commit": warmup_commit,
            "runs": "batched" if args.batched else "interleaved",
            "references": "dropped after every run",
            "get_ids": [GET_IDS[0], GET_IDS[-1]],
            "commit_rows": COMMIT_ROWS,
            "table": TABLE,
            "rows_in_table": ROWS_IN_TABLE,
            "ttl": TTL,
            "postgres": redact_url(args.pg),
            "redis": redact_url(args.redis),
        }
        mode = "each variant back to back" if args.batched else "all variants interleaved"
        print(
            f"entity_cache benchmark: {n} runs per session.get variant, {n_commit} per commit "
            f"variant, in {repeats} rounds, {mode}; references to loaded objects dropped "
            "after every run"
        )

        def progress(s: str) -> None:
            print(f"  {s}", flush=True)

        print(" reads:")
        results = measure(
            bench.read_variants(n, warmup), repeats, progress, interleave=not args.batched
        )
        print(" commits:")
        results |= measure(
            bench.commit_variants(n_commit, warmup_commit),
            repeats,
            progress,
            interleave=not args.batched,
        )
        bench.verify_commits()
        code = report(bench, results, settings, args.json)
    finally:
        bench.close()
        print(f"total time {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
