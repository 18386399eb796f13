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

Which rows are there is the database's word, not Python's: under a case-insensitive or
``PAD SPACE`` collation ``'ABC'`` and ``'abc '`` are the row ``'abc'`` (the locking
SELECT returns its spelling), and two images of one batch may be one row. Such a key
is taken for a new one, and the multi-row INSERT fails on a duplicate key, which undoes
that statement only: its rows are then written one at a time, each looked up (and
locked) by the database first — upserted if found, INSERTed if not. A truly new row is
never taken for one that exists (the guard would then give another row its primary
key), and a real collision raises from that INSERT.

A raised ``IntegrityError`` rolls the batch back; the worker retries and dead-letters."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .entity import EntitySpec
from .server_rollback import _error_code
from .visibility import QUEUE_APPLY

_DUPLICATE_KEY = 1062  # ER_DUP_ENTRY

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
    fresh: list[tuple[frozenset[int] | None, dict[str, Any]]] = []
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
                fresh.append((mask, p))
        if existing:
            conn.execute(_guarded_upsert(spec, mask), existing)
    if fresh:
        _insert_new(conn, spec, fresh)
    for mask, params in later.items():
        conn.execute(_guarded_upsert(spec, mask), params)


def _insert_new(
    conn: Connection,
    spec: EntitySpec,
    fresh: Sequence[tuple[frozenset[int] | None, dict[str, Any]]],
) -> None:
    """INSERT the images ``fresh`` (with their changed columns) of rows the locking
    SELECT did not return by their spelling: in one statement; if a key of them is a
    duplicate (a row there, or another of them, under the column's collation), one at a
    time, each upserted if the database finds its row (locked), else INSERTed."""
    table: Any = spec.mapper.local_table
    try:
        conn.execute(table.insert(), [p for _, p in fresh])
        return
    except sa.exc.IntegrityError as exc:  # (undoes this statement only)
        if _error_code(exc.orig) != _DUPLICATE_KEY:
            raise
    pk_cols = list(spec.mapper.primary_key)
    for mask, p in fresh:
        key = tuple(p[str(c.key)] for c in pk_cols)
        if _lock_existing(conn, spec, {key}):
            conn.execute(_guarded_upsert(spec, mask), [p])
        else:
            conn.execute(table.insert(), [p])


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
    query = query.execution_options(**{QUEUE_APPLY: True})  # (not a user's lock)
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
