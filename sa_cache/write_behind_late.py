"""Write-behind: a committed transaction's changes written by their producer, late.

After the database COMMIT of a transaction with write-behind changes, the commit script
confirms its prepare records (`write_behind_commit.finish`). When that fails (Redis
timed out, or the script refused: past `write_behind_records.confirm_by`), the producer
writes the changes to the database itself before ``commit()`` returns (`write_late`),
then aborts its prepare records. Other Sessions may have committed newer changes of
the same rows meanwhile (they read the entries the failed confirm never updated), and
the worker may even have applied them. Last commit wins, and no committed change
vanishes silently:

- **Sync marks carry the time of the change written** (its image, made before the
  COMMIT: ``Queued.made``), not of the write. A change queued after it is newer, and
  the worker applies it afterwards, over the columns it changed; older queued images
  stay fenced out (`write_behind_fence.plan`). A mark never goes back (the greater
  token stays: `write_behind_fence.mark_synced`).
- **What is newer is left out**, row by row and column by column (`decide`), as seen
  *after* the write took the rows' locks — no worker batch can then commit a change of
  those rows until this transaction ends, and a batch that committed before has either
  finalized the row's entry or left its queued entry there. If anything is left out,
  the transaction rolls back and runs again without it (as a worker batch does for
  sync marks). Newer is:

  * a sync mark as new as the change (another producer wrote the row synchronously);
  * the row's entry holding another transaction's queued change made at or after it
    (queued, or applied and not finalized yet): the columns that change wrote are left
    out (the whole row for an insert or a delete), and that entry is kept;
  * the row's entry stored at or after the change as an ordinary one (the worker
    finalized an applied change, or a reader cached the database's row), whose values
    of the columns to write are neither the change's nor those it was merged over: a
    change of those columns reached the database meanwhile, newer or older — the clocks
    cannot say (for a delete: the entry holds another row than the one it deleted).
    The change is then not written but moved to the dead-letter stream, with why, for
    an operator to check and replay.

- **What it cannot see:** with Redis unreachable, the entries cannot be read, so only
  the sync marks count: a change another producer queued meanwhile is still applied
  after this write (its image is newer than the mark), but one the worker already
  applied (Redis answering it, not this producer) is overwritten. So is one whose entry
  the worker dropped once applied (a delete, values the database stores otherwise) or
  that expired: nothing tells it from an older state (README, Write-behind, "Redis down
  means the queue is out of reach").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .backends.base import BackendError
from .codec import CodecError, Envelope, decode
from .transaction import BehindChange
from .write_behind import WriteBehind, write_behind_for
from .write_behind_apply import MARK_ROUNDS, MarksMoving, apply_in_order
from .write_behind_coalesce import Slot
from .write_behind_dead import dead_letter_fields
from .write_behind_fence import (
    fence_row,
    fence_table_for,
    mark_names,
    mark_synced,
    marker_name,
    read_marks,
)
from .write_behind_merge import ABSENT, NO_CHECK, UNKNOWN
from .write_behind_order import foreign_key_reach
from .write_behind_records import Queued, partition_of_key, queued_entry, redis_errors
from .write_behind_versions import row_of

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger("sa_cache")

Decision = tuple[str, frozenset[int] | None, bool]
"""What the late write does with a row: ``"write"``, ``"skip"`` or ``"dead"`` (to the
dead-letter stream), the columns it writes (None: all), and whether the row's entry is
a newer queued change to keep."""


class Late:
    """One row to write late: its last change, the time the change was made (producer
    clock), its queued entry and image, and the image it was merged over (None: not
    known)."""

    __slots__ = ("base", "change", "image", "made", "own", "partition", "tx")

    def __init__(
        self,
        change: BehindChange,
        partition: int,
        made: float,
        own: bytes | None,
        merged_over: bytes | None,
        tx: str,
    ) -> None:
        self.change = change
        self.partition = partition
        self.made = made
        self.own = own
        self.tx = tx
        self.image = _value(own) if own is not None else change.image
        base = None
        if merged_over is not None and merged_over not in (ABSENT, UNKNOWN, NO_CHECK):
            base = _value(merged_over)
        if base is None and change.base is not None:  # the row as its object loaded it
            try:
                base = _value(queued_entry(change.base, 0.0, ""))
            except TypeError:
                base = None
        self.base = base if isinstance(base, list) else None


def _value(raw: bytes) -> Any:
    try:
        return decode(raw).value
    except CodecError:
        return None


def rows_of(queued: Queued, partitions: Sequence[int]) -> list[Late]:
    """The rows of ``queued`` in ``partitions``, each with its last change."""
    rows: dict[str, Late] = {}
    for p in partitions:
        for i, change in enumerate(queued.changes[p]):
            own, merged_over = queued.entries[p][i], queued.expected[p][i]
            rows[change.key] = Late(change, p, queued.made[p][i], own, merged_over, queued.tx)
    return list(rows.values())


def rows_now(changes: Sequence[BehindChange], made: float) -> list[Late]:
    """The rows of ``changes`` that were never prepared, made at ``made``."""
    rows: dict[str, Late] = {}
    for change in changes:
        try:
            own: bytes | None = queued_entry(change.image, made, "", change.cols, False)
        except TypeError:
            own = None
        rows[change.key] = Late(change, partition_of_key(change.key), made, own, None, "")
    return list(rows.values())


def renewed(change: BehindChange) -> bool:
    """Was the row deleted in the transaction before the image was made (deleted and
    added again)?"""
    return change.first == "d" and change.image is not None


def write_late(cache: Cache, session: Session, rows: list[Late]) -> bool:
    """Write ``rows`` after their transaction's COMMIT (see the module's docstring): one
    transaction per engine. False if that failed (their prepare records stay for the
    worker, which dead-letters them as outcome unknown)."""
    wb = write_behind_for(cache)
    by_engine: dict[Engine, list[Late]] = {}
    for row in rows:
        engine = session.get_bind(mapper=row.change.spec.mapper).engine
        by_engine.setdefault(engine, []).append(row)
    decided: list[tuple[Late, Decision]] = []
    try:
        for engine, some in by_engine.items():
            chosen = _write_engine(cache, wb, engine, some)
            decided += [(row, chosen[row.change.key]) for row in some]
    except (sa.exc.SQLAlchemyError, MarksMoving) as exc:
        log.error(
            "sa_cache: write-behind changes of a committed transaction could neither be "
            "confirmed nor written (%s); the worker will dead-letter them as outcome unknown",
            exc,
        )
        return False
    written = [(row.change, d) for row, d in decided if d[0] == "write"]
    cache.stats.incr("write_behind.sync", len(written))
    reached = foreign_key_reach((c.spec, c.image, cols, renewed(c)) for c, (_, cols, _) in written)
    tables = {c.spec.table for c, _ in written}
    cache.bump(sorted(tables | reached), deletes=[c.key for c, d in written if not d[2]])
    return True


def _write_engine(
    cache: Cache, wb: WriteBehind, engine: Engine, rows: list[Late]
) -> dict[str, Decision]:
    """The late write of ``rows`` in one transaction of ``engine``: rows written, then
    what is newer read (sync marks, entries) and the transaction run again without it
    until nothing more is left out; then the dead letters and the sync marks."""
    chosen: dict[str, Decision] = {r.change.key: ("write", r.change.cols, False) for r in rows}
    streams = sorted({wb.stream(r.partition) for r in rows})
    fence_table_for(engine)  # (read before the marks are written)
    dead_ok = True
    for _ in range(MARK_ROUNDS):
        try:
            with engine.begin() as conn:
                _apply(conn, rows, chosen)
                marks = read_marks(conn, streams)
                raws = cache.fetch([r.change.key for r in rows])  # all misses if Redis fails
                seen = {
                    r.change.key: decide(r, wb.stream(r.partition), marks, raw, dead_ok)
                    for r, raw in zip(rows, raws, strict=True)
                }
                dead = [r for r in rows if chosen[r.change.key][0] == "dead"]
                if seen == chosen and dead and not _dead_letter(cache, wb, dead):
                    dead_ok = False  # Redis failed now: write them after all
                    seen = {k: ("write", *d[1:]) if d[0] == "dead" else d for k, d in seen.items()}
                if seen != chosen:  # something newer is to be left out: again without it
                    raise _Again(seen)
                _mark(conn, wb, rows, chosen)
        except _Again as again:
            chosen = again.chosen
            continue
        return chosen
    raise MarksMoving(f"rows of a late write-behind write changed {MARK_ROUNDS} times")


class _Again(Exception):
    def __init__(self, chosen: dict[str, Decision]) -> None:
        self.chosen = chosen


def _apply(conn: Connection, rows: list[Late], chosen: dict[str, Decision]) -> None:
    """The rows ``chosen`` to write, in this transaction (`apply_in_order`: the deletes
    first after a SAVEPOINT if the images first fail; a row deleted early keeps the
    columns left out, as the database holds them)."""
    by_spec: dict[Any, list[Any]] = {}
    for row in rows:
        kind, cols, _ = chosen[row.change.key]
        if kind == "write":
            c = row.change
            by_spec.setdefault(c.spec, []).append((c.pk, c.image, cols, renewed(c)))
    apply_in_order(conn, by_spec)


def _mark(conn: Connection, wb: WriteBehind, rows: list[Late], chosen: dict[str, Decision]) -> None:
    """The sync marks of the rows written, at the time of their changes."""
    by_time: dict[float, list[str]] = {}
    for row in rows:
        kind, cols, _ = chosen[row.change.key]
        if kind == "write":
            c = row.change
            names = mark_names(wb.stream(row.partition), row_of(c.key), c.key, c.image, cols)
            by_time.setdefault(row.made, []).extend(names)
    for made, names in by_time.items():
        mark_synced(conn, names, made)


def decide(
    row: Late, stream: str, marks: dict[str, int], raw: object, dead_ok: bool = True
) -> Decision:
    """What the late write does with ``row`` given the sync marks of its partition and
    its entry ``raw`` as read after its write (see the module's docstring)."""
    c = row.change
    names = [marker_name(stream, row_of(c.key)), marker_name(stream, c.key)]
    skip, cols = fence_row(names, marks, c.image, c.cols, row.made, {}, c.spec)
    if skip:
        return ("skip", None, False)
    env = _entry(raw, c.spec)
    if env is None:
        return ("write", cols, False)
    meta = env.meta or {}
    if (row.tx and meta.get("wb") == row.tx) or env.created_at < row.made:
        return ("write", cols, False)  # its own (the confirm went through), or older
    check = True
    keep = False
    if "wb" in meta:  # another transaction's change, made after: applied after, or was
        theirs = meta.get("c")
        if theirs is None or env.value is None or c.image is None:
            return ("skip", None, True)  # a whole row (an insert, a delete) after it
        keys = {i for i, col in enumerate(c.spec.columns) if col.primary_key}
        left = set(range(len(c.image)) if cols is None else cols) - {int(i) for i in theirs}
        if not left - keys:
            return ("skip", None, True)
        cols, keep = frozenset(left), True
        check = bool(meta.get("w", False))  # its other columns are a whole row's
    if check and dead_ok and row.own is not None and not _agrees(row, env.value, cols):
        return ("dead", cols, keep)
    return ("write", cols, keep)


def _entry(raw: object, spec: Any) -> Envelope | None:
    """The entry ``raw`` if it holds a row of ``spec`` (or a queued delete)."""
    if not isinstance(raw, bytes):
        return None
    try:
        env = decode(raw)
    except CodecError:  # a tombstone, a marker of another version, a foreign value
        return None
    if env.value is None:
        return env if "wb" in (env.meta or {}) else None
    return env if spec.fits(env.value) else None


def _agrees(row: Late, value: Any, cols: frozenset[int] | None) -> bool:
    """Do the values ``value`` shows for the columns ``row`` writes come from it, or
    from the image it was merged over (no other change of them reached the entry)? For
    a delete: is ``value`` the row it deleted (a reader cached the row the database
    still held)?"""
    mine, base = row.image, row.base
    if value is None or mine is None:
        if value is None or row.change.image is not None:
            return value is None and mine is None
        return isinstance(base, list) and value == base  # (a delete)
    if not isinstance(mine, list) or len(mine) != len(value):
        return False
    for i in range(len(mine)) if cols is None else cols:
        if value[i] != mine[i] and (base is None or value[i] != base[i]):
            return False
    return True


def _dead_letter(cache: Cache, wb: WriteBehind, rows: list[Late]) -> bool:
    """Move ``rows`` to the dead-letter stream (False if Redis failed)."""
    pipe = wb.client.pipeline(transaction=False)
    for row in rows:
        c = row.change
        slot = Slot(c.key, c.spec.table, c.first)
        slot.entry, slot.pk, slot.cols = row.own or b"", list(c.pk), c.cols
        error = (
            "not written after its commit could not be confirmed: the row's entry shows "
            "other values of its columns stored since the change was made at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(row.made))}Z (a change "
            "applied meanwhile, newer or older); check the row, replay if still wanted"
        )
        fields = dead_letter_fields(row.partition, slot, error)
        # (execute_command: a Cluster pipeline routes by key and has no xadd)
        pipe.execute_command("XADD", wb.dead_key, "*", *chain.from_iterable(fields.items()))
    try:
        with redis_errors("dead letter"):
            pipe.execute()
    except BackendError as exc:
        log.warning("sa_cache: could not dead-letter write-behind changes (%s)", exc)
        return False
    cache.stats.incr("write_behind.dead_letter", len(rows))
    for row in rows:
        log.error(
            "sa_cache: write-behind change %s dead-lettered: a change of its columns was "
            "applied while its confirmation failed",
            row.change.key,
        )
    return True
