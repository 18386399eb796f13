"""Scheduled warming: cron expressions (croniter) or intervals, and the loop that runs them.

The scheduler reads time only through ``clock`` and waits only through ``sleep``, so a
test drives it with a fake clock. A job that raises is logged and counted, and runs
again at its next time: one failing target never stops the others. A job that overran
its next time runs once, not once per missed slot.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Protocol

from .freshness import check_seconds

log = logging.getLogger("sa_cache")

_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Schedule(Protocol):
    """When a job runs next."""

    def next_after(self, now: float) -> float:
        """The first run time (unix seconds) strictly after ``now``."""
        ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Interval:
    """Every ``seconds`` seconds, counted from the end of the previous run."""

    seconds: float

    def __post_init__(self) -> None:
        # (inf passed a "> 0" test, and then broke the job table: OverflowError)
        check_seconds("an interval", self.seconds)

    def next_after(self, now: float) -> float:
        return now + self.seconds

    def describe(self) -> str:
        return f"every {self.seconds:g} s"


@dataclass(frozen=True)
class Cron:
    """A cron expression (5 fields, or 6 with seconds last; ``@hourly`` etc.) in ``tz``."""

    expression: str
    tz: tzinfo = timezone.utc

    def __post_init__(self) -> None:
        try:
            from croniter import croniter
        except ImportError as exc:  # a dependency of sa-cache; missing in a broken install
            raise ImportError("cron schedules need croniter: pip install croniter") from exc
        if not croniter.is_valid(self.expression):
            raise ValueError(f"not a cron expression or an interval: {self.expression!r}")

    def next_after(self, now: float) -> float:
        from croniter import croniter

        start = datetime.fromtimestamp(now, self.tz)
        return float(croniter(self.expression, start).get_next(float))

    def describe(self) -> str:
        return f"cron {self.expression!r} ({self.tz})"


def parse_schedule(spec: Any, tz: tzinfo | None = None) -> Schedule:
    """A `Schedule` from a cron string, an interval (``300``, ``"5m"``, ``timedelta``)
    or a ready `Schedule`. Cron times are in ``tz`` (default UTC)."""
    if isinstance(spec, (Interval, Cron)):
        return spec
    if isinstance(spec, timedelta):
        return Interval(spec.total_seconds())
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Interval(float(spec))
    if isinstance(spec, str):
        match = _INTERVAL.match(spec)
        if match:
            return Interval(float(match.group(1)) * _UNITS[match.group(2)])
        return Cron(spec.strip(), tz or timezone.utc)
    if callable(getattr(spec, "next_after", None)):
        return spec  # type: ignore[no-any-return]
    raise TypeError(f"a schedule is a cron string, seconds or a timedelta, got {spec!r}")


@dataclass(eq=False)
class Job:
    """One scheduled target. ``action`` returns a result, or raises when it failed."""

    name: str
    schedule: Schedule
    action: Callable[[], Any]
    next_run: float | None = None
    runs: int = 0
    failures: int = 0
    last_error: BaseException | None = None
    last_result: Any = None


@dataclass
class JobRun:
    """One run of a job: its result, or the error it raised."""

    job: Job
    started: float
    seconds: float
    result: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Scheduler:
    """Runs ``jobs`` when due. Drive it with `run_pending` or `run_forever`."""

    jobs: list[Job]
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Any] | None = None
    on_run: Callable[[JobRun], None] | None = None
    tick: float = 1.0
    """Longest single wait, so that a stop request is noticed quickly."""
    history: list[JobRun] = field(default_factory=list)
    keep: int = 100
    """Runs kept in ``history``."""

    def __post_init__(self) -> None:
        now = self.clock()
        for job in self.jobs:
            if job.next_run is None:
                job.next_run = job.schedule.next_after(now)

    def next_due(self) -> float | None:
        """When the next job is due (None without jobs)."""
        times = [job.next_run for job in self.jobs if job.next_run is not None]
        return min(times) if times else None

    def run_pending(self, limit: int | None = None) -> list[JobRun]:
        """Run every job due now (at most ``limit``), in order of due time."""
        now = self.clock()
        due = sorted(
            (j for j in self.jobs if j.next_run is not None and j.next_run <= now),
            key=lambda j: j.next_run or 0.0,
        )
        return [self._run(job) for job in due[:limit]]

    def _run(self, job: Job) -> JobRun:
        started = self.clock()
        began = time.perf_counter()
        run = JobRun(job, started, 0.0)
        try:
            run.result = job.action()
        except Exception as exc:
            run.error = exc
            job.failures += 1
            job.last_error = exc
            log.error("sa_cache: warming job %r failed: %s", job.name, exc, exc_info=exc)
        else:
            job.last_result = run.result
        run.seconds = time.perf_counter() - began
        job.runs += 1
        job.next_run = job.schedule.next_after(max(self.clock(), started))
        self.history.append(run)
        del self.history[: -self.keep]
        if self.on_run is not None:
            self.on_run(run)
        return run

    def run_forever(self, stop: threading.Event | None = None, max_runs: int | None = None) -> int:
        """Run jobs as they fall due until ``stop`` is set or ``max_runs`` ran; the count."""
        sleep = self.sleep or (stop.wait if stop is not None else time.sleep)
        ran = 0
        while stop is None or not stop.is_set():
            due = self.next_due()
            if due is None or (max_runs is not None and ran >= max_runs):
                break
            wait = due - self.clock()
            if wait > 0:
                sleep(min(wait, self.tick))
                continue
            left = None if max_runs is None else max_runs - ran
            ran += len(self.run_pending(left))
        return ran


def jobs_table(jobs: Iterable[Job]) -> list[tuple[str, str, str]]:
    """(name, schedule, next run in UTC) for each job, for listings."""
    out = []
    for job in jobs:
        when = "-"
        if job.next_run is not None:
            when = datetime.fromtimestamp(job.next_run, timezone.utc).isoformat(timespec="seconds")
        out.append((job.name, job.schedule.describe(), when))
    return out
