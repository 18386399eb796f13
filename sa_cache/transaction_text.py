"""A transaction ended by SQL text: ``COMMIT`` / ``ROLLBACK`` (``END``, ``ABORT``) sent
with ``session.execute(text(...))`` or ``exec_driver_sql`` — e.g. before PostgreSQL's
``CREATE INDEX CONCURRENTLY``. SQLAlchemy does not see it: its transaction goes on
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
from typing import TYPE_CHECKING

from sqlalchemy.engine import Connection

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


def ends_transaction(sql: str) -> bool:
    """Does ``sql`` (one statement or several) end the connection's transaction?"""
    return bool(_ENDS.search(sql))


def ended_by_text(conn: Connection, collector: Collector) -> None:
    """``conn`` ran SQL that ended its database transaction: invalidate what the
    Session wrote so far, and start counting ``conn``'s statements (and its snapshot)
    afresh, as for a new transaction."""
    collector.text_ended = True
    written, entities = collector.written(), collector.entity_changes()
    if written or entities:
        collector.cache.bump(sorted(written), deletes=list(entities), tombstone=True)
    key = id(conn)
    if key in collector.statements:
        collector.statements[key] = 0
    if key in collector.snapshot_clocks:  # the next statement takes a new snapshot
        collector.snapshot_clocks[key] = collector.cache.read_clock()
