"""Stampede and outage benchmark: database queries under a stampede, read latency with Redis down.

Run: ``.venv/bin/python benchmarks/stampede.py [--pg URL] [--redis URL] [--quick] [--json PATH]``

1. **Stampede.** 64 threads in each of 4 processes (spawned, each with its own engine
   and `Cache` on the same Redis namespace) miss one key at the same moment; the
   query takes ``--query-ms``. Database queries are counted by an engine event in
   every process. Side by side: naive cache-aside (get, load, set) and
   `sa_cache.stampede.get_or_load`. Target: exactly 1 query with sa_cache.
2. **Outage.** A private ``redis-server`` (tests/redis_servers.py) serves a warm key;
   16 threads read it through `get_or_load` for a while with Redis up, hung
   (SIGSTOP: every command runs into the socket timeout) and killed (connection
   refused). Target: p99 latency within the configured socket timeout, no failure.

Exit status 1 only when the measurement itself broke (a worker died, a service is
unreachable, a wrong value came back); missed targets are reported, not fatal.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from _common import (
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    POSTGRES_ENV,
    REDIS_ENV,
    delete_namespace_keys,
    env_url,
    environment,
    print_table,
    run_id,
    write_json,
)

from sa_cache import NO_VALUE, Cache
from sa_cache.freshness import Freshness
from sa_cache.stampede import StampedeGuard, get_or_load

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_servers import RedisServer  # type: ignore[import-not-found]

PROCESSES, THREADS, OUTAGE_THREADS = 4, 64, 16
FRESH = Freshness(300)


class BrokenMeasurement(Exception):
    """The benchmark could not measure what it says it measures."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_engine(url: str, pool: int) -> sa.Engine:
    return sa.create_engine(url, pool_size=pool, max_overflow=0, pool_timeout=60)


def count_queries(engine: sa.Engine, table: str) -> Callable[[], int]:
    """Count statements that read ``table`` on ``engine``; returns a reader."""
    counter = [0]
    lock = threading.Lock()

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if table in statement:
            with lock:
                counter[0] += 1

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    return lambda: counter[0]


def make_loader(engine: sa.Engine, table: str, delay_ms: float) -> Callable[[], str]:
    sleep = f", pg_sleep({delay_ms / 1000:.3f})" if delay_ms else ""
    query = sa.text(f"SELECT value{sleep} FROM {table} WHERE id = 1")

    def load() -> str:
        with engine.connect() as conn:
            return str(conn.execute(query).first()[0])  # type: ignore[index]

    return load


def hammer(
    threads: int, request: Callable[[], str], expected: str, release: Callable[[], object]
) -> dict[str, Any]:
    """``threads`` threads, started and parked, send one request each once ``release()`` returns."""
    barrier = threading.Barrier(threads + 1)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            value = request()
            problem = None if value == expected else f"wrong value {value!r}"
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        with lock:
            latencies.append(time.perf_counter() - started)
            if problem:
                errors.append(problem)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    release()  # e.g. wait for the other processes
    barrier.wait()
    for t in pool:
        t.join()
    return {"latencies": latencies, "errors": errors}


def stampede_worker(
    variant: str, pg: str, redis_url: str, namespace: str, table: str,
    delay_ms: float, barrier: Any, out: Any,
) -> None:  # fmt: skip
    """One process of the stampede: warm up, wait for the others, then 64 misses at once."""
    try:
        engine = make_engine(pg, pool=8)
        queries = count_queries(engine, table)
        load = make_loader(engine, table, delay_ms)
        with engine.connect() as conn:  # a connection ready before the clock starts
            conn.execute(sa.text("SELECT 1"))
        cache = Cache.from_url(redis_url, namespace=namespace)
        if not cache.backend.ping():
            raise BrokenMeasurement(f"Redis does not answer at {redis_url}")
        guard = StampedeGuard(lease_ttl=10.0)
        key = "hot"

        def naive() -> str:
            value = cache.get(key)
            if value is NO_VALUE:
                value = load()
                cache.set(key, value, ttl=300)
            return str(value)

        def protected() -> str:
            return get_or_load(cache, cache.keys.user(key), load, FRESH, guard=guard)

        request = naive if variant == "naive" else protected
        report = hammer(THREADS, request, "v1", lambda: barrier.wait(120))
        report["queries"] = queries()
        out.put(report)
        guard.close()
        cache.close()
        engine.dispose()
    except BaseException:
        out.put({"crash": traceback.format_exc()})


def run_stampede(pg: str, redis_url: str, table: str, delay_ms: float) -> list[dict[str, Any]]:
    spawn = multiprocessing.get_context("spawn")
    rows = []
    client = redis.Redis.from_url(redis_url)
    try:
        for variant in ("naive", "sa_cache"):
            namespace = f"bench-stampede-{run_id()}"
            barrier, out = spawn.Barrier(PROCESSES), spawn.Queue()
            args = (variant, pg, redis_url, namespace, table, delay_ms, barrier, out)
            procs = [spawn.Process(target=stampede_worker, args=args) for _ in range(PROCESSES)]
            for p in procs:
                p.start()
            started = time.perf_counter()
            try:
                reports = [out.get(timeout=180) for _ in procs]
            finally:
                for p in procs:
                    p.join(30)
                delete_namespace_keys(client, [namespace])
            wall = time.perf_counter() - started
            crashes = [r["crash"] for r in reports if "crash" in r]
            if crashes:
                raise BrokenMeasurement("a stampede worker crashed:\n" + crashes[0])
            latencies = [x for r in reports for x in r["latencies"]]
            errors = [e for r in reports for e in r["errors"]]
            if errors:
                raise BrokenMeasurement(f"{variant}: {len(errors)} requests failed: {errors[0]}")
            rows.append(
                {
                    "variant": variant,
                    "requests": len(latencies),
                    "queries": sum(r["queries"] for r in reports),
                    "p50_ms": statistics.median(latencies) * 1000,
                    "p99_ms": percentile(latencies, 0.99) * 1000,
                    "wall_s": wall,
                }
            )
    finally:
        client.close()
    return rows


def read_for(seconds: float, threads: int, request: Callable[[], str]) -> dict[str, Any]:
    """``threads`` threads reading in a loop for ``seconds``: latencies and failures."""
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        mine: list[float] = []
        while time.monotonic() < stop:
            started = time.perf_counter()
            try:
                value = request()
                problem = None if value == "v1" else f"wrong value {value!r}"
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            mine.append(time.perf_counter() - started)
            if problem:
                with lock:
                    failures.append(problem)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"latencies": latencies, "failures": failures}


def run_outage(pg: str, table: str, seconds: float) -> tuple[list[dict[str, Any]], float]:
    server = RedisServer().start()
    engine = make_engine(pg, pool=OUTAGE_THREADS)
    queries = count_queries(engine, table)
    load = make_loader(engine, table, 0)
    cache = Cache.from_url(server.url, namespace=f"bench-outage-{run_id()}")
    timeout = cache.config.socket_timeout
    guard = StampedeGuard()
    key = cache.keys.user("warm")
    rows = []
    try:
        if get_or_load(cache, key, load, FRESH, guard=guard) != "v1":
            raise BrokenMeasurement("the warm-up read returned a wrong value")

        def request() -> str:
            return get_or_load(cache, key, load, FRESH, guard=guard)

        scenarios: list[tuple[str, Callable[[], None], Callable[[], None]]] = [
            ("redis up", lambda: None, lambda: None),
            (
                "redis hung (SIGSTOP)",
                lambda: server.process.send_signal(signal.SIGSTOP),
                lambda: server.process.send_signal(signal.SIGCONT),
            ),
            ("redis killed", server.kill, lambda: None),
        ]
        for name, before, after in scenarios:
            cache.stats.reset()
            q0 = queries()
            before()
            try:
                result = read_for(seconds, OUTAGE_THREADS, request)
            finally:
                after()
            lat = result["latencies"]
            if not lat:
                raise BrokenMeasurement(f"{name}: no request completed")
            rows.append(
                {
                    "scenario": name,
                    "requests": len(lat),
                    "failures": len(result["failures"]),
                    "p50_ms": statistics.median(lat) * 1000,
                    "p99_ms": percentile(lat, 0.99) * 1000,
                    "max_ms": max(lat) * 1000,
                    "queries": queries() - q0,
                    "hits": cache.stats["hit"],
                }
            )
            if name.startswith("redis hung"):  # let the breaker close again before the next
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    request()
                    if cache.stats["hit"] > rows[-1]["hits"]:
                        break
                    time.sleep(0.05)
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        guard.close()
        cache.close()
        server.close()
        engine.dispose()
    return rows, timeout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default=env_url(POSTGRES_ENV, DEFAULT_POSTGRES_URL))
    parser.add_argument("--redis", default=env_url(REDIS_ENV, DEFAULT_REDIS_URL))
    parser.add_argument("--query-ms", type=float, default=50.0, help="query time (pg_sleep)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per outage scenario")
    parser.add_argument("--quick", action="store_true", help="shorter outage scenarios")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH")
    args = parser.parse_args()
    logging.getLogger("sa_cache").setLevel(logging.ERROR)  # outage warnings are expected here
    seconds = 0.75 if args.quick else args.seconds
    table = f"sac_bench_stampede_{run_id()}"
    try:
        engine = make_engine(args.pg, pool=1)
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, value TEXT)"))
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (1, 'v1')"))
    except Exception as exc:
        print(f"cannot prepare PostgreSQL at {args.pg}: {exc}", file=sys.stderr)
        return 1
    try:
        stampede = run_stampede(args.pg, args.redis, table, args.query_ms)
        outage, timeout = run_outage(args.pg, table, seconds)
    except (BrokenMeasurement, Exception) as exc:
        print(f"measurement broke: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()

    print(f"\nStampede: {PROCESSES} processes x {THREADS} threads miss one key at once "
          f"(query {args.query_ms:.0f} ms)\n")  # fmt: skip
    print_table(
        ["variant", "requests", "db queries", "p50 ms", "p99 ms", "wall s"],
        [
            [r["variant"], str(r["requests"]), str(r["queries"]), f"{r['p50_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['wall_s']:.2f}"]
            for r in stampede
        ],
        right=range(1, 6),
    )  # fmt: skip
    print(f"\nReads while Redis is down: {OUTAGE_THREADS} threads, {seconds:.2f} s per scenario, "
          f"socket timeout {timeout * 1000:.0f} ms\n")  # fmt: skip
    print_table(
        ["scenario", "requests", "failures", "p50 ms", "p99 ms", "max ms", "db queries"],
        [
            [r["scenario"], str(r["requests"]), str(r["failures"]), f"{r['p50_ms']:.2f}",
             f"{r['p99_ms']:.2f}", f"{r['max_ms']:.1f}", str(r["queries"])]
            for r in outage
        ],
        right=range(1, 7),
    )  # fmt: skip
    protected = next(r for r in stampede if r["variant"] == "sa_cache")
    targets = [(f"sa_cache stampede: db queries == 1 (got {protected['queries']})",
                protected["queries"] == 1)]  # fmt: skip
    for r in outage[1:]:
        ok = r["p99_ms"] <= timeout * 1000 and r["failures"] == 0
        targets.append((f"{r['scenario']}: p99 {r['p99_ms']:.1f} ms <= {timeout * 1000:.0f} ms, "
                        f"{r['failures']} failures", ok))  # fmt: skip
    print("\nTargets")
    for name, ok in targets:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")
    print(f"  {sum(ok for _, ok in targets)}/{len(targets)} targets met")
    if args.json:
        write_json(
            args.json,
            {
                "environment": environment(),
                "stampede": stampede,
                "outage": outage,
                "socket_timeout_s": timeout,
                "targets": [{"name": n, "pass": ok} for n, ok in targets],
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
