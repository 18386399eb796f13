"""What a Session may be served from the cache while it holds a transaction: not
what its own uncommitted (or unflushed) writes change (DESIGN rule 2), nor, under
REPEATABLE READ, rows newer than the snapshot its database reads see, nor anything
under SERIALIZABLE (`serializable`); and no locking read of a write-behind model, whose
rows no database lock covers."""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy.orm import Session
from sqlalchemy.sql import visitors

from .invalidation import ALL, moved, table_name
from .serializable import bound_serializable, declared_other, found_serializable
from .statements import _collectors
from .tokens import older_than
from .transaction import INFO_KEY, Collector, joined_transaction

if TYPE_CHECKING:
    from .cache import Cache


def pending_tables(session: Session, cache: Cache) -> set[str]:
    """Tables of the Session's new, dirty and deleted objects (not flushed yet), but
    not those of write-behind models: their changes never reach the database before
    the commit, so a database read would not see them either (and would miss what
    the queue holds)."""
    out: set[str] = set()
    entities = cache.entities
    for obj in (*session.new, *session.dirty, *session.deleted):
        mapper = getattr(obj, "__mapper__", None)
        if mapper is not None:
            spec = entities.get(mapper)
            if spec is None or spec.write != "behind":
                out.update(n for t in mapper.tables for n in moved(table_name(t)))
    return out


def sees_own_writes(session: Session, cache: Cache, tables: Collection[str]) -> bool:
    """True when this Session has changes to ``tables`` the cache must not hide (rule 2),
    or may have them (`joined_transaction`)."""
    if session.bind is not None and joined_transaction(session):
        return True
    collector: Collector | None = session.info.get(INFO_KEY)
    if collector is not None and collector.cache is cache:  # else it wrote nothing yet
        written = collector.written()
        if written and (ALL in written or not written.isdisjoint(tables)):
            return True
    return not session._is_clean() and not pending_tables(session, cache).isdisjoint(tables)


def snapshot_of(session: Session) -> int | None:
    """`Collector.snapshot_taken` of ``session``'s transaction (None: no older snapshot
    to honour — e.g. READ COMMITTED, or no statement yet); -1 (nothing may be served)
    for a SERIALIZABLE one, even before its first statement (`serializable`)."""
    collector: Collector | None = session.info.get(INFO_KEY)
    bind: Any = session.bind
    if collector is None or bind is None or not collector.connections:
        # No connection yet (or several binds): would the one to come be SERIALIZABLE?
        # Attribute tests only, for the binds that give no reason to ask.
        if bind is None or bind._execution_options:
            if bound_serializable(session):
                return -1
        else:
            dialect = bind.dialect
            if (
                dialect in found_serializable
                or (
                    dialect._on_connect_isolation_level is not None
                    and dialect not in declared_other
                )
            ) and bound_serializable(session):
                return -1
        if collector is None:
            return None
    if collector.serializable:
        return -1
    if not collector.snapshot_clocks:
        return None
    return collector.snapshot_taken()


def in_snapshot(session: Session, gens: Sequence[str]) -> bool:
    """May rows valid under the generation tokens ``gens`` be served to ``session``?
    Not to a transaction reading an older snapshot if a commit wrote one of their
    tables after it: its database reads would not see those changes."""
    snapshot = snapshot_of(session)  # (None under READ COMMITTED)
    return snapshot is None or older_than(gens, snapshot)


class WriteBehindLockError(Exception):
    """Raised for a locking read (``with_for_update``) of a model registered
    ``write="behind"``: the latest state of its rows is in the queue, which database
    row locks do not cover, so a locked read-modify-write would lose other commits'
    queued changes."""


def refuse_locked_write_behind(cache: Cache, state: Any) -> None:
    """Raise `WriteBehindLockError` if ``state`` is a locking read of a write-behind
    model (``session.get(..., with_for_update=...)``, ``select(...).with_for_update()``,
    ``session.refresh(..., with_for_update=...)``)."""
    lock = getattr(state.statement, "_for_update_arg", None)
    if not state.is_select or lock is None:
        return
    entities = cache.entities
    # ``of=``: only those tables are locked (where the dialect renders OF; elsewhere the
    # others are locked too, which no read-modify-write of theirs was asked to rely on)
    locked = _tables_of(lock.of) if lock.of else None
    behind = [spec for spec in entities.values() if spec.write == "behind"]
    if not behind:
        return
    read = {m.local_table for m in state.all_mappers}  # and a Table selected as it is
    read |= _tables_of([state.statement]) or set()
    for spec in behind:
        mapper = spec.mapper
        if read.isdisjoint(mapper.tables):
            continue
        if locked is None or not locked.isdisjoint(mapper.tables):
            raise WriteBehindLockError(
                f"sa_cache: {mapper.class_.__name__} is registered write='behind': a "
                "locking read (with_for_update) cannot lock its rows, whose latest state "
                "is in the write-behind queue; register it write='through' for locked "
                "updates, or update it without a lock"
            )


_LOCK_TEXT = re.compile(
    r"\bfor\s+(?:no\s+key\s+)?update\b|\bfor\s+(?:key\s+)?share\b|\block\s+in\s+share\s+mode\b",
    re.IGNORECASE,
)


def lock_check(
    conn: Any, cursor: Any, sql: str, parameters: Any, context: Any, executemany: bool
) -> None:
    """``before_cursor_execute`` (`statements.watch_engine`): `refuse_nested_lock` for
    the statements of a Session's transaction."""
    collector = _collectors.get(conn)
    if collector is not None and _LOCK_TEXT.search(sql):
        refuse_nested_lock(collector.cache, sql, context)


def refuse_nested_lock(cache: Cache, sql: str, context: Any) -> None:
    """`refuse_locked_write_behind` for a lock the statement itself does not carry (a
    subquery's or CTE's ``with_for_update()``, ``suffix_with("FOR UPDATE")``, a hint):
    seen in the SQL about to be sent (``before_cursor_execute``), so that statements
    without a lock pay one text search only."""
    compiled = getattr(context, "compiled", None)
    statement = getattr(compiled, "statement", None)
    if statement is None or getattr(statement, "_for_update_arg", None) is not None:
        return  # (SQL text: its tables are unknown; its own lock: checked with ``of=``)
    behind = [s for s in cache.entities.values() if s.write == "behind"]
    if not behind:
        return
    tables = {n for n in visitors.iterate(statement) if isinstance(n, Table)}
    for spec in behind:
        if not tables.isdisjoint(spec.mapper.tables):
            raise WriteBehindLockError(
                f"sa_cache: {spec.mapper.class_.__name__} is registered write='behind': "
                "a statement that locks rows (FOR UPDATE / FOR SHARE in it) cannot lock "
                "its rows, whose latest state is in the write-behind queue"
            )


def _tables_of(targets: Any) -> set[Any] | None:
    """The tables ``with_for_update(of=...)`` names (tables, entities, columns, aliases:
    their tables); None (every table) for one it cannot tell."""
    from sqlalchemy.sql.util import find_tables

    out: set[Any] = set()
    try:
        for target in targets:
            for found in find_tables(target, include_aliases=True, check_columns=True):
                base: Any = found
                while base is not None and not isinstance(base, Table):
                    base = getattr(base, "element", None)  # an alias: its table
                if base is None:
                    return None
                out.add(base)
    except Exception:  # (as above)
        return None
    return out or None
