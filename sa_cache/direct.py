"""Building ORM objects straight from cached rows, without the ORM's loading machinery.

A cached hit of a plain single-entity select (``select(Model)...``, legacy
``session.query(Model)``) needs none of what the ORM's loading path does beyond
creating persistent objects and registering them in the identity map: no eager
loaders, no polymorphic switch, no version check, no load or refresh events. For
such a statement shape, `direct_plan` records which result column feeds which
attribute, and `build_objects` does what ``loading._instance`` does for a fresh load
— new objects get their column values, identity key, Session and the loader options
to propagate to their lazy loads; objects already in the identity map are returned
as they are, with only their unloaded (expired) attributes filled from the row, so
pending changes are never overwritten. The values stored are processed by the
mapping's column types, so the mapped class and those types are part of the shape's
key (`DirectPlan.signature`). Results dedupe by identity under ``unique()``, as the
ORM's do (`entity_metadata`).

Everything else (eager loads, inheritance, deferred columns, ``TypeDecorator`` or
user-defined column types, column or tuple selects, aliased entities, ``load`` /
``refresh`` / ``loaded_as_persistent`` listeners, ``yield_per``) takes the general
path in `query`, which feeds the cached raw rows to the ORM's own loading.

How a direct shape's rows are stored (by column from 8 rows) is in `direct_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_dict, instance_state
from sqlalchemy.orm.base import DEFAULT_STATE_ATTR as STATE_ATTR
from sqlalchemy.orm.identity import _WeakInstanceDict as WeakInstanceDict
from sqlalchemy.orm.instrumentation import ClassManager

from .codec import register_enum
from .result_types import enum_classes, plain_type, type_key

LAZY_STRATEGIES = frozenset({"select", "noload", "raise", "raise_on_sql", "dynamic", "write_only"})
"""Relationship strategies that add nothing to a load (no eager SELECT, no JOIN)."""


_SINGLE_ENTITY: Any = IteratorResult(SimpleResultMetaData([]), iter(()))._attributes.union(
    {"is_single_entity": True, "filtered": True}
)
"""The ``_attributes`` the ORM gives the result of a single-entity select."""


def _by_identity(result: Any) -> list[Any]:
    return [id]


def entity_metadata(name: str) -> SimpleResultMetaData:
    """The result metadata of a single-entity select: ``unique()`` tells objects apart
    by identity, as the ORM's loading does (never by ``__hash__`` / ``__eq__``, which a
    mapped dataclass does not have, or which makes two rows one)."""
    make: Any = SimpleResultMetaData
    if "_create_unique_filters" in SimpleResultMetaData.__slots__:  # SQLAlchemy 2.1
        return make([name], _create_unique_filters=_by_identity)  # type: ignore[no-any-return]
    return make([name], _unique_filters=[id])  # type: ignore[no-any-return]


def single_entity_result(
    mapper: Mapper[Any], objects: list[Any], metadata: SimpleResultMetaData | None = None
) -> Any:
    """A Result of ``objects`` shaped like the ORM's for ``select(Model)`` (``metadata``:
    its result metadata, if made already)."""
    if metadata is None:
        metadata = entity_metadata(mapper.class_.__name__)
    result: Any = IteratorResult(metadata, iter(objects), _source_supports_scalars=True)
    result._attributes = _SINGLE_ENTITY
    return result


class DirectPlan:
    """How to build objects of one mapper from the rows of one statement shape."""

    __slots__ = (
        "attr_keys", "dispatch", "identity_class", "mapper", "metadata", "path",
        "pk_positions", "plain_manager", "signature",
    )  # fmt: skip

    def __init__(
        self,
        mapper: Mapper[Any],
        attr_keys: tuple[str, ...],
        pk: tuple[int, ...],
        signature: str = "",
    ) -> None:
        self.mapper = mapper
        self.attr_keys = attr_keys  # attribute per result column
        self.pk_positions = pk  # result columns of the primary key, in mapper order
        # what the processed values stored for this shape depend on besides the SQL
        self.signature = signature
        self.identity_class = mapper._identity_class
        self.path = mapper._path_registry  # the load path the ORM gives top-level objects
        self.metadata = entity_metadata(mapper.class_.__name__)
        manager = mapper.class_manager
        self.dispatch = manager.dispatch  # (its listener collections change in place)
        # the ordinary instrumentation: objects keep their state in their __dict__
        self.plain_manager = type(manager) is ClassManager and manager.STATE_ATTR == STATE_ATTR

    def result(self, objects: list[Any]) -> Any:
        """A Result of ``objects`` shaped like the ORM's for ``select(Model)``."""
        return single_entity_result(self.mapper, objects, self.metadata)

    def usable(self, session: Session) -> bool:
        """False when events must see this load (they run only on the ORM's path):
        ``load`` and ``loaded_as_persistent`` for new objects, ``refresh`` for objects
        of the identity map whose unloaded attributes a load fills."""
        dispatch = self.dispatch
        return not (dispatch.load or dispatch.refresh or session.dispatch.loaded_as_persistent)


def only_cache_options(statement: Any) -> bool:
    """Does ``statement`` carry no options but `with_cache` (nothing that changes loading)?"""
    from .query_option import with_cache  # (query_option imports this module)

    return all(isinstance(o, with_cache) for o in statement._with_options)


def selected_entity(statement: Any) -> Any:
    """The mapped entity (class or alias) ``statement`` selects alone, as in
    ``select(Model)``; None for anything else (columns, several entities)."""
    descriptions = statement.column_descriptions
    if len(descriptions) != 1:
        return None
    entity = descriptions[0].get("entity")
    if entity is None or descriptions[0].get("expr") is not entity:
        return None
    return entity


def register_enums(mapper: Mapper[Any]) -> None:
    """Let the codec decode the Enum classes of ``mapper``'s columns (stored by name),
    also those inside an ``ARRAY`` or a variant: entries written by other processes
    hold their members."""
    for column in mapper.columns:
        for enum_class in enum_classes(column.type):
            register_enum(enum_class)


def direct_plan(compiled: Any) -> DirectPlan | None:
    """A `DirectPlan` when ``compiled`` is a plain select of one mapped class, else None."""
    statement = compiled.statement
    if not isinstance(statement, sa.Select):
        return None
    if not only_cache_options(statement):
        return None
    entity = selected_entity(statement)
    if entity is None:
        return None
    insp = inspect(entity)
    if not isinstance(insp, Mapper) or insp.class_ is not entity:
        return None  # aliased(), or not a mapped class
    mapper: Mapper[Any] = insp
    if (
        mapper.inherits is not None
        or mapper.polymorphic_on is not None
        or mapper.with_polymorphic
        or mapper.version_id_col is not None
        or mapper.always_refresh
        or any(r.lazy not in LAZY_STRATEGIES for r in mapper.relationships)
        or any(p.deferred for p in mapper.column_attrs)
        # A TypeDecorator or user-defined type may return any object: raw rows instead.
        or not all(plain_type(c.type) for c in mapper.columns)
    ):
        return None
    register_enums(mapper)
    by_column = mapper._columntoproperty
    attr_keys: list[str] = []
    for entry in compiled._result_columns:
        props = [by_column[o] for o in entry.objects if isinstance(o, sa.Column) and o in by_column]
        if len(props) != 1:
            return None
        attr_keys.append(props[0].key)
    if sorted(attr_keys) != sorted(p.key for p in mapper.column_attrs):
        return None  # a column selected twice, or an attribute not selected
    pk_keys = [by_column[c].key for c in mapper.primary_key]
    # Processed values depend on the mapping, not only on the SQL: another class mapped
    # to this table may read its columns with other types.
    cls = mapper.class_
    signature = repr(
        (
            f"{cls.__module__}.{cls.__qualname__}",
            tuple(type_key(entry[3]) for entry in compiled._result_columns),
        )
    )
    pk = tuple(attr_keys.index(k) for k in pk_keys)
    return DirectPlan(mapper, tuple(attr_keys), pk, signature)


def inlined(plan: DirectPlan, session: Session) -> bool:
    """Can objects of ``plan`` be made for ``session`` with the ORM's steps inlined? (The
    ordinary class manager and identity map.)"""
    return plan.plain_manager and type(session.identity_map) is WeakInstanceDict


def blank_objects(
    session: Session, plan: DirectPlan, count: int, identity_token: Any, options: tuple[Any, ...]
) -> list[tuple[Any, Any]]:
    """``count`` new objects of ``plan``'s class with their state, made as `build_objects`
    makes them but without identity or values: made while a read is on its way, they
    are taken by `build_objects` (``blanks``) once the rows are there. Only where
    `inlined`. One not taken is dropped as if never made (in no identity map)."""
    manager = plan.mapper.class_manager
    cls: Any = manager.class_
    new, make_state = cls.__new__, manager._state_constructor
    session_id, path = session.hash_key, plan.path
    out = []
    for _ in range(count):
        instance = new(cls)
        state = make_state(instance, manager)
        instance.__dict__[STATE_ATTR] = state
        state.identity_token = identity_token
        state.session_id = session_id
        state.load_options = options
        state.load_path = path
        out.append((instance, state))
    return out


def build_objects(
    session: Session,
    plan: DirectPlan,
    rows: Sequence[Sequence[Any]],
    identity_token: Any,
    options: tuple[Any, ...],
    blanks: list[tuple[Any, Any]] | None = None,
) -> list[Any]:
    """The objects for ``rows`` (processed column values), as a database load gives them
    (``blanks``: from `blank_objects`, for this session, token and options; taken first).

    An object already in the identity map is returned as it is, its expired attributes
    filled from the row (pending changes stay); a row without a primary key gives None,
    as the ORM's loading does. New objects are made by `blank_objects` (what
    ``ClassManager.new_instance`` does, inlined as the ORM's loading inlines it) and
    registered as ``WeakInstanceDict._add_unpresent`` would; with any other
    instrumentation or identity map, through those two.
    """
    identity_map = session.identity_map
    present = identity_map._dict.get  # identity key -> state (as loading.py reads it)
    by_key, map_ref = identity_map._dict, identity_map._wr
    identity_class, attr_keys, pk_positions = plan.identity_class, plan.attr_keys, plan.pk_positions
    single = pk_positions[0] if len(pk_positions) == 1 else None
    partial_ok = plan.mapper.allow_partial_pks
    inline = inlined(plan, session)
    if inline:
        blanks = blanks or []
        if len(blanks) < len(rows):
            blanks += blank_objects(session, plan, len(rows) - len(blanks), identity_token, options)
        take = blanks.pop
    out: list[Any] = []
    append = out.append
    for row in rows:
        pk = (row[single],) if single is not None else tuple([row[i] for i in pk_positions])
        identity_key = (identity_class, pk, identity_token)
        state: Any = present(identity_key)
        if state is not None:
            instance = state.obj()
            if instance is not None:  # already loaded: returned as it is
                if state.unloaded:
                    _fill_expired(state, attr_keys, row)
                append(instance)
                continue
        if None in pk and (not partial_ok or all(v is None for v in pk)):
            append(None)  # no identity, no object
            continue
        if inline:
            instance, state = take()
            state.key = identity_key
            by_key[identity_key] = state
            state._instance_dict = map_ref
            instance.__dict__.update(zip(attr_keys, row, strict=True))
        else:
            instance = _through_manager(session, plan, identity_key, options, row)
        append(instance)
    return out


def _through_manager(
    session: Session, plan: DirectPlan, identity_key: Any, options: tuple[Any, ...], row: Any
) -> Any:
    """One new object made and registered through the class manager and identity map."""
    instance = plan.mapper.class_manager.new_instance()
    state = instance_state(instance)
    state.key = identity_key
    state.identity_token = identity_key[2]
    state.session_id = session.hash_key
    state.load_options = options
    state.load_path = plan.path
    session.identity_map._add_unpresent(state, identity_key)
    instance_dict(instance).update(zip(plan.attr_keys, row, strict=True))
    return instance


def _fill_expired(state: Any, attr_keys: tuple[str, ...], row: Sequence[Any]) -> None:
    """Refresh the expired attributes of a loaded object from ``row``, as the ORM does
    (pending changes stay)."""
    unloaded = state.unloaded
    dict_ = state.dict
    todo = [k for k in attr_keys if k in unloaded]
    for key, value in zip(attr_keys, row, strict=True):
        if key in unloaded:
            dict_[key] = value
    state._commit(dict_, todo)
