"""Write-behind images of MySQL / MariaDB tables with a unique key besides the primary key.

``ON DUPLICATE KEY UPDATE`` updates the row of whichever unique key the new row collides
with: a row with another primary key and the same value of another unique column would
be overwritten, the write reported done (``ON CONFLICT (pk)`` raises elsewhere). Such a
table (`upsert_may_hit_other_rows`) is written by `write_exact`, in a few statements per
batch whatever its size (pymysql runs an UPDATE executemany one row at a time, and folds
an ``INSERT ... VALUES`` executemany into one multi-row statement):

- one ``SELECT pk ... WHERE pk IN (...) FOR UPDATE``: the batch's rows that exist, locked
  until the batch commits (a locking read takes no snapshot: the sync marks read after
  the writes still see later commits);
- per set of changed columns, the upsert of the existing rows only: its INSERT row
  collides on the primary key of a row that is there, and a guard sets the primary key
  of the row updated to the image's, so that if another row were updated it would
  collide on the primary key and raise; a new value colliding with another row's
  unique value raises as an UPDATE would;
- one ``INSERT ... VALUES`` of the rows that were not there: a collision raises.

A raised ``IntegrityError`` rolls the batch back; the worker retries and dead-letters."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .entity import EntitySpec

_other_keys: weakref.WeakKeyDictionary[Engine, dict[Any, bool]] = weakref.WeakKeyDictionary()
"""Per engine and table: has the table a unique key besides its primary key?"""


def upsert_may_hit_other_rows(conn: Connection, table: Any) -> bool:
    """Would MySQL / MariaDB's ``ON DUPLICATE KEY UPDATE`` of ``table`` update another row
    than the one of the primary key: has it a unique key besides the primary key (in the
    model, or in the database: looked up once per engine)? False on other dialects."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return False
    known = _other_keys.setdefault(conn.engine, {})
    found = known.get(table)
    if found is None:
        found = any(isinstance(c, sa.UniqueConstraint) for c in table.constraints)
        found = found or any(ix.unique for ix in table.indexes)
        if not found:
            try:  # (SHOW CREATE TABLE: no read that would take the batch's snapshot)
                inspector = sa.inspect(conn)
                names = (table.name, table.schema)
                found = any(ix.get("unique") for ix in inspector.get_indexes(*names))
                found = found or bool(inspector.get_unique_constraints(*names))
            except sa.exc.SQLAlchemyError:  # cannot tell: the way right in any case
                return True
        known[table] = found
    return found


def write_exact(
    conn: Connection,
    spec: EntitySpec,
    groups: Mapping[frozenset[int] | None, Sequence[dict[str, Any]]],
) -> None:
    """Write the images ``groups`` (changed column positions, None for all -> whole
    images by column key) of ``spec``'s table: existing rows get those columns, missing
    rows their whole image; a collision on another unique key raises."""
    pk_cols = list(spec.mapper.primary_key)
    pk_keys = [str(c.key) for c in pk_cols]
    wanted = {tuple(p[k] for k in pk_keys) for params in groups.values() for p in params}
    there = _lock_existing(conn, spec, wanted)
    fresh: list[dict[str, Any]] = []
    inserted: set[tuple[Any, ...]] = set()
    later: dict[frozenset[int] | None, list[dict[str, Any]]] = {}  # new, seen again
    for mask, params in groups.items():
        existing = []
        for p in params:
            pk = tuple(p[k] for k in pk_keys)
            if pk in there:
                existing.append(p)
            elif pk in inserted:
                later.setdefault(mask, []).append(p)
            else:
                inserted.add(pk)
                fresh.append(p)
        if existing:
            conn.execute(_guarded_upsert(spec, mask), existing)
    if fresh:
        table: Any = spec.mapper.local_table
        conn.execute(table.insert(), fresh)
    for mask, params in later.items():
        conn.execute(_guarded_upsert(spec, mask), params)


def _lock_existing(
    conn: Connection, spec: EntitySpec, wanted: set[tuple[Any, ...]]
) -> set[tuple[Any, ...]]:
    """The primary keys of ``wanted`` the table holds, locked (``FOR UPDATE``)."""
    pk_cols = list(spec.mapper.primary_key)
    if len(pk_cols) == 1:
        where = pk_cols[0].in_([pk[0] for pk in wanted])
    else:
        where = sa.tuple_(*pk_cols).in_(list(wanted))
    query = sa.select(*pk_cols).where(where).with_for_update()
    return {tuple(row) for row in conn.execute(query)}


def _guarded_upsert(spec: EntitySpec, mask: frozenset[int] | None) -> Any:
    """``INSERT ... ON DUPLICATE KEY UPDATE`` setting the columns ``mask`` (None: all but
    the primary key) of rows known to exist, and their primary key to itself: a row
    updated by another unique key would be given an existing primary key, and raise."""
    from sqlalchemy.dialects import mysql

    table: Any = spec.mapper.local_table
    stmt = mysql.insert(table)
    new = stmt.inserted
    sets: dict[str, Any] = {
        c.name: sa.func.IF(c == new[str(c.key)], c, new[str(c.key)])
        for c in spec.mapper.primary_key
    }
    for i, c in enumerate(spec.columns):
        if not c.primary_key and (mask is None or i in mask):
            sets[c.name] = new[str(c.key)]
    return stmt.on_duplicate_key_update(sets)
