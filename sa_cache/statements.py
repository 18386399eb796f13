"""The engine-level listeners: every statement run on a connection a Session holds.

`watch_engine` installs them once per engine. A statement that writes marks its tables
in the Session's transaction (`transaction.Collector.record_write`), including rows
the database changes through foreign-key actions; a query miss's rows are captured
(`CAPTURE_OPTION`); a COMMIT sent is noted (its outcome may be unknown); SQL that sets
snapshot isolation is noted (`snapshot_is_fresh`, `serializable`); an error after which
the database rolled the transaction back is noted (`server_rollback`).
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .commit_hook import _forget_after_commit, _hook_commit, after_commit
from .invalidation import (
    _COMMENTS,
    ALL,
    cte_writes,
    foreign_key_writes,
    rows_generation,
    tables_written,
    translated,
)
from .transaction_text import AUTOCOMMIT_SET, driver_autocommits, ended_by_text, transaction_end

if TYPE_CHECKING:
    from .transaction import Collector

log = logging.getLogger("sa_cache")

CAPTURE_OPTION = "sa_cache_capture"
_TRANSLATE = "schema_translate_map"

_FRESH_ISOLATION = {"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"}


def snapshot_is_fresh(conn: Connection) -> bool:
    """True when each statement on ``conn`` sees every commit made before it started.

    Under REPEATABLE READ / SERIALIZABLE the snapshot is taken by the transaction's
    first statement, so later statements may read data older than the generations
    read just before them.
    """
    if conn.dialect.name == "sqlite":
        # One writer at a time: a read outside a transaction sees every commit. In one
        # (an explicit BEGIN, the pysqlite recipe; WAL) it reads the first read's snapshot.
        dbapi = getattr(conn.connection, "dbapi_connection", None)
        return not getattr(dbapi, "in_transaction", False)
    if conn.info.get(SNAPSHOT_SET):
        return False  # set with SQL (`_note_isolation`)
    level = conn.get_execution_options().get("isolation_level") or _own_level(conn)
    return isinstance(level, str) and level.upper() in _FRESH_ISOLATION


ISOLATION = "sa_cache.isolation_level"
"""``Connection.info`` key: the DBAPI connection's own isolation level, read once."""


def _own_level(conn: Connection) -> Any:
    """The isolation level of ``conn``'s DBAPI connection when no execution option sets
    one, asked once per pooled connection: the engine's default is read by SQLAlchemy
    before the application's ``connect`` listeners run, which may set another (``SET
    SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ``)."""
    info = conn.info
    if ISOLATION not in info:
        level = getattr(conn, "default_isolation_level", None)  # if the driver cannot say
        try:
            dbapi = conn.connection.dbapi_connection
            if dbapi is not None:
                level = conn.dialect.get_isolation_level(dbapi)
        except Exception:  # (as above)
            pass
        info[ISOLATION] = level
    return info[ISOLATION]


def autocommits(conn: Connection) -> bool:
    """Does ``conn`` commit each statement as it runs (``isolation_level="AUTOCOMMIT"``,
    of the engine or the connection; MySQL's ``SET autocommit = 1``)? Then a Session's
    rollback takes nothing back."""
    level = conn.get_execution_options().get("isolation_level")
    if isinstance(level, str):
        if level.upper() == "AUTOCOMMIT":
            return True
        if not conn.info.get(AUTOCOMMIT_SET):  # (else: SQL may have changed it since)
            return False
    return driver_autocommits(conn)


SNAPSHOT_SET = "sa_cache.snapshot_isolation"
"""``Connection.info`` (the DBAPI connection's, kept across pool checkouts) key: this
connection was given REPEATABLE READ or SERIALIZABLE with SQL."""

_NO_SNAPSHOT = re.compile(
    _COMMENTS + r"(?:begin|start\s+transaction(?![^;]*consistent\s+snapshot)|savepoint|release"
    r"|rollback|commit|xa|prepare\s+transaction|set\s+(?:session\s+characteristics"
    r"|(?:session\s+)?transaction\s+(?:isolation|read|deferrable)))\b",
    re.IGNORECASE | re.DOTALL,
)
"""Statements that read no data, so cannot take a REPEATABLE READ snapshot (counted are
all others, even ``SET @x = (SELECT ...)`` or ``START TRANSACTION WITH CONSISTENT
SNAPSHOT``: see `Collector.statements`)."""
_IMPORTED_SNAPSHOT = re.compile(r"\bset\s+transaction\s+snapshot\b", re.IGNORECASE)

_SNAPSHOT_SQL = re.compile(
    r"isolation\s+level\s+(?:repeatable\s+read|serializable)"
    r"|(?:tx|transaction)_isolation(?:\s*=\s*|\s+to\s+)'?(?:repeatable[- ]read|serializable)",
    re.IGNORECASE,
)
SERIALIZABLE_SET = "sa_cache.serializable"
"""``Connection.info`` key (kept as `SNAPSHOT_SET` is): SQL set SERIALIZABLE (`serializable`)."""


def _note_isolation(conn: Connection, sql: str) -> None:
    """SQL that sets snapshot isolation (``SET TRANSACTION ISOLATION LEVEL REPEATABLE
    READ``, ``BEGIN ISOLATION LEVEL SERIALIZABLE``, ``SET SESSION ...``): the connection
    is snapshot-isolated from now on (kept, conservatively, even if it was for one
    transaction only), and a Session's transaction on it reads the clock now, before
    its snapshot is taken."""
    if ("NAPSHOT" in sql or "napshot" in sql) and _IMPORTED_SNAPSHOT.search(sql):
        # PostgreSQL's SET TRANSACTION SNAPSHOT: an older transaction's snapshot, taken
        # at a clock nobody read: no fills, no hits for this transaction
        conn.info[SNAPSHOT_SET] = True
        collector = _collectors.get(conn)
        if collector is not None:
            collector.snapshot_clocks[id(conn)] = None
        return
    found = _SNAPSHOT_SQL.search(sql) if "olation" in sql or "OLATION" in sql else None
    if found is None:
        return
    conn.info[SNAPSHOT_SET] = True
    collector = _collectors.get(conn)
    if found.group(0)[-4:].lower() == "able":  # SERIALIZABLE: no hits from now on
        conn.info[SERIALIZABLE_SET] = True
        if collector is not None:
            collector.serializable = True
    if collector is not None and id(conn) not in collector.snapshot_clocks:
        collector.snapshot_clocks[id(conn)] = collector.cache.read_clock()


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_collectors: weakref.WeakKeyDictionary[Connection, Collector] = weakref.WeakKeyDictionary()


def _after_execute(
    conn: Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: Any,
    result: Any,
) -> None:
    text = getattr(clauseelement, "text", None)
    if type(text) is str:
        _note_isolation(conn, text)
    collector = _collectors.get(conn)
    if collector is not None:
        key = id(conn)
        collector.statements[key] = collector.statements.get(key, 0) + 1
        try:
            written = tables_written(clauseelement)
            if written is None and result is not None:
                written = cte_writes(result.context.compiled)  # select(update(...).cte())
            compiled = result.context.compiled if result is not None else None
            cascaded = foreign_key_writes(clauseelement, compiled) if written else None
        except Exception:  # a statement these cannot read must not fail the application
            log.exception("sa_cache: cannot tell which tables a statement wrote; all of them")
            written, cascaded = frozenset([ALL]), None
        if written:
            # the unit of work runs its objects' rows with their mapper's compiled cache
            # (not the engine's or connection's own option: DML of flush events runs with it)
            own = conn.get_execution_options()
            cached = execution_options.get("compiled_cache")
            persisting = cached is not None and cached is not own.get("compiled_cache")
            collector.record_write(written, persisting)
            every = written | cascaded if cascaded else written
            if cascaded:  # rows the database changed on its own: named by nothing
                collector.record_write(cascaded)
            schema_map = execution_options.get(_TRANSLATE) or own.get(_TRANSLATE)
            if schema_map:  # the schemas the database wrote: named by no flush either
                real = translated(every, schema_map)
                if real:
                    collector.record_write(real)
                    every |= real
            if collector.autocommit:
                _committed_now(conn, collector, every, persisting)
        end = transaction_end(conn, text if type(text) is str else None, clauseelement)
        if end is not None:
            ended_by_text(conn, collector, end)
    box = execution_options.get(CAPTURE_OPTION)
    if box is not None and result is not None and result.returns_rows:
        box.capture(conn, result, collector)


def _after_cursor_execute(
    conn: Connection,
    cursor: Any,
    statement: str,
    parameters: Any,
    context: Any,
    executemany: bool,
) -> None:
    """SQL sent with ``exec_driver_sql``, which fires no ``after_execute``."""
    if context is None or context.compiled is not None:
        return  # compiled: `_after_execute` saw it
    _note_isolation(conn, statement)
    collector = _collectors.get(conn)
    if collector is not None:
        if not _NO_SNAPSHOT.match(statement):
            key = id(conn)
            collector.statements[key] = collector.statements.get(key, 0) + 1
        # (always: "SAVEPOINT a; UPDATE ..." is one call on drivers that take several)
        written = tables_written(statement)
        if written:
            collector.record_write(written)
            if collector.autocommit:
                _committed_now(conn, collector, written)
        end = transaction_end(conn, statement)
        if end is not None:
            ended_by_text(conn, collector, end)


def _committed_now(
    conn: Connection, collector: Collector, tables: frozenset[str], persisting: bool = False
) -> None:
    """On an AUTOCOMMIT connection the database committed the statement as it ran:
    its tables (and the rows of their entity entries) are invalidated now, not when the
    Session's transaction ends — which may be much later (a long-lived Session), while
    others read the rows it replaced. Row generations a flush's own statement noted for
    the rows the flush names (`Collector.record_write`) are left alone: the flush swaps
    or tombstones those entries itself (`entity_writes.record_flush`). Anything else,
    ``bulk_update_mappings`` / ``bulk_save_objects`` / an ORM bulk UPDATE by primary key
    among them (run like a flush's statements, but no flush), names no rows."""
    if not autocommits(conn):
        return
    rows = {rows_generation(t) for t in tables if t != ALL}
    if persisting and collector.in_flush:
        rows -= collector.flush_rows - collector.flush_foreign
    collector.cache.bump(sorted({*tables, *rows}))


def _commit_sent(conn: Connection) -> None:
    """``commit`` (before the DBAPI COMMIT): from now on the transaction may have been
    committed, whatever the Session hears back — unless the database says it was not
    (`_commit_heard`)."""
    collector = _collectors.get(conn)
    if collector is not None:
        collector.commit_sent = True
        if in_failed_transaction(conn):
            collector.doomed = True
        elif not after_commit(conn, lambda failed: _commit_heard(conn, collector, failed)):
            collector.healthy_commit = True


def _commit_heard(conn: Connection, collector: Collector, failed: BaseException | None) -> None:
    """After the COMMIT: one the server answered with an error (an SQLSTATE: a deferred
    constraint, a serialization failure at COMMIT), the driver reporting its connection
    open and idle, was rolled back for sure (PostgreSQL); any other failure (a lost
    connection, an error raised in the client) leaves the outcome unknown."""
    state = getattr(failed, "sqlstate", None) or getattr(failed, "pgcode", None)
    if isinstance(state, str) and state and _idle_after_failure(conn):
        collector.doomed = True
    else:
        collector.healthy_commit = True


def _idle_after_failure(conn: Connection) -> bool:
    try:
        dbapi = conn.connection.dbapi_connection
    except Exception:  # closed, invalidated: unknown
        return False
    if dbapi is None or getattr(dbapi, "closed", True):
        return False
    return _transaction_status(dbapi) == _IDLE


def _transaction_status(dbapi: Any) -> int | None:
    """The transaction status psycopg 3 or psycopg2 reports (None: another driver)."""
    info = getattr(dbapi, "info", None)
    status = getattr(info, "transaction_status", None)  # psycopg 3
    if status is None:
        get = getattr(dbapi, "get_transaction_status", None)  # psycopg2
        status = get() if callable(get) else None
    return None if status is None else int(status)


def _twophase_sent(conn: Connection, xid: Any, is_prepared: bool = True) -> None:
    """``prepare_twophase`` / ``commit_twophase``: a prepared transaction may commit."""
    collector = _collectors.get(conn)
    if collector is not None:
        collector.commit_sent = collector.healthy_commit = True


def in_failed_transaction(conn: Connection) -> bool:
    """Has a statement failed in ``conn``'s transaction so that its COMMIT will roll it
    back? PostgreSQL's state, as psycopg 3 and psycopg2 report it: a COMMIT then ends in
    ROLLBACK without an error (the application caught a statement's error and went on)."""
    try:
        dbapi = conn.connection.dbapi_connection
    except Exception:  # closed, invalidated: not ours to say
        return False
    return _transaction_status(dbapi) == _INERROR


_INERROR = 3
"""``TransactionStatus.INERROR`` (psycopg 3), ``TRANSACTION_STATUS_INERROR`` (psycopg2)."""
_IDLE = 0
"""``TransactionStatus.IDLE`` (psycopg 3), ``TRANSACTION_STATUS_IDLE`` (psycopg2)."""


def watch_engine(engine: Engine) -> None:
    """Install the statement listeners on ``engine`` once."""
    if engine not in _engines:
        from .server_rollback import statement_failed  # (they import this module)
        from .visibility import lock_check

        event.listen(engine, "before_cursor_execute", lock_check)
        event.listen(engine, "after_execute", _after_execute)
        event.listen(engine, "after_cursor_execute", _after_cursor_execute)
        event.listen(engine, "commit", _commit_sent)
        event.listen(engine, "begin", _forget_after_commit)
        event.listen(engine, "prepare_twophase", _twophase_sent)
        event.listen(engine, "commit_twophase", _twophase_sent)
        event.listen(engine, "handle_error", statement_failed)
        _hook_commit(engine.dialect)
        _engines.add(engine)
