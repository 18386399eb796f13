"""A statement's error after which the database rolled back the whole transaction, not
only the statement, and went on: MySQL / MariaDB's deadlock (1213), and a lock wait
timeout (1205) on a server started with ``innodb_rollback_on_timeout``. The connection
then runs in a new implicit transaction: a COMMIT the application sends after catching
the error commits only the statements run after it.

`statement_failed` (the engine's ``handle_error`` listener) marks the Session's
transaction (`transaction.Collector.rolled_back_by_error`). Its end then handles what it
wrote as of unknown outcome — invalidated, never written through nor put back (the
statements after the error may have been committed) — and aborts its write-behind
changes, as for any rolled-back transaction (``session._outermost_ended``).

PostgreSQL needs none of this: a failed transaction stays failed until its end, and its
COMMIT is a ROLLBACK (`statements.in_failed_transaction`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

from .outer_commit import outer_ended
from .statements import _NO_SNAPSHOT, _collectors, autocommits
from .transaction_text import ENDS, ended_by_text, transaction_end

if TYPE_CHECKING:
    from .transaction import Collector

log = logging.getLogger("sa_cache")

_MYSQL = ("mysql", "mariadb")

_DEADLOCK = 1213  # ER_LOCK_DEADLOCK
_LOCK_WAIT_TIMEOUT = 1205  # ER_LOCK_WAIT_TIMEOUT

ROLLBACK_ON_TIMEOUT = "sa_cache.innodb_rollback_on_timeout"
"""``Connection.info`` key: the server's ``@@innodb_rollback_on_timeout``, read once per
connection (at its first lock wait timeout)."""


def statement_failed(context: Any) -> None:
    """``handle_error``. A statement that failed may have taken the snapshot first (a
    read stopped by a timeout, a subquery with too many rows: MariaDB keeps the
    transaction, and its read view, going): it counts as a statement run. One whose
    error rolled the whole transaction back marks it (`rolled_back`)."""
    conn, sql = context.connection, context.statement
    if conn is None:
        return
    # MySQL / MariaDB commit the open transaction before DDL (and the like) runs,
    # whether it then fails or not (a DROP TABLE of a missing table): also what
    # Sessions joined to it wrote, waiting for its COMMIT (`outer_commit`)
    ends = conn.dialect.name in _MYSQL and isinstance(sql, str) and transaction_end(conn, sql)
    if ends:
        outer_ended(conn)
    collector = _collectors.get(conn)
    if collector is None:
        return
    if isinstance(sql, str) and not _NO_SNAPSHOT.match(sql):
        key = id(conn)
        collector.statements[key] = collector.statements.get(key, 0) + 1
    if ends:
        ended_by_text(conn, collector, ENDS)
    if rolls_back_transaction(conn, context.original_exception):
        rolled_back(conn, collector)


def rolls_back_transaction(conn: Connection, error: BaseException | None) -> bool:
    """Did ``error`` (a statement's, on ``conn``) make the database roll back the whole
    transaction? InnoDB's deadlock does; its lock wait timeout does when the server runs
    with ``innodb_rollback_on_timeout`` (else it undoes the statement only)."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return False
    code = _error_code(error)
    if code == _DEADLOCK:
        return True
    return code == _LOCK_WAIT_TIMEOUT and _rollback_on_timeout(conn)


def _error_code(error: BaseException | None) -> int | None:
    """The MySQL error number of a driver's exception: ``args[0]`` (PyMySQL, mysqlclient,
    asyncmy, aiomysql) or ``errno`` (MySQL Connector, MariaDB Connector)."""
    code = getattr(error, "errno", None)
    if isinstance(code, int):
        return code
    args = getattr(error, "args", None) or ()
    return args[0] if args and isinstance(args[0], int) else None


def _rollback_on_timeout(conn: Connection) -> bool:
    """The server's ``@@innodb_rollback_on_timeout`` (a startup option), read once per
    connection; True if it cannot be read (the connection is likely gone anyway)."""
    info = conn.info
    if ROLLBACK_ON_TIMEOUT not in info:
        try:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute("SELECT @@innodb_rollback_on_timeout")
                row = cursor.fetchone()
            finally:
                cursor.close()
            info[ROLLBACK_ON_TIMEOUT] = row is not None and bool(int(row[0]))
        except Exception:  # a server without InnoDB's variable, a broken connection
            log.warning("sa_cache: cannot read @@innodb_rollback_on_timeout; taken as ON")
            return True
    return bool(info[ROLLBACK_ON_TIMEOUT])


def rolled_back(conn: Connection, collector: Collector) -> None:
    """The database rolled back ``conn``'s transaction and goes on in a new one: mark the
    Session's transaction, and count ``conn``'s statements (and its snapshot) afresh.
    On an AUTOCOMMIT connection the error undid its own statement only."""
    if autocommits(conn):
        return
    collector.rolled_back_by_error = True
    key = id(conn)
    if key in collector.statements:
        collector.statements[key] = 0
    if key in collector.snapshot_clocks:  # the next statement takes a new snapshot
        collector.snapshot_clocks[key] = collector.cache.read_clock()
