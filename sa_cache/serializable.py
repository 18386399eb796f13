"""SERIALIZABLE transactions are served no hits.

A read answered from the cache never reaches the database, so it takes part in none of
its conflict detection: PostgreSQL's SSI takes no SIREAD lock for it, InnoDB no shared
lock. Two SERIALIZABLE transactions that each read rows from the cache and then write
others could both commit a write skew the database exists to refuse. So their reads go
to the database (`visibility.snapshot_of`); what they load fills the cache as a
REPEATABLE READ transaction's loads do.

A Session's transaction is SERIALIZABLE when one of its connections is (`serializes`,
at ``after_begin``; or SQL sets it: `statements._note_isolation`). Before it holds a
connection — a ``session.get`` answered first thing takes none — its binds tell
(`bound_serializable`): an ``isolation_level`` execution option of the engine or
Connection, ``create_engine(isolation_level=...)``, or a level the engine's connections
were found at (a server default, a ``connect`` listener: known from the first
transaction on one of them). SQLite's level is not looked at: pysqlite begins no
transaction before a SELECT (unless the explicit-BEGIN recipe is used), and SQLAlchemy
reports every SQLite connection as SERIALIZABLE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from .statements import SERIALIZABLE_SET, _own_level

if TYPE_CHECKING:
    from .transaction import Collector

found_serializable: set[Any] = set()
"""Dialects (one per engine, shared by its ``execution_options()`` copies) whose
connections are SERIALIZABLE with no execution option saying so (its
``create_engine(isolation_level=...)``, a server default, a ``connect`` listener).
Plain sets: the hit path tests them (`visibility.snapshot_of`) without a function call."""
declared_other: set[Any] = set()
"""Dialects whose ``create_engine(isolation_level=...)`` is another level."""


def _is_serializable(level: Any) -> bool:
    return isinstance(level, str) and level.upper() == "SERIALIZABLE"


def note_serializable(collector: Collector, conn: Connection) -> None:
    """``after_begin`` on ``conn`` (`transaction.Collector.bind_connection` done): mark
    the transaction if ``conn`` is SERIALIZABLE (asked of connections that are not
    `statements.snapshot_is_fresh` only: they have a snapshot clock)."""
    if id(conn) in collector.snapshot_clocks and serializes(conn):
        collector.serializable = True


def serializes(conn: Connection) -> bool:
    """Is the transaction ``conn`` begins SERIALIZABLE?"""
    dialect = conn.dialect
    if dialect.name == "sqlite":
        return False
    if conn.info.get(SERIALIZABLE_SET):
        return True
    level = conn.get_execution_options().get("isolation_level")
    if level is not None:
        return _is_serializable(level)
    if _is_serializable(_own_level(conn)):
        found_serializable.add(dialect)  # its next Sessions know it before a connection
        return True
    return False


def bound_serializable(session: Session) -> bool:
    """Would a connection ``session`` takes from one of its binds be SERIALIZABLE? (A
    ``get_bind`` override's engines are known once their connections are taken.)"""
    binds = [session.bind, *session.binds.values()]
    return any(bind is not None and _bind_serializable(bind) for bind in binds)


def _bind_serializable(bind: Any) -> bool:
    dialect = bind.dialect
    if dialect.name == "sqlite":
        return False
    level = bind._execution_options.get("isolation_level")
    if level is not None:
        return _is_serializable(level)
    declared = getattr(dialect, "_on_connect_isolation_level", None)  # create_engine's
    if declared is not None:
        (found_serializable if _is_serializable(declared) else declared_other).add(dialect)
    return dialect in found_serializable
