"""What the warmer preloads: the target kinds, their results, and the statement runner.

Each target kind knows how to describe itself (``sa-cache warm --dry-run``) and how to
run in a Session of the warmer; `Warmer` declares and runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.orm import Session

from .backends.base import NO_VALUE
from .entity_plan import plan_for
from .query import query_key
from .query_option import REFRESH_OPTION, with_cache
from .warming_entities import Tally, WarmError, count_rows, warm_keys, warm_table

if TYPE_CHECKING:
    from .cache import Cache
    from .entity import EntitySpec
    from .warming import Warmer

Progress = Callable[[str, int, "int | None"], None]
"""``progress(target name, rows done, total rows or None)``."""


@dataclass
class TargetResult(Tally):
    """What one target did, how long it took, and the error that stopped it (if any)."""

    name: str = ""
    kind: str = ""
    seconds: float = 0.0
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class WarmReport:
    """The results of one run, target by target, and totals."""

    results: list[TargetResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[TargetResult]:
        return [r for r in self.results if not r.ok]

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.results)

    @property
    def entries(self) -> int:
        return sum(r.entries for r in self.results)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.results)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.results)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# -- targets ----------------------------------------------------------------------------


def cache_option(statement: Any) -> with_cache | None:
    """The ``with_cache`` option a statement carries, if any."""
    for option in getattr(statement, "_with_options", ()):
        if isinstance(option, with_cache):
            return option
    return None


def label(statement: Any) -> str:
    """A short name for a statement: the entities it selects."""
    names = []
    for description in getattr(statement, "column_descriptions", ()):
        entity = description.get("entity")
        names.append(entity.__name__ if isinstance(entity, type) else str(description["name"]))
    return ",".join(dict.fromkeys(names)) or "statement"


def _sql(statement: Any) -> str:
    try:
        return " ".join(str(statement).split())
    except Exception:  # a construct the default dialect cannot render
        return repr(statement)


class Target:
    """Something the warmer preloads; built by the `Warmer` methods, run by `Warmer.run`."""

    kind = "target"

    def __init__(self, name: str) -> None:
        self.name = name

    def describe(self) -> str:
        raise NotImplementedError

    def run(self, warmer: Warmer, session: Session, tally: Tally, progress: Progress) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class ReferenceTarget(Target):
    """Every row of a registered model, plus the cached all-rows query ``statement``."""

    kind = "reference"

    def __init__(self, name: str, spec: EntitySpec, all_rows: bool) -> None:
        super().__init__(name)
        self.spec = spec
        model = spec.mapper.class_
        self.statement: sa.Select[Any] | None = None
        if all_rows:
            self.statement = sa.select(model).options(with_cache(ttl=spec.ttl, name=name))

    def describe(self) -> str:
        ttl = "default ttl" if self.spec.ttl is None else f"ttl {self.spec.ttl:g} s"
        text = f"every {self.spec.mapper.class_.__name__} row as an entity entry ({ttl})"
        if self.statement is not None:
            text += f" + the cached query {_sql(self.statement)}"
        return text

    def run(self, warmer: Warmer, session: Session, tally: Tally, progress: Progress) -> None:
        total = count_rows(session, self.spec)
        progress(self.name, 0, total)
        warm_table(
            warmer.cache,
            session,
            self.spec,
            warmer.batch_size,
            tally,
            lambda t: progress(self.name, t.rows, max(total, t.rows)),
        )
        if self.statement is not None:
            warm_statement(warmer, session, self.statement, None, tally, entities=False)


class HotTarget(Target):
    """The rows a statement returns, as entity entries; and its result when cached."""

    kind = "hot"

    def __init__(self, name: str, statement: Any, params: dict[str, Any] | None) -> None:
        super().__init__(name)
        self.statement = statement
        self.params = params
        self.option = cache_option(statement)

    def describe(self) -> str:
        also = " + its cached result" if self.option is not None else ""
        return f"entity entries of the rows of {_sql(self.statement)}{also}"

    def run(self, warmer: Warmer, session: Session, tally: Tally, progress: Progress) -> None:
        tally.rows += warm_statement(
            warmer, session, self.statement, self.params, tally, entities=True
        )
        progress(self.name, tally.rows, tally.rows)


class QueryTarget(Target):
    """The cached result of one statement (``with_cache`` is added when missing)."""

    kind = "query"

    def __init__(self, name: str, statement: Any, params: dict[str, Any] | None) -> None:
        super().__init__(name)
        option = cache_option(statement)
        if option is None:
            option = with_cache(name=name)
            statement = statement.options(option)
        self.statement = statement
        self.params = params
        self.option = option

    def describe(self) -> str:
        return f"the cached result of {_sql(self.statement)}"

    def run(self, warmer: Warmer, session: Session, tally: Tally, progress: Progress) -> None:
        tally.rows += warm_statement(
            warmer, session, self.statement, self.params, tally, entities=False
        )
        progress(self.name, tally.rows, tally.rows)


class PredictiveTarget(Target):
    """The ``top`` most read entity rows and named queries of the coming time bucket."""

    kind = "predictive"

    def __init__(self, name: str, top: int, lead: float) -> None:
        super().__init__(name)
        self.top = top
        self.lead = lead

    def describe(self) -> str:
        return (
            f"the {self.top} entity rows and named queries read most in the time-of-day "
            f"bucket {self.lead:g} s ahead (sampled access statistics)"
        )

    def run(self, warmer: Warmer, session: Session, tally: Tally, progress: Progress) -> None:
        from .access_stats import stats_for

        stats = stats_for(warmer.cache)
        stats.flush()
        bucket = stats.bucket_of(warmer.clock() + self.lead)
        specs = {spec.table: spec for spec in warmer.cache.entities.values()}
        queries = warmer.query_targets()
        rows: dict[str, list[tuple[Any, ...]]] = {}
        chosen: dict[str, Target] = {}
        picked = 0
        for member, _score in stats.top(bucket, stats.capacity + stats.capacity // 4):
            if picked >= self.top:
                break
            if member.kind == "e" and member.name in specs and member.identity_token is None:
                rows.setdefault(member.name, []).append(member.pk)
            elif member.kind == "q" and member.name in queries:
                chosen[member.name] = queries[member.name]
            else:
                continue  # unknown to this warmer: nothing to re-run it with
            picked += 1
        progress(self.name, 0, picked)
        for table, pks in rows.items():
            warm_keys(warmer.cache, session, specs[table], pks, warmer.batch_size, tally)
            progress(self.name, tally.rows, picked)
        for target in dict.fromkeys(chosen.values()):
            target.run(warmer, session, tally, lambda *_: None)
        progress(self.name, picked, picked)


class CallTarget(Target):
    """A plain function run on a schedule."""

    kind = "call"

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        super().__init__(name)
        self.fn = fn

    def describe(self) -> str:
        return f"call {self.fn!r}"

    def run(self, warmer: Warmer, session: Session, tally: Tally, progress: Progress) -> None:
        self.fn()


def warm_statement(
    warmer: Warmer,
    session: Session,
    statement: Any,
    params: dict[str, Any] | None,
    tally: Tally,
    *,
    entities: bool,
) -> int:
    """Run ``statement`` through ``session`` (the cache fills its entry when it carries
    ``with_cache``); with ``entities``, warm the registered rows it loaded. Returns
    the number of result rows (entity rows re-read for their entries are not counted).

    A primary-key lookup of a registered model is served by its entity entry, not by
    a query entry: that entry is what gets warmed.
    """
    session.rollback()
    session.expunge_all()
    bind = session.get_bind(mapper=_first_mapper(statement), clause=statement)
    by_entity = _served_by_entity(warmer.cache, statement, bind)
    result = session.execute(statement, params, execution_options={REFRESH_OPTION: True})
    if getattr(result, "_unique_filter_state", None) is not None:
        result = result.unique()
    rows = result.all()  # held: the identity map keeps loaded objects only weakly
    loaded = list(session.identity_map.keys())
    count = len(rows)
    del rows
    if entities or by_entity:
        by_spec: dict[Any, list[tuple[Any, ...]]] = {}
        for cls, pk, token in loaded:
            spec = warmer.cache.entities.get(inspect(cls))
            if spec is not None and token is None:
                by_spec.setdefault(spec, []).append(tuple(pk))
        if entities and count and not by_spec and cache_option(statement) is None:
            raise WarmError(  # (a plausible mistake: said, not reported as "ok")
                f"{_sql(statement)} loaded no row of a registered model and carries no "
                "with_cache(): nothing to warm (register the model, or add with_cache())"
            )
        scratch = Tally()
        for spec, pks in by_spec.items():
            warm_keys(warmer.cache, session, spec, pks, warmer.batch_size, scratch)
        tally.entries += scratch.entries
        tally.bytes += scratch.bytes
        tally.skipped += scratch.skipped
    if cache_option(statement) is not None and not by_entity:
        _check_stored(warmer.cache, bind, statement, params, tally)
    return count


def _served_by_entity(cache: Cache, statement: Any, bind: Any) -> bool:
    """Is ``statement`` a primary-key lookup the entity cache answers?"""
    if not cache.entities:
        return False
    # The cache key first: compiling an ORM select before its first cache key is made
    # changes the key SQLAlchemy memoizes for it, and the cache would not find it again.
    ck = statement._generate_cache_key()
    if ck is None:
        return False
    plan = plan_for(cache, statement.compile(dialect=bind.dialect, cache_key=ck))
    if plan is None:
        return False
    option = cache_option(statement)  # (tags, relationships: cached as a query)
    return option is None or option.entity_served(plan.spec.write)


def _first_mapper(statement: Any) -> Any:
    for description in getattr(statement, "column_descriptions", ()):
        entity = description.get("entity")
        if entity is not None:
            return inspect(entity).mapper
    return None


def _check_stored(
    cache: Cache, bind: Any, statement: Any, params: dict[str, Any] | None, tally: Tally
) -> None:
    key = query_key(cache, statement, bind, params)
    raw = cache.fetch([key])[0]
    if raw is NO_VALUE or cache.unpack(raw) is NO_VALUE:
        raise WarmError(
            f"the result of {_sql(statement)} was not stored (the cache did not answer, "
            "or the statement cannot be cached: with_cache(strict=True) names the reason)"
        )
    tally.entries += 1
    tally.bytes += len(raw)


def no_progress(name: str, done: int, total: int | None) -> None:
    pass


def check_select(statement: Any, what: str) -> None:
    """Refuse anything but a ``select()`` for ``what``."""
    if not isinstance(statement, sa.Select):
        raise TypeError(f"{what}() takes a select() statement, got {type(statement).__name__}")
