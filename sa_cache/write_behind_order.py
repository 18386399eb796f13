"""The order of a write-behind batch's statements, which a coalesced batch no longer has.

The application's flushes sent its statements in an order the database accepted; the
queue keeps only each row's last image (or its delete), so the worker and the
synchronous fallback (`write_behind_apply.apply_in_order`) rebuild one:

- tables in foreign-key order (`dependency_order`): images parents first, deletes
  children first;
- within a self-referencing table, images parents first (`parent_layers`): a row the
  batch adds under a parent it adds too (or deletes and adds again) comes after it;
- a row deleted and added again whose delete sets off foreign-key actions is deleted
  before the other images are written (`early_deletes`), and so is, before it, what the
  batch deletes in the tables that would be in its way (RESTRICT, NO ACTION, SET NULL)
  — also a table that has such rows of its own; the images of those tables that refer
  to no row the batch writes (rows moved away from it) are written before it too
  (`early_images`);
- changes of one table whose keys the collation may find one row's (MySQL / MariaDB:
  ``'ABC'`` and ``'abc'``; `split_peers`) are written one at a time in batch order,
  deletes among images: grouped by columns, or deleted after the images, an earlier
  change of the row could be written after a later one;
- when the worker bisects a failed batch, the rows deleted early go before the rows
  their delete could reach, and those wait while such a row fails (`write_behind_holds`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.ddl import sort_tables_and_constraints

from .invalidation import foreign_key_writes, rows_generation
from .write_behind_mysql import collation_peers, fold_key

if TYPE_CHECKING:
    from .entity import EntitySpec

Row = tuple[Sequence[Any], Sequence[Any] | None, Collection[int] | None, bool]
"""(primary key, image or None to delete, changed columns or None for all, renewed)."""

R = TypeVar("R")

InOrder = dict["EntitySpec", tuple[Sequence[Row], bool]]
"""Per model, rows to write one at a time in batch order, and whether a renewed row
among them is deleted before its image (as the early deletes would have)."""


def dependency_order(specs: Sequence[EntitySpec]) -> list[EntitySpec]:
    """``specs`` with the tables referred to by foreign keys before those referring to
    them (cycles and tables outside ``specs`` are left alone, without a warning)."""
    if len(specs) < 2:
        return list(specs)
    tables: dict[Any, list[EntitySpec]] = {}
    for spec in specs:
        tables.setdefault(spec.mapper.local_table, []).append(spec)
    sort: Any = sort_tables_and_constraints  # (untyped)
    ordered = sort(list(tables), filter_fn=lambda fkc: fkc.referred_table not in tables or None)
    return [spec for table, _ in ordered if table is not None for spec in tables[table]]


def split_peers(
    conn: Connection,
    order: Sequence[EntitySpec],
    by_spec: Mapping[EntitySpec, Sequence[Row]],
    early: Collection[EntitySpec],
) -> tuple[dict[EntitySpec, Sequence[Row]], InOrder]:
    """(``by_spec`` but the `collation_peers`: changes that may be of one row under
    other spellings of its key; these, in batch order, as `InOrder`: renewed rows
    deleted first in ``early`` tables). ``by_spec`` as it is and {} for none."""
    apart: dict[EntitySpec, Sequence[Row]] = {}
    in_order: InOrder = {}
    for spec in order:
        rows = by_spec[spec]
        found = set(collation_peers(conn, rows))
        apart[spec] = [r for n, r in enumerate(rows) if n not in found] if found else rows
        if found:
            in_order[spec] = ([r for n, r in enumerate(rows) if n in found], spec in early)
    return apart, in_order


def delete_acts(spec: EntitySpec) -> bool:
    """Does deleting a row of ``spec``'s table make the database change other rows?"""
    table: Any = spec.mapper.local_table
    return bool(foreign_key_writes(table.delete()))


def refers_to(table: Any) -> set[Any]:
    """The tables ``table``'s foreign keys refer to (those it can resolve)."""
    out = set()
    for fk in table.foreign_keys:
        try:
            out.add(fk.column.table)
        except sa.exc.SQLAlchemyError:  # (a table outside its MetaData)
            continue
    return out


def early_deletes(
    order: Sequence[EntitySpec], by_spec: Mapping[EntitySpec, Sequence[Row]]
) -> tuple[set[EntitySpec], set[EntitySpec]]:
    """(models with renewed rows whose delete sets off foreign-key actions, models of
    the batch whose rows could be in the way of those deletes — all of whose deletes go
    early). In the way: a row of a table that refers, other than ``ON DELETE CASCADE``,
    to a table those deletes reach (the roots', and those referring to them, directly
    or through one another): RESTRICT / NO ACTION would refuse the delete, SET NULL
    would write a row the application had deleted first (a NOT NULL column refuses
    it). A root can be in the way of another root, or of itself. A child that goes with
    its parent (CASCADE) is deleted late, as are other tables' rows: an image written
    first may move a row away from it (early, its cascade would take that row)."""
    roots = {
        spec
        for spec in order
        if any(again and image is not None for _, image, _, again in by_spec[spec])
        and delete_acts(spec)
    }
    if not roots:
        return roots, set()
    reached = {spec.mapper.local_table for spec in roots}
    for table in list(reached):
        reached |= reaching_tables(table)
    return roots, {spec for spec in order if _in_the_way(spec.mapper.local_table, reached)}


def renews(rows: Sequence[Row]) -> bool:
    """Is one of ``rows`` deleted and added again (an image that follows a delete)?"""
    return any(again and image is not None for _, image, _, again in rows)


def early_images(
    order: Sequence[EntitySpec],
    by_spec: Mapping[EntitySpec, Sequence[Row]],
    children: Collection[EntitySpec],
    apart: dict[EntitySpec, Sequence[Row]],
) -> dict[EntitySpec, list[Row]]:
    """The images of ``children`` (tables in the way of the early deletes; only rows
    ``apart``, not renewed) written before the roots' early deletes: those whose
    foreign-key values refer to no row the batch writes (``by_spec``'s images, renewed
    rows included). Such an image moves a row away from (or keeps it off) a row the
    early delete removes — after it, RESTRICT / NO ACTION refuses that delete — and
    what it refers to is in the database already. An image that refers to a row the
    batch writes (a new crate under the renewed box) stays at its table's turn. Those
    returned are taken out of ``apart``."""
    written: dict[tuple[Any, tuple[Any, ...]], set[tuple[Any, ...]] | None] = {}

    def keys_written(table: Any, cols: tuple[Any, ...]) -> set[tuple[Any, ...]] | None:
        """The values of ``cols`` in the batch's images of ``table`` (None: unknown)."""
        if (table, cols) not in written:
            found: set[tuple[Any, ...]] | None = set()
            for spec, rows in by_spec.items():
                if spec.mapper.local_table is not table or found is None:
                    continue
                try:
                    at = [spec.columns.index(c) for c in cols]
                except ValueError:  # (a column the model does not map)
                    found = None
                    continue
                found |= {_key(image, at) for _, image, _, _ in rows if image is not None}
            written[(table, cols)] = found
        return written[(table, cols)]

    out: dict[EntitySpec, list[Row]] = {}
    for spec in order:
        if spec not in children or _other_unique(spec):
            continue
        links = foreign_links(spec)
        picked = []
        for row in apart[spec]:
            image = row[1]
            if image is None or row[3] or links is None:
                continue
            refs = [(t, cols, _key(image, at)) for t, cols, at in links]
            if all(
                None in ref or ((keys := keys_written(t, cols)) is not None and ref not in keys)
                for t, cols, ref in refs
            ):
                picked.append(row)
        if picked:
            out[spec] = picked
            moved = {id(r) for r in picked}
            apart[spec] = [r for r in apart[spec] if id(r) not in moved]
    return out


def _key(image: Sequence[Any], at: Sequence[int]) -> tuple[Any, ...]:
    """The values at ``at`` of ``image``, strings as coarsely as a case- and
    accent-insensitive collation compares them (`write_behind_mysql.fold_key`: a match
    where it might be one keeps the image late, as before)."""
    return tuple(fold_key(image[i]) for i in at)


def _other_unique(spec: EntitySpec) -> bool:
    """Has ``spec``'s table a unique key besides its primary key (a constraint, a unique
    column or index)? An image written early there could take a value another row of
    the batch frees later (its delete, or its image)."""
    table: Any = spec.mapper.local_table
    return (
        any(isinstance(c, sa.UniqueConstraint) for c in table.constraints)
        or any(c.unique for c in table.columns)
        or any(i.unique for i in table.indexes)
    )


def foreign_links(spec: EntitySpec) -> list[tuple[Any, tuple[Any, ...], list[int]]] | None:
    """The foreign keys of ``spec``'s table: (referred table, referred columns,
    positions of the referring columns in its images); None if one cannot be resolved
    or the model does not map its columns."""
    table: Any = spec.mapper.local_table
    links = []
    for fkc in table.foreign_key_constraints:
        try:
            cols = tuple(e.column for e in fkc.elements)
            at = [spec.columns.index(e.parent) for e in fkc.elements]
        except (ValueError, sa.exc.SQLAlchemyError):
            return None
        links.append((fkc.referred_table, cols, at))
    return links


def _in_the_way(table: Any, reached: Collection[Any]) -> bool:
    """Does ``table`` refer to one of ``reached`` by a foreign key other than ``ON
    DELETE CASCADE``?"""
    for fk in table.foreign_keys:
        try:
            referred = fk.column.table
        except sa.exc.SQLAlchemyError:  # (a table outside its MetaData)
            continue
        if referred in reached and (fk.ondelete or "").upper() != "CASCADE":
            return True
    return False


def reaching_tables(table: Any) -> set[Any]:
    """The tables of ``table``'s MetaData that refer to it, directly or through one
    another (itself if it refers to itself): those whose rows a delete of its rows can
    reach."""
    tables = list(table.metadata.tables.values()) if table.metadata is not None else []
    found: set[Any] = set()
    grew, reached = True, {table}
    while grew:
        grew = False
        for other in tables:
            if other not in found and not refers_to(other).isdisjoint(reached):
                found.add(other)
                reached.add(other)
                grew = True
    return found


def _self_links(spec: EntitySpec) -> list[tuple[list[int], list[int]]]:
    """The self-referencing foreign keys of ``spec``'s table: (positions of the
    referring columns, positions of the columns they refer to) in its images."""
    table: Any = spec.mapper.local_table
    links = []
    for fkc in table.foreign_key_constraints:
        if fkc.referred_table is not table:
            continue
        try:
            local = [spec.columns.index(e.parent) for e in fkc.elements]
            remote = [spec.columns.index(e.column) for e in fkc.elements]
        except (ValueError, sa.exc.SQLAlchemyError):  # a column the model does not map
            continue
        links.append((local, remote))
    return links


def parent_layers(spec: EntitySpec, rows: Sequence[R], image_of: Any) -> list[list[R]]:
    """``rows`` of ``spec``'s table in layers to write one after another: a row whose
    image refers (self-referencing foreign key) to the image of another row of
    ``rows`` is in a later layer than that row (rows in a cycle: in the last). One
    layer, ``rows`` as given, for a table that does not refer to itself."""
    links = _self_links(spec) if len(rows) > 1 else []
    if not links:
        return [list(rows)]
    images: list[Sequence[Any]] = [image_of(r) for r in rows]
    parents: list[set[int]] = [set() for _ in rows]
    for local, remote in links:
        owners: dict[tuple[Any, ...], int] = {}
        for n, image in enumerate(images):
            owners.setdefault(tuple(image[i] for i in remote), n)
        for n, image in enumerate(images):
            ref = tuple(image[i] for i in local)
            owner = owners.get(ref)
            if owner is not None and owner != n and None not in ref:
                parents[n].add(owner)
    if not any(parents):
        return [list(rows)]
    below: list[list[int]] = [[] for _ in rows]
    for n, up in enumerate(parents):
        for p in up:
            below[p].append(n)
    waiting = [len(up) for up in parents]
    layer = [n for n in range(len(rows)) if not waiting[n]]
    layers, placed = [], set()
    while layer:  # (Kahn's algorithm, a layer at a time)
        layers.append([rows[n] for n in layer])
        placed.update(layer)
        nxt = []
        for n in layer:
            for c in below[n]:
                waiting[c] -= 1
                if not waiting[c]:
                    nxt.append(c)
        layer = sorted(nxt)
    rest = [rows[n] for n in range(len(rows)) if n not in placed]  # (a cycle)
    return [*layers, rest] if rest else layers


def savepoint(conn: Connection) -> Any:
    """``conn.begin_nested()``, its transaction begun in the database first: pysqlite
    sends its BEGIN only before an INSERT / UPDATE / DELETE, so a SAVEPOINT before any
    would start the transaction itself, and its RELEASE would commit it."""
    if conn.dialect.name == "sqlite":
        dbapi: Any = conn.connection.dbapi_connection
        level = getattr(dbapi, "isolation_level", None)  # (None: the driver's autocommit)
        if level is not None and getattr(dbapi, "in_transaction", True) is False:
            dbapi.execute(f"BEGIN {level}")  # as pysqlite would before the next write
    return conn.begin_nested()


def keep_synced(
    conn: Connection, by_spec: Mapping[EntitySpec, Sequence[Row]], specs: Collection[EntitySpec]
) -> Mapping[EntitySpec, Sequence[Row]]:
    """``by_spec`` where a row deleted early (``specs``) and added again has an image
    that leaves out columns written synchronously since it was made (the sync marks:
    `write_behind_fence.plan`, `write_behind_late.decide`): those columns get the row's
    values, read (and locked) before its delete, and the image is written whole — its
    delete would otherwise take them away, and undo the newer write."""
    out = dict(by_spec)
    for spec in specs:
        rows = list(by_spec[spec])
        narrowed = [n for n, (_, image, cols, again) in enumerate(rows) if again and image and cols]
        if not narrowed:
            continue
        pk_cols = list(spec.mapper.primary_key)
        positions = [spec.columns.index(c) for c in pk_cols]
        keys = [tuple(rows[n][0]) for n in narrowed]
        if len(pk_cols) == 1:
            where = pk_cols[0].in_([k[0] for k in keys])
        else:
            where = sa.tuple_(*pk_cols).in_(keys)
        query = sa.select(*spec.columns).where(where).with_for_update()  # (takes no snapshot)
        held = {tuple(r[i] for i in positions): r for r in conn.execute(query)}
        for n in narrowed:
            pk, image, cols, again = rows[n]
            now = held.get(tuple(pk))
            if now is not None and image is not None and cols is not None:
                kept = [v if i in cols else now[i] for i, v in enumerate(image)]
                rows[n] = (pk, kept, None, again)
        out[spec] = rows
    return out


def foreign_key_reach(
    changes: Iterable[tuple[EntitySpec, Sequence[Any] | None, Collection[int] | None, bool]],
) -> frozenset[str]:
    """The generations to bump besides those of the changed tables when ``changes``
    ((model, image or None to delete, positions of the changed columns or None for all,
    renewed: deleted before the image is written) are applied: tables whose rows the
    database changes on its own, through a foreign key's ``ON DELETE`` action (a delete,
    renewed rows too) or ``ON UPDATE`` action on a column written (an upsert or UPDATE
    sets every column of the image but the primary key), found as
    for a Session's statements (`invalidation.foreign_key_writes`) — with their row
    generations: the entity entries of those rows are stale too."""
    deleted: dict[EntitySpec, None] = {}
    written: dict[EntitySpec, set[int]] = {}
    for spec, image, cols, renewed in changes:
        if image is None or renewed:
            deleted[spec] = None
        if image is not None:
            written.setdefault(spec, set()).update(range(len(image)) if cols is None else cols)
    tables: set[str] = set()
    for spec in deleted:
        table: Any = spec.mapper.local_table
        tables |= foreign_key_writes(table.delete())
    for spec, positions in written.items():
        sets = {
            c.name: None for i, c in enumerate(spec.columns) if i in positions and not c.primary_key
        }
        if sets:
            table = spec.mapper.local_table
            tables |= foreign_key_writes(table.update().values(sets))
    return frozenset(tables | {rows_generation(t) for t in tables})
