"""Which tables a statement reads or writes (pure: no I/O).

Invalidation is by table generation: a commit that wrote a table bumps its
generation, and every cached result that read the table stops matching.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from sqlalchemy import Table
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.util import find_tables

_DML_TEXT = re.compile(
    r"^\s*(?:/\*.*?\*/\s*)*(insert|update|delete|replace|merge|truncate|upsert|alter|drop|create)\b",
    re.IGNORECASE | re.DOTALL,
)
ALL = "*"


def table_name(table: Any) -> str:
    """The generation name of a table: ``schema.name`` or ``name``."""
    schema = getattr(table, "schema", None)
    return f"{schema}.{table.name}" if schema else str(table.name)


def rows_generation(table: str) -> str:
    """The generation entity entries of ``table`` check: bumped by writes whose rows are
    not known one by one (bulk statements, Core DML, text), never by ORM flushes."""
    return f"{table}!rows"


def tables_read(element: ClauseElement) -> frozenset[str]:
    """Every table a (compiled) SELECT reads: joins, aliases, subqueries, secondaries."""
    found = find_tables(
        element, check_columns=True, include_aliases=True, include_joins=True, include_selects=True
    )
    names = set()
    for item in found:
        base = item
        while not isinstance(base, Table) and hasattr(base, "element"):
            base = base.element
        if isinstance(base, Table):
            names.add(table_name(base))
    return frozenset(names)


_dml_tables: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()
"""Tables of DML statement objects seen (immutable; not column elements, whose ``==``
builds an expression, so usable as keys)."""


def tables_written(statement: Any) -> frozenset[str] | None:
    """Tables a DML statement writes; ``ALL`` for DML text; None when it writes nothing."""
    if isinstance(statement, str):
        return frozenset([ALL]) if _DML_TEXT.match(statement) else None
    if getattr(statement, "is_dml", False):
        found = _dml_tables.get(statement)
        if found is None:  # the ORM's flush runs the same statement objects again
            table = getattr(statement, "table", None)
            names = set() if table is None else find_tables(table, include_aliases=True)
            found = frozenset({table_name(t) for t in names} or {ALL})
            _dml_tables[statement] = found
        return found
    if getattr(statement, "is_ddl", False):
        return frozenset([ALL])
    text = getattr(statement, "text", None)
    if isinstance(text, str) and _DML_TEXT.match(text):
        return frozenset([ALL])
    return None
