"""Invalidations that wait for the COMMIT of an outer Connection's transaction: what
Sessions joined to it wrote (the "join a Session into an external transaction"
recipe). Their own commit is a SAVEPOINT release or nothing at all; the database's
commit is the Connection's.

One set of listeners per Connection, however many transactions it runs (a job that
loops ``with conn.begin(): ...`` on one Connection would otherwise pile them up).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection

from .statements import after_commit

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
    pending.append((cache, set(tables), list(keys)))


def _outer_commit(conn: Connection) -> None:
    pending = _on_commit.get(conn)
    if not pending:
        return
    by_cache: dict[int, tuple[Cache, set[str], list[str]]] = {}
    for cache, tables, keys in pending:
        _, all_tables, all_keys = by_cache.setdefault(id(cache), (cache, set(), []))
        all_tables |= tables
        all_keys += keys
    pending.clear()

    def invalidate(failed: BaseException | None = None) -> None:
        for cache, tables, keys in by_cache.values():
            cache.bump(sorted(tables), deletes=keys, tombstone=True)

    # After the COMMIT: a reader in between would load the old rows and store them
    # under the new generations (this event runs just before it).
    if not after_commit(conn, invalidate):
        invalidate()


def _outer_rollback(conn: Connection) -> None:
    pending = _on_commit.get(conn)
    if pending:
        pending.clear()


def _outer_commit_twophase(conn: Connection, xid: Any, is_prepared: bool) -> None:
    _outer_commit(conn)


def _outer_rollback_twophase(conn: Connection, xid: Any, is_prepared: bool) -> None:
    _outer_rollback(conn)
