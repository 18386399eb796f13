"""Shared helpers for the benchmarks: arguments, timing, checks, ratios, tables, cleanup.

Every benchmark prints figures measured in one run, side by side (DESIGN, Performance):
the runs of all variants are interleaved in random order, so that a slow moment of
the machine hits all of them alike and the ratios stay meaningful.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

TIMES = "\N{MULTIPLICATION SIGN}"

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_ENV = ("SA_CACHE_BENCH_POSTGRES_URL", "SA_CACHE_TEST_POSTGRES_URL")
REDIS_ENV = ("SA_CACHE_BENCH_REDIS_URL", "SA_CACHE_TEST_REDIS_URL")


# -- arguments --------------------------------------------------------------------------


def env_url(names: Iterable[str], default: str) -> str:
    """The first of the environment variables ``names`` that is set, else ``default``."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return default


def base_parser(description: str, default_n: int, quick_n: int) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes.

    ``--pg`` / ``--redis`` default to ``$SA_CACHE_BENCH_POSTGRES_URL`` /
    ``$SA_CACHE_BENCH_REDIS_URL``, then the test suite's variables, then localhost.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--pg",
        default=env_url(POSTGRES_ENV, DEFAULT_POSTGRES_URL),
        help=f"PostgreSQL URL (default ${POSTGRES_ENV[0]}, ${POSTGRES_ENV[1]}, "
        f"else {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument(
        "--redis",
        default=env_url(REDIS_ENV, DEFAULT_REDIS_URL),
        help=f"Redis URL (default ${REDIS_ENV[0]}, ${REDIS_ENV[1]}, else {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"timed iterations per variant (default {default_n}; {quick_n} with --quick)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="rounds the iterations are split in"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~10 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    return parser


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for printing and JSON)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def run_id() -> str:
    """A short random id for names this run creates (tables, cache namespaces)."""
    return secrets.token_hex(4)


def cannot_reach(exc: BaseException) -> int:
    """Report that a server could not be reached; the exit status for it (2)."""
    print(f"cannot reach a server: {str(exc).splitlines()[0]}", file=sys.stderr)
    return 2


# -- timing -----------------------------------------------------------------------------


class Probe(Protocol):
    """Checks around timed runs (e.g. that every run was a cache hit).

    One probe may watch several variants (e.g. every variant using one cache):
    `measure` starts each distinct probe once and stops it with the total number
    of timed runs of the variants it watches.
    """

    def start(self) -> None: ...

    def stop(self, count: int) -> None: ...


class Checks:
    """What the probes verified, and the failures of their checks (then the run exits 1)."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.verified: dict[str, dict[str, int]] = {}
        self.identity_map_leftovers: dict[str, int] = {}

    def tally(self, label: str, **counts: int) -> None:
        """Add ``counts`` to what ``label`` verified (its keys in the order first given)."""
        seen = self.verified.setdefault(label, dict.fromkeys(counts, 0))
        for key, value in counts.items():
            seen[key] += value

    def print_failures(self) -> None:
        for failure in self.failures:
            print(f"FAILED CHECK: {failure}", file=sys.stderr)

    def as_dict(self) -> dict[str, Any]:
        return {
            "verified": self.verified,
            "failures": self.failures,
            "identity_map_leftovers": self.identity_map_leftovers,
        }


@dataclass
class Variant:
    """One thing to time.

    ``op`` runs one operation and must return a plain value (a checksum), never the
    objects it loaded: the timer must not keep them alive into the next run.
    ``prepare`` runs untimed before each operation; ``probes`` around timed runs.
    """

    key: str
    op: Callable[[], object]
    n: int
    warmup: int
    prepare: Callable[[], object] | None = None
    probes: tuple[Probe, ...] = ()
    samples: list[int] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    """Per-operation figures of one variant, in microseconds."""

    median: float
    p25: float
    p75: float
    count: int
    spread: float
    """(max - min) of the per-round medians over the overall median: run-to-run noise."""
    rounds: tuple[float, ...] = ()
    """The median of each round."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_us": round(self.median, 2),
            "p25_us": round(self.p25, 2),
            "p75_us": round(self.p75, 2),
            "count": self.count,
            "round_spread": round(self.spread, 4),
            "round_medians_us": [round(r, 2) for r in self.rounds],
        }


def _run_schedule(variants: Sequence[Variant], schedule: Sequence[int]) -> list[list[int]]:
    """Run ``variants[i]`` for each ``i`` of ``schedule``; per-variant timings in ns."""
    timings: list[list[int]] = [[] for _ in variants]
    clock = time.perf_counter_ns
    for i in schedule:
        variant = variants[i]
        if variant.prepare is not None:
            variant.prepare()
        op = variant.op
        started = clock()
        op()  # its result (a checksum) is dropped here, outside the timing
        timings[i].append(clock() - started)
    return timings


def _probed(variants: Sequence[Variant], counts: Sequence[int]) -> list[tuple[Probe, int]]:
    """Distinct probes of ``variants``, each with the runs it watches."""
    totals: dict[int, list[Any]] = {}
    for variant, count in zip(variants, counts, strict=True):
        for probe in variant.probes:
            totals.setdefault(id(probe), [probe, 0])[1] += count
    return [(probe, total) for probe, total in totals.values()]


def measure(
    variants: Sequence[Variant],
    repeats: int,
    progress: Callable[[str], None] | None = None,
    interleave: bool = True,
    seed: int = 1,
) -> dict[str, Summary]:
    """Time every variant: warm-up, then ``repeats`` rounds of ``n / repeats`` runs each.

    Each operation is timed on its own (``perf_counter_ns``); the summary is the median
    of all of them, which shrugs off the odd garbage collection or scheduler hiccup.
    With ``interleave`` (the default) the runs of one round are shuffled together, so
    every variant sees the same machine: on a shared or virtual machine the cost of a
    loopback round trip drifts by 2-3x from one second to the next, and timing the
    variants one after the other would charge that drift to whichever ran then.
    Without it, the variants run one batch each per round, in a rotating order.
    """
    for variant in variants:
        _run_schedule([variant], [0] * variant.warmup)
    rng = random.Random(seed)
    counts = [max(1, v.n // repeats) for v in variants]
    for round_no in range(repeats):
        if progress is not None:
            progress(f"round {round_no + 1}/{repeats}")
        if interleave:
            schedule = [i for i, count in enumerate(counts) for _ in range(count)]
            rng.shuffle(schedule)
            batches = [(list(range(len(variants))), schedule)]
        else:
            shift = round_no % len(variants)
            order = [*range(shift, len(variants)), *range(shift)]
            batches = [([i], [0] * counts[i]) for i in order]
        for members, schedule in batches:
            chosen = [variants[i] for i in members]
            probed = _probed(chosen, [counts[i] for i in members])
            gc.collect()
            for probe, _ in probed:
                probe.start()
            timings = _run_schedule(chosen, schedule)
            for probe, total in probed:
                probe.stop(total)
            for variant, samples in zip(chosen, timings, strict=True):
                variant.samples.extend(samples)
                variant.round_medians.append(statistics.median(samples))
    return {v.key: summarize(v.samples, v.round_medians) for v in variants}


def summarize(samples_ns: Sequence[int], round_medians_ns: Sequence[float] = ()) -> Summary:
    """Median and quartiles in microseconds."""
    us = sorted(s / 1000 for s in samples_ns)
    q = statistics.quantiles(us, n=4) if len(us) > 1 else [us[0]] * 3
    median = statistics.median(us)
    rounds = tuple(r / 1000 for r in round_medians_ns)
    spread = 0.0
    if len(rounds) > 1 and median:
        spread = (max(rounds) - min(rounds)) / median
    return Summary(median, q[0], q[2], len(us), spread, rounds)


# -- formatting -------------------------------------------------------------------------


def round_or_none(value: float | None, digits: int = 4) -> float | None:
    """``round(value, digits)``, or None for None (for the JSON output)."""
    return None if value is None else round(value, digits)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or zero."""
    if not numerator or not denominator:
        return None
    return numerator / denominator


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}{TIMES}"


def fmt_us(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def fmt_pct(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.0f}%"


def summary_cells(s: Summary) -> list[str]:
    """Table cells of ``s``: the median, the p25-p75 range and the spread of the rounds."""
    return [fmt_us(s.median), f"{fmt_us(s.p25)}-{fmt_us(s.p75)}", fmt_pct(s.spread)]


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()
) -> None:
    """Print ``rows`` as an aligned text table; columns in ``right`` are right-aligned."""
    right = set(right)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        if not row:
            print()
        else:
            print(line(row))


# -- targets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A ratio checked against a limit: ``value <= limit`` or ``value >= limit``.

    ``low`` / ``high``: the lowest and highest value of the ratio taken round by round,
    to show how much it moved during the run.
    """

    name: str
    value: float | None
    op: str
    limit: float
    low: float | None = None
    high: float | None = None

    @classmethod
    def ratio_of(
        cls, name: str, numerator: Summary, denominator: Summary, op: str, limit: float
    ) -> Target:
        """The target on ``numerator / denominator`` (medians), with its per-round range."""
        per_round = [n / d for n, d in zip(numerator.rounds, denominator.rounds, strict=False) if d]
        low = min(per_round) if per_round else None
        high = max(per_round) if per_round else None
        return cls(name, ratio(numerator.median, denominator.median), op, limit, low, high)

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def line(self, width: int = 60) -> str:
        verdict = "PASS" if self.passed else "MISS"
        shown = "n/a" if self.value is None else f"{self.value:.2f}{TIMES}"
        limit = f"{self.op} {self.limit}{TIMES}"
        rounds = ""
        if self.low is not None and self.high is not None:
            rounds = f"  rounds {self.low:.2f}-{self.high:.2f}"
        target = f"(target {limit})"
        return f"  {verdict}  {self.name.ljust(width)} {shown:>7}  {target:<18}{rounds}".rstrip()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": round_or_none(self.value),
            "op": self.op,
            "limit": self.limit,
            "pass": self.passed,
            "round_low": round_or_none(self.low),
            "round_high": round_or_none(self.high),
        }


def print_targets(targets: Sequence[Target]) -> None:
    width = max(len(t.name) for t in targets)
    for target in targets:
        print(target.line(width))
    passed = sum(t.passed for t in targets)
    print(f"  {passed}/{len(targets)} targets met")


def print_floor(name: str, base: Summary, round_trip: Summary, trips: int = 1) -> float:
    """Print and return the least ``name`` can be: ``(base + trips round trips) / base``
    (medians of this run). Not a target: what a path that must wait for the store that
    many times cannot go below, whatever its own code costs."""
    floor = (base.median + trips * round_trip.median) / base.median
    print(
        f"  floor {name}: {floor:.2f}{TIMES} "
        f"(({base.median:,.0f} + {trips} {TIMES} {round_trip.median:,.0f} µs Redis round trip)"
        f" / {base.median:,.0f})"
    )
    return floor


# -- environment and cleanup ------------------------------------------------------------


def environment() -> dict[str, str]:
    """Versions and machine, for the JSON output."""
    import msgpack
    import redis
    import sqlalchemy

    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": str(os.cpu_count()),
        "sqlalchemy": sqlalchemy.__version__,
        "redis-py": redis.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def delete_namespace_keys(client: Any, namespaces: Iterable[str], batch: int = 500) -> int:
    """UNLINK every key under ``{namespace}:`` (SCAN MATCH, never FLUSHDB); the count."""
    removed = 0
    for namespace in namespaces:
        keys: list[bytes] = []
        for key in client.scan_iter(match=_glob_escape(namespace) + ":*", count=1000):
            keys.append(key)
            if len(keys) >= batch:
                removed += int(client.unlink(*keys))
                keys.clear()
        if keys:
            removed += int(client.unlink(*keys))
    return removed


def delete_namespaces_reported(client: Any, namespaces: Sequence[str]) -> None:
    """`delete_namespace_keys`, then print how many keys went, from where."""
    removed = delete_namespace_keys(client, namespaces)
    where = " and ".join(f"{namespace}:*" for namespace in namespaces)
    print(f"cleanup: removed {removed} Redis keys under {where}")


def run_cleanup(steps: Iterable[tuple[str, Callable[[], object]]]) -> None:
    """Run every ``(what, step)``; report a failed step on stderr, never raise."""
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            print(f"cleanup: could not {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
