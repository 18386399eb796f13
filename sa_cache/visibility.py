"""What a Session may be served from the cache while it holds a transaction: not
what its own uncommitted (or unflushed) writes change (DESIGN rule 2), nor, under
REPEATABLE READ, rows newer than the snapshot its database reads see, nor anything
under SERIALIZABLE (`serializable`); and no lock of a write-behind model's rows, which
no database lock covers (`locked_write_behind`)."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy.orm import Session
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ClauseElement, ColumnElement, TextClause
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import (
    CTE,
    AliasedReturnsRows,
    CompoundSelect,
    FromGrouping,
    Join,
    Select,
    TableClause,
    TextualSelect,
    Values,
)

from .invalidation import ALL, moved, table_name
from .serializable import bound_serializable, declared_other, found_serializable
from .statements import _collectors
from .tokens import older_than
from .transaction import INFO_KEY, Collector, joined_transaction

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

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
    binds = session.binds  # per-mapper / table binds: the one serving a read may be
    # another than those taken so far, or than ``bind``
    if collector is None or bind is None or binds or not collector.connections:
        # No connection yet (or several binds): would one to come be SERIALIZABLE?
        # Attribute tests only, for a plain bind that gives no reason to ask.
        if bind is None or binds or bind._execution_options:
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


# -- no row lock on a write-behind table ------------------------------------------------
#
# Its rows in the database trail the queue, so a lock there protects nothing, and a
# locked read-modify-write would read an older row and lose the queued change
# (`WriteBehindLockError`).
#
# One decision (`locked_write_behind`) judges a statement wherever it is seen: in
# ``do_orm_execute`` (`refuse_locked_write_behind`: a locking read the cache or the queue
# could otherwise answer with no SQL sent) and as SQL is sent on a Session's connection
# (`lock_check`: ``session.connection().execute``, nested locks, SQL text). It follows what
# the databases lock, found on PostgreSQL 15 and MariaDB 10.11 by a second connection
# trying ``FOR UPDATE NOWAIT`` on the rows:
#
# - a locking clause locks the rows of the tables in the FROM list of its own SELECT: its
#   tables, joined ones (also a table only a WHERE column names: it is in the FROM list),
#   and the tables of a FROM subquery or LATERAL, recursively (PostgreSQL; MariaDB locks no
#   derived table's rows, but a statement is judged alike on every database, and ``of=``
#   leaves a subquery out);
# - never the rows of a sub-select in WHERE or in the columns (IN, EXISTS, a scalar
#   subquery), nor those of a CTE the statement reads, on either database — each nested
#   SELECT's own lock (the claim-rows pattern) is judged as a lock of its own;
# - ``of=``: only what it names (a subquery named: its tables). MariaDB renders no OF and
#   locks the whole FROM list; nothing relies on those extra locks, so it is judged by
#   what it names too;
# - SQLAlchemy renders no lock for a UNION's own ``with_for_update()``: its members' count;
# - SQL text (``text()``, ``exec_driver_sql``, a ``text()`` FROM, ``from_statement``) is
#   not parsed: a lock in it counts for every write-behind table it names anywhere.

QUEUE_APPLY = "sa_cache_queue_apply"
"""Execution option of sa_cache's own locking reads of write-behind rows (the synchronous
write of queued changes locks the rows it upserts): `lock_check` lets them run."""


class WriteBehindLockError(Exception):
    """Raised for a statement that would lock rows of a model registered
    ``write="behind"`` (``with_for_update``, a nested or textual lock): the latest state
    of its rows is in the queue, which database row locks do not cover, so a locked
    read-modify-write would lose other commits' queued changes."""


_LOCK_TEXT = re.compile(
    r"\bfor\s+(?:no\s+key\s+)?update\b|\bfor\s+(?:key\s+)?share\b|\block\s+in\s+share\s+mode\b",
    re.IGNORECASE,
)


def refuse_locked_write_behind(cache: Cache, state: Any) -> None:
    """``do_orm_execute``: raise `WriteBehindLockError` for a locking select of a
    write-behind table (``session.get(..., with_for_update=...)``,
    ``select(...).with_for_update()``, ``refresh(..., with_for_update=...)``). Only a
    statement with a lock of its own pays more than an attribute test; nested locks
    always send SQL (`query_shape.locks_rows`), which `lock_check` sees."""
    statement = state.statement
    if state.is_select and getattr(statement, "_for_update_arg", None) is not None:
        _refuse(cache, statement, None)


def lock_check(
    conn: Any, cursor: Any, sql: str, parameters: Any, context: Any, executemany: bool
) -> None:
    """``before_cursor_execute`` (`statements.watch_engine`): `locked_write_behind` for
    the statements of a Session's transaction whose SQL has a lock in it (the others pay
    one text search)."""
    collector = _collectors.get(conn)
    if collector is None or not _LOCK_TEXT.search(sql):
        return
    if context.execution_options.get(QUEUE_APPLY):
        return
    statement = getattr(getattr(context, "compiled", None), "statement", None)
    if not isinstance(statement, ClauseElement):
        statement = None  # ``exec_driver_sql``: the SQL text alone
    _refuse(collector.cache, statement, sql)


def _refuse(cache: Cache, statement: ClauseElement | None, sql: str | None) -> None:
    mapper = locked_write_behind(cache, statement, sql)
    if mapper is not None:
        raise WriteBehindLockError(
            f"sa_cache: {mapper.class_.__name__} is registered write='behind': a "
            "statement that locks its rows (with_for_update, FOR UPDATE / FOR SHARE) "
            "cannot lock them, whose latest state is in the write-behind queue; register "
            "it write='through' for locked updates, or update it without a lock"
        )


def locked_write_behind(
    cache: Cache, statement: ClauseElement | None, sql: str | None
) -> Mapper[Any] | None:
    """The write-behind mapper whose rows ``statement`` locks, if any (see the comment
    above). ``sql``: the SQL sent, when known — for a lock in it the statement's
    structure does not show (then every table it reads counts), or the whole of it when
    there is no statement."""
    behind: dict[Any, Mapper[Any]] = {}
    for spec in cache.entities.values():
        if spec.write == "behind":
            behind.update((t, spec.mapper) for t in spec.mapper.tables)
    if not behind:
        return None
    reached: list[Any] = []  # tables, and SQL text whose tables are unknown
    if statement is None:
        reached.append(sql or "")
    else:
        locks = _locks(statement, reached)
        if not locks and sql is not None and _LOCK_TEXT.search(sql):
            for node in visitors.iterate(statement):  # a lock we cannot place: anywhere
                if isinstance(node, TableClause | TextClause):
                    reached.append(node.text if isinstance(node, TextClause) else node)
    texts: list[str] = []
    for target in reached:
        if isinstance(target, str):
            texts.append(target)
        elif isinstance(target, Table):
            if target in behind:
                return behind[target]
        else:  # a lightweight ``table()``: by its name
            texts.append(target.name)
    if texts:
        for table, mapper in behind.items():
            name = re.compile(rf"(?<![\w$]){re.escape(table.name)}(?![\w$])", re.IGNORECASE)
            if any(name.search(text) for text in texts):
                return mapper
    return None


def _locks(statement: ClauseElement, reached: list[Any]) -> bool:
    """Add to ``reached`` what each lock in ``statement`` locks: each SELECT's own
    (``with_for_update``, or one in its suffixes or hints), a text fragment's. False if
    the structure shows none."""
    found = False
    for node in visitors.iterate(statement):
        if isinstance(node, Select):
            lock = node._for_update_arg
            if lock is not None and lock.of:
                found = True
                _of(lock.of, node, reached)
            elif lock is not None or _worded_lock(node):
                found = True
                _from_list(node, reached)
        elif isinstance(node, CompoundSelect) and _worded_lock(node):
            found = True  # (MariaDB: the last member's; counted for every member)
            for member in node.selects:
                _from_select(member, reached)
        elif isinstance(node, TextClause) and _LOCK_TEXT.search(node.text):
            found = True
            reached.append(node.text)
    return found


def _worded_lock(select: Any) -> bool:
    """A lock given as words: ``suffix_with("FOR UPDATE")``, a prefix, a hint."""
    parts = (*getattr(select, "_suffixes", ()), *getattr(select, "_prefixes", ()))
    words = [str(text) for text, _ in parts]
    words += [text for _, text in getattr(select, "_statement_hints", ())]
    words += list(getattr(select, "_hints", {}).values())
    return any(_LOCK_TEXT.search(w) for w in words)


def _of(targets: Iterable[Any], select: Select[Any], reached: list[Any]) -> None:
    """What ``with_for_update(of=...)`` locks: the tables (and subqueries) it names."""
    for target in targets:
        if isinstance(target, ColumnElement):
            for from_ in target._from_objects:
                _from(from_, reached)
        elif isinstance(target, ClauseElement):
            _from(target, reached)
        else:  # (not seen: SQLAlchemy coerces them) the whole FROM list
            _from_list(select, reached)


def _from_list(select: Select[Any], reached: list[Any]) -> None:
    """The FROM list of ``select`` (as SQLAlchemy builds it: the FROM objects of its
    columns and WHERE, its ``select_from()`` and joins); sub-selects in them add none."""
    for clause in (*select._raw_columns, *select._where_criteria):
        for from_ in clause._from_objects:
            _from(from_, reached)
    for from_ in select._from_obj:
        _from(from_, reached)
    for target, _, left, _ in select._setup_joins:  # (a relationship: not a table's)
        _from(target, reached)
        _from(left, reached)


def _from(from_: Any, reached: list[Any]) -> None:
    """The tables whose rows a lock of the FROM entry ``from_`` takes."""
    if isinstance(from_, TableClause):
        reached.append(from_)
    elif isinstance(from_, Join):
        _from(from_.left, reached)
        _from(from_.right, reached)
    elif isinstance(from_, CTE | Values | FunctionElement):
        return  # neither database locks a CTE's rows; a function or VALUES has none
    elif isinstance(from_, AliasedReturnsRows | FromGrouping):
        _from_select(from_.element, reached)  # an alias, a FROM subquery, LATERAL
    elif isinstance(from_, TextClause):
        reached.append(from_.text)
    elif isinstance(from_, ClauseElement):  # (none seen) any table in it
        reached.extend(n for n in visitors.iterate(from_) if isinstance(n, TableClause))


def _from_select(element: Any, reached: list[Any]) -> None:
    """What a lock of a FROM subquery over ``element`` takes (PostgreSQL: the rows of
    its own FROM list, recursively)."""
    if isinstance(element, Select):
        _from_list(element, reached)
    elif isinstance(element, CompoundSelect):
        for member in element.selects:
            _from_select(member, reached)
    elif isinstance(element, TextualSelect):
        reached.append(str(element.element))
    else:
        _from(element, reached)
