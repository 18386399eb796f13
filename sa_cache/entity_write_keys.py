"""Which entries the rows a flush wrote reach: the keys readers key those rows by.

An entry is keyed by its row's primary key as the database gives it back. An object's
identity may be spelled otherwise: ``"5"`` for an Integer key, ``"de"`` for the row
``"DE"`` under MariaDB's case-insensitive collations, ``"Python"`` where a TypeDecorator
stores ``"python"`` (`entity_types.key_checks_of`, `entity_types.key_spelling_of`).
A write of such an object moves its table's row generation (`respelled`), since the
row's own entry cannot be named. And rows of a registered table written through another
mapper — a second class mapped to the table, a subclass of the registered class — are
invalidated (`foreign`): the flush names them, so no statement-level row generation
covers them (`transaction.Collector.record_write`).

Used by `entity_writes.record_flush`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from .entity import EntitySpec
from .entity_types import EQUAL_SPELLINGS, ByKey, KeyChecks, write_checks_of
from .invalidation import table_name
from .keys import unkeyable

if TYPE_CHECKING:
    from .cache import Cache

Checks = tuple[ByKey, KeyChecks, int]
"""(value checks by attribute, primary-key checks, key spelling) of a model on the
database a flush wrote to (`checks_of`)."""

Row = tuple[EntitySpec, Any, bool]
"""(spec, state, deleted) of one row a flush wrote."""


def checks_of(session: Session, spec: EntitySpec, memo: dict[EntitySpec, Checks]) -> Checks:
    """The checks (`entity_types`) of ``spec``'s values and primary-key values, and how
    its keys may be spelled (`entity_types.key_spelling_of`), on the database the flush
    wrote its rows to."""
    found = memo.get(spec)
    if found is None:
        _, by_key, key_checks, spelling = write_checks_of(
            spec, session.get_bind(spec.mapper).dialect.name
        )
        found = memo[spec] = (by_key, key_checks, spelling)
    return found


def written_rows(
    session: Session, flush_context: Any, entities: dict[Any, EntitySpec]
) -> tuple[list[Row], list[Row]]:
    """The rows of registered models the flush wrote (see `entity_writes.record_flush`),
    and those of their tables it wrote through other mappers (`foreign`)."""
    out: list[Row] = []
    others: list[Row] = []
    tables: dict[str, EntitySpec] | None = None  # made at the first other mapper
    if flush_context is None:
        removed = session._deleted  # states, as session.new / dirty / deleted hold them
        for state, isdelete in (
            *((s, False) for s in session._new),
            *((s, False) for s in session._dirty_states if s not in removed),
            *((s, True) for s in removed),
        ):
            spec = entities.get(state.mapper)
            if spec is not None:
                out.append((spec, state, isdelete))
                continue
            if tables is None:
                tables = {e.table: e for e in entities.values()}
            others.extend((other, state, isdelete) for other in _sharing(state.mapper, tables))
        return out, others
    states = flush_context.states  # state -> (isdelete, listonly)
    for mapper, mapped in flush_context.mappers.items():
        spec = entities.get(mapper)
        if spec is not None:
            for state in mapped:
                isdelete, listonly = states[state]
                if not listonly:  # listonly: a related row the flush only read
                    out.append((spec, state, isdelete))
            continue
        if tables is None:
            tables = {e.table: e for e in entities.values()}
        for spec in _sharing(mapper, tables):
            for state in mapped:
                isdelete, listonly = states[state]
                if not listonly:
                    others.append((spec, state, isdelete))
    return out, others


def _sharing(mapper: Any, tables: dict[str, EntitySpec]) -> list[EntitySpec]:
    """The registered models (``tables``: by `EntitySpec.table`) whose table ``mapper``,
    a mapper not registered, writes (it maps it too)."""
    return [tables[name] for t in mapper.tables if (name := table_name(t)) in tables]


def respelled(state: Any, old: Any, pk: Sequence[Any] | None, checks: Checks) -> bool:
    """May the entry of a row a flush wrote be keyed otherwise than the object's key?
    ``old``: its identity before the flush (None: inserted); ``pk``: its key after it
    (None: deleted). So when either is not of the type readers' keys have, or when
    ``old`` may be spelled otherwise (a key type of `entity_types.EQUAL_SPELLINGS` or
    more) and is not known to be the row's spelling (`as_stored`). An insert or a key
    change of such a type notes whether the key the object holds from now on is its
    row's: it is when the database stores it as given (`EQUAL_SPELLINGS`)."""
    _, key_checks, spelling = checks
    if spelling and pk is not None and (old is None or tuple(pk) != old[1]):
        setattr(state, _STORED, (tuple(pk), spelling == EQUAL_SPELLINGS))
    for values in (pk, None if old is None else old[1]):
        if values is not None:
            size = len(values)
            for index, check in key_checks:
                value = values[index] if index < size else None
                if value is not None and not check(value):
                    return True
    return bool(spelling) and old is not None and not as_stored(state, old[1])


_STORED = "_sa_cache_key_as_stored"
"""The InstanceState attribute where a flush notes the key it gave an object (an insert,
a key change) and whether the database stored it as given (`respelled`)."""


def as_stored(state: Any, pk: tuple[Any, ...]) -> bool:
    """Is ``pk``, the identity ``state`` holds, its row's key as the database gives it
    back (so as readers key the row's entry)? Known when a flush of this object noted
    it (`respelled`), or when the object was loaded — by the ORM, or built from an entity
    entry or a cached query's rows, which hold what loads gave: then its ``load_path``
    is set, as the ORM's loading sets it. Not known (False) for an identity the
    application spelled: `make_transient_to_detached`, ``merge(load=False)`` of such an
    object, a key the database stores otherwise; nor for an object loaded with
    ``populate_existing`` (the ORM sets no ``load_path`` then), which only costs misses.
    (An object loaded, made transient, given another spelling of its key and made
    detached again keeps its ``load_path``: that is not told apart.)"""
    noted = getattr(state, _STORED, None)
    if noted is not None and noted[0] == pk:
        return bool(noted[1])
    return not state.load_path.is_root


def foreign(
    cache: Cache,
    session: Session,
    rows: list[Row],
    checks: dict[EntitySpec, Checks],
    deleted: dict[str, EntitySpec],
    inexact: set[str],
    tables: set[str],
) -> None:
    """Invalidate the entries of rows of registered tables a flush wrote through another
    mapper: a second class mapped to the table, or a subclass of the registered class
    (joined or single table; it may be declared after `register`). Its image is of
    another mapping, so it is never written through: the entry of the row's key (old
    and new) is deleted (in ``deleted``), and so is every later image of the row in the
    transaction (``inexact``). When that key is not known — the mapper's primary key is
    not the registered model's, the object's key may be spelled otherwise
    (`respelled`), or the model is written behind — the table goes in ``tables``: its
    row generation moves, all of its entries go."""
    memo: dict[tuple[Any, EntitySpec], tuple[str, ...] | None] = {}
    for spec, state, isdelete in rows:
        mapper = state.mapper
        if (mapper, spec) not in memo:
            memo[(mapper, spec)] = _key_attrs(mapper, spec)
        attrs = memo[(mapper, spec)]
        old = state.key
        pk: tuple[Any, ...] | None = None
        if not isdelete and attrs is not None:
            try:
                pk = tuple([state.dict[attr] for attr in attrs])
            except KeyError:  # (not after a flush)
                attrs = None
        if attrs is None or spec.write == "behind":
            tables.add(spec.table)
            continue
        if respelled(state, old, pk, checks_of(session, spec, checks)):
            tables.add(spec.table)
        keys = [] if old is None else [old[1]]
        if pk is not None and (old is None or pk != old[1]):
            keys.append(pk)
        for values in keys:
            if (
                any(v is None for v in values)
                or unkeyable((*values, state.identity_token)) is not None
            ):
                continue  # no entry is keyed by it
            key = spec.key(cache, values, state.identity_token)
            deleted[key] = spec
            inexact.add(key)


def _key_attrs(mapper: Any, spec: EntitySpec) -> tuple[str, ...] | None:
    """The attributes of ``mapper`` holding ``spec``'s primary key, in its order, when
    ``mapper``'s identity is that key (its primary-key columns are the registered
    model's: a subclass's, or those of a second class of the table); else None."""
    own = tuple(mapper.primary_key)
    theirs = tuple(spec.mapper.primary_key)
    if len(own) != len(theirs) or any(a is not b for a, b in zip(own, theirs, strict=True)):
        return None
    return tuple(mapper.get_property_by_column(c).key for c in own)
