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
- one ``INSERT ... VALUES`` of the rows that were not there: a collision raises. When
  a row there has an image after a new one in the batch, these two run under a
  ``SAVEPOINT`` (two statements more).

Each database row must end as its last image in the batch says (as through the plain
upsert). Which rows are there is the database's word, not Python's: under a
case-insensitive or ``PAD SPACE`` collation ``'ABC'`` and ``'abc '`` are the row
``'abc'`` (the locking SELECT returns its spelling), so two images of one batch may be
one row. Such a key is taken for a new one, and the multi-row INSERT fails on a
duplicate key, which undoes that statement only; the savepoint, if any, undoes the
upserts before it. The batch is then written in its order (from its first new row if
nothing was undone), one row at a time, each looked up (and locked) by the database
first — upserted if found, INSERTed if not — so an image spelled otherwise is never
written after a later image of its row. (`write_behind_order.split_peers` takes the
changes whose keys `collation_peers` finds alike out of the batch first, and writes
them one at a time in batch order, deletes among them: this way is left for spellings
its fold does not see alike.) Only such a batch costs statements per row. A
truly new row is never taken for one that exists (the guard would then give another
row its primary key), and a real collision raises there too. Images of one key spelled
alike (`apply_rows` given a row twice) go in rounds: the n-th of each key in the n-th.

A raised ``IntegrityError`` rolls the batch back; the worker retries and dead-letters.

`collation_peers` finds, for any MySQL / MariaDB table, the changes of a batch whose
keys the collation may find equal (the plain upsert groups images by columns and
deletes after every image: `write_behind_apply` writes these in batch order instead)."""

from __future__ import annotations

import unicodedata
import weakref
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .entity import EntitySpec
from .server_rollback import _error_code
from .visibility import QUEUE_APPLY

if TYPE_CHECKING:
    from .write_behind_apply import Rows

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


def collation_peers(conn: Connection, rows: Rows) -> list[int]:
    """Positions of ``rows`` (changes of one MySQL / MariaDB table, in batch order)
    whose primary key may be another's of ``rows`` under the key's collation (the same
    `fold_key`); none on other dialects, and none in a batch of distinct keys (every batch
    but these: one dict of the folded keys)."""
    if len(rows) < 2 or conn.dialect.name not in ("mysql", "mariadb"):
        return []
    folded = [tuple(fold_key(v) for v in pk) for pk, _, _, _ in rows]
    seen: dict[tuple[Any, ...], int] = {}
    for key in folded:
        seen[key] = seen.get(key, 0) + 1
    if len(seen) == len(folded):
        return []
    return [n for n, key in enumerate(folded) if seen[key] > 1]


def fold_key(value: Any) -> Any:
    """A string key part as coarsely as any case- and accent-insensitive, ``PAD SPACE``
    collation compares it, or coarser (a false match only costs statements): case
    folded, compatibility forms, accents and format characters dropped, ``ss`` as
    ``s`` (``'ß'`` is ``'s'`` to ``utf8mb4_general_ci``, ``'ss'`` to the UCA ones),
    trailing spaces stripped. Other values as they are."""
    if not isinstance(value, str):
        return value
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", value).casefold())
    kept = (ch for ch in text if not unicodedata.combining(ch) and unicodedata.category(ch) != "Cf")
    return "".join(kept).replace("ss", "s").rstrip(" ")


Image = tuple[tuple[Any, ...], frozenset[int] | None, dict[str, Any]]
"""(primary key as spelled, changed column positions or None for all, the image by
column key)."""


def write_exact(conn: Connection, spec: EntitySpec, rows: Rows) -> None:
    """Write the images of ``rows`` (in batch order; deletes are left out) to ``spec``'s
    table: existing rows get their changed columns, missing rows their whole image; a
    collision on another unique key raises. Each database row ends as its last image
    says, however the images spell its key (see the module's docstring)."""
    keys = [str(c.key) for c in spec.columns]
    at = spec.pk_positions
    images = [
        (tuple(image[i] for i in at), _mask(cols), dict(zip(keys, image, strict=True)))
        for _, image, cols, _ in rows
        if image is not None
    ]
    if not images:
        return
    there = _lock_existing(conn, spec, {pk for pk, _, _ in images})
    # The n-th image of a key (as spelled) goes in round n: a round has one image per
    # key, so grouping it by columns keeps the batch order of every row's images.
    rounds: list[list[Image]] = []
    count: dict[tuple[Any, ...], int] = {}
    new: list[int] = []  # positions of the first images of keys not there as spelled
    for i, (pk, mask, params) in enumerate(images):
        n = count[pk] = count.get(pk, -1) + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append((pk, mask, params))
        if n == 0 and pk not in there:
            new.append(i)
    if not new:  # (every key as stored: one spelling per row)
        for images_of_round in rounds:
            _upsert_groups(conn, spec, images_of_round)
        return
    existing = [image for image in rounds[0] if image[0] in there]
    fresh = [images[i][2] for i in new]
    table: Any = spec.mapper.local_table
    # The upsert of the rows there comes first (a row there may give up a unique value a
    # new row takes). If they are the images before the first new one, a failed INSERT
    # leaves the batch written up to it; else a savepoint undoes them.
    undo = len(existing) != new[0] or len(rounds) > 1
    if not undo:
        _upsert_groups(conn, spec, existing)  # (a collision raises)
    try:
        if undo:
            with conn.begin_nested():
                _upsert_groups(conn, spec, existing)
                conn.execute(table.insert(), fresh)
        else:
            conn.execute(table.insert(), fresh)
    except sa.exc.IntegrityError as exc:  # (a failed statement undoes itself only)
        if _error_code(exc.orig) != _DUPLICATE_KEY:
            raise
        # A key is a duplicate under the column's collation (of a row there, or of
        # another new key: two images of one row), or a real collision: the batch in its
        # order, row by row, from where it stands.
        _one_at_a_time(conn, spec, images if undo else images[new[0] :], there)
        return
    # The INSERT went through: no new key is a spelling of another row of the batch.
    for images_of_round in rounds[1:]:
        _upsert_groups(conn, spec, images_of_round)


def _mask(cols: Collection[int] | None) -> frozenset[int] | None:
    return None if cols is None else frozenset(cols)


def _upsert_groups(conn: Connection, spec: EntitySpec, images: Sequence[Image]) -> None:
    """The guarded upsert of ``images`` of rows that exist (one image per row), one
    executemany per set of changed columns."""
    groups: dict[frozenset[int] | None, list[dict[str, Any]]] = {}
    for _, mask, image in images:
        groups.setdefault(mask, []).append(image)
    for mask, params in groups.items():
        conn.execute(_guarded_upsert(spec, mask), params)


def _one_at_a_time(
    conn: Connection, spec: EntitySpec, images: Sequence[Image], there: set[tuple[Any, ...]]
) -> None:
    """Write ``images`` in their order, one statement each: upserted if the row exists
    (a key ``there`` as spelled, else looked up and locked by the database), INSERTed
    if not."""
    table: Any = spec.mapper.local_table
    known = set(there)  # (keys that name a row as spelled: no lookup)
    for pk, mask, params in images:
        if pk in known or _lock_existing(conn, spec, {pk}):
            conn.execute(_guarded_upsert(spec, mask), [params])
        else:
            conn.execute(table.insert(), [params])
        known.add(pk)


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
