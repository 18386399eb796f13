"""A transaction ended by SQL text: ``COMMIT`` / ``ROLLBACK`` (``END``, ``ABORT``) sent
with ``session.execute(text(...))`` or ``exec_driver_sql`` — e.g. before PostgreSQL's
``CREATE INDEX CONCURRENTLY`` — or by a statement before which MySQL / MariaDB commit
on their own (DDL, ``BEGIN``, ``LOCK TABLES``...: `_MYSQL_IMPLICIT`, compiled DDL
too). SQLAlchemy does not see it: its transaction goes on
(the driver begins a new one at the next statement), while the database has committed
or rolled back what the Session wrote so far.

sa_cache cannot tell which of the two the database did in every case (a COMMIT of a
failed PostgreSQL transaction is a rollback), and need not: what was written so far is
invalidated as the statement returns (`ended_by_text`), and the Session's end then
handles its transaction as one whose outcome is unknown — no images written, no old
entries put back (`transaction.Collector.text_ended`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection
from sqlalchemy.sql.ddl import ExecutableDDLElement

from .invalidation import _COMMENTS

if TYPE_CHECKING:
    from .transaction import Collector

_ENDS = re.compile(
    r"(?:^|;)" + _COMMENTS[1:] + r"(?:commit|end|rollback|abort)\b"
    # not ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] x, nor COMMIT / ROLLBACK PREPARED
    # (PostgreSQL's two-phase: another, prepared, transaction)
    r"(?!\s+(?:(?:work|transaction)\s+)?to\b)(?!\s+prepared\b)",
    re.IGNORECASE | re.DOTALL,
)


_MYSQL_IMPLICIT = re.compile(
    r"(?:^|;)" + _COMMENTS[1:] + r"(?:create|alter|drop|rename|truncate|begin"
    r"|start\s+transaction|lock\s+tables?|unlock\s+tables?|grant|revoke|analyze|optimize"
    r"|repair|flush|install|uninstall|set\s+(?:@@(?:session\.)?)?autocommit\s*=\s*(?:1|on))\b",
    re.IGNORECASE | re.DOTALL,
)
"""Statements before which MySQL / MariaDB commit the open transaction on their own
(DDL, ``BEGIN`` / ``START TRANSACTION``, ``LOCK TABLES``, ``SET autocommit = 1``...:
their "implicit commit"; a few, e.g. ``CREATE TEMPORARY TABLE``, do not — taken all the
same: more invalidation, never less)."""


def ends_transaction(conn: Connection, sql: str | None, element: Any = None) -> bool:
    """Does ``sql`` (one statement or several; None: compiled ``element``) end the
    connection's transaction?"""
    if sql is not None and _ENDS.search(sql):
        return True
    if conn.dialect.name not in ("mysql", "mariadb"):
        return False
    if sql is not None:
        return bool(_MYSQL_IMPLICIT.search(sql))
    return isinstance(element, ExecutableDDLElement)  # (compiled DDL: CREATE TABLE ...)


def ended_by_text(conn: Connection, collector: Collector, reads_nothing: bool) -> None:
    """``conn`` ran SQL that ended its database transaction: invalidate what the
    Session wrote so far, and — if that SQL reads nothing itself (``reads_nothing``: a
    COMMIT, a BEGIN) — start counting ``conn``'s statements (and its snapshot) afresh,
    as for a new transaction. SQL that may take the new transaction's snapshot as it
    runs (MariaDB's ``START TRANSACTION WITH CONSISTENT SNAPSHOT``, DDL) stays counted,
    under the clock read before the old one's first statement: older, so safe."""
    collector.text_ended = True
    written, entities = collector.written(), collector.entity_changes()
    if written or entities:
        collector.cache.bump(sorted(written), deletes=list(entities), tombstone=True)
    if not reads_nothing:
        return
    key = id(conn)
    if key in collector.statements:
        collector.statements[key] = 0
    if key in collector.snapshot_clocks:  # the next statement takes a new snapshot
        collector.snapshot_clocks[key] = collector.cache.read_clock()
