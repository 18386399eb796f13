"""Invalidations that wait for the COMMIT of an outer Connection's transaction: what
Sessions joined to it wrote (the "join a Session into an external transaction"
recipe). Their own commit is a SAVEPOINT release or nothing at all; the database's
commit is the Connection's.

One set of listeners per Connection, however many transactions it runs (a job that
loops ``with conn.begin(): ...`` on one Connection would otherwise pile them up).

SQL text run on the Connection may end its transaction behind SQLAlchemy's back (a
``COMMIT`` sent as text, MySQL's implicit commit before DDL: `transaction_text`): what
waits is then invalidated as that statement returns — the COMMIT that SQLAlchemy sends
later, if any, commits a new transaction, and its ROLLBACK (or the Connection's close)
takes nothing back. Only text that is nothing but a ROLLBACK drops it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection

from .commit_hook import after_commit
from .transaction_text import ROLLS_BACK, transaction_end

if TYPE_CHECKING:
    from .cache import Cache

_on_commit: weakref.WeakKeyDictionary[Connection, list[tuple[Cache, set[str], list[str]]]] = (
    weakref.WeakKeyDictionary()
)
"""Per outer Connection: the invalidations waiting for its transaction's COMMIT."""


def invalidate_on_commit(cache: Cache, conn: Connection, tables: set[str], keys: list[str]) -> None:
    """Invalidate ``tables`` and entity ``keys`` when ``conn``'s transaction commits;
    forget them if it rolls back. (One set of listeners per Connection, however many
    transactions it runs.)"""
    pending = _on_commit.get(conn)
    if pending is None:
        pending = _on_commit[conn] = []
        event.listen(conn, "commit", _outer_commit)
        event.listen(conn, "rollback", _outer_rollback)
        event.listen(conn, "commit_twophase", _outer_commit_twophase)
        event.listen(conn, "rollback_twophase", _outer_rollback_twophase)
        event.listen(conn, "after_execute", _outer_execute)
        event.listen(conn, "after_cursor_execute", _outer_cursor_execute)
    pending.append((cache, set(tables), list(keys)))


def _outer_commit(conn: Connection) -> None:
    invalidate = _taken(conn)
    # After the COMMIT: a reader in between would load the old rows and store them
    # under the new generations (this event runs just before it).
    if invalidate is not None and not after_commit(conn, invalidate):
        invalidate(None)


def _taken(conn: Connection, keep: bool = False) -> Callable[[BaseException | None], None] | None:
    """The invalidation of what waits for ``conn``'s COMMIT, taken off it — or, with
    ``keep``, left waiting too (None: none)."""
    pending = _on_commit.get(conn)
    if not pending:
        return None
    by_cache: dict[int, tuple[Cache, set[str], list[str]]] = {}
    for cache, tables, keys in pending:
        _, all_tables, all_keys = by_cache.setdefault(id(cache), (cache, set(), []))
        all_tables |= tables
        all_keys += keys
    if not keep:
        pending.clear()

    def invalidate(failed: BaseException | None = None) -> None:
        for cache, tables, keys in by_cache.values():
            cache.bump(sorted(tables), deletes=keys, tombstone=True)

    return invalidate


def _outer_text(conn: Connection, sql: str | None, element: Any = None) -> None:
    """SQL run on ``conn`` that ended its transaction (`transaction_text`): the database
    committed what waits (or may have), or rolled it back. What waits is invalidated
    now and still waits for the COMMIT: text taken for an end may be none (MariaDB's
    ``CREATE TEMPORARY TABLE`` commits nothing), and a reader in between may have
    stored the rows still committed."""
    end = transaction_end(conn, sql, element)
    if end == ROLLS_BACK:
        # (the entries the joined Sessions' flushes swapped keep their tombstones —
        # their ends wrote no images — so readers load the rows the database kept)
        _outer_rollback(conn)
    elif end is not None:
        outer_ended(conn)


def outer_ended(conn: Connection) -> None:
    """``conn``'s transaction ended, or may have (SQL text, a failed statement before
    which MySQL / MariaDB commit): invalidate what waits for its COMMIT now, and leave
    it waiting (never dropped: the COMMIT, if it comes, invalidates again)."""
    invalidate = _taken(conn, keep=True)
    if invalidate is not None:
        invalidate(None)


def _outer_execute(
    conn: Connection, element: Any, multiparams: Any, params: Any, options: Any, result: Any
) -> None:
    if _on_commit.get(conn):
        text = getattr(element, "text", None)
        _outer_text(conn, text if type(text) is str else None, element)


def _outer_cursor_execute(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    """SQL sent with ``exec_driver_sql`` (compiled SQL: `_outer_execute`)."""
    if context is not None and context.compiled is None and _on_commit.get(conn):
        _outer_text(conn, statement)


def _outer_rollback(conn: Connection) -> None:
    pending = _on_commit.get(conn)
    if pending:
        pending.clear()


def _outer_commit_twophase(conn: Connection, xid: Any, is_prepared: bool) -> None:
    _outer_commit(conn)


def _outer_rollback_twophase(conn: Connection, xid: Any, is_prepared: bool) -> None:
    _outer_rollback(conn)
