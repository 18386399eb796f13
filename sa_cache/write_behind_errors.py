"""How the write-behind worker tells a batch's failures apart: a failure of the
database rather than of the rows (`is_transient`: a lost connection, lock contention,
a database that does not answer), and a foreign-key violation (`is_foreign_key_violation`:
the row it refers to may sit in another partition, applied later). Used by
`write_behind_batches`.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

# Lock wait timeouts, deadlocks, serialization failures: another transaction was in
# the way, the rows are fine. PostgreSQL SQLSTATEs; MySQL / MariaDB error numbers;
# SQLite's busy / locked messages.
_CONTENTION_SQLSTATES = frozenset({"40P01", "40001", "55P03"})
_CONTENTION_MYSQL = frozenset({1205, 1213})
_CONTENTION_SQLITE = ("database is locked", "database table is locked", "database is busy")


def is_contention(exc: BaseException) -> bool:
    """A lock wait timeout, deadlock or serialization failure (retry: not the rows)."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _CONTENTION_SQLSTATES:
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _CONTENTION_MYSQL:
        return True
    text = str(orig).lower()
    return type(orig).__module__.startswith("sqlite3") and any(
        m in text for m in _CONTENTION_SQLITE
    )


# A row refers to one the database does not have (yet), or a deleted row is still
# referred to: PostgreSQL SQLSTATE; MySQL / MariaDB error numbers (1216 / 1217: older
# servers); SQLite's message and extended code (SQLITE_CONSTRAINT_FOREIGNKEY).
_FOREIGN_KEY_SQLSTATES = frozenset({"23503"})
_FOREIGN_KEY_MYSQL = frozenset({1216, 1217, 1451, 1452})
_FOREIGN_KEY_SQLITE = 787


def is_foreign_key_violation(exc: BaseException) -> bool:
    """A foreign-key violation: the row it refers to (or that refers to it) may be a
    write-behind row of another partition, applied later (`Batches._failed` waits)."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _FOREIGN_KEY_SQLSTATES:
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _FOREIGN_KEY_MYSQL:
        return True
    if not type(orig).__module__.startswith("sqlite3"):
        return False
    code = getattr(orig, "sqlite_errorcode", None)
    return code == _FOREIGN_KEY_SQLITE or "foreign key constraint failed" in str(orig).lower()


def is_transient(engine: Engine, exc: BaseException) -> bool:
    """A failure of the database rather than of these rows: lost connection, lock
    contention (`is_contention`), or the database does not answer a trivial query now
    (counted against no key)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sa.exc.DisconnectionError) or is_contention(exc):
        return True
    try:
        with engine.connect() as conn:
            conn.execute(sa.select(1))
    except sa.exc.SQLAlchemyError:
        return True
    return False
