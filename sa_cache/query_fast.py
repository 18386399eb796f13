"""The short way to a `with_cache` hit: `CachingSession.execute`, ``scalars`` and
``scalar`` answer a plain single-entity select without ``Session.execute``.

``Session.execute`` coerces the statement, merges execution options, runs the ORM's
pre-execution step and builds an ``ORMExecuteState`` before the ``do_orm_execute``
hook (`query.on_orm_execute`) sees the statement; on a 1-row hit from an in-process
store that costs more than the cached read itself. This path is taken only when none
of it can matter:

- the statement is a ``Select`` served by a direct plan (`direct`: one mapped class,
  no eager loads, no inheritance, no load events) with `with_cache` as its only option,
  or a primary-key lookup of a registered model (`entity_plan`; answered as
  `CachingSession.get` answers it, `entity_reads.fast_get`), and has no execution options;
- the call passes no parameters, execution options or bind arguments;
- the Session has one bind, no per-mapper binds, no ``get_bind`` override, no
  Session-wide execution options, and no ``do_orm_execute`` listener but ours.

What a statement object needs (its shape, key, generation keys) is computed once and
kept beside it (weakly; ``Select`` objects are immutable). Its bind values are not
always: a list or dict given as one (``bindparam("ids", value=ids, expanding=True)``,
``.params(ids=ids)``) is read by SQLAlchemy at each execution, so a value that can
change in place is compared with a copy of what its key was made of at each use, and
a changed one makes the key anew. The checks of the hook run
as they do there: autoflush first, then the Session's own uncommitted writes (rule 2),
then one read of the entry and the generations (rule 3). Anything but a plain fresh hit
goes the ordinary way, handing over what was read (`PREFETCH`), so a miss costs no
second round trip.

A statement whose last read was a hit of 8 rows or more sends its read to a networked
store and, while the reply travels, makes that many objects with their state
(`direct.blank_objects`); the hit then only gives them identity and values. Unused
ones (fewer rows, or rows already in the identity map) are dropped unregistered.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import Select
from sqlalchemy.orm import Session

from .access_stats import record_query
from .backends.base import NO_VALUE
from .codec_peek import other_generations
from .direct import (
    DirectPlan,
    blank_objects,
    build_objects,
    inlined,
    single_entity_result,
)
from .direct_rows import mutable_columns, thawed, unpack_columns
from .entity_reads import fast_get
from .keys import unkeyable
from .query_option import with_cache
from .query_shape import Shape, material, sent_params, shape_of, translate_of
from .stampede import fresh_value
from .visibility import in_snapshot, sees_own_writes

if TYPE_CHECKING:
    from .cache import Cache
PREFETCH = "sa_cache.query_prefetched"
"""``session.info`` key: ``(keys, raw values, decoded entry or None)`` the fast path read
but could not serve."""


class _Memo:
    """What a statement needs on the fast path, for one engine and one cache's key
    builder (a cache's own; replaced when its key version changes). ``direct`` None:
    this statement never takes the fast path."""

    __slots__ = ("decoded", "direct", "engine", "entity", "fetch_keys", "gen_keys", "keys",
                 "opt", "options", "rows", "shape", "watched")  # fmt: skip

    def __init__(self, cache: Cache, engine: Any) -> None:
        self.engine, self.keys = engine, cache.keys
        self.direct: DirectPlan | None = None
        # a primary-key lookup of a registered model: (its mapper, the key's values)
        self.entity: tuple[Any, list[Any]] | None = None
        self.shape: Shape | None = None
        self.opt: with_cache | None = None
        self.fetch_keys: list[str] = []
        self.gen_keys: tuple[str, ...] = ()
        self.options: tuple[Any, ...] = ()
        self.rows = 0  # rows of the last hit (capped at BLANKS_MAX)
        # bind values that can change in place, with a copy of what the key was made of
        self.watched: tuple[tuple[Any, Any], ...] = ()
        # an in-process store's last hit: (its entry's bytes, the entry decoded, the rows,
        # the positions of values copied for each use: `direct_rows.mutable_columns`)
        self.decoded: tuple[bytes, Any, Sequence[Sequence[Any]], tuple[int, ...]] | None = None

    def outdated(self) -> bool:
        """Has a bind value this memo's key was made of changed in place since? (Compared
        with ``!=``, which costs far less than the key's ``repr()`` of a long IN list.)"""
        return any(type(value) is not type(seen) or value != seen for value, seen in self.watched)


BLANKS_MIN_ROWS = 8
"""From this many rows in its last hit, a statement's objects are made while its read
is on the way to a networked store (`direct.blank_objects`)."""
BLANKS_MAX = 1000
KEEP_DECODED_MAX = 16 * 1024
"""On an in-process store, a statement's last hit of an entry up to this size (bytes) is
kept decoded: the next hit of the same entry (the same bytes object) skips decoding."""


_memos: weakref.WeakKeyDictionary[Any, _Memo] = weakref.WeakKeyDictionary()
_plain_get_bind: dict[type, bool] = {}
_FIXED = frozenset(
    {type(None), bool, int, float, str, bytes, Decimal, datetime, date, time, timedelta, UUID}
)
"""Bind value types that cannot change in place."""


def _fixed(value: Any) -> bool:
    kind = type(value)
    if kind in _FIXED or isinstance(value, Enum):
        return True
    return (kind is tuple or kind is frozenset) and all(map(_fixed, value))


def _watched(ck: Any) -> tuple[tuple[Any, Any], ...] | None:
    """The bind values of ``ck`` (its statement's own, and ``.params()``'s) that can
    change in place, each with a copy of it now; None if one cannot be copied (then the
    statement is not kept)."""
    values = [b.value for b in ck.bindparams]
    if getattr(ck, "params", None):
        values += ck.params.values()
    try:
        return tuple((v, copy.deepcopy(v)) for v in values if not _fixed(v))
    except Exception:  # (a value that refuses copying)
        return None


def _prepare(cache: Cache, statement: Any, engine: Any) -> _Memo:
    memo = _Memo(cache, engine)
    options = statement._with_options
    if len(options) > 1 or (options and not isinstance(options[0], with_cache)):
        return memo
    if statement._execution_options or statement._for_update_arg is not None:
        return memo
    ck = statement._generate_cache_key()
    if ck is None or any(b.callable is not None for b in ck.bindparams):
        return memo  # a callable's value is taken at each execution: not kept here
    shape = shape_of(statement, ck, engine)
    if shape.locks or shape.opaque is not None:
        return memo  # the ordinary way bypasses the cache (and says why)
    params = sent_params(shape, ck, None)
    if params is None:
        return memo  # SQLAlchemy refuses the parameters: the ordinary way raises its error
    if unkeyable(params.values()) is not None:
        return memo  # no key can be made of a value: the ordinary way bypasses the cache
    watched = _watched(ck)
    if watched is None:
        return memo
    plan = shape.plan(cache, statement)
    if plan is not None and options and not options[0].entity_served(plan.spec.write):
        plan = None  # the query's own entry (`with_cache.entity_served`)
    if plan is not None:  # served as `session.get` would be
        if plan.admits(params):
            memo.entity = (plan.spec.mapper, [params[k] for k in plan.bind_keys])
            memo.watched = watched
        return memo
    if not options or shape.direct is None or not shape.gen_tables:
        return memo
    memo.watched = watched
    opt: with_cache = options[0]
    gen_keys = shape.generation_keys(cache)
    if opt.tags:
        gen_keys += tuple(cache.keys.tag(t) for t in opt.tags)
    key = cache.keys.query(material(shape.prefix, params))
    memo.shape, memo.opt, memo.gen_keys = shape, opt, gen_keys
    memo.fetch_keys = [key, *gen_keys]
    memo.options = tuple(o for o in options if o.propagate_to_loaders)
    memo.direct = shape.direct
    return memo


def _entity_candidate(cache: Cache, statement: Any) -> bool:
    """Could ``statement`` be a primary-key read of a registered model?"""
    if not cache.entities:
        return False
    subject = statement._propagate_attrs.get("plugin_subject")
    return getattr(subject, "mapper", None) in cache.entities


def _plain_session(session: Session) -> bool:
    cls = type(session)
    plain = _plain_get_bind.get(cls)
    if plain is None:
        plain = _plain_get_bind[cls] = cls.get_bind is Session.get_bind
    return plain and not session.execution_options and not session.binds


def fast_result(session: Session, cache: Cache, statement: Any) -> Any:
    """The Result of a fresh hit of ``statement`` served on the short way, else None
    (the caller runs ``Session.execute``; what was read waits in `PREFETCH`)."""
    if type(statement) is not Select:
        return None
    if not statement._with_options and not _entity_candidate(cache, statement):
        return None  # not ours: nothing compiled or kept for it
    bind = session.bind
    if bind is None or not _plain_session(session) or translate_of(session, bind) is not None:
        return None  # (a schema translate map: the ordinary way knows what it means)
    engine = getattr(bind, "engine", bind)
    memo = _memos.get(statement)
    if (
        memo is None
        or memo.keys is not cache.keys
        or memo.engine is not engine
        or (memo.watched and memo.outdated())
    ):
        memo = _prepare(cache, statement, engine)
        _memos[statement] = memo
    if len(session.dispatch.do_orm_execute) != 1:
        return None
    if memo.entity is not None:
        mapper, pk = memo.entity
        found = fast_get(cache, session, mapper.class_, pk)  # NO_VALUE: the ordinary way
        if found is NO_VALUE:
            return None
        return single_entity_result(mapper, [] if found is None else [found])
    direct = memo.direct
    if direct is None or not direct.usable(session):
        return None
    if session.autoflush:
        session._autoflush()  # as Session.execute would before running the query
    assert memo.shape is not None
    assert memo.opt is not None
    if sees_own_writes(session, cache, memo.shape.gen_tables):
        return None  # the ordinary path counts it and goes to the database
    opt = memo.opt
    if opt.name is not None:
        record_query(cache, opt.name)
    blanks = None
    if memo.rows >= BLANKS_MIN_ROWS and inlined(direct, session) and not cache.in_process:
        # The objects of as many rows as the last hit had are made while the read travels.
        read = cache.fetch_soon(memo.fetch_keys)
        try:
            blanks = blank_objects(session, direct, memo.rows, None, memo.options)
        finally:
            raws = read()  # always: until then the connection is ours alone
    else:
        raws = cache.fetch(memo.fetch_keys)
    gens = cache.ensure_generations(memo.gen_keys, raws[1:])
    env: Any = None  # (decoded, if it was)
    if gens is not None:
        found, env = _hit(session, cache, memo, raws[0], gens, blanks)
        if found is not None:
            return found
    memo.rows = 0  # not a hit: the next read makes no objects ahead (a miss may repeat)
    session.info[PREFETCH] = (memo.fetch_keys, raws, env)
    return None


def _hit(
    session: Session,
    cache: Cache,
    memo: _Memo,
    raw: bytes | Any,
    gens: tuple[str, ...],
    blanks: list[tuple[Any, Any]] | None,
) -> tuple[Any, Any]:
    """(the Result, None) if the entry ``raw`` is a plain fresh hit under ``gens``, else
    (None, the entry decoded or None if it was not)."""
    direct, opt = memo.direct, memo.opt
    assert direct is not None
    assert opt is not None
    kept = memo.decoded
    if other_generations(raw, gens):
        return None, None
    if kept is not None and kept[0] is raw:  # the same bytes, as an in-process store gives
        _, shared, values, copied = kept
        hit = fresh_value(cache, shared, gens, opt.freshness(cache), "query.")
        if hit is NO_VALUE or not in_snapshot(session, gens):
            return None, None  # (not ``shared``: `unpack_columns` may have changed it)
        objects = build_objects(session, direct, thawed(values, copied), None, memo.options)
        return direct.result(objects), None
    env = cache.unpack(raw)
    rows = fresh_value(cache, env, gens, opt.freshness(cache), "query.")
    if rows is NO_VALUE or not in_snapshot(session, gens):
        return None, env
    values = unpack_columns(rows)
    memo.rows = min(len(values), BLANKS_MAX)
    if cache.in_process and len(raw) <= KEEP_DECODED_MAX:
        columns = mutable_columns(values)
        if columns is not None:
            memo.decoded = (raw, env, values, columns)
            values = thawed(values, columns)
    objects = build_objects(session, direct, values, None, memo.options, blanks)
    return direct.result(objects), None


def prefetched(session: Session, keys: list[str]) -> tuple[list[Any], Any] | None:
    """What the fast path read for ``keys`` in this call, if it did (taken once): the raw
    values, and the entry decoded (None if it was not)."""
    found = session.info.pop(PREFETCH, None)
    if found is None or found[0] != keys:
        return None
    return found[1], found[2]
