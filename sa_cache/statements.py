"""The engine-level listeners: every statement run on a connection a Session holds.

`watch_engine` installs them once per engine. A statement that writes marks its tables
in the Session's transaction (`transaction.Collector.record_write`), including rows
the database changes through foreign-key actions; a query miss's rows are captured
(`CAPTURE_OPTION`); a COMMIT sent is noted (its outcome may be unknown); SQL that sets
snapshot isolation is noted (`snapshot_is_fresh`).
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .invalidation import (
    ALL,
    TRANSACTION_CONTROL,
    cte_writes,
    foreign_key_writes,
    rows_generation,
    tables_written,
)

if TYPE_CHECKING:
    from .transaction import Collector

log = logging.getLogger("sa_cache")

CAPTURE_OPTION = "sa_cache_capture"

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
    level = conn.get_execution_options().get("isolation_level") or getattr(
        conn, "default_isolation_level", None
    )
    return isinstance(level, str) and level.upper() in _FRESH_ISOLATION


def autocommits(conn: Connection) -> bool:
    """Does ``conn`` commit each statement as it runs (``isolation_level="AUTOCOMMIT"``,
    of the engine or the connection)? Then a Session's rollback takes nothing back."""
    level = conn.get_execution_options().get("isolation_level")
    if isinstance(level, str):
        return level.upper() == "AUTOCOMMIT"
    detect = getattr(conn.dialect, "detect_autocommit_setting", None)
    if detect is None:
        return False
    try:
        return bool(detect(conn.connection.dbapi_connection))
    except Exception:  # a driver that cannot tell: as without AUTOCOMMIT
        return False


SNAPSHOT_SET = "sa_cache.snapshot_isolation"
"""``Connection.info`` (the DBAPI connection's, kept across pool checkouts) key: this
connection was given REPEATABLE READ or SERIALIZABLE with SQL."""

_SNAPSHOT_SQL = re.compile(
    r"isolation\s+level\s+(?:repeatable\s+read|serializable)"
    r"|(?:tx|transaction)_isolation\s*=\s*'?(?:repeatable-read|serializable)",
    re.IGNORECASE,
)


def _note_isolation(conn: Connection, sql: str) -> None:
    """SQL that sets snapshot isolation (``SET TRANSACTION ISOLATION LEVEL REPEATABLE
    READ``, ``BEGIN ISOLATION LEVEL SERIALIZABLE``, ``SET SESSION ...``): the connection
    is snapshot-isolated from now on (kept, conservatively, even if it was for one
    transaction only), and a Session's transaction on it reads the clock now, before
    its snapshot is taken."""
    if ("olation" not in sql and "OLATION" not in sql) or not _SNAPSHOT_SQL.search(sql):
        return
    conn.info[SNAPSHOT_SET] = True
    collector = _collectors.get(conn)
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
            persisting = "compiled_cache" in execution_options
            collector.record_write(written, persisting)
            if cascaded:  # rows the database changed on its own: named by nothing
                collector.record_write(cascaded)
            if collector.autocommit:
                _committed_now(conn, collector, written, persisting, cascaded)
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
    if collector is not None and not TRANSACTION_CONTROL.match(statement):
        key = id(conn)
        collector.statements[key] = collector.statements.get(key, 0) + 1
        written = tables_written(statement)
        if written:
            collector.record_write(written)
            if collector.autocommit:
                _committed_now(conn, collector, written)


def _committed_now(
    conn: Connection,
    collector: Collector,
    tables: frozenset[str],
    persisting: bool = False,
    cascaded: frozenset[str] | None = None,
) -> None:
    """On an AUTOCOMMIT connection the database committed the statement as it ran:
    its tables (and the rows of their entity entries, unless a flush names them) are
    invalidated now, not when the Session's transaction ends — which may be much later
    (a long-lived Session), while others read the rows it replaced."""
    if not autocommits(conn):
        return
    names = set(tables) | set(cascaded or ())
    rows = tables if not persisting else frozenset()
    names |= {rows_generation(t) for t in (*rows, *(cascaded or ())) if t != ALL}
    collector.cache.bump(sorted(names))


def _commit_sent(conn: Connection) -> None:
    """``commit`` (before the DBAPI COMMIT): from now on the transaction may have been
    committed, whatever the Session hears back."""
    collector = _collectors.get(conn)
    if collector is not None:
        collector.commit_sent = True
        if in_failed_transaction(conn):
            collector.doomed = True
        else:
            collector.healthy_commit = True


def in_failed_transaction(conn: Connection) -> bool:
    """Has a statement failed in ``conn``'s transaction so that its COMMIT will roll it
    back? PostgreSQL's state, as psycopg 3 and psycopg2 report it: a COMMIT then ends in
    ROLLBACK without an error (the application caught a statement's error and went on)."""
    try:
        dbapi = conn.connection.dbapi_connection
    except Exception:  # closed, invalidated: not ours to say
        return False
    info = getattr(dbapi, "info", None)
    status = getattr(info, "transaction_status", None)  # psycopg 3
    if status is None:
        get = getattr(dbapi, "get_transaction_status", None)  # psycopg2
        status = get() if callable(get) else None
    return status is not None and int(status) == _INERROR


_INERROR = 3
"""``TransactionStatus.INERROR`` (psycopg 3), ``TRANSACTION_STATUS_INERROR`` (psycopg2)."""


def watch_engine(engine: Engine) -> None:
    """Install the statement listeners on ``engine`` once."""
    if engine not in _engines:
        event.listen(engine, "after_execute", _after_execute)
        event.listen(engine, "after_cursor_execute", _after_cursor_execute)
        event.listen(engine, "commit", _commit_sent)
        _hook_commit(engine.dialect)
        _engines.add(engine)


# -- after a COMMIT --------------------------------------------------------------------

_after_commit: dict[int, list[Callable[[], None]]] = {}
"""Actions to run right after the DBAPI COMMIT of a checked-out connection (by the id of
its pool proxy: what ``Connection.connection`` is, and what the dialect's ``do_commit``
is given)."""
_hooked: weakref.WeakSet[Any] = weakref.WeakSet()  # dialects whose do_commit runs them


def _hook_commit(dialect: Any) -> None:
    """Make ``dialect.do_commit`` (this engine's dialect instance only, shared with its
    ``execution_options()`` copies) run the actions `after_commit` registered for the
    connection, once its COMMIT returned or failed. SQLAlchemy's Connection ``commit``
    event runs before the COMMIT, and no event runs after it."""
    if dialect in _hooked:
        return
    plain = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        try:
            plain(dbapi_connection)
        finally:  # (a failed COMMIT may have been applied all the same)
            actions = _after_commit.pop(id(dbapi_connection), None)
            for action in actions or ():
                try:
                    action()
                except Exception:  # never in the way of the COMMIT's own outcome
                    log.exception("sa_cache: an action after a COMMIT failed")

    dialect.do_commit = do_commit
    _hooked.add(dialect)


def after_commit(conn: Connection, action: Callable[[], None]) -> bool:
    """Run ``action`` right after the COMMIT of ``conn``'s transaction, which is about
    to be sent (call from its ``commit`` event): before ``commit()`` returns to the
    application, whatever its outcome. False if that cannot be arranged (the caller
    then runs it now)."""
    if conn.dialect not in _hooked:
        return False
    try:
        proxy = conn.connection
    except Exception:  # closed, invalidated
        return False
    _after_commit.setdefault(id(proxy), []).append(action)
    return True
