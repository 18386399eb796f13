"""The raw-row capture of a query-cache miss and the replay of stored rows: a miss's
rows are taken from the driver's cursor as the ORM path runs (`Capture`, given the
rows by the engine listener in `statements`), and a hit's stored rows are handed to
the ORM's loading as a CursorResult with the metadata of an earlier execution
(`replay`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.engine.cursor import FullyBufferedCursorFetchStrategy

from .detach import MUTABLE, detached
from .statements import snapshot_is_fresh
from .tokens import older_than
from .transaction import Collector


def detached_rows(rows: Iterable[Sequence[Any]]) -> tuple[list[list[Any]], bool]:
    """Lists of the values of ``rows`` (lists pack without a tuple marker), each mutable
    container among them copied (deeply), and whether there was one. A driver's JSON or
    ARRAY value is the very object a loaded instance holds, which the application may
    change in place (and roll back) before a fill is encoded in the background."""
    out = [list(r) for r in rows]
    if MUTABLE.isdisjoint(map(type, chain.from_iterable(out))):
        return out, False  # the usual row: nothing to copy
    return [[detached(v) if type(v) in MUTABLE else v for v in row] for row in out], True


class Capture:
    """Receives the raw rows of a miss from the engine listener: a copy of its own,
    which nothing changes (`detached_rows`), encoded later."""

    __slots__ = ("fill_ok", "mutable", "rows", "snapshot_clock", "template")

    def __init__(self) -> None:
        self.rows: list[list[Any]] | None = None
        self.mutable = False  # the rows hold containers: give others copies of them
        self.template: CursorResult[Any] | None = None
        self.fill_ok = False
        self.snapshot_clock: int | None = None

    def fill_allowed(self, gens: tuple[str, ...]) -> bool:
        """May rows read by this statement be stored under ``gens``? (see `snapshot_is_fresh`)"""
        return self.fill_ok or older_than(gens, self.snapshot_clock)

    def capture(self, conn: Connection, result: Any, collector: Collector | None) -> None:
        if self.rows is not None:
            return
        # What the driver says before the rows are fetched (psycopg says -1 after).
        result.__dict__["rowcount"] = _driver_rowcount(result)
        rows = result.cursor_strategy.fetchall(result, result.cursor)
        result.cursor_strategy = FullyBufferedCursorFetchStrategy(
            result.cursor, None, initial_buffer=rows
        )
        self.rows, self.mutable = detached_rows(rows)
        self.template = result
        if collector is None or snapshot_is_fresh(conn):
            self.fill_ok = True
        else:
            self.fill_ok = collector.statements.get(id(conn), 0) <= 1
            self.snapshot_clock = collector.snapshot_clocks.get(id(conn))


class _NullCursor:
    def close(self) -> None:
        pass


_NULL_CURSOR = _NullCursor()


def _driver_rowcount(result: Any) -> int:
    """The ``rowcount`` the driver gives this SELECT's cursor (-1: it gives none)."""
    try:
        count = result.context.rowcount
    except Exception:  # a driver that cannot say: as SQLAlchemy reports it, "unknown"
        return -1
    return count if isinstance(count, int) else -1


def replay(
    template: CursorResult[Any], rows: list[Any], statement: Any = None
) -> CursorResult[Any]:
    """A CursorResult over cached raw rows, with the metadata of an earlier execution
    (``template``), adapted to ``statement`` when given (a Core select, whose rows are
    looked up by its own column objects: see `adapted_metadata`). Its ``rowcount`` is
    the number of rows, where the driver reports one for a SELECT (as the template's
    did); -1 where it does not (SQLite)."""
    result: CursorResult[Any] = CursorResult.__new__(CursorResult)
    result.context = template.context
    result.dialect = template.dialect
    result.connection = template.connection
    result._echo = False
    if statement is None:
        result._metadata = template._metadata
    else:
        result._metadata = adapted_metadata(template, statement)
    result.cursor = _NULL_CURSOR  # type: ignore[assignment]
    result.cursor_strategy = FullyBufferedCursorFetchStrategy(None, None, initial_buffer=rows)
    result.__dict__["rowcount"] = len(rows) if template.rowcount >= 0 else -1
    return result


_last_adapted: tuple[Any, Any, Any] = (None, None, None)
"""The last statement object adapted to, the metadata adapted, and the result: a
statement object executed again and again is adapted once (a weak dictionary of them
costs more than adapting)."""


class _Invoked:
    """What ``CursorResultMetaData._adapt_to_context`` reads of an execution context."""

    __slots__ = ("compiled", "invoked_statement")

    def __init__(self, compiled: Any, statement: Any) -> None:
        self.compiled, self.invoked_statement = compiled, statement


def adapted_metadata(template: CursorResult[Any], statement: Any) -> Any:
    """``template``'s result metadata, keyed by ``statement``'s column objects as well,
    as SQLAlchemy adapts it when another statement object with the same cache key
    reuses a compiled statement (``row._mapping[subquery.c.x]``)."""
    global _last_adapted  # noqa: PLW0603 (one tuple, replaced whole)
    metadata: Any = template._metadata
    compiled = template.context.compiled
    if compiled is None or compiled.statement is statement:
        return metadata
    last_statement, last_metadata, adapted = _last_adapted
    if last_statement is statement and last_metadata is metadata:
        return adapted
    adapted = metadata._adapt_to_context(_Invoked(compiled, statement))
    _last_adapted = (statement, metadata, adapted)
    return adapted
