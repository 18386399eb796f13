"""Statement shapes: what a cacheable statement compiles to (once per process), its
exact key. (The raw-row capture and replay of the ORM path: `query_replay`.)

The key is the SQL the dialect compiles plus the parameter values it would send
(and the types that process them), the database it goes to and the identity token:
two statements that can return different rows never share a key (DESIGN rule 4).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import CursorResult
from sqlalchemy.sql import visitors
from sqlalchemy.sql.selectable import GenerativeSelect

from .direct import direct_plan
from .entity_plan import EntityPlan, plan_for
from .invalidation import ANY_SCHEMA, opaque_source, tables_read
from .keys import stable_digest, unkeyable
from .result_types import unpickles

if TYPE_CHECKING:
    from .cache import Cache

SHAPE_CACHE_SIZE = 2000


class NotCacheable(Exception):
    """Raised by ``with_cache(strict=True)`` for a statement that cannot be cached."""


class Shape:
    """What one statement shape compiles to, computed once per process."""

    __slots__ = (
        "compiled", "direct", "gen_keys", "gen_tables", "locks", "opaque", "plans", "prefix",
        "raw_prefix", "template",
    )  # fmt: skip

    def __init__(
        self,
        compiled: Any,
        gen_tables: tuple[str, ...],
        bind: Any,
        opaque: str | None = None,
        locks: bool = False,
    ) -> None:
        self.compiled = compiled
        self.gen_tables = gen_tables
        self.opaque = opaque  # why its tables cannot all be known (then: not cached)
        self.locks = locks  # it locks rows (`locks_rows`): always run, never a hit
        url = getattr(bind, "url", None)
        database: Any = url.render_as_string(hide_password=True) if url is not None else id(bind)
        translate = translate_map(bind)  # an engine's own (tenant) schema translate map
        if translate is not None:
            database = (database, translate)
        # The part of every key material that is fixed for this shape: database, SQL, the
        # types of its bind parameters (`bind_types`), and what the entry holds —
        # processed values for a direct shape (built without the ORM's loading; they
        # depend on the mapped class and its column types too), raw cursor rows
        # otherwise; the two never share a key.
        self.raw_prefix = repr((database, compiled.string, bind_types(compiled)))
        self.direct = direct_plan(compiled)
        direct = self.direct
        self.prefix = self.raw_prefix if direct is None else f"d{direct.signature}{self.raw_prefix}"
        # per Cache: (its registered models, how many, the plan for them)
        self.plans: dict[int, tuple[dict[Any, Any], int, EntityPlan | None]] = {}
        self.gen_keys: dict[str, tuple[str, ...]] = {}  # per namespace
        # a CursorResult of one real execution in this process: its metadata replays hits
        self.template: CursorResult[Any] | None = None

    def generation_keys(self, cache: Cache, translated: bool = False) -> tuple[str, ...]:
        """The generation keys of this shape's tables in ``cache``'s namespace (of
        `tables` ``translated``)."""
        at = cache.namespace + ("/translated" if translated else "")
        try:
            return self.gen_keys[at]
        except KeyError:
            keys = self.gen_keys[at] = cache.generation_keys(self.tables(translated))
            return keys

    def tables(self, translated: bool = False) -> tuple[str, ...]:
        """The generations a read of this shape watches; ``translated``: under a
        ``schema_translate_map``, which names its tables' schemas otherwise than they are
        spelled here, so a write spelling the real schema must reach it too (every
        schema-qualified write of a table moves ``*.name``: `invalidation.moved`)."""
        if not translated:
            return self.gen_tables
        anywhere = {ANY_SCHEMA + t.rpartition(".")[2] for t in self.gen_tables if "." in t}
        return tuple(sorted({*self.gen_tables, *anywhere}))

    def plan(self, cache: Cache, statement: Any) -> EntityPlan | None:
        """The entity-cache plan of this shape for ``cache``, computed once per set of
        registered models. Kept with that cache's own registry (``cache.entities``, held
        here, so another Cache can never get its id and reuse a plan of the first)."""
        entities = cache.entities
        found = self.plans.get(id(cache))
        if found is not None and found[0] is entities and found[1] == len(entities):
            return found[2]
        plan = plan_for(cache, self.compiled)
        self.plans[id(cache)] = (entities, len(entities), plan)
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


def shape_of(statement: Any, ck: Any, bind: Any) -> Shape:
    key = (bind, ck.key)
    shape: Shape | None = _shapes.get(key)
    if shape is None:
        compiled = statement.compile(dialect=bind.dialect, cache_key=ck)
        compile_state = getattr(compiled, "compile_state", None)
        element = getattr(compile_state, "statement", None)
        if element is None:
            element = compiled.statement
        tables = tables_read(element)
        opaque = opaque_source(element) or unpickles(compiled)
        locks = locks_rows(element, compiled.string)
        shape = Shape(compiled, tuple(sorted(tables)), bind, opaque, locks)
        _shapes.put(key, shape)
    return shape


def bind_types(compiled: Any) -> str:
    """The types of a compiled statement's bind parameters, by name, as key material.
    Their processing makes the values sent: ``Product.price == 5`` sends 500 through a
    ``Cents`` type, 5 through ``Integer``, in the same SQL. Told apart as SQLAlchemy's
    statement cache tells them apart (class and constructor arguments), without the
    addresses a repr may name."""
    binds = compiled.bind_names.items()  # (in the order compiling met them)
    return stable_digest([(name, _type_key(bind.type)) for bind, name in binds])


def _type_key(kind: Any) -> Any:
    """``kind._static_cache_key`` with its (argument, value) pairs sorted: SQLAlchemy
    lists them in the order of a set of names, which str hashing (random per process)
    decides — a key must be the same in every process."""
    return _sorted_key(kind._static_cache_key)


def _sorted_key(key: Any) -> Any:
    """A type's static cache key, ``(class, (argument, value), ...)``, with its pairs
    sorted at every depth (a value may be a type's key too: ``ARRAY``'s item type)."""
    if type(key) is not tuple:
        return key
    items = [_sorted_key(v) for v in key]
    if items and isinstance(items[0], type):
        return (items[0], *sorted(items[1:], key=repr))
    return tuple(items)


_LOCKING_SQL = re.compile(
    r"\bfor\s+(?:no\s+key\s+)?update\b|\bfor\s+(?:key\s+)?share\b|\block\s+in\s+share\s+mode\b",
    re.IGNORECASE,
)


def locks_rows(element: Any, sql: str) -> bool:
    """Does a statement lock rows: a ``with_for_update()`` anywhere in it (a subquery's,
    a CTE's, a UNION member's: not only its own), or a lock in its SQL (given as text:
    ``suffix_with("FOR UPDATE")``, a hint)? A hit would take no lock."""
    if _LOCKING_SQL.search(sql):
        return True
    return any(
        isinstance(node, GenerativeSelect) and node._for_update_arg is not None
        for node in visitors.iterate(element)
    )


def translate_of(session: Any, bind: Any) -> tuple[tuple[Any, Any], ...] | None:
    """The ``schema_translate_map`` a statement of ``session`` on ``bind`` executes with
    (besides its own execution options), as a key part: that of the Connection the
    Session's transaction holds for ``bind`` when it has one (set by
    ``session.connection(execution_options=...)``, or the Session's own options), else
    ``bind``'s."""
    root = session.get_transaction()  # the outermost transaction holds the connections
    if root is not None:
        entry = root._connections.get(bind)
        if entry is not None:
            return translate_map(entry[0])
    return translate_map(bind)


def translate_map(bind: Any) -> tuple[tuple[Any, Any], ...] | None:
    """The ``schema_translate_map`` an engine or connection executes with, as a key part."""
    options = getattr(bind, "_execution_options", None)
    return translate_key(options.get("schema_translate_map") if options else None)


def translate_key(found: Any) -> tuple[tuple[Any, Any], ...] | None:
    """A ``schema_translate_map`` as a key part. (SQLAlchemy adds ``"_none"`` for the
    ``None`` key to a map it executes with, in place: both spellings are one.)"""
    if not found:
        return None
    items = {("_none" if k is None else k): v for k, v in found.items()}
    return tuple(sorted(items.items(), key=repr))


def sent_params(shape: Shape, ck: Any, parameters: Any) -> dict[str, Any] | None:
    """`params_of`, or None when SQLAlchemy would refuse these parameters (a required
    one missing, a bind callable that raises): the cache then steps aside, so that the
    execution raises SQLAlchemy's own error (a ``StatementError`` naming the SQL and
    parameters), not one of ours."""
    try:
        return params_of(shape, ck, parameters)
    except Exception:
        return None


def params_of(shape: Shape, ck: Any, parameters: Any) -> dict[str, Any]:
    """The parameter values the dialect would send for this execution."""
    params: dict[str, Any] = shape.compiled.construct_params(
        parameters or None,
        extracted_parameters=ck.bindparams,
        escape_names=False,
        **({"_collected_params": ck.params} if getattr(ck, "params", None) else {}),
    )
    return params


def material(
    prefix: str,
    params: dict[str, Any],
    identity_token: Any = None,
    schema_translate_map: Any = None,
) -> str:
    """Everything that decides which rows come back: database, SQL, parameter values
    (``prefix``: the shape's fixed part, see `Shape`)."""
    return prefix + repr(
        (sorted(params.items()) if params else (), identity_token, schema_translate_map)
    )


def query_key(
    cache: Cache, statement: Any, bind: Any, parameters: Any = None, identity_token: Any = None
) -> str:
    """The key ``statement`` is cached under when run on ``bind`` with ``parameters``."""
    return query_keys(cache, statement, bind, parameters, identity_token)[0]


def query_keys(
    cache: Cache,
    statement: Any,
    bind: Any,
    parameters: Any = None,
    identity_token: Any = None,
    schema_translate_map: Any = None,
) -> list[str]:
    """Every key ``statement`` may be cached under (a direct shape has two formats; a
    primary-key select of a registered model is served from its entity entry)."""
    if hasattr(statement, "_statement_20"):  # a legacy Query: the statement it runs
        statement = statement._statement_20()
    ck = statement._generate_cache_key()
    if ck is None:
        raise NotCacheable("the statement has no SQLAlchemy cache key")
    engine = getattr(bind, "engine", bind)
    shape = shape_of(statement, ck, engine)
    params = params_of(shape, ck, parameters)
    reason = unkeyable(params.values())
    if reason is not None:
        raise NotCacheable(reason)
    translate = translate_key(schema_translate_map) or translate_map(bind)
    prefixes = dict.fromkeys([shape.prefix, shape.raw_prefix])
    keys = [cache.keys.query(material(p, params, identity_token, translate)) for p in prefixes]
    plan = None if translate else shape.plan(cache, statement)
    if plan is not None and plan.admits(params) and plan.spec.write != "behind":
        pk = [params[k] for k in plan.bind_keys]
        keys.append(plan.spec.key(cache, pk, identity_token))
    return keys
