"""Write-through: what a flush records of each registered row, and what the outermost
commit sends for it.

Every flush records the full column image of each inserted or updated registered row
(or a delete) in the transaction's frame, together with the entry as the store held
it at that moment. After the outermost commit the image is written with a
compare-and-set against that earlier value; if anything else changed the entry
meanwhile (a concurrent writer, a fill), the entry gets a tombstone instead. So a late
writer can never put an older image over a newer one, without clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.orm.base import NEVER_SET, PassiveFlag
from sqlalchemy.orm.base import NO_VALUE as NO_VALUE_ATTR

from .detach import MUTABLE
from .detach import detached as detached_value
from .entity import EntitySpec, column_image
from .entity_batch import FlushBatch
from .entity_types import ByKey, changes_are_exact, strict_mode
from .entity_write_keys import Checks, checks_of, foreign, respelled, written_rows
from .invalidation import rows_generation
from .keys import unkeyable
from .transaction import NEVER, Collector, EntityChange, collector_for

if TYPE_CHECKING:
    from .cache import Cache


def detached(image: list[Any]) -> list[Any]:
    """``image`` with its mutable values (a JSON column's dict, say) copied: it is
    encoded later (at the commit), and a change made in place after the flush reaches
    neither the database nor, so, the cache."""
    for i, value in enumerate(image):
        kind = type(value)
        if kind in _IMMUTABLE:
            continue
        if kind in MUTABLE or isinstance(value, _CONTAINERS):
            image[i] = detached_value(value)
    return image


_CONTAINERS = (dict, list, set, bytearray)
_IMMUTABLE = frozenset(
    {type(None), bool, int, float, str, bytes, Decimal, datetime, date, time, timedelta, UUID}
)
"""Types of values that are neither `MUTABLE` nor subclasses of `_CONTAINERS`: kept as
they are, without a closer look."""


def _pre_image(spec: EntitySpec, state: Any, values: list[Any]) -> list[Any] | bool:
    """The column values ``state`` held before this flush changed it (in ``after_flush``
    the attribute history is still there), given its values now (every one loaded);
    False when one of them was never loaded."""
    committed = state.committed_state
    out = list(values)
    positions = spec.positions
    for key, value in committed.items():
        i = positions.get(key)
        if i is not None:
            if value is NO_VALUE_ATTR or value is NEVER_SET:
                return False
            out[i] = value
    return out


def _primary_key(spec: EntitySpec, state: Any) -> Sequence[Any]:
    """The object's primary key, as `Mapper.primary_key_from_instance` reads it (which
    loads an attribute that is not there)."""
    dict_ = state.dict
    try:
        return tuple([dict_[key] for key in spec.pk_keys])
    except KeyError:
        return state.mapper.primary_key_from_instance(state.obj())  # type: ignore[no-any-return]


def record_flush(cache: Cache, session: Session, flush_context: Any = None) -> None:
    """``after_flush``: note the image (or delete) of each registered row written.

    The rows are those ``flush_context`` (the flush's ``UOWTransaction``) wrote: with
    the rows its cascades deleted (orphans), without the objects a partial flush
    (``flush([obj])``) left out. Without it they are taken from the Session's new,
    dirty and deleted objects, which can be neither.

    An update's image is the flushed object's column values, but its UPDATE sets only
    the changed columns: if the object was loaded before another transaction changed
    other columns, the database row is not the image. So an update is written through
    only when the entry, read now (the row is locked), holds exactly the values the
    object had before this transaction changed it; otherwise the entry is invalidated
    (a tombstone, see `Cache.bump`). An update of the primary key also deletes the
    entry of the old key; a key deleted by the flush is never written by it.

    A write of an object whose key may not be its row's as readers key it moves the
    table's row generation too (`entity_write_keys.respelled`); rows of a registered
    table written through another mapper are invalidated (`entity_write_keys.foreign`).
    """
    entities = cache.entities
    if not entities:
        return
    deleted: dict[str, EntitySpec] = {}  # entries to delete: deleted rows, old keys
    inexact: set[str] = set()  # rows whose object holds a value the database changed
    images: list[_Image] = []
    checks: dict[EntitySpec, Checks] = {}
    connections: dict[EntitySpec, tuple[bool, tzinfo | None]] = {}
    tables: set[str] = set()  # whose written rows' entries cannot all be named: all go
    written, others = written_rows(session, flush_context, entities)
    for spec, state, isdelete in written:
        old = state.key  # the identity before this flush: None for an insert
        if isdelete:
            if old is not None and not any(v is None for v in old[1]):
                deleted[spec.key(cache, old[1], state.identity_token)] = spec
                if respelled(state, old, None, checks_of(session, spec, checks)):
                    tables.add(spec.table)
            continue
        connection = (
            None if spec.write == "invalidate" else _connection_of(session, spec, connections)
        )
        image, pre, pk = _taken(spec, state, connection is not None and not connection[0])
        if old is not None and tuple(pk) != old[1]:  # the primary key changed
            deleted[spec.key(cache, old[1], state.identity_token)] = spec
        found = checks_of(session, spec, checks)
        if respelled(state, old, pk, found):
            tables.add(spec.table)
        # (``is None``: a key value may define ==)
        if any(v is None for v in pk) or unkeyable((*pk, state.identity_token)) is not None:
            continue  # no entry can be keyed by it (`keys.unkeyable`): none to write
        key = spec.key(cache, pk, state.identity_token)
        if image is None or connection is None:
            deleted[key] = spec  # write="invalidate"
            continue
        if not _exact(spec, state, image, old is None, found[0]):
            deleted[key] = spec  # a value the database stores otherwise: invalidated,
            inexact.add(key)  # and so is every later image of the row (`NEVER`)
            continue
        zone = connection[1]
        if zone is not None:
            _in_zone(image, spec.aware_positions, zone)
        skip = () if old is None else _update_sets(spec, state)
        images.append((key, spec, image, pre, skip))
    if others:
        foreign(cache, session, others, checks, deleted, inexact, tables)
    if not (tables or deleted or images):
        return
    collector = collector_for(session, cache)
    # an entry under another spelling of the key, or of another mapping's row
    rows = sorted({rows_generation(t) for t in tables})
    collector.frames[-1].tables.update(rows)
    if deleted or images:
        _record(cache, collector, deleted, inexact, images)
    if collector.autocommit and (deleted or rows):
        # committed as the flush ran: gone for other Sessions now, not at its end (the
        # transaction end tombstones them again, images are swapped at every flush)
        cache.bump(rows, deletes=list(deleted), tombstone=True)


def _taken(
    spec: EntitySpec, state: Any, imaged: bool
) -> tuple[list[Any] | None, list[Any] | bool | None, Sequence[Any]]:
    """(image, values before an update, primary key) of a row a flush wrote; with no
    image unless ``imaged`` (or a value is not known: see `column_image`)."""
    inserted = state.key is None
    image = column_image(spec, state.obj(), inserted=inserted) if imaged else None
    if image is None:
        return None, None, _primary_key(spec, state)
    # (before `detached` and `_in_zone` change ``image``)
    pre = None if inserted else _pre_image(spec, state, image)
    image = detached(image)
    return image, pre, [image[i] for i in spec.pk_positions]


_Image = tuple[str, EntitySpec, list[Any], list[Any] | bool | None, tuple[int, ...]]
"""(key, spec, image, values before an update (None for inserts), positions the update
sets whatever they held: its ``onupdate`` columns)"""


def _update_sets(spec: EntitySpec, state: Any) -> tuple[int, ...]:
    """The positions the UPDATE of an updated row sets whatever they held: its
    ``onupdate`` columns, if it is sent at all."""
    if spec.onupdate_positions and _sends_update(spec, state):
        return spec.onupdate_positions
    return ()


def _sends_update(spec: EntitySpec, state: Any) -> bool:
    """Does the flush send an UPDATE of this row (a column value changed)? Not when only
    a collection changed, or an attribute was set to the value it had: then its
    ``onupdate`` columns keep what they held."""
    manager, dict_ = state.manager, state.dict
    columns = set(spec.attr_keys)
    for key in state.committed_state:
        if key in columns:
            added, _, deleted = manager[key].impl.get_history(
                state, dict_, passive=PassiveFlag.NO_CHANGE
            )
            if added or deleted:
                return True
    return False


def _record(
    cache: Cache,
    collector: Collector,
    deleted: dict[str, EntitySpec],
    inexact: set[str],
    images: list[_Image],
) -> None:
    """Note a flush's changes in the innermost frame; send its store read."""
    frame = collector.frames[-1]
    ttls: dict[EntitySpec, float | None] = {}
    batch: FlushBatch | None = None
    for key, spec in deleted.items():
        earlier = collector.latest_change(key)
        expected = None if earlier is None else earlier.expected
        if key in inexact:
            expected = NEVER  # a later flush's image of the row carries the value too
        frame.entities[key] = EntityChange(key, None, expected, _ttl(cache, spec, ttls))
    for key, spec, image, pre, skip in images:
        if key in deleted:
            continue
        if batch is None:  # (AUTOCOMMIT: every row's entry is swapped at every flush)
            batch = FlushBatch(cache, collector.autocommit)
        change = EntityChange(key, None, None, _ttl(cache, spec, ttls), batch)
        batch.add(change, spec, image, pre, collector.latest_change(key), skip)
        frame.entities[key] = change
    if batch is not None:
        batch.send()


def _connection_of(
    session: Session, spec: EntitySpec, memo: dict[EntitySpec, tuple[bool, tzinfo | None]]
) -> tuple[bool, tzinfo | None]:
    """What the connection the flush wrote ``spec``'s rows on means for their images:
    whether it has a ``schema_translate_map`` (of the engine, or of the Connection
    itself) — entries are keyed by the table as mapped, so another schema's row is only
    ever invalidated, never written through (the entries of the table the map names go
    by its row generation: `statements._after_execute`) — or runs MySQL / MariaDB
    without a strict ``sql_mode`` (`entity_types.strict_mode`: values are truncated and
    clamped, not refused), both meaning "invalidate, never write through"; and the zone
    PostgreSQL gives aware datetimes back in (its ``TimeZone``, where the driver tells:
    psycopg)."""
    found = memo.get(spec)
    if found is None:
        bind: Any = session.get_bind(spec.mapper)
        root = session.get_transaction()
        entry = root._connections.get(bind) if root is not None else None
        conn = entry[0] if entry is not None else bind
        translated = bool(conn.get_execution_options().get("schema_translate_map"))
        translated = translated or not strict_mode(conn)
        zone = None
        if spec.aware_positions and isinstance(conn, sa.Connection):
            info = getattr(conn.connection.dbapi_connection, "info", None)
            zone = getattr(info, "timezone", None)
        found = memo[spec] = (translated, zone if isinstance(zone, tzinfo) else None)
    return found


def _in_zone(image: list[Any], positions: Sequence[int], zone: tzinfo) -> None:
    """Aware datetimes of ``image`` as the database gives them back: in ``zone``."""
    for i in positions:
        value = image[i]
        if isinstance(value, datetime) and value.tzinfo is not zone:
            image[i] = value.astimezone(zone)


def _exact(spec: EntitySpec, state: Any, image: list[Any], inserted: bool, checks: ByKey) -> bool:
    """Does the database give back ``image`` as it is (`entity_types`)? For an update,
    only the attributes it changed need a look."""
    if inserted:
        return changes_are_exact(image, spec.attr_keys, checks)
    if spec.onupdate_keys:  # set by the UPDATE too, without history
        return changes_are_exact(image, (*state.committed_state, *spec.onupdate_keys), checks)
    return changes_are_exact(image, state.committed_state, checks)


def _ttl(cache: Cache, spec: EntitySpec, ttls: dict[EntitySpec, float | None]) -> float | None:
    if spec not in ttls:
        ttls[spec] = cache._ttl(spec.ttl)
    return ttls[spec]


def commit_writes(
    changes: dict[str, EntityChange],
) -> tuple[list[tuple[str, bytes | None, bytes | None, float | None]], list[str]]:
    """What the outermost commit sends for these rows: images to compare-and-set over
    what was expected (a failed compare deletes), and keys to delete."""
    writes: list[tuple[str, bytes | None, bytes | None, float | None]] = []
    deletes: list[str] = []
    for change in changes.values():
        image, expected = change.parts()
        if image is None:
            deletes.append(change.key)
        else:
            writes.append((change.key, expected, image, change.ttl))
    return writes, deletes
