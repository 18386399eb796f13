"""Actions run right after the DBAPI COMMIT of a checked-out connection.

SQLAlchemy's Connection ``commit`` event runs before the COMMIT, and no event runs
after it. sa_cache wraps the dialect's ``do_commit`` (`_hook_commit`) to run what was
registered for the connection (`after_commit`: invalidations that must follow the
COMMIT, the COMMIT's outcome) once its COMMIT returned or failed. Registered actions
are keyed by the connection's pool proxy (with a weak reference to it: never run for
another proxy at the same address), and those of a COMMIT that never ran are dropped
when the connection begins its next transaction (`_forget_after_commit`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from sqlalchemy.engine import Connection

log = logging.getLogger("sa_cache")

_after_commit: dict[int, tuple[weakref.ref[Any], list[Callable[[BaseException | None], None]]]] = {}
"""Actions to run right after the DBAPI COMMIT of a checked-out connection (by the id of
its pool proxy: what ``Connection.connection`` is, and what the dialect's ``do_commit``
is given)."""


def _hook_commit(dialect: Any) -> None:
    """Make ``dialect.do_commit`` (this engine's dialect instance only, shared with its
    ``execution_options()`` copies) run the actions `after_commit` registered for the
    connection, once its COMMIT returned or failed. SQLAlchemy's Connection ``commit``
    event runs before the COMMIT, and no event runs after it."""
    if getattr(dialect.do_commit, "sa_cache_hook", False):
        return
    plain = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        failed: BaseException | None = None
        try:
            plain(dbapi_connection)
        except BaseException as exc:  # (a failed COMMIT may have been applied all the same)
            failed = exc
            raise
        finally:
            _run_after_commit(dbapi_connection, failed)

    do_commit.sa_cache_hook = True  # type: ignore[attr-defined]
    dialect.do_commit = do_commit
    plain_twophase = dialect.do_commit_twophase

    def do_commit_twophase(connection: Any, *args: Any, **kwargs: Any) -> None:
        failed: BaseException | None = None
        try:
            plain_twophase(connection, *args, **kwargs)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            _run_after_commit(getattr(connection, "_dbapi_connection", None), failed)

    dialect.do_commit_twophase = do_commit_twophase


def _run_after_commit(proxy: Any, failed: BaseException | None) -> None:
    found = _after_commit.pop(id(proxy), None)
    if found is None or found[0]() is not proxy:  # (another proxy at that address)
        return
    for action in found[1]:
        try:
            action(failed)
        except Exception:  # never in the way of the COMMIT's own outcome
            log.exception("sa_cache: an action after a COMMIT failed")


def after_commit(conn: Connection, action: Callable[[BaseException | None], None]) -> bool:
    """Run ``action(failure)`` right after the COMMIT of ``conn``'s transaction, which is
    about to be sent (call from its ``commit`` event): before ``commit()`` returns to the
    application, whatever its outcome (``failure``: what the COMMIT raised, or None).
    False if that cannot be arranged (the caller then does without)."""
    try:
        proxy = conn.connection
    except Exception:  # closed, invalidated
        return False
    _hook_commit(conn.dialect)  # (again if something replaced it since)
    found = _after_commit.get(id(proxy))
    if found is None or found[0]() is not proxy:
        found = _after_commit[id(proxy)] = (weakref.ref(proxy), [])
    found[1].append(action)
    return True


def _forget_after_commit(conn: Connection) -> None:
    """``begin``: actions still registered for the connection are those of a COMMIT
    that never ran (a ``commit`` listener after sa_cache's raised); they would run at
    this transaction's COMMIT, as if it were theirs."""
    if _after_commit:
        with suppress(Exception):  # (closed, invalidated: nothing of it runs again)
            _after_commit.pop(id(conn.connection), None)
