"""Applying a write-behind batch: the database transaction, fenced, and what follows it.

- `apply_rows`: the dialect's upsert (``ON CONFLICT`` / ``ON DUPLICATE KEY UPDATE``)
  and DELETE by key, with executemany; also the synchronous fallback of the producer.
  `apply_in_order` does several tables in the order `write_behind_order` rebuilds
  (foreign keys, early deletes; the deletes first if images first fail on a
  constraint); a change that does not fit the model (`misfit`: queued before a
  migration) is never written. On MySQL / MariaDB
  a table with another unique key than its primary key is written by a guarded upsert
  of the rows that exist and an INSERT of the others (`write_behind_mysql`).
- `write_behind_order.foreign_key_reach`: the tables whose rows the database changes
  on its own (foreign-key actions) when changes are applied: invalidated with the
  changes' own.
- `write_batch`: one transaction per batch that first checks every partition's
  fencing token: ``UPDATE sa_cache_write_behind_fence SET token = :mine WHERE stream
  = :s AND token <= :mine`` must match its row, so a worker that lost its lease
  (paused, partitioned) cannot commit after the new owner.
- after the COMMIT, `write_behind_finalize` acknowledges and deletes the records and
  turns the queued cache entries into ordinary ones.
- sync markers (`write_behind_fence`): a batch does not write an image of a row written
  synchronously after the image was made; it reads the marks after its writes and, if
  one of its rows was marked meanwhile, rolls back and writes again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .entity import EntitySpec
from .write_behind_coalesce import Partition, Slot
from .write_behind_fence import Plan, plan, read_marks, take_fences, upsert_table
from .write_behind_mysql import upsert_may_hit_other_rows, write_exact
from .write_behind_order import (
    InOrder,
    dependency_order,
    early_deletes,
    early_images,
    keep_synced,
    parent_layers,
    renews,
    savepoint,
    split_peers,
)

if TYPE_CHECKING:
    from .cache import Cache


class UnknownTable(Exception):
    """A change this worker cannot apply (its model is not registered here)."""


class Misfit(ValueError):
    """A queued change that does not fit this worker's model of its table (queued before
    a migration added or dropped a column): it can never be applied as it is."""


def misfit(spec: EntitySpec, pk: Sequence[Any], image: Sequence[Any] | None) -> str | None:
    """Why a change of ``spec``'s table — its primary key and image (None: a delete) —
    does not fit the model; None if it does. Written by code whose model had other
    columns, it would be written to the wrong columns, or fail in ``zip``."""
    if image is not None and not spec.fits(image):
        size = len(image) if isinstance(image, (list, tuple)) else type(image).__name__
        found = f"an image of {size} columns"
    elif len(pk) != len(spec.mapper.primary_key):
        found = f"a primary key of {len(pk)} values"
    else:
        return None
    names = ", ".join(c.name for c in spec.columns)
    keys = ", ".join(c.name for c in spec.mapper.primary_key)
    return (
        f"the queued change of table {spec.table!r} does not fit the model "
        f"{spec.mapper.class_.__name__}: {found}, the model has {len(spec.columns)} columns "
        f"({names}), primary key ({keys}); was the table migrated while changes were "
        "queued? (drain the queue first; fix the image, then replay)"
    )


def _upsert(spec: EntitySpec, dialect: str, mask: frozenset[int] | None = None) -> Any:
    """The upsert of whole rows, or (``mask``) one whose update sets only those."""
    cols = [
        c for i, c in enumerate(spec.columns) if not c.primary_key and (mask is None or i in mask)
    ]
    return upsert_table(spec.mapper.local_table, cols, list(spec.mapper.primary_key), dialect)


Rows = Sequence[tuple[Sequence[Any], Sequence[Any] | None, Collection[int] | None, bool]]
"""(primary key, full image or None to delete, positions of the changed columns or None
for all, renewed: the image follows a delete of the row) of rows of one table."""


def apply_rows(conn: Connection, spec: EntitySpec, rows: Rows) -> None:
    """Write ``rows`` with executemany: whole rows by upsert; an update of some columns
    by an UPDATE of those (see `write_behind_merge`), and, for a row the database no
    longer has, an INSERT of its image; then the deletes. `Misfit` for a row of another
    shape than the model (nothing is written)."""
    apply_in_order(conn, {spec: rows})


def apply_in_order(
    conn: Connection, by_spec: Mapping[EntitySpec, Rows], deletes_first: bool | None = None
) -> None:
    """`apply_rows` of several tables in foreign-key order, as the ORM's flush does: the
    rows written, parents first (`write_behind_order`), then the deletes, children first.

    The batch no longer has the order of the application's flushes, and neither order
    of images and deletes fits every transaction: a row moved away from a parent the
    batch deletes needs its image first, a unique value a deleted row held and an image
    takes needs the delete first. Images go first; if that fails on a constraint where
    the deletes first might not (the batch has both), then, with ``deletes_first``:
    None (in a transaction of the caller's: the synchronous fallback, the late write),
    the images-first attempt ran in a SAVEPOINT, rolled back to, and the deletes go
    first (their error raised if that fails too: the first's); False, `DeletesFirst` is
    raised, for the caller to run its transaction again with True (the worker: no
    SAVEPOINT in a batch that goes through)."""
    order = dependency_order(list(by_spec))
    for spec in order:
        for pk, image, _, _ in by_spec[spec]:
            reason = misfit(spec, pk, image)
            if reason is not None:
                raise Misfit(reason)
    # A row deleted and added again (coalesced into one image) is deleted first where
    # the delete sets off foreign-key actions (ON DELETE CASCADE / SET NULL of rows
    # referring to it), as the application's delete would have: children first — and
    # so are, before it, the rows the batch deletes (or renews) in the tables whose
    # rows its delete would otherwise find in the way (RESTRICT / NO ACTION / SET NULL).
    # Its image then keeps the columns written synchronously since it was made.
    roots, children = early_deletes(order, by_spec)
    if roots:
        by_spec = keep_synced(conn, by_spec, roots | children)
    # Changes whose keys the collation may find one row's (MySQL / MariaDB: 'ABC' and
    # 'abc') are written in batch order, one at a time, at their table's turn for
    # images: grouped by columns, or deleted after the images, an earlier one could win.
    apart, in_order = split_peers(conn, order, by_spec, roots | children)
    # Images in those tables that refer to no row the batch writes (a row moved away
    # from the renewed one) go before the first renewed row's delete: after it, RESTRICT
    # / NO ACTION would refuse that delete (`early_images`).
    first = early_images(order, by_spec, children, apart) if roots else {}
    for spec in reversed(order):
        if first and (spec in roots or (spec in children and renews(apart[spec]))):
            for s, rows in first.items():  # (in foreign-key order)
                _write_images(conn, s, rows)
            first = {}
        if spec in children:
            _delete_rows(conn, spec, apart[spec], early=True)
        elif spec in roots:
            _delete_rows(conn, spec, apart[spec], renewed=True)
    late = [s for s in order if s not in children and any(r[1] is None for r in by_spec[s])]
    both = bool(late) and any(r[1] is not None for s in order for r in by_spec[s])
    args = (conn, order, apart, late, in_order)
    if not both or deletes_first:
        _rest(*args, deletes_first=bool(deletes_first))
        return
    if deletes_first is False:
        try:
            _rest(*args, deletes_first=False)
        except sa.exc.IntegrityError as exc:
            raise DeletesFirst(exc) from exc
        return
    try:
        with savepoint(conn):
            _rest(*args, deletes_first=False)
    except sa.exc.IntegrityError as exc:
        try:
            _rest(*args, deletes_first=True)
        except sa.exc.IntegrityError:
            raise exc from None


class DeletesFirst(Exception):
    """`apply_in_order` with ``deletes_first=False`` failed on a constraint (``error``)
    where the deletes first might not: run the transaction again with True."""

    def __init__(self, error: sa.exc.IntegrityError) -> None:
        super().__init__(str(error))
        self.error = error


def _rest(
    conn: Connection,
    order: Sequence[EntitySpec],
    by_spec: Mapping[EntitySpec, Rows],
    late: Sequence[EntitySpec],
    in_order: InOrder,
    deletes_first: bool,
) -> None:
    """After the early deletes: the images, parents first, and the other deletes,
    children first (these before the images with ``deletes_first``). After a table's
    images, its rows ``in_order``, one change at a time, a delete before an image: a
    delete there that rows of a later table are in the way of fails, and the batch is
    written again, deletes first."""
    if deletes_first:
        for spec in reversed(late):
            _delete_rows(conn, spec, by_spec[spec])
    for spec in order:
        _write_images(conn, spec, by_spec[spec])
        seq, early = in_order.get(spec, ((), False))
        for row in seq:
            _delete_rows(conn, spec, [row], early=early)
            _write_layer(conn, spec, [row])
    if not deletes_first:
        for spec in reversed(late):
            _delete_rows(conn, spec, by_spec[spec])


def _write_images(conn: Connection, spec: EntitySpec, rows: Rows) -> None:
    """The images of ``rows``: per set of changed columns, one executemany; in a
    self-referencing table, rows whose parents are among them after those."""
    written = [r for r in rows if r[1] is not None]
    for layer in parent_layers(spec, written, lambda r: r[1]):
        _write_layer(conn, spec, layer)


def _write_layer(conn: Connection, spec: EntitySpec, rows: Rows) -> None:
    keys = [str(c.key) for c in spec.columns]
    pk_cols = list(spec.mapper.primary_key)
    groups: dict[frozenset[int] | None, list[dict[str, Any]]] = {}
    for _, image, cols, _ in rows:
        if image is not None:
            mask = None if cols is None else frozenset(cols)
            groups.setdefault(mask, []).append(dict(zip(keys, image, strict=True)))
    table: Any = spec.mapper.local_table
    if groups and upsert_may_hit_other_rows(conn, table):
        write_exact(conn, spec, rows)  # (MySQL / MariaDB, another unique key; in order)
        return
    match = sa.and_(*(c == sa.bindparam(f"pk{i}") for i, c in enumerate(pk_cols)))
    for mask, params in groups.items():
        if mask is not None and _update_some(conn, spec, mask, params):
            continue
        stmt = _upsert(spec, conn.dialect.name, mask)  # (a driver that cannot count)
        if stmt is None:  # no upsert in this dialect: delete, then insert
            pks = [{f"pk{i}": r[str(c.key)] for i, c in enumerate(pk_cols)} for r in params]
            conn.execute(table.delete().where(match), pks)
            stmt = table.insert()
        conn.execute(stmt, params)


def _delete_rows(
    conn: Connection, spec: EntitySpec, rows: Rows, renewed: bool = False, early: bool = False
) -> None:
    """DELETE the rows to delete (``renewed``: instead, those whose image follows a
    delete; ``early``: both)."""
    deletes = [
        {f"pk{i}": v for i, v in enumerate(pk)}
        for pk, image, _, again in rows
        if (image is None and not renewed) or (again and image is not None and (renewed or early))
    ]
    if deletes:
        pk_cols = list(spec.mapper.primary_key)
        match = sa.and_(*(c == sa.bindparam(f"pk{i}") for i, c in enumerate(pk_cols)))
        table: Any = spec.mapper.local_table
        conn.execute(table.delete().where(match), deletes)


def _update_some(
    conn: Connection, spec: EntitySpec, mask: frozenset[int], params: list[dict[str, Any]]
) -> bool:
    """UPDATE only the columns ``mask`` of existing rows (an upsert would check the
    constraints of its whole INSERT row, other columns included); rows missing in the
    database get their image inserted. False: the dialect cannot count matched rows."""
    if not conn.dialect.supports_sane_multi_rowcount:
        return False
    table: Any = spec.mapper.local_table
    pk = list(spec.mapper.primary_key)
    where = sa.and_(*(c == sa.bindparam(f"_v_{c.key}") for c in pk))
    sets: dict[str, Any] = {
        c.name: sa.bindparam(f"_v_{c.key}")
        for i, c in enumerate(spec.columns)
        if i in mask and not c.primary_key
    }
    args = [{f"_v_{k}": v for k, v in p.items()} for p in params]
    if sets:
        matched = conn.execute(table.update().where(where).values(sets), args).rowcount
        if matched == len(params):
            return True
    row = (sa.bindparam(f"_v_{c.key}", type_=c.type) for c in spec.columns)
    missing = sa.select(*row).where(~sa.exists().where(where))
    conn.execute(table.insert().from_select([c.name for c in spec.columns], missing), args)
    return True


class MarksMoving(Exception):
    """Rows of a batch were marked written synchronously again and again while it ran."""


MARK_ROUNDS = 8


class _Replan(Exception):
    def __init__(self, plan: Plan) -> None:
        self.plan = plan


def write_batch(
    engine: Engine, cache: Cache, items: list[tuple[Partition, Slot]]
) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """The database transaction of one batch; returns the generations read before it,
    and the rows skipped: written synchronously after their image was made.

    The sync marks are read after the batch's writes (`write_behind_fence`): a row
    marked by a transaction that committed while a write here waited for its lock is
    seen then, and the batch rolls back and runs again without it. (Marks are rare: a
    batch that finds none affecting it runs once, with no extra statement.)"""
    for _, slot in items:
        if slot.spec is None:
            raise UnknownTable(
                f"table {slot.table!r} is not registered with write='behind' in this worker"
            )
    gens: dict[str, tuple[str, ...]] = {}
    for spec in {s.spec: None for _, s in items if s.spec is not None}:
        keys = spec.gen_keys(cache)
        clock, *raws = cache.fetch([cache.clock_key, *keys])
        found = cache.ensure_generations(keys, raws, clock)
        gens[spec.table] = found if found is not None else ("-",)
    parts = list({p.index: p for p, _ in items}.values())
    streams = [p.stream for p in parts]
    chosen = plan(items, {})
    order: DeletesFirst | None = None  # the images-first attempt's failure
    for _ in range(MARK_ROUNDS + 1):
        try:
            with engine.begin() as conn:
                take_fences(conn, parts)
                todo = _write_planned(conn, items, chosen, order is not None)
                seen = plan(items, read_marks(conn, streams))
                if seen != chosen:  # a row was marked meanwhile: again, as the marks say
                    raise _Replan(seen)
                for spec, slots in todo.items():
                    _read_back(conn, spec, [s for s in slots if s.cols is not None and s.image])
        except _Replan as again:
            chosen = again.plan
            continue
        except DeletesFirst as failed:  # (`apply_in_order`): again, the deletes first
            order = failed
            continue
        except sa.exc.IntegrityError:
            if order is not None:  # the other order failed too: the images-first error
                raise order.error from None
            raise
        return gens, set(chosen[0])
    raise MarksMoving(f"sync marks of this batch's rows changed {MARK_ROUNDS} times")


def _write_planned(
    conn: Connection, items: list[tuple[Partition, Slot]], chosen: Plan, deletes_first: bool
) -> dict[EntitySpec, list[Slot]]:
    """Write ``items`` as ``chosen`` says (its columns become the slots'), the deletes
    first or not (`apply_in_order`); the slots written, by model."""
    skipped, cols = chosen
    by_spec: dict[EntitySpec, list[Slot]] = {}
    for (_, slot), mask in zip(items, cols, strict=True):
        slot.stored = None
        slot.cols = mask
        if slot.row not in skipped and slot.spec is not None:
            by_spec.setdefault(slot.spec, []).append(slot)
    rows = {sp: [(s.pk, s.image, s.cols, s.renewed) for s in ss] for sp, ss in by_spec.items()}
    apply_in_order(conn, rows, deletes_first)
    return by_spec


def _read_back(conn: Connection, spec: EntitySpec, slots: list[Slot]) -> None:
    """The rows of updates of some columns as the database now holds them (one SELECT,
    in the batch's transaction): their other columns may have changed outside the
    queue, so these, not the images, become the rows' entries (`Slot.stored`)."""
    if not slots:
        return
    pk_cols = list(spec.mapper.primary_key)
    positions = [spec.columns.index(c) for c in pk_cols]
    if len(pk_cols) == 1:
        where = pk_cols[0].in_([s.pk[0] for s in slots])
    else:
        where = sa.tuple_(*pk_cols).in_([tuple(s.pk) for s in slots])
    rows = conn.execute(sa.select(*spec.columns).where(where)).all()
    found = {tuple(row[i] for i in positions): list(row) for row in rows}
    for slot in slots:
        slot.stored = found.get(tuple(slot.pk))
