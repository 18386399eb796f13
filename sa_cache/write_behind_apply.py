"""Applying a write-behind batch: the database transaction, fenced, and what follows it.

- `apply_rows`: the dialect's upsert (``ON CONFLICT`` / ``ON DUPLICATE KEY UPDATE``)
  and DELETE by key, with executemany; also the synchronous fallback of the producer.
  `apply_in_order` does several tables in foreign-key order; a change that does not fit
  the model (`misfit`: queued before a migration) is never written.
- `write_batch`: one transaction per batch that first checks every partition's
  fencing token: ``UPDATE sa_cache_write_behind_fence SET token = :mine WHERE stream
  = :s AND token <= :mine`` must match its row, so a worker that lost its lease
  (paused, partitioned) cannot commit after the new owner.
- after the COMMIT, `write_behind_finalize` acknowledges and deletes the records and
  turns the queued cache entries into ordinary ones.
- sync markers: a row the producer wrote synchronously (Redis unavailable) gets a row
  ``<stream>:sync:<digest of the row>`` in the fence table (the row: its key without
  the key version, `write_behind_versions.row_of`, so a mark fences images queued under
  every version), token = when (producer clock, microseconds), in that same transaction
  (`mark_synced`). The batch transaction skips images of such a row made before it
  (`write_batch`): an older queued image is never applied after a newer synchronous
  write. Marks named by the versioned key (an earlier release) still count.
  `drop_markers` forgets markers no queued image can be older than.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.ddl import sort_tables_and_constraints

from .entity import EntitySpec
from .keys import digest
from .write_behind_coalesce import Partition, Slot

if TYPE_CHECKING:
    from .cache import Cache

FENCE = sa.Table(
    "sa_cache_write_behind_fence",
    sa.MetaData(),
    sa.Column("stream", sa.String(191), primary_key=True),
    sa.Column("token", sa.BigInteger, nullable=False),
)
"""One row per partition stream: the fencing token of its current owner."""


class Fenced(Exception):
    """Newer owners of these partitions exist: this worker must drop them."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"partitions {partitions} have a newer owner")
        self.partitions = partitions


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


_fenced_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # FENCE known to exist


def ensure_fence_table(engine: Engine) -> None:
    """Create the fencing-token table if it is missing."""
    FENCE.create(engine, checkfirst=True)
    _fenced_engines.add(engine)


def marker_name(stream: str, row: str) -> str:
    """The fence-table row that marks ``row`` (of partition ``stream``; see
    `write_behind_versions.row_of`) as written synchronously. (An earlier release named
    the versioned key instead: `_check_markers` reads those too.)"""
    return f"{stream}:sync:{digest(row)}"


def mark_synced(conn: Connection, names: Iterable[str]) -> None:
    """In the synchronous write's transaction: mark these rows written now."""
    engine = conn.engine
    if engine not in _fenced_engines:
        if conn.dialect.name in ("mysql", "mariadb"):  # DDL would commit the transaction
            ensure_fence_table(engine)
        else:
            FENCE.create(conn, checkfirst=True)
    now = int(time.time() * 1_000_000)
    rows = [{"stream": name, "token": now} for name in sorted(set(names))]
    stmt = _upsert_table(FENCE, [FENCE.c.token], [FENCE.c.stream], conn.dialect.name)
    if stmt is None:
        conn.execute(FENCE.delete().where(FENCE.c.stream.in_([r["stream"] for r in rows])))
        stmt = FENCE.insert()
    conn.execute(stmt, rows)


def drop_markers(conn: Connection, stream: str, before: float) -> None:
    """Forget the sync markers of partition ``stream`` set before unix time ``before``."""
    prefix = FENCE.c.stream.startswith(f"{stream}:sync:", autoescape=True)
    conn.execute(FENCE.delete().where(prefix, FENCE.c.token < int(before * 1_000_000)))


def fence_token(client: Any, engine: Engine, stream: str) -> int:
    """A new fencing token for the owner of ``stream``: above every earlier one, even if
    Redis lost its counter (the database row holds the last token used)."""
    token = int(client.incr(f"{stream}:fence"))
    with engine.begin() as conn:
        query = sa.select(FENCE.c.token).where(FENCE.c.stream == stream)
        stored = conn.execute(query).scalar()
        if stored is None:
            conn.execute(FENCE.insert(), {"stream": stream, "token": 0})
            stored = 0
    if stored >= token:  # Redis lost its counter (no AOF): move past the database
        token = int(client.incrby(f"{stream}:fence", stored - token + 1))
    return token


def _upsert(spec: EntitySpec, dialect: str, mask: frozenset[int] | None = None) -> Any:
    """The upsert of whole rows, or (``mask``) one whose update sets only those."""
    cols = [
        c for i, c in enumerate(spec.columns) if not c.primary_key and (mask is None or i in mask)
    ]
    return _upsert_table(spec.mapper.local_table, cols, list(spec.mapper.primary_key), dialect)


def _upsert_table(table: Any, cols: Sequence[Any], pk: Sequence[Any], dialect: str) -> Any:
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        module: Any = postgresql if dialect == "postgresql" else sqlite
        stmt = module.insert(table)
        if not cols:
            return stmt.on_conflict_do_nothing(index_elements=pk)
        return stmt.on_conflict_do_update(
            index_elements=pk, set_={c.name: stmt.excluded[c.key] for c in cols}
        )
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        stmt = mysql.insert(table)
        return stmt.on_duplicate_key_update(
            {c.name: stmt.inserted[str(c.key)] for c in (cols or pk[:1])}
        )
    return None


Rows = Sequence[tuple[Sequence[Any], Sequence[Any] | None, Collection[int] | None]]
"""(primary key, full image or None to delete, positions of the changed columns or None
for all) of rows of one table."""


def apply_rows(conn: Connection, spec: EntitySpec, rows: Rows) -> None:
    """Write ``rows`` with executemany: whole rows by upsert; an update of some columns
    by an UPDATE of those (see `write_behind_merge`), and, for a row the database no
    longer has, an INSERT of its image; then the deletes. `Misfit` for a row of another
    shape than the model (nothing is written)."""
    apply_in_order(conn, {spec: rows})


def apply_in_order(conn: Connection, by_spec: Mapping[EntitySpec, Rows]) -> None:
    """`apply_rows` of several tables in foreign-key order, as the ORM's flush does: the
    rows written, parents first, then the deletes, children first."""
    order = dependency_order(list(by_spec))
    for spec in order:
        for pk, image, _ in by_spec[spec]:
            reason = misfit(spec, pk, image)
            if reason is not None:
                raise Misfit(reason)
    for spec in order:
        _write_images(conn, spec, by_spec[spec])
    for spec in reversed(order):
        _delete_rows(conn, spec, by_spec[spec])


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


def _write_images(conn: Connection, spec: EntitySpec, rows: Rows) -> None:
    keys = [str(c.key) for c in spec.columns]
    pk_cols = list(spec.mapper.primary_key)
    groups: dict[frozenset[int] | None, list[dict[str, Any]]] = {}
    for _, image, cols in rows:
        if image is not None:
            mask = None if cols is None else frozenset(cols)
            groups.setdefault(mask, []).append(dict(zip(keys, image, strict=True)))
    table: Any = spec.mapper.local_table
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


def _delete_rows(conn: Connection, spec: EntitySpec, rows: Rows) -> None:
    deletes = [{f"pk{i}": v for i, v in enumerate(pk)} for pk, image, _ in rows if image is None]
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


def write_batch(
    engine: Engine, cache: Cache, items: list[tuple[Partition, Slot]]
) -> tuple[dict[str, tuple[str, ...]], set[str]]:
    """The database transaction of one batch; returns the generations read before it,
    and the rows skipped: written synchronously after their image was made."""
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
    with engine.begin() as conn:
        # One statement checks (and takes) every partition's fence: a newer owner's
        # token makes it match fewer rows, and the whole batch rolls back.
        mine = sa.or_(
            *(sa.and_(FENCE.c.stream == p.stream, FENCE.c.token <= p.token) for p in parts)
        )
        tokens = sa.case({p.stream: p.token for p in parts}, value=FENCE.c.stream)
        matched = conn.execute(FENCE.update().where(mine).values(token=tokens)).rowcount
        if matched != len(parts):
            query = sa.select(FENCE.c.stream, FENCE.c.token)
            held = dict(
                conn.execute(query.where(FENCE.c.stream.in_([p.stream for p in parts]))).all()
            )
            lost = [p.index for p in parts if held.get(p.stream, p.token + 1) > p.token]
            raise Fenced(lost or [p.index for p in parts])
        skipped = _check_markers(conn, items)
        by_spec: dict[EntitySpec, list[Slot]] = {}
        for _, slot in items:
            slot.stored = None
            if slot.row not in skipped and slot.spec is not None:
                by_spec.setdefault(slot.spec, []).append(slot)
        apply_in_order(
            conn, {sp: [(s.pk, s.image, s.cols) for s in ss] for sp, ss in by_spec.items()}
        )
        for spec, slots in by_spec.items():
            _read_back(conn, spec, [s for s in slots if s.cols is not None and s.image])
    return gens, skipped


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


def _check_markers(conn: Connection, items: list[tuple[Partition, Slot]]) -> set[str]:
    """Rows of ``items`` written synchronously after their image was made (to skip); a
    column written so after the change that set it here is taken out of the write
    instead (per column: a slot coalesces changes of different times). Markers go only
    by age (`drop_markers`): an older change of the row may still be on its way.
    (Markers exist only after a synchronous fallback: one query by prefix.)"""
    streams = {p.stream for p, _ in items}
    prefixes = [FENCE.c.stream.startswith(f"{s}:sync:", autoescape=True) for s in streams]
    query = sa.select(FENCE.c.stream, FENCE.c.token).where(sa.or_(*prefixes))
    found: dict[str, int] = dict(conn.execute(query).all())
    skipped: set[str] = set()
    if not found:
        return skipped
    for p, slot in items:
        # the row's mark, and those an earlier release named by each versioned key
        names = [marker_name(p.stream, x) for x in (slot.row, slot.key, *slot.writes)]
        whole = max(found.get(name, -1) for name in names)
        cols: dict[int, int] = {}
        for n, at in found.items():
            name, sep, col = n.rpartition("#")
            if sep and name in names:
                cols[int(col)] = max(at, cols.get(int(col), -1))
        if whole < 0 and not cols:
            continue
        if slot.image is None:  # a delete made before any of them: the row was written since
            if max([whole, *cols.values()]) >= int(slot.created * 1_000_000):
                skipped.add(slot.row)
            continue
        writes = range(len(slot.image)) if slot.cols is None else slot.cols
        made = {i: int(slot.times.get(i, slot.created) * 1_000_000) for i in writes}
        later = {i for i in writes if max(whole, cols.get(i, -1)) >= made[i]}
        if not later:
            continue
        keys = {i for i, c in enumerate(slot.spec.columns) if c.primary_key} if slot.spec else set()
        left = set(writes) - later
        if not left - keys:
            skipped.add(slot.row)  # every column it writes was written after it
        else:
            slot.cols = frozenset(left)
    return skipped
