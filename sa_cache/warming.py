"""The warming runner: declare what to preload, then run it once, on a schedule, after
commits, or following measured traffic.

``warmer = sa_cache.Warmer(cache, SessionLocal)`` then::

    warmer.reference(Country)                    # every row + the cached select(Country)
    warmer.hot(select(User).order_by(User.last_login.desc()).limit(1000))
    warmer.query(select(Product).where(...).options(with_cache(name="featured")))
    warmer.every("0 * * * *", warmer.predictive(top=1000))
    warmer.on_commit(Order, lambda order: [order.customer])
    warmer.run()                                 # or: sa-cache warm app:warmer

Entity entries are written in pipelined, guarded batches (`warming_entities`): stamped
with the generations read before the batch was loaded, swapped in by compare-and-set,
so a commit during a run is never overwritten. Query entries are filled by running the
statement through a Session of ``session_factory`` — the cache's own fill path. Running
the same declarations twice leaves the same entries (with fresh TTLs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import tzinfo
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.orm import Session, scoped_session

from .freshness import check_seconds
from .query_option import REFRESH_OPTION
from .warming_entities import WarmError, warm_keys
from .warming_schedule import Job, JobRun, Scheduler, parse_schedule
from .warming_targets import (
    CallTarget,
    HotTarget,
    PredictiveTarget,
    Progress,
    QueryTarget,
    ReferenceTarget,
    Target,
    TargetResult,
    WarmReport,
    cache_option,
    check_select,
    label,
    no_progress,
    warm_statement,
)

if TYPE_CHECKING:
    from .cache import Cache
    from .entity import EntitySpec
    from .warming_events import CommitWatch

__all__ = ["REFRESH_OPTION", "Target", "TargetResult", "WarmError", "WarmReport", "Warmer"]

log = logging.getLogger("sa_cache")


class Warmer:
    """Preloads a `Cache`: declared targets, schedules, commit rules, predictions.

    ``session_factory`` makes the Sessions the warmer loads with: a sessionmaker of
    `CachingSession`, or one the cache is attached to (of a ``scoped_session``, its
    sessionmaker: the warmer never uses the thread's own Session). ``batch_size`` rows
    go in one pipelined batch; ``clock`` (unix seconds) drives predictions and schedules.
    """

    def __init__(
        self,
        cache: Cache,
        session_factory: Callable[[], Session],
        *,
        batch_size: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.cache = cache
        if isinstance(session_factory, scoped_session):
            session_factory = session_factory.session_factory
        self.session_factory = session_factory
        self.batch_size = batch_size
        self.clock = clock
        self.targets: list[Target] = []
        self.jobs: list[Job] = []
        self._watch: CommitWatch | None = None

    # -- declarations ---------------------------------------------------------------------

    def reference(self, model: Any, *, all_rows: bool = True, name: str | None = None) -> Target:
        """Every row of registered ``model`` as entity entries, and (``all_rows``) the
        cached ``select(model)`` — reuse ``target.statement`` to read it. That query is
        one entry holding the whole table: for large tables pass ``all_rows=False``."""
        spec = self._spec(model)
        name = name or f"reference:{model.__name__}"
        for target in self.targets:
            if (
                isinstance(target, ReferenceTarget)
                and target.spec is spec
                and target.name == name
                and (target.statement is not None) == all_rows
            ):
                return target
        return self._add(ReferenceTarget(name, spec, all_rows))

    def hot(
        self, statement: Any, *, name: str | None = None, params: dict[str, Any] | None = None
    ) -> Target:
        """The rows ``statement`` returns as entity entries (registered models, eager
        loads included), and its own result when it carries ``with_cache()``."""
        check_select(statement, "hot")
        option = cache_option(statement)
        name = self._name(name or (option.name if option else None), "hot", statement)
        return self._add(HotTarget(name, statement, params))

    def query(
        self, statement: Any, *, name: str | None = None, params: dict[str, Any] | None = None
    ) -> Target:
        """The cached result of ``statement`` (named ``name`` or by its ``with_cache``)."""
        check_select(statement, "query")
        option = cache_option(statement)
        name = self._name(name or (option.name if option else None), "query", statement)
        return self._add(QueryTarget(name, statement, params))

    def predictive(
        self, top: int = 1000, *, lead: float = 600.0, name: str = "predictive"
    ) -> Target:
        """Re-warm the ``top`` entity rows and named queries read most in the time-of-day
        bucket that is current ``lead`` seconds from now (see `access_stats`)."""
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"top must be a positive int, got {top!r}")
        lead = check_seconds("lead", lead, zero=True)  # NaN would fail every run
        return self._add(PredictiveTarget(self._name(name, "predictive", None), top, lead))

    def every(
        self, schedule: Any, target: Target | str | Callable[[], Any], *, tz: tzinfo | None = None
    ) -> Job:
        """Run ``target`` on ``schedule``: a cron string (``"0 * * * *"``, in ``tz``,
        default UTC), seconds, ``"15m"``-style text or a timedelta."""
        parsed = parse_schedule(schedule, tz)
        if isinstance(target, str):
            target = self.target(target)
        elif not isinstance(target, Target):
            if not callable(target):
                raise TypeError(
                    f"every() takes a target, a target name or a function, got {target!r}"
                )
            fn = target
            target = CallTarget(getattr(fn, "__name__", "call"), fn)
        chosen = target

        def action() -> TargetResult:
            result = TargetResult(name=chosen.name, kind=chosen.kind)
            self._execute(chosen, result, no_progress)  # the scheduler logs a failure
            return result

        job = Job(chosen.name, parsed, action)
        self.jobs.append(job)
        return job

    def on_commit(
        self, model: type[Any], fn: Callable[[Any], Any], *, deleted: bool = False
    ) -> None:
        """After the outermost commit that inserted or updated (``deleted``: or deleted)
        an instance of ``model``, warm what ``fn(instance)`` returns: instances,
        statements (as `hot`), targets, or None. Never for rolled-back changes."""
        from .warming_events import CommitWatch, Rule

        if not isinstance(model, type) or not hasattr(model, "__mapper__"):
            raise TypeError(f"on_commit() takes a mapped class, got {model!r}")
        if not callable(fn):
            raise TypeError(f"on_commit() takes a function of the instance, got {fn!r}")
        if self._watch is None:
            self._watch = CommitWatch(self, self.session_factory)
        self._watch.add(Rule(model, fn, deleted))

    # -- running --------------------------------------------------------------------------

    def target(self, name: str) -> Target:
        """The declared target called ``name``."""
        for target in self.targets:
            if target.name == name:
                return target
        known = ", ".join(t.name for t in self.targets) or "none"
        raise KeyError(f"no warming target named {name!r} (declared: {known})")

    def plan(self) -> list[tuple[str, str, str]]:
        """(name, kind, description) of every declared target; touches nothing."""
        return [(t.name, t.kind, t.describe()) for t in self.targets]

    def run(
        self, targets: Iterable[Target | str] | None = None, *, progress: Progress | None = None
    ) -> WarmReport:
        """Run ``targets`` (default: all declared) one after the other."""
        chosen = [self.target(t) if isinstance(t, str) else t for t in (targets or self.targets)]
        started = time.perf_counter()
        report = WarmReport([self.run_target(t, progress) for t in chosen])
        report.seconds = time.perf_counter() - started
        return report

    def run_target(self, target: Target, progress: Progress | None = None) -> TargetResult:
        """Run one target; its failure is in the result, never raised."""
        result = TargetResult(name=target.name, kind=target.kind)
        try:
            self._execute(target, result, progress or no_progress)
        except Exception as exc:
            result.error = exc
            log.error("sa_cache: warming %r failed: %s", target.name, exc, exc_info=exc)
        return result

    def _execute(self, target: Target, result: TargetResult, progress: Progress) -> None:
        started = time.perf_counter()
        try:
            with self.session_factory() as session:
                target.run(self, session, result, progress)
        except Exception:
            self.cache.stats.incr("warm.error")
            raise
        finally:
            result.seconds = time.perf_counter() - started

    def warm(self, *items: Any, session: Session | None = None) -> TargetResult:
        """Warm ``items`` now: instances of registered models, statements (as `hot`),
        or targets. Raises on failure."""
        result = TargetResult(name="warm", kind="warm")
        if session is None:
            with self.session_factory() as own:
                self._warm_items(own, items, result)
        else:
            self._warm_items(session, items, result)
        return result

    def scheduler(
        self,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Any] | None = None,
        on_run: Callable[[JobRun], None] | None = None,
    ) -> Scheduler:
        """A `Scheduler` over the jobs declared with `every`."""
        return Scheduler(self.jobs, clock or self.clock, sleep, on_run)

    # -- internals ------------------------------------------------------------------------

    def _spec(self, model: Any) -> EntitySpec:
        try:
            mapper = inspect(model)
        except sa.exc.NoInspectionAvailable:
            raise TypeError(f"expected a mapped class, got {model!r}") from None
        spec: EntitySpec | None = self.cache.entities.get(mapper)
        if spec is None:
            name = getattr(model, "__name__", repr(model))
            raise ValueError(f"{name} is not registered with the cache: cache.register({name})")
        return spec

    def _add(self, target: Target) -> Target:
        if any(t.name == target.name for t in self.targets):
            raise ValueError(f"a warming target named {target.name!r} is already declared")
        self.targets.append(target)
        return target

    def _name(self, name: str | None, kind: str, statement: Any) -> str:
        if name is not None:
            return name
        base = f"{kind}:{label(statement)}" if statement is not None else kind
        taken = {t.name for t in self.targets}
        n, candidate = 1, base
        while candidate in taken:
            n += 1
            candidate = f"{base}#{n}"
        return candidate

    def query_targets(self) -> dict[str, Target]:
        """Declared query and hot targets by target name and ``with_cache`` name."""
        found: dict[str, Target] = {}
        for target in self.targets:
            if isinstance(target, (QueryTarget, HotTarget)):
                found.setdefault(target.name, target)
                if target.option is not None and target.option.name:
                    found.setdefault(target.option.name, target)
        return found

    def _warm_items(self, session: Session, items: Sequence[Any], result: TargetResult) -> None:
        by_spec: dict[Any, list[tuple[Any, ...]]] = {}
        for item in items:
            if isinstance(item, Target):
                item.run(self, session, result, no_progress)
            elif isinstance(item, sa.Select):
                result.rows += warm_statement(self, session, item, None, result, entities=True)
            elif hasattr(item, "_sa_instance_state"):
                state = sa.inspect(item)
                spec = self.cache.entities.get(state.mapper)
                if spec is None:
                    raise ValueError(f"{type(item).__name__} is not registered with the cache")
                if state.key is not None and state.key[2] is None:  # no shard / tenant
                    by_spec.setdefault(spec, []).append(tuple(state.key[1]))
            else:
                raise TypeError(f"cannot warm {item!r}: pass instances, statements or targets")
        for spec, pks in by_spec.items():
            warm_keys(self.cache, session, spec, pks, self.batch_size, result)
