"""Write-behind benchmark: 10,000 updates over 1,000 hot rows, against write-through.

Run: ``.venv/bin/python benchmarks/write_behind.py [--pg URL] [--redis URL] [--n N]
[--rows R] [--quick] [--json PATH]``

On a real PostgreSQL and Redis, two tables of the same shape (``R`` = 1,000 rows each,
created for the run, dropped after it), one registered ``write="through"``, the other
``write="behind"``, each in a cache namespace of its own. Before timing, every row is
read once through the cache, so each update starts from an entity-cache hit.

One *update* is what a request does: a fresh Session, ``session.get(Row, pk)``, one
counter incremented, ``commit()``. ``N`` = 10,000 updates go to rows drawn at random
(the same sequence for both variants).

- **write-through**: each commit runs its UPDATE and COMMIT on PostgreSQL and writes
  the new image to Redis. Sustained rate = N / wall time.
- **write-behind**: each commit queues the image (Redis only); a `WriteBehindWorker`
  in a thread of this process (sharing its GIL, so the figure is conservative)
  applies batches meanwhile. The clock stops when ``cache.write_behind.flush()``
  returns, i.e. when the database holds every update: sustained rate = N / that time.

Database statements are counted with a cursor event on every engine involved
(the application's and the worker's, fence updates included). After each run the
table is compared with the expected counters; a difference fails the run (exit 1).
The targets of issue 5 (>= 20x fewer statements, >= 5x the update rate) are
reported, not asserted.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa
from _common import (
    Target,
    base_parser,
    delete_namespace_keys,
    environment,
    print_table,
    print_targets,
    redact_url,
    run_id,
    write_json,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import sa_cache
from sa_cache.write_behind import write_behind_for
from sa_cache.write_behind_worker import FENCE, WriteBehindWorker


class Base(DeclarativeBase):
    pass


def model(name: str) -> Any:
    """A mapped class on table ``name``: a counter row of a few columns."""
    return type(
        name,
        (Base,),
        {
            "__tablename__": name,
            "id": mapped_column(sa.Integer, primary_key=True, autoincrement=False),
            "hits": mapped_column(sa.Integer, nullable=False),
            "label": mapped_column(sa.String(40), nullable=False),
            "score": mapped_column(sa.Float, nullable=False),
            "__annotations__": {"id": Mapped[int], "hits": Mapped[int]},
        },
    )


class Statements:
    """Counts the statements an engine sends."""

    def __init__(self, *engines: sa.Engine) -> None:
        self.count = 0
        self.engines = engines
        for engine in engines:
            sa.event.listen(engine, "before_cursor_execute", self)

    def __call__(self, *args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        for engine in self.engines:
            sa.event.remove(engine, "before_cursor_execute", self)


def seed(engine: sa.Engine, cls: Any, rows: int) -> None:
    cls.__table__.create(engine)
    with engine.begin() as conn:
        conn.execute(
            cls.__table__.insert(),
            [{"id": i, "hits": 0, "label": f"row {i}", "score": i / 7} for i in range(rows)],
        )


def warm(factory: sessionmaker[Any], cls: Any, rows: int) -> None:
    for i in range(rows):
        with factory() as s:
            s.get(cls, i)


def per_request(factory: sessionmaker[Any], cls: Any, keys: list[int]) -> None:
    """A fresh Session per update: get (an entity-cache hit), increment, commit."""
    for key in keys:
        with factory() as s:
            row = s.get(cls, key)
            row.hits += 1
            s.commit()


def held(factory: sessionmaker[Any], cls: Any, keys: list[int]) -> None:
    """One long-lived Session holding every row (expire_on_commit=False): increment one
    row, commit — the write path alone."""
    with factory(expire_on_commit=False) as s:
        rows = {r.id: r for r in s.scalars(sa.select(cls))}
        s.commit()
        for key in keys:
            rows[key].hits += 1
            s.commit()


SCENARIOS = {"request": per_request, "held": held}


def check(engine: sa.Engine, cls: Any, expected: Counter[int], rows: int) -> bool:
    with engine.connect() as conn:
        got: dict[int, int] = dict(conn.execute(sa.select(cls.id, cls.hits)).all())
    return got == {i: expected.get(i, 0) for i in range(rows)}


class Worker:
    def stop(self) -> int:
        """Stop the worker; the statements it sent that were not counted here."""
        raise NotImplementedError


class ThreadWorker(Worker):
    """A `WriteBehindWorker` in a thread of this process (it shares the GIL)."""

    def __init__(self, cache: sa_cache.Cache, engine: sa.Engine) -> None:
        self.runner = WriteBehindWorker(cache, engine)
        self.runner.start()  # fence table, durability check: before the clock
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self.runner.run, args=(self.halt,), daemon=True)
        self.thread.start()

    def stop(self) -> int:
        self.halt.set()
        self.thread.join(30)
        return 0  # its engine is counted by the caller


APP = """
import os, sqlalchemy as sa, sa_cache
from sqlalchemy.orm import DeclarativeBase, mapped_column

class Base(DeclarativeBase):
    pass

class Row(Base):
    __tablename__ = os.environ["WB_BENCH_TABLE"]
    id = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    hits = mapped_column(sa.Integer, nullable=False)
    label = mapped_column(sa.String(40), nullable=False)
    score = mapped_column(sa.Float, nullable=False)

cache = sa_cache.Cache.from_url(os.environ["WB_BENCH_REDIS"], namespace=os.environ["WB_BENCH_NS"])
cache.register(Row, ttl=3600, write="behind")
counted = [0]
engine_count = lambda *a: counted.__setitem__(0, counted[0] + 1)
import atexit
sa.event.listen(sa.engine.Engine, "before_cursor_execute", engine_count)
atexit.register(lambda: open(os.environ["WB_BENCH_COUNT"], "w").write(str(counted[0])))
"""


class ProcessWorker(Worker):
    """``sa-cache worker`` in a process of its own, as it runs in production."""

    def __init__(self, pg: str, redis_url: str, namespace: str, table: str) -> None:
        self.dir = tempfile.TemporaryDirectory()
        Path(self.dir.name, "wb_bench_app.py").write_text(APP)
        self.count_file = Path(self.dir.name, "statements")
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([self.dir.name, root])}
        env.update(WB_BENCH_TABLE=table, WB_BENCH_REDIS=redis_url, WB_BENCH_NS=namespace)
        env.update(WB_BENCH_COUNT=str(self.count_file))
        command = [sys.executable, "-m", "sa_cache.cli_worker", "--app", "wb_bench_app:cache"]
        self.process = subprocess.Popen(
            [*command, "--database-url", pg],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        probe = sa_cache.Cache.from_url(redis_url, namespace=namespace)
        try:  # ready once it holds every partition
            leases = [f"{write_behind_for(probe).stream(p)}:lease" for p in range(16)]
            client: Any = probe.backend.client  # type: ignore[attr-defined]
            deadline = time.monotonic() + 30
            while client.exists(*leases) < len(leases):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start: {self.process.stderr}")
                time.sleep(0.05)
        finally:
            probe.close()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=60)
        if self.process.returncode != 0:
            raise RuntimeError(f"worker failed: {err.decode()}")
        count = int(self.count_file.read_text())
        self.dir.cleanup()
        return count


class Run:
    """One scenario with one write mode, on a table and cache namespace of its own."""

    def __init__(self, args: Any, scenario: str, mode: str, rid: str) -> None:
        self.scenario, self.mode = scenario, mode
        self.pg, self.redis, self.worker_mode = args.pg, args.redis, args.worker
        self.namespace = f"bench-{mode}-{scenario}-{rid}"
        self.engine = sa.create_engine(args.pg)
        self.worker_engine = sa.create_engine(args.pg)
        self.cls = model(f"sac_bench_{mode[:2]}_{scenario}_{rid}")
        self.cache = sa_cache.Cache.from_url(args.redis, namespace=self.namespace)
        self.cache.register(self.cls, ttl=3600, write=mode)

    def __call__(self, keys: list[int], rows: int) -> dict[str, Any]:
        factory = sessionmaker(self.engine, class_=sa_cache.CachingSession, cache=self.cache)
        seed(self.engine, self.cls, rows)
        warm(factory, self.cls, rows)
        worker = self.start_worker() if self.mode == "behind" else None
        counted = Statements(self.engine, self.worker_engine)
        started = time.perf_counter()
        SCENARIOS[self.scenario](factory, self.cls, keys)
        produced = time.perf_counter() - started
        if self.mode == "behind":
            write_behind_for(self.cache).flush(timeout=600)
        total = time.perf_counter() - started
        counted.close()
        statements = counted.count + (worker.stop() if worker is not None else 0)
        return {
            "seconds": total,
            "producer_seconds": produced,
            "statements": statements,
            "updates_per_s": len(keys) / total,
            "commits_per_s": len(keys) / produced,
            "database_matches": check(self.engine, self.cls, Counter(keys), rows),
        }

    def start_worker(self) -> Worker:
        """The worker, in a process of its own as in production (or a thread)."""
        if self.worker_mode == "thread":
            return ThreadWorker(self.cache, self.worker_engine)
        return ProcessWorker(self.pg, self.redis, self.namespace, self.cls.__tablename__)

    def close(self) -> None:
        self.cls.__table__.drop(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            if sa.inspect(conn).has_table(FENCE.name):
                conn.execute(FENCE.delete().where(FENCE.c.stream.startswith(self.namespace)))
        delete_namespace_keys(self.cache.backend.client, [self.namespace])  # type: ignore[attr-defined]
        self.cache.close()
        self.engine.dispose()
        self.worker_engine.dispose()


def report(n: int, results: dict[str, dict[str, dict[str, Any]]]) -> list[Target]:
    table, targets = [], []
    for scenario, by_mode in results.items():
        for mode, r in by_mode.items():
            table.append(
                [
                    f"{scenario}: write-{mode}",
                    f"{r['statements']:,}",
                    f"{r['statements'] / n:.3f}",
                    f"{r['seconds']:.2f}",
                    f"{r['updates_per_s']:,.0f}",
                    f"{r['commits_per_s']:,.0f}",
                    "yes" if r["database_matches"] else "NO",
                ]
            )
        t, b = by_mode["through"], by_mode["behind"]
        targets += [
            Target(
                f"{scenario}: fewer database statements (through / behind)",
                t["statements"] / max(1, b["statements"]),
                ">=",
                20,
            ),
            Target(
                f"{scenario}: sustained updates/s (behind / through)",
                b["updates_per_s"] / t["updates_per_s"],
                ">=",
                5,
            ),
        ]
    headers = ["scenario", "DB statements", "per update", "seconds", "sustained/s"]
    print_table([*headers, "commits/s", "DB correct"], table, right=range(1, 7))
    print(
        "\n  request: a fresh Session per update (get from the entity cache, +1, commit);"
        "\n  held: one Session holding its rows (expire_on_commit=False), +1 and commit;"
        "\n  sustained: until the database holds every update (write-behind: flush() "
        "returned);\n  commits/s: the application's commit rate alone.\n"
    )
    print_targets(targets)
    return targets


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], default_n=10_000, quick_n=2_000)
    parser.add_argument("--rows", type=int, default=1_000, help="hot rows (default 1000)")
    parser.add_argument(
        "--worker",
        choices=["process", "thread"],
        default="process",
        help="run the worker in a process of its own (default) or a thread of this one",
    )
    args = parser.parse_args()
    n = args.n or (2_000 if args.quick else 10_000)
    rng = random.Random(5)
    keys = [rng.randrange(args.rows) for _ in range(n)]
    rid = run_id()
    print(f"write-behind benchmark: {n:,} updates over {args.rows:,} rows")
    print(f"  PostgreSQL {redact_url(args.pg)}, Redis {redact_url(args.redis)}\n")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in SCENARIOS:
        for mode in ("through", "behind"):
            run = Run(args, scenario, mode, rid)
            try:
                results.setdefault(scenario, {})[mode] = run(keys, args.rows)
            finally:
                run.close()
    targets = report(n, results)
    if args.json:
        data = {"benchmark": "write_behind", "updates": n, "rows": args.rows}
        data.update(results=results, targets=[t.as_dict() for t in targets])
        write_json(args.json, {**data, "environment": environment()})
    if not all(r["database_matches"] for by in results.values() for r in by.values()):
        print("\nFAILED: a table does not hold the expected counters", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
