"""Read-through query caching: the `with_cache()` option and its execute hook.

A miss runs the statement as usual and keeps its rows; the fill is encoded and
stored in the background (`filler`). A hit of a plain single-entity select builds
its objects directly from the cached processed values (`direct`); any other hit
feeds the cached raw rows to the ORM's own loading path, as if they had come from
the cursor (objects built, registered and post-loaded exactly as on a database
load). Neither checks out a connection.

Keys and statement shapes are in `query_shape`. The entry stores the table
generations read *before* the query ran; a newer generation makes it a miss
(DESIGN rule 3).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from .access_stats import record_query
from .backends.base import NO_VALUE, NoValue
from .codec_peek import other_generations
from .direct import DirectPlan, build_objects
from .direct_rows import pack_columns, unpack_columns
from .entity_reads import serve as serve_entity
from .keys import unkeyable
from .query_fast import prefetched
from .query_option import REFRESH_OPTION, bypass, option_of, with_cache
from .query_replay import Capture, detached_rows, replay
from .query_shape import (
    NotCacheable,
    Shape,
    material,
    query_key,
    query_keys,
    sent_params,
    shape_of,
    translate_key,
    translate_of,
)
from .stampede import fresh_value, get_or_load
from .stampede_primitives import guarded_fill
from .statements import CAPTURE_OPTION
from .tokens import fill_in_time, older_than
from .visibility import sees_own_writes, snapshot_of
from .write_behind import queue_of
from .write_behind_session import populate_queued

if TYPE_CHECKING:
    from .cache import Cache

__all__ = [
    "REFRESH_OPTION",
    "NotCacheable",
    "on_orm_execute",
    "query_key",
    "query_keys",
    "with_cache",
]

log = logging.getLogger("sa_cache")

_warned_listeners: set[str] = set()


def _runs_last(cache: Cache, session: Session) -> bool:
    """Is sa_cache's ``do_orm_execute`` hook the last one this Session runs? A listener
    after it could change the statement (``with_loader_criteria`` recipes, sharding)
    after the key was made, or never run on a hit: then the cache steps aside."""
    listeners = list(session.dispatch.do_orm_execute)
    if getattr(listeners[-1], "sa_cache_hook", False):
        return True
    name = getattr(listeners[-1], "__qualname__", repr(listeners[-1]))
    if name not in _warned_listeners:
        _warned_listeners.add(name)
        log.warning(
            "sa_cache: the do_orm_execute listener %s runs after sa_cache's, so queries "
            "of these Sessions are not cached; register it with insert=True to run it "
            "first",
            name,
        )
    cache.stats.incr("query.bypass_listener")
    return False


def _entity_candidate(cache: Cache, state: Any) -> bool:
    """Could this execution be a primary-key read of a registered model?"""
    return bool(cache.entities) and state.bind_mapper in cache.entities


def on_orm_execute(cache: Cache, state: Any) -> Any:
    """The ``do_orm_execute`` hook: serve from the cache, fill it, or step aside."""
    if not state.is_select or state.is_column_load:
        return None
    opt = option_of(state)
    if opt is None and not _entity_candidate(cache, state):
        return None
    session: Session = state.session
    if len(session.dispatch.do_orm_execute) > 1 and not _runs_last(cache, session):
        bypass(opt, cache, "a do_orm_execute listener runs after sa_cache's")
        return None
    statement = state.statement
    for_update = getattr(statement, "_for_update_arg", None)
    populate = state.load_options._populate_existing  # a write-behind row: its queue
    if for_update is not None or (populate and queue_of(cache) is None):
        cache.stats.incr("query.bypass")
        return None
    ck = statement._generate_cache_key()
    if ck is None:
        bypass(opt, cache, "the statement has no SQLAlchemy cache key")
        return None
    raw_bind = session.get_bind(**state.bind_arguments)
    bind = getattr(raw_bind, "engine", raw_bind)
    shape = shape_of(statement, ck, bind)
    if shape.locks:  # a FOR UPDATE inside it, or as text: the read must take its locks
        cache.stats.incr("query.bypass")
        return None
    translate = translate_key(state.execution_options.get("schema_translate_map"))
    translate = translate or translate_of(session, raw_bind)  # its Connection's, or bind's
    # Entity entries are one per row of a table: not per schema a translate map picks.
    plan = None if translate else shape.plan(cache, statement)
    if plan is not None and opt is not None and not opt.entity_served(plan.spec.write):
        plan = None  # the query's own entry: tags and lazy loads of its own
    if populate and (plan is None or plan.spec.write != "behind"):
        cache.stats.incr("query.bypass")
        return None
    if opt is None and plan is None:
        return None
    if shape.opaque is not None:
        bypass(opt, cache, shape.opaque)
        return None
    if not shape.gen_tables:
        bypass(opt, cache, "no tables found to invalidate it by (e.g. text() without tables)")
        return None
    # Autoflush now, as the ORM would before running the query (a hit skips it).
    if state.load_options._autoflush and session.autoflush:
        session._autoflush()
    if populate and plan is not None:  # the queue is the row; None: nothing queued
        queued_params = sent_params(shape, ck, state.parameters)
        if queued_params is None:  # refused by SQLAlchemy: the execution raises its error
            return None
        return populate_queued(cache, state, plan, queued_params)
    if sees_own_writes(session, cache, shape.tables(bool(translate))):
        cache.stats.incr("query.own_writes")
        return None
    params = sent_params(shape, ck, state.parameters)
    if params is None:  # refused by SQLAlchemy: the execution raises its own error
        return None
    unfit = unkeyable(params.values())
    if unfit is not None:  # a value whose repr is its address: no key names it
        bypass(opt, cache, unfit)
        return None
    if plan is not None and not plan.admits(params):
        plan = None  # LIMIT 0: no row, no lookup
        if opt is None:
            return None
    if plan is not None:
        return serve_entity(cache, state, plan, params, lambda: _run_captured(state))
    assert opt is not None
    return _serve(cache, state, opt, shape, params, bind, translate)


def _serve(
    cache: Cache,
    state: Any,
    opt: with_cache,
    shape: Shape,
    params: dict[str, Any],
    bind: Any,
    translate: Any,
) -> Any:
    """Answer a `with_cache` select from its entry, or load and fill it."""
    session: Session = state.session
    opts = state.execution_options
    identity_token = _identity_token(state)
    direct = shape.direct
    if direct is not None and (opts.get("yield_per") or not direct.usable(session)):
        direct = None  # this execution needs the ORM's loading: raw rows, their own key
    key = cache.keys.query(
        material(
            shape.prefix if direct is not None else shape.raw_prefix,
            params,
            identity_token,
            translate,
        )
    )
    gen_keys = shape.generation_keys(cache, bool(translate))
    if opt.tags:
        gen_keys += tuple(cache.keys.tag(t) for t in opt.tags)
    fetch_keys = [key, *gen_keys]
    read = prefetched(session, fetch_keys)  # read (and maybe decoded) by `query_fast`
    if read is None:
        if opt.name is not None:
            record_query(cache, opt.name)
        read = cache.fetch(fetch_keys), None
    raws, decoded = read
    gens = cache.ensure_generations(gen_keys, raws[1:])
    if opts.get(REFRESH_OPTION):  # the warmer: load and store, never serve the entry
        cache.stats.incr("query.refresh")
        return _load_and_fill(cache, state, opt, key, raws[0], gens, shape, direct)
    if gens is None or (direct is None and shape.template is None):
        # The store cannot say which generations are current (no fill), or this shape has
        # no result metadata in this process yet (a hit could not be replayed).
        cache.stats.incr("query.miss")
        return _load_and_fill(cache, state, opt, key, raws[0], gens, shape, direct)
    snapshot = snapshot_of(session)
    if snapshot is not None and not older_than(gens, snapshot):
        # An older snapshot (REPEATABLE READ, after its first statement) that a commit to
        # these tables postdates: its database reads do not see what the entry holds.
        cache.stats.incr("query.snapshot_older")
        return _load_and_fill(cache, state, opt, key, raws[0], gens, shape, direct)
    fresh = opt.freshness(cache)
    env = decoded
    if env is None and not other_generations(raws[0], gens):
        env = cache.unpack(raws[0])  # (an entry of other generations: get_or_load counts it)
    rows = NO_VALUE if env is None else fresh_value(cache, env, gens, fresh, "query.")
    if rows is not NO_VALUE:
        return _from_rows(state, shape, direct, rows, identity_token)
    if snapshot is not None:  # no single flight: another caller's rows are not its snapshot's
        return _load_and_fill(cache, state, opt, key, raws[0], gens, shape, direct)
    ran: list[tuple[Capture, Any]] = []  # this thread's own execution, if it ran one
    began = time.perf_counter()  # (the entry was read just before)

    def load() -> Capture:  # turned into rows by whoever needs them (see _stored_form)
        ran.append(_run_captured(state))
        box = ran[0][0]
        if box.template is not None:
            shape.template = box.template
        return box

    def store_ok() -> bool:  # the fill itself compares the entry with what was read
        box = ran[0][0]
        in_time = fill_in_time(time.perf_counter() - began)
        return box.rows is not None and box.fill_allowed(gens) and in_time

    rows = get_or_load(
        cache, key, load, fresh, gens=gens, store_ok=store_ok,
        refresh=_background_load(state, bind, direct, translate), prefix="query.", raw=raws[0],
        lease=opt.lease, decoded=env, fill_later=True,
        store_as=lambda box: _stored_form(box, direct), stale_if_error=_no_work_yet(session),
    )  # fmt: skip
    if ran:  # this thread ran the statement: its own result, as the ORM built it
        return ran[0][1]
    return _from_rows(state, shape, direct, rows, identity_token)


def _from_rows(
    state: Any, shape: Shape, direct: DirectPlan | None, value: Any, identity_token: Any
) -> Any:
    """The result of a hit (a stored value) or of another thread's load (its `Capture`):
    objects built directly, or raw rows through the ORM."""
    session: Session = state.session
    statement = state.statement
    if isinstance(value, Capture):
        if value.rows is None:  # shared from a load whose rows could not be captured
            return state.invoke_statement()
        box, value = value, _rows_to_store(value, direct)
        if box.mutable:  # the fill encodes the box's rows later: our objects get copies
            value = detached_rows(value)[0]
    rows: list[Any] = value
    if direct is not None:
        options = tuple(o for o in statement._with_options if o.propagate_to_loaders)
        objects = build_objects(session, direct, unpack_columns(rows), identity_token, options)
        return direct.result(objects)
    # The ORM ran orm_pre_session_exec before this hook; autoflush ran above.
    assert shape.template is not None  # checked before the read
    if state._compile_state_cls is None:  # a Core select: Session.execute returns it as is
        return replay(shape.template, rows, statement)  # its rows by its own columns too
    return state._compile_state_cls.orm_setup_cursor_result(
        session, statement, state.parameters, state.execution_options, state.bind_arguments,
        replay(shape.template, rows),
    )  # fmt: skip


def _no_work_yet(session: Session) -> bool:
    """Has ``session``'s transaction no database connection yet? Then a load that fails
    in it takes nothing earlier with it, and serving the entry stale hides no lost
    work (a statement's error aborts a PostgreSQL transaction, whose COMMIT then rolls
    back without an error; an InnoDB deadlock rolls the whole transaction back)."""
    transaction = session.get_transaction()
    return transaction is None or not transaction._connections


def _identity_token(state: Any) -> Any:
    """The identity token of this execution (horizontal sharding), if any."""
    return (
        state.load_options._identity_token
        or state.bind_arguments.get("identity_token")
        or state.execution_options.get("identity_token")
    )


def _rows_to_store(box: Capture, direct: DirectPlan | None) -> list[Any] | None:
    """What the entry holds: processed column values for a direct shape, else raw rows."""
    if box.rows is None or direct is None or box.template is None:
        return box.rows
    # No column converts its value and none is reordered: the driver's rows are the rows.
    meta = box.template._metadata
    processors = getattr(meta, "_processors", None)
    if processors is not None and not any(processors) and not getattr(meta, "_tuplefilter", 1):
        return [list(row) for row in box.rows]
    return [list(row) for row in replay(box.template, box.rows)]


def _stored_form(box: Capture, direct: DirectPlan | None) -> Any:
    """What an entry stores for a load: its rows, column-typed for a direct shape. Made
    in the background with the fill (`Cache.fill_later`), off the request path."""
    rows = _rows_to_store(box, direct)
    return pack_columns(rows) if direct is not None and rows else rows


def _background_load(state: Any, bind: Any, direct: DirectPlan | None, translate: Any) -> Any:
    """A loader of this statement's rows for a background refresh: its own Session,
    with the execution options of the call (the schema translate map in effect too)."""
    statement, params = state.statement, state.parameters
    options = {**state.local_execution_options}
    if translate:
        options["schema_translate_map"] = {(None if k == "_none" else k): v for k, v in translate}

    def load() -> Capture:
        box = Capture()
        with Session(bind) as session:  # a plain Session: no cache hook, no caller state
            session.execute(statement, params, execution_options={**options, CAPTURE_OPTION: box})
        if box.rows is None:
            raise NotCacheable("the statement's rows could not be captured")
        return box

    return load


def _run_captured(state: Any) -> tuple[Capture, Any]:
    box = Capture()
    return box, state.invoke_statement(execution_options={CAPTURE_OPTION: box})


def _load_and_fill(
    cache: Cache,
    state: Any,
    opt: with_cache,
    key: str,
    seen: bytes | NoValue,
    gens: tuple[str, ...] | None,
    shape: Shape,
    direct: DirectPlan | None,
) -> Any:
    """Run the statement, keep its rows, and store them under the generations read, in
    place of what the entry held then (``seen``): never over a later invalidation."""
    box = Capture()
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
    expected = None if seen is NO_VALUE else seen

    def store() -> None:  # the captured rows are our own: safe to process and encode later
        if not fill_in_time(time.perf_counter() - started):
            cache.stats.incr("query.fill.too_late")
            return
        try:
            packed = cache.pack(_stored_form(box, direct), fresh.ttl, gens, elapsed)
        except TypeError as exc:
            bypass(opt, cache, f"rows cannot be cached: {exc}")
            return
        stored = guarded_fill(cache, key, expected, packed, fresh.store_ttl)
        event = "fill" if stored else "fill.conflict" if stored is False else "fill.failed"
        cache.stats.incr("query." + event)

    # strict=True raises NotCacheable for rows that cannot be encoded: in this thread
    if opt.strict or not cache.fill_later(store, (key,)):
        store()
    return result
