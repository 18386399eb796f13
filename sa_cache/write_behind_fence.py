"""The write-behind fence table: fencing tokens of partition owners, and sync marks.

- fencing tokens: one row per partition stream holds the token of its current owner
  (`fence_token`); a batch transaction checks and takes it first (`write_behind_apply.
  write_batch`), so a worker that lost its lease cannot commit after the new owner.
- sync marks: a row the producer wrote synchronously (Redis unavailable, or a Session
  joined to an outer transaction) gets a row ``<stream>:sync:<digest of the row>`` in
  the fence table (the row: its key without the key version, `write_behind_versions.
  row_of`, so a mark fences images queued under every version), token = the time of the
  change written (producer clock, microseconds), in that same transaction
  (`mark_synced`): the write itself at the commit, the image's time for a change
  written after its COMMIT (`write_behind_late`). A mark never goes back (the greater
  token stays). A batch does not write images of such a row made before it (`plan`): an
  older queued image is never applied after a newer synchronous write. Marks named by
  the versioned key (an earlier release) still count. `drop_markers` forgets markers no
  queued image can be older than.

A batch reads the marks after its own writes (`read_marks`), in its transaction: a
mark committed while the batch began is not visible to it, but the synchronous write
holds the lock of its row until that commit, so a batch writing the same row waits for
it, and then sees the mark. (On MariaDB's REPEATABLE READ this read is the batch's first
consistent read, which takes its snapshot: nothing before it in the batch reads.)
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .keys import digest

if TYPE_CHECKING:
    from .entity import EntitySpec
    from .write_behind_coalesce import Partition, Slot

FENCE = sa.Table(
    "sa_cache_write_behind_fence",
    sa.MetaData(),
    sa.Column("stream", sa.String(191), primary_key=True),
    sa.Column("token", sa.BigInteger, nullable=False),
)
"""One row per partition stream: the fencing token of its current owner (and the sync
marks, named ``<stream>:sync:...``)."""


class Fenced(Exception):
    """Newer owners of these partitions exist: this worker must drop them."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"partitions {partitions} have a newer owner")
        self.partitions = partitions


_fenced_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # FENCE known to exist


def ensure_fence_table(engine: Engine) -> None:
    """Create the fencing-token table if it is missing."""
    FENCE.create(engine, checkfirst=True)
    _fenced_engines.add(engine)


def fence_table_for(engine: Engine) -> None:
    """`ensure_fence_table`, once per engine."""
    if engine not in _fenced_engines:
        ensure_fence_table(engine)


def upsert_table(table: Any, cols: Sequence[Any], pk: Sequence[Any], dialect: str) -> Any:
    """INSERT of whole rows of ``table`` that sets ``cols`` of those already there (by
    primary key ``pk``), in the dialect's upsert; None where there is none."""
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


def take_fences(conn: Connection, parts: Sequence[Partition]) -> None:
    """In a batch's transaction: check (and take) every partition's fence in one
    statement; a newer owner's token makes it match fewer rows: `Fenced`."""
    mine = sa.or_(*(sa.and_(FENCE.c.stream == p.stream, FENCE.c.token <= p.token) for p in parts))
    tokens = sa.case({p.stream: p.token for p in parts}, value=FENCE.c.stream)
    matched = conn.execute(FENCE.update().where(mine).values(token=tokens)).rowcount
    if matched != len(parts):
        query = sa.select(FENCE.c.stream, FENCE.c.token)
        held = dict(conn.execute(query.where(FENCE.c.stream.in_([p.stream for p in parts]))).all())
        lost = [p.index for p in parts if held.get(p.stream, p.token + 1) > p.token]
        raise Fenced(lost or [p.index for p in parts])


def marker_name(stream: str, row: str) -> str:
    """The fence-table row that marks ``row`` (of partition ``stream``; see
    `write_behind_versions.row_of`) as written synchronously. (An earlier release named
    the versioned key instead: `plan` reads those too.)"""
    return f"{stream}:sync:{digest(row)}"


def mark_synced(conn: Connection, names: Iterable[str], at: float | None = None) -> None:
    """In the synchronous write's transaction, after its rows: mark these rows written
    by a change made at unix time ``at`` (None: now). A mark already newer stays."""
    engine = conn.engine
    if engine not in _fenced_engines:
        if conn.dialect.name in ("mysql", "mariadb"):  # DDL would commit the transaction
            ensure_fence_table(engine)
        else:
            FENCE.create(conn, checkfirst=True)
    token = int((time.time() if at is None else at) * 1_000_000)
    wanted = sorted(set(names))
    stmt = _keep_newer(conn.dialect.name)
    if stmt is None:  # no upsert: replace a mark only by a newer one
        conn.execute(FENCE.delete().where(FENCE.c.stream.in_(wanted), FENCE.c.token < token))
        held = read_marks_named(conn, wanted)
        wanted = [name for name in wanted if name not in held]
        stmt = FENCE.insert()
    if wanted:
        conn.execute(stmt, [{"stream": name, "token": token} for name in wanted])


def _keep_newer(dialect: str) -> Any:
    """An upsert of marks that keeps the greater token (None: the dialect has none)."""
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        module: Any = postgresql if dialect == "postgresql" else sqlite
        stmt = module.insert(FENCE)
        newer = (sa.func.greatest if dialect == "postgresql" else sa.func.max)(
            FENCE.c.token, stmt.excluded.token
        )
        return stmt.on_conflict_do_update(index_elements=[FENCE.c.stream], set_={"token": newer})
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        stmt = mysql.insert(FENCE)
        return stmt.on_duplicate_key_update(
            token=sa.func.greatest(FENCE.c.token, stmt.inserted.token)
        )
    return None


def mark_names(
    stream: str, row: str, key: str, image: Any, cols: Collection[int] | None
) -> list[str]:
    """The marks a synchronous write of ``key`` (row ``row``, partition ``stream``) sets:
    the row's, and the one a worker of the previous release looks for (named by the
    versioned key); an update of some columns marks only those."""
    names = [marker_name(stream, row), marker_name(stream, key)]
    if cols is None or image is None:
        return names
    return [f"{name}#{i}" for name in names for i in sorted(cols)]


def drop_markers(conn: Connection, stream: str, before: float) -> None:
    """Forget the sync markers of partition ``stream`` set before unix time ``before``:
    found first, then deleted by name, so that the DELETE locks only those rows (a
    DELETE by prefix would wait on InnoDB for any mark an open transaction is adding,
    e.g. an outer transaction a Session joined, and stall the worker until it ends)."""
    prefix = FENCE.c.stream.startswith(f"{stream}:sync:", autoescape=True)
    older = FENCE.c.token < int(before * 1_000_000)
    names = list(conn.execute(sa.select(FENCE.c.stream).where(prefix, older)).scalars())
    for at in range(0, len(names), 500):
        conn.execute(FENCE.delete().where(FENCE.c.stream.in_(names[at : at + 500]), older))


def read_marks(conn: Connection, streams: Collection[str]) -> dict[str, int]:
    """The sync marks of partitions ``streams``: name -> token (one query by prefix)."""
    prefixes = [FENCE.c.stream.startswith(f"{s}:sync:", autoescape=True) for s in streams]
    query = sa.select(FENCE.c.stream, FENCE.c.token).where(sa.or_(*prefixes))
    return dict(conn.execute(query).all())


def read_marks_named(conn: Connection, names: Collection[str]) -> dict[str, int]:
    """The marks named ``names`` that exist: name -> token."""
    query = sa.select(FENCE.c.stream, FENCE.c.token).where(FENCE.c.stream.in_(list(names)))
    return dict(conn.execute(query).all())


Plan = tuple[frozenset[str], tuple[frozenset[int] | None, ...]]
"""What a batch writes: the rows it skips, and each item's columns (None: all)."""


def plan(items: Sequence[tuple[Partition, Slot]], found: dict[str, int]) -> Plan:
    """The rows of ``items`` written synchronously after their image was made (to skip),
    and the columns of each item to write: a column written so after the change that
    set it here is taken out of the write (per column: a slot coalesces changes of
    different times). Marks go only by age (`drop_markers`): an older change of the row
    may still be on its way."""
    skipped: set[str] = set()
    cols = [slot.cols for _, slot in items]
    if not found:
        return frozenset(), tuple(cols)
    for n, (p, slot) in enumerate(items):
        # the row's mark, and those an earlier release named by each versioned key
        names = [marker_name(p.stream, x) for x in (slot.row, slot.key, *slot.writes)]
        skip, cols[n] = fence_row(
            names, found, slot.image, slot.cols, slot.created, slot.times, slot.spec
        )
        if skip:
            skipped.add(slot.row)
    return frozenset(skipped), tuple(cols)


def fence_row(
    names: Sequence[str],
    found: dict[str, int],
    image: Sequence[Any] | None,
    cols: frozenset[int] | None,
    created: float,
    times: dict[int, float],
    spec: EntitySpec | None,
) -> tuple[bool, frozenset[int] | None]:
    """Whether a change of the row whose marks are ``names`` (made at ``created``, its
    columns at ``times``) is to be skipped, given the marks ``found``, and else the
    columns to write: those no mark in ``found`` is as new as."""
    whole = max(found.get(name, -1) for name in names)
    by_col: dict[int, int] = {}
    for mark, at in found.items():
        name, sep, col = mark.rpartition("#")
        if sep and name in names:
            by_col[int(col)] = max(at, by_col.get(int(col), -1))
    if whole < 0 and not by_col:
        return False, cols
    if image is None:  # a delete made before any of them: the row was written since
        return max([whole, *by_col.values()]) >= int(created * 1_000_000), cols
    writes = range(len(image)) if cols is None else cols
    made = {i: int(times.get(i, created) * 1_000_000) for i in writes}
    later = {i for i in writes if max(whole, by_col.get(i, -1)) >= made[i]}
    if not later:
        return False, cols
    keys = {i for i, c in enumerate(spec.columns) if c.primary_key} if spec else set()
    left = set(writes) - later
    if not left - keys:
        return True, cols  # every column it writes was written after it
    return False, frozenset(left)
