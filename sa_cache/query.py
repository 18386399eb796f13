"""Read-through query caching: the `with_cache()` option and its execute hook.

A miss runs the statement as usual and keeps the raw database rows (before any
type processing). A hit feeds those rows to the ORM's own loading path, as if
they had come from the cursor: objects are built, registered in the identity map
and post-loaded (``selectinload``) exactly as on a database load, result
processors run once, and no connection is checked out.

The key is the SQL the dialect compiles plus the parameter values it would send,
the database it goes to and the identity token: two statements that can return
different rows never share a key (DESIGN rule 4). The entry stores the table
generations read *before* the query ran; a newer generation makes it a miss
(rule 3).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy
from sqlalchemy.orm import Session, UserDefinedOption

from .access_stats import record_query
from .backends.base import NO_VALUE
from .cache import token_clock
from .direct import DirectPlan, build_objects, direct_plan
from .entity import EntityPlan, plan_for
from .entity import serve as serve_entity
from .freshness import Freshness
from .invalidation import tables_read
from .stampede import fresh_value, get_or_load
from .transaction import CAPTURE_OPTION, Collector, sees_own_writes, snapshot_is_fresh

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger("sa_cache")

SHAPE_CACHE_SIZE = 2000
REFRESH_OPTION = "sa_cache_refresh"
"""Execution option: run the statement and store its result even over a valid entry
(the warmer sets it, so that a re-run renews entries instead of reading them)."""


class NotCacheable(Exception):
    """Raised by ``with_cache(strict=True)`` for a statement that cannot be cached."""


class with_cache(UserDefinedOption):
    """Cache the results of this statement: ``select(...).options(with_cache(ttl=60))``.

    ``ttl`` seconds (default: the cache's ``default_ttl``); ``name`` labels the query
    in stats; ``tags`` can be invalidated together with ``cache.invalidate_tags``;
    ``relationships=True`` also caches lazy loads of objects this query loaded
    (eager ``selectinload`` / ``subqueryload`` SELECTs are always cached with it);
    ``strict=True`` raises `NotCacheable` instead of bypassing the cache.

    Concurrent misses of one key in a process run the query once; ``lease=True`` makes
    that one load across processes too (a Redis lease: two more round trips per miss).
    ``stale_ttl`` seconds after expiry the rows are still served while one caller
    reloads them, or when the database fails (never after a write to a table they
    read); ``refresh_ahead`` (a fraction of the TTL) and ``beta`` (XFetch) refresh hot
    entries in the background before they expire.
    """

    __slots__ = (
        "_fresh", "beta", "lease", "name", "refresh_ahead", "relationships", "stale_ttl",
        "strict", "tags", "ttl",
    )  # fmt: skip
    propagate_to_loaders = True

    def __init__(
        self,
        ttl: float | None = None,
        name: str | None = None,
        tags: tuple[str, ...] | list[str] = (),
        relationships: bool = False,
        strict: bool = False,
        *,
        stale_ttl: float = 0.0,
        refresh_ahead: float | None = None,
        beta: float = 1.0,
        lease: bool = False,
    ) -> None:
        Freshness(ttl or 1.0, stale_ttl, refresh_ahead, beta)  # ValueError names a bad field
        if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
            raise ValueError(f"with_cache ttl must be positive seconds or None, got {ttl!r}")
        if isinstance(tags, str):
            raise TypeError("with_cache tags must be a sequence of str, not a str")
        self.ttl = ttl
        self.name = name
        self.tags = tuple(tags)
        self.relationships = relationships
        self.strict = strict
        self.stale_ttl, self.refresh_ahead, self.beta = stale_ttl, refresh_ahead, beta
        self.lease = lease
        self._fresh: tuple[Any, Freshness] | None = None  # (config, its policy), memoized
        super().__init__(payload=None)

    def freshness(self, cache: Cache) -> Freshness:
        """The freshness policy of this option in ``cache`` (ttl defaults to its default)."""
        memo = self._fresh
        if memo is not None and memo[0] is cache.config:
            return memo[1]
        ttl = cache._ttl(self.ttl)
        fresh = (
            Freshness(None)
            if ttl is None
            else Freshness(ttl, self.stale_ttl, self.refresh_ahead, self.beta)
        )
        self._fresh = (cache.config, fresh)
        return fresh


class _Shape:
    """What one statement shape compiles to, computed once per process."""

    __slots__ = (
        "compiled", "direct", "gen_keys", "gen_tables", "plans", "prefix", "raw_prefix",
        "template",
    )  # fmt: skip

    def __init__(self, compiled: Any, gen_tables: tuple[str, ...], bind: Any) -> None:
        self.compiled = compiled
        self.gen_tables = gen_tables
        url = getattr(bind, "url", None)
        database = url.render_as_string(hide_password=True) if url is not None else id(bind)
        # The part of every key material that is fixed for this shape: database, SQL, and
        # what the entry holds — processed values for a direct shape (built without the
        # ORM's loading), raw cursor rows otherwise; the two never share a key.
        self.raw_prefix = repr((database, compiled.string))
        self.direct = direct_plan(compiled)
        self.prefix = ("d" if self.direct is not None else "") + self.raw_prefix
        self.plans: dict[int, EntityPlan | None] = {}  # per Cache (its registered models)
        self.gen_keys: dict[str, tuple[str, ...]] = {}  # per namespace
        # a CursorResult of one real execution in this process: its metadata replays hits
        self.template: CursorResult[Any] | None = None

    def generation_keys(self, cache: Cache) -> tuple[str, ...]:
        """The generation keys of this shape's tables in ``cache``'s namespace."""
        try:
            return self.gen_keys[cache.namespace]
        except KeyError:
            keys = self.gen_keys[cache.namespace] = cache.generation_keys(self.gen_tables)
            return keys

    def plan(self, cache: Cache, statement: Any) -> EntityPlan | None:
        """The entity-cache plan of this shape for ``cache`` (computed once)."""
        try:
            return self.plans[id(cache)]
        except KeyError:
            plan = self.plans[id(cache)] = plan_for(cache, self.compiled)
            return plan


class _Lru(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.lock = threading.Lock()

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self[key] = value
            if len(self) > self.size:
                self.popitem(last=False)


_shapes = _Lru(SHAPE_CACHE_SIZE)


class _Capture:
    """Receives the raw rows of a miss from the engine listener."""

    __slots__ = ("fill_ok", "rows", "snapshot_clock", "template")

    def __init__(self) -> None:
        self.rows: list[list[Any]] | None = None
        self.template: CursorResult[Any] | None = None
        self.fill_ok = False
        self.snapshot_clock: int | None = None

    def fill_allowed(self, gens: tuple[str, ...]) -> bool:
        """May rows read by this statement be stored under ``gens``? (see `snapshot_is_fresh`)"""
        return self.fill_ok or _older_than_snapshot(gens, self.snapshot_clock)

    def capture(self, conn: Connection, result: Any, collector: Collector | None) -> None:
        if self.rows is not None:
            return
        rows = result.cursor_strategy.fetchall(result, result.cursor)
        result.cursor_strategy = FullyBufferedCursorFetchStrategy(
            result.cursor, None, initial_buffer=rows
        )
        self.rows = [list(r) for r in rows]  # lists pack without a tuple marker
        self.template = result
        if collector is None or snapshot_is_fresh(conn):
            self.fill_ok = True
        else:
            self.fill_ok = collector.statements.get(id(conn), 0) <= 1
            self.snapshot_clock = collector.snapshot_clocks.get(id(conn))


class _NullCursor:
    def close(self) -> None:
        pass


_NULL_CURSOR = _NullCursor()


def _replay(template: CursorResult[Any], rows: list[Any]) -> CursorResult[Any]:
    """A CursorResult over cached raw rows, with the metadata of an earlier execution."""
    result: CursorResult[Any] = CursorResult.__new__(CursorResult)
    result.context = template.context
    result.dialect = template.dialect
    result.connection = template.connection
    result._echo = False
    result._metadata = template._metadata
    result.cursor = _NULL_CURSOR  # type: ignore[assignment]
    result.cursor_strategy = FullyBufferedCursorFetchStrategy(None, None, initial_buffer=rows)
    return result


def _older_than_snapshot(gens: tuple[str, ...], snapshot_clock: int | None) -> bool:
    """True when no table in ``gens`` was bumped after the transaction's snapshot clock.

    Then the snapshot already holds every commit those generations stand for, and a
    result read from it may be stored under them (REPEATABLE READ / SERIALIZABLE).
    """
    if snapshot_clock is None:
        return False
    for token in gens:
        clock = token_clock(token)
        if clock is None or clock > snapshot_clock:
            return False
    return True


def _bypass(opt: with_cache | None, cache: Cache, reason: str) -> None:
    cache.stats.incr("query.bypass")
    if opt is not None and opt.strict:
        raise NotCacheable(reason)
    log.debug("sa_cache: not caching: %s", reason)


def _shape(statement: Any, ck: Any, bind: Any) -> _Shape:
    key = (bind, ck.key)
    shape: _Shape | None = _shapes.get(key)
    if shape is None:
        compiled = statement.compile(dialect=bind.dialect, cache_key=ck)
        compile_state = getattr(compiled, "compile_state", None)
        element = getattr(compile_state, "statement", None)
        if element is None:
            element = compiled.statement
        tables = tables_read(element)
        shape = _Shape(compiled, tuple(sorted(tables)), bind)
        _shapes.put(key, shape)
    return shape


def _params(shape: _Shape, ck: Any, parameters: Any) -> dict[str, Any]:
    """The parameter values the dialect would send for this execution."""
    params: dict[str, Any] = shape.compiled.construct_params(
        parameters or None,
        extracted_parameters=ck.bindparams,
        escape_names=False,
        **({"_collected_params": ck.params} if getattr(ck, "params", None) else {}),
    )
    return params


def _material(
    prefix: str,
    params: dict[str, Any],
    identity_token: Any = None,
    schema_translate_map: Any = None,
) -> str:
    """Everything that decides which rows come back: database, SQL, parameter values
    (``prefix``: the shape's fixed part, see `_Shape`)."""
    return prefix + repr(
        (sorted(params.items()) if params else (), identity_token, schema_translate_map)
    )


def query_key(
    cache: Cache, statement: Any, bind: Any, parameters: Any = None, identity_token: Any = None
) -> str:
    """The key ``statement`` is cached under when run on ``bind`` with ``parameters``."""
    return query_keys(cache, statement, bind, parameters, identity_token)[0]


def query_keys(
    cache: Cache, statement: Any, bind: Any, parameters: Any = None, identity_token: Any = None
) -> list[str]:
    """Every key ``statement`` may be cached under (a direct shape has two formats)."""
    ck = statement._generate_cache_key()
    if ck is None:
        raise NotCacheable("the statement has no SQLAlchemy cache key")
    engine = getattr(bind, "engine", bind)
    shape = _shape(statement, ck, engine)
    params = _params(shape, ck, parameters)
    prefixes = dict.fromkeys([shape.prefix, shape.raw_prefix])
    return [cache.keys.query(_material(p, params, identity_token)) for p in prefixes]


def _option(state: Any) -> with_cache | None:
    """The `with_cache` option of this execution, if it is one we may serve."""
    for option in state.user_defined_options:
        if isinstance(option, with_cache):
            break
    else:
        return None
    if state.lazy_loaded_from is not None and not option.relationships:
        return None
    return option


def _entity_candidate(cache: Cache, state: Any) -> bool:
    """Could this execution be a primary-key read of a registered model?"""
    return bool(cache.entities) and state.bind_mapper in cache.entities


def on_orm_execute(cache: Cache, state: Any) -> Any:
    """The ``do_orm_execute`` hook: serve from the cache, fill it, or step aside."""
    if not state.is_select or state.is_column_load:
        return None
    opt = _option(state)
    if opt is None and not _entity_candidate(cache, state):
        return None
    statement = state.statement
    if state.load_options._populate_existing or statement._for_update_arg is not None:
        cache.stats.incr("query.bypass")
        return None
    ck = statement._generate_cache_key()
    if ck is None:
        _bypass(opt, cache, "the statement has no SQLAlchemy cache key")
        return None
    session: Session = state.session
    bind = session.get_bind(**state.bind_arguments)
    bind = getattr(bind, "engine", bind)
    shape = _shape(statement, ck, bind)
    plan = shape.plan(cache, statement)
    if opt is None and plan is None:
        return None
    if not shape.gen_tables:
        _bypass(opt, cache, "no tables found to invalidate it by (e.g. text() without tables)")
        return None
    # Autoflush now, as the ORM would before running the query (a hit skips it).
    if state.load_options._autoflush and session.autoflush:
        session._autoflush()
    if sees_own_writes(session, cache, shape.gen_tables):
        cache.stats.incr("query.own_writes")
        return None
    params = _params(shape, ck, state.parameters)
    if plan is not None:
        return serve_entity(cache, state, plan, params, lambda: _run_captured(state))
    assert opt is not None
    return _serve(cache, state, opt, shape, params, bind)


def _serve(
    cache: Cache, state: Any, opt: with_cache, shape: _Shape, params: dict[str, Any], bind: Any
) -> Any:
    """Answer a `with_cache` select from its entry, or load and fill it."""
    session: Session = state.session
    if opt.name is not None:
        record_query(cache, opt.name)
    opts = state.execution_options
    identity_token = _identity_token(state)
    direct = shape.direct
    if direct is not None and (opts.get("yield_per") or not direct.usable(session)):
        direct = None  # this execution needs the ORM's loading: raw rows, their own key
    key = cache.keys.query(
        _material(
            shape.prefix if direct is not None else shape.raw_prefix,
            params,
            identity_token,
            opts.get("schema_translate_map"),
        )
    )
    gen_keys = shape.generation_keys(cache)
    if opt.tags:
        gen_keys += tuple(cache.keys.tag(t) for t in opt.tags)
    raws = cache.fetch([key, *gen_keys])
    gens = cache.ensure_generations(gen_keys, raws[1:])
    if opts.get(REFRESH_OPTION):  # the warmer: load and store, never serve the entry
        cache.stats.incr("query.refresh")
        return _load_and_fill(cache, state, opt, key, gens, shape, direct)
    if gens is None or (direct is None and shape.template is None):
        # The store cannot say which generations are current (no fill), or this shape has
        # no result metadata in this process yet (a hit could not be replayed).
        cache.stats.incr("query.miss")
        return _load_and_fill(cache, state, opt, key, gens, shape, direct)
    fresh = opt.freshness(cache)
    env = cache.unpack(raws[0])
    rows = fresh_value(cache, env, gens, fresh, "query.")
    if rows is not NO_VALUE:
        return _from_rows(state, shape, direct, rows, identity_token)
    ran: list[tuple[_Capture, Any]] = []  # this thread's own execution, if it ran one

    def load() -> list[Any] | None:
        ran.append(_run_captured(state))
        box = ran[0][0]
        if box.template is not None:
            shape.template = box.template
        return _rows_to_store(box, direct)

    def store_ok() -> bool:
        box = ran[0][0]
        return box.rows is not None and box.fill_allowed(gens)

    rows = get_or_load(
        cache, key, load, fresh, gens=gens, store_ok=store_ok,
        refresh=_background_load(state, bind, direct), prefix="query.", raw=raws[0],
        lease=opt.lease, decoded=env, fill_later=True,
    )  # fmt: skip
    if ran:  # this thread ran the statement: its own result, as the ORM built it
        return ran[0][1]
    if rows is None:  # shared from a load whose rows could not be captured
        return state.invoke_statement()
    return _from_rows(state, shape, direct, rows, identity_token)


def _from_rows(
    state: Any, shape: _Shape, direct: DirectPlan | None, rows: list[Any], identity_token: Any
) -> Any:
    """The result of a hit: objects built directly, or cached raw rows through the ORM."""
    session: Session = state.session
    statement = state.statement
    if direct is not None:
        options = tuple(o for o in statement._with_options if o.propagate_to_loaders)
        objects = build_objects(session, direct, rows, identity_token, options)
        return direct.result(objects)
    # The ORM ran orm_pre_session_exec before this hook; autoflush ran above.
    assert shape.template is not None  # checked before the read
    return state._compile_state_cls.orm_setup_cursor_result(
        session, statement, state.parameters, state.execution_options, state.bind_arguments,
        _replay(shape.template, rows),
    )  # fmt: skip


def _identity_token(state: Any) -> Any:
    """The identity token of this execution (horizontal sharding), if any."""
    return (
        state.load_options._identity_token
        or state.bind_arguments.get("identity_token")
        or state.execution_options.get("identity_token")
    )


def _rows_to_store(box: _Capture, direct: DirectPlan | None) -> list[Any] | None:
    """What the entry holds: processed column values for a direct shape, else raw rows."""
    if box.rows is None or direct is None or box.template is None:
        return box.rows
    return [list(row) for row in _replay(box.template, box.rows)]


def _background_load(state: Any, bind: Any, direct: DirectPlan | None) -> Any:
    """A loader of this statement's rows for a background refresh: its own Session."""
    statement, params = state.statement, state.parameters

    def load() -> list[Any]:
        box = _Capture()
        with Session(bind) as session:  # a plain Session: no cache hook, no caller state
            session.execute(statement, params, execution_options={CAPTURE_OPTION: box})
        rows = _rows_to_store(box, direct)
        if rows is None:
            raise NotCacheable("the statement's rows could not be captured")
        return rows

    return load


def _run_captured(state: Any) -> tuple[_Capture, Any]:
    box = _Capture()
    return box, state.invoke_statement(execution_options={CAPTURE_OPTION: box})


def _load_and_fill(
    cache: Cache,
    state: Any,
    opt: with_cache,
    key: str,
    gens: tuple[str, ...] | None,
    shape: _Shape,
    direct: DirectPlan | None,
) -> Any:
    """Run the statement, keep its rows, and store them under the generations read."""
    box = _Capture()
    started = time.perf_counter()
    result = state.invoke_statement(execution_options={CAPTURE_OPTION: box})
    elapsed = time.perf_counter() - started
    if box.rows is None or box.template is None:
        return result
    shape.template = box.template
    if gens is None:
        return result  # the store is unreachable: no fill
    if not box.fill_allowed(gens):
        cache.stats.incr("query.fill_skipped_snapshot")
        return result
    fresh = opt.freshness(cache)  # stored ttl + stale_ttl: a stale entry stays readable
    rows = _rows_to_store(box, direct)  # our own lists: safe to encode later

    def store() -> None:
        try:
            packed = cache.pack(rows, fresh.ttl, gens, elapsed)
        except TypeError as exc:
            _bypass(opt, cache, f"rows cannot be cached: {exc}")
            return
        cache.store({key: packed}, fresh.store_ttl)
        cache.stats.incr("query.fill")

    # strict=True raises NotCacheable for rows that cannot be encoded: in this thread
    if opt.strict or not cache.fill_later(store):
        store()
    return result
