"""Which tables a statement reads or writes (pure: no I/O).

Invalidation is by table generation: a commit that wrote a table bumps its
generation, and every cached result that read the table stops matching.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from sqlalchemy import Table
from sqlalchemy.sql import ClauseElement, TableClause, TextClause, visitors
from sqlalchemy.sql.util import find_tables

_COMMENTS = r"^\s*(?:(?:/\*.*?\*/|(?:--|#)[^\n]*(?:\n|$))\s*)*"  # (# : MySQL's)
_READ_TEXT = re.compile(
    _COMMENTS + r"(?:select|show|values|table|describe|desc|with|explain(?![^;]*\banaly[sz]e\b)"
    r"|set|begin|start\s+transaction|savepoint|release|rollback|commit|lock|listen|xa"
    r"|prepare\s+transaction"
    r"|unlisten|notify|analyze|vacuum)\b",
    re.IGNORECASE | re.DOTALL,
)
"""SQL text known not to change data: reads, transaction control (two-phase too: ``XA
...``, ``PREPARE TRANSACTION``), session settings, statistics. Anything else (DML, DDL,
``CALL``, ``DO``, ``EXECUTE``, ``EXPLAIN ANALYZE``, a second statement after a ``;``)
may."""
_WITH_TEXT = re.compile(_COMMENTS + r"with\b", re.IGNORECASE | re.DOTALL)
# In a WITH statement: a data-modifying part (not FOR UPDATE / FOR NO KEY UPDATE, not
# ON DUPLICATE KEY UPDATE, which only comes with an INSERT anyway).
_DML_WORD = re.compile(
    r"\b(?:insert\s+into|delete\s+from|merge\s+into)\b"
    r"|(?<!for )(?<!key )\bupdate\s+(?!of\b|nowait\b|skip\b)",
    re.IGNORECASE,
)
ALL = "*"


def table_name(table: Any) -> str:
    """How a table is spelled: ``schema.name`` or ``name``. Entity entries are keyed by
    it; the generations a write moves and a read watches are `moved` and `watched`."""
    schema = getattr(table, "schema", None)
    return f"{schema}.{table.name}" if schema else str(table.name)


ANY_SCHEMA = "*."
"""``*.name``: the generation every schema-qualified write of a table ``name`` moves."""


def moved(name: str) -> tuple[str, ...]:
    """The generations a write to the table spelled ``name`` (`table_name`, or its
    `rows_generation`) moves: its own and, for ``schema.name``, ``*.name``, which reads
    of the unqualified ``name`` watch: that may be this very table (in the connection's
    default schema, or on its search path), which only the database knows."""
    if "." not in name or name.startswith(ANY_SCHEMA):
        return (name,)
    return (name, ANY_SCHEMA + name.rpartition(".")[2])


def watched(name: str) -> tuple[str, ...]:
    """The generations a cached read of the table spelled ``name`` is valid under: its
    own and those of the other spelling's writes — the unqualified ``name`` for
    ``schema.name`` (a write spelled so may be of this table), ``*.name`` for ``name``
    (see `moved`). Tables of one name in several schemas keep generations of their own:
    a write to ``a.t`` moves ``a.t`` and ``*.t``, neither of which a read of ``b.t``
    watches."""
    if "." not in name:
        return (name, ANY_SCHEMA + name)
    return (name, name.rpartition(".")[2])


def _moved_by(tables: Any) -> set[str]:
    """`moved` of each of ``tables`` (Table objects)."""
    return {n for t in tables for n in moved(table_name(t))}


def rows_generation(table: str) -> str:
    """The generation entity entries of ``table`` check: bumped by writes whose rows are
    not known one by one (bulk statements, Core DML, text), never by ORM flushes."""
    return f"{table}!rows"


def tables_read(element: ClauseElement) -> frozenset[str]:
    """The generations of every table a (compiled) SELECT reads — joins, aliases,
    subqueries, secondaries — as `watched`."""
    found = find_tables(
        element, check_columns=True, include_aliases=True, include_joins=True, include_selects=True
    )
    names: set[str] = set()
    for item in found:
        base = item
        while not isinstance(base, Table) and hasattr(base, "element"):
            base = base.element
        if isinstance(base, Table):
            names.update(watched(table_name(base)))
    return frozenset(names)


_UNKNOWN = "the tables it reads cannot all be known:"


def opaque_source(element: ClauseElement) -> str | None:
    """Why ``element``'s result cannot be cached, or None: the tables it reads cannot
    all be known (SQL text: a ``text()`` fragment, a ``literal_column()``, a prefix,
    suffix or hint — any SQL, any table; a lightweight ``table()``: no `Table` to
    name), or running it writes (a data-modifying CTE, which a hit would skip).

    Text that reads no table is let through: a ``literal_column()`` that is ``*``, a
    number, a quoted string (``'it''s'``; no backslash, which MySQL reads as an escape)
    or a (dotted) name — a column of the statement's own FROM — and prefixes, suffixes
    and hints made of MySQL's optimizer words, index hints and ``/*+ ... */`` only."""
    from sqlalchemy.sql.expression import ColumnClause
    from sqlalchemy.sql.selectable import HasHints, HasPrefixes, HasSuffixes

    plain = r"\*|[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|'(?:[^'\\]|'')*'"
    plain += r"|[a-z_][\w$]*(?:\.[a-z_][\w$]*)*"
    hints = (
        r"(?:\s*(?:straight_join|sql_(?:no_)?cache|high_priority|sql_(?:small|big|buffer)_result"
        r"|distinct(?:row)?|all|(?:not\s+)?materialized|/\*\+(?:[^*]|\*(?!/))*\*/"
        r"|(?:use|force|ignore)\s+(?:index|key)(?:\s+for\s+(?:join|(?:order|group)\s+by))?"
        r"\s*\([\w$`\", ]*\)))*\s*"
    )
    for node in visitors.iterate(element):
        if isinstance(node, TextClause):
            return f"{_UNKNOWN} it contains a text() fragment ({str(node)[:40]!r})"
        literal = node.name if isinstance(node, ColumnClause) and node.is_literal else None
        if literal is not None and not re.fullmatch(plain, literal.strip(), re.IGNORECASE):
            return f"{_UNKNOWN} it contains SQL text: literal_column({literal[:40]!r})"
        raw = [str(p) for p, _ in node._prefixes] if isinstance(node, HasPrefixes) else []
        raw += [str(p) for p, _ in node._suffixes] if isinstance(node, HasSuffixes) else []
        if isinstance(node, HasHints):
            raw += [*node._hints.values(), *(h for _, h in node._statement_hints)]
        for text in raw:
            if not re.fullmatch(hints, text, re.IGNORECASE):
                return f"{_UNKNOWN} it contains SQL text: a prefix, suffix or hint {text[:40]!r}"
        if isinstance(node, TableClause) and not isinstance(node, Table):
            return f"{_UNKNOWN} it reads table({node.name!r}), which is not a Table"
        if getattr(node, "is_dml", False) and node is not element:
            kind = type(node).__name__.upper()
            return f"it writes: a data-modifying {kind} runs inside it (a hit would skip it)"
    return None


_dml_tables: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()
"""Tables of DML statement objects seen (immutable; not column elements, whose ``==``
builds an expression, so usable as keys)."""


def tables_written(statement: Any) -> frozenset[str] | None:
    """The generations of the tables a DML statement writes (`moved`); ``ALL`` for DML
    text; None when it writes nothing."""
    if isinstance(statement, str):
        return frozenset([ALL]) if _writes_text(statement) else None
    if getattr(statement, "is_dml", False):
        found = _dml_tables.get(statement)
        if found is None:  # the ORM's flush runs the same statement objects again
            table = getattr(statement, "table", None)
            names = [] if table is None else find_tables(table, include_aliases=True)
            names += _set_tables(statement)
            found = frozenset(_moved_by(names) or {ALL})
            _dml_tables[statement] = found
        return found
    if getattr(statement, "is_ddl", False):
        return frozenset([ALL])
    text = getattr(statement, "text", None)
    if isinstance(text, str) and _writes_text(text):
        return frozenset([ALL])
    return None


def translated(names: frozenset[str], schema_map: Any) -> frozenset[str]:
    """The generations (`moved`) of the tables spelled ``names`` (`tables_written`'s) as
    a ``schema_translate_map`` names their schemas — the tables the database wrote —
    that ``names`` lacks. A read naming the real schema watches neither the placeholder's
    spelling nor ``*.name``. (The ``None`` key, or SQLAlchemy's ``"_none"``, maps
    unqualified tables; a lightweight ``table()``, which SQLAlchemy leaves as it is, is
    taken too: one invalidation more.)"""
    out: set[str] = set()
    for name in names:
        if name == ALL or name.startswith(ANY_SCHEMA):
            continue
        schema, _, base = name.rpartition(".")
        key = schema or (None if None in schema_map else "_none")
        if key not in schema_map:
            continue
        target = schema_map[key]
        out.update(moved(f"{target}.{base}" if target else base))
    return frozenset(out.difference(names))


def _set_tables(statement: Any) -> list[Any]:
    """Tables of the columns an UPDATE sets besides its own (MySQL / MariaDB's
    multiple-table ``UPDATE a, b SET b.x = ...``)."""
    values = getattr(statement, "_values", None) or {}
    ordered = getattr(statement, "_ordered_values", None) or ()
    keys = [*values, *(k for k, _ in ordered)]
    return [k.table for k in keys if isinstance(getattr(k, "table", None), TableClause)]


def _writes_text(sql: str) -> bool:
    """May this SQL text modify data (or the schema)? Any table: the caller takes all.
    Only text known to read (`_READ_TEXT`) is not a write; so is a WITH without a
    data-modifying part. More than one statement counts as a write."""
    if _READ_TEXT.match(sql) is None or ";" in sql.strip().rstrip(";"):
        return True
    return bool(_WITH_TEXT.match(sql) and _DML_WORD.search(sql))


_cte_tables: weakref.WeakKeyDictionary[Any, frozenset[str] | None] = weakref.WeakKeyDictionary()


def cte_writes(compiled: Any) -> frozenset[str] | None:
    """Tables the data-modifying CTEs of a compiled SELECT write
    (``select(update(T).returning(...).cte())``), or None; once per compiled statement
    (SQLAlchemy reuses those across executions)."""
    if compiled is None:
        return None
    try:
        return _cte_tables[compiled]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: look every time
        return _find_cte_writes(compiled)
    found = _cte_tables[compiled] = _find_cte_writes(compiled)
    return found


def _find_cte_writes(compiled: Any) -> frozenset[str] | None:
    statement = getattr(compiled, "statement", None)
    if statement is None or getattr(statement, "is_dml", False):
        return None
    names: set[str] = set()
    for node in visitors.iterate(statement):
        if getattr(node, "is_dml", False):
            table = getattr(node, "table", None)
            found = set() if table is None else find_tables(table, include_aliases=True)
            names |= _moved_by(found) or {ALL}
    return frozenset(names) or None


# -- rows the database writes on its own: foreign-key actions -----------------------------

_NO_ACTION = {None, "NO ACTION", "RESTRICT"}
# per statement object: every table its foreign-key actions can reach, and, for an
# UPDATE, per foreign key it can set off: the referenced columns and the tables reached
_FkPlan = tuple[frozenset[str], tuple[tuple[frozenset[str], frozenset[str]], ...]]
_fk_plans: weakref.WeakKeyDictionary[Any, _FkPlan] = weakref.WeakKeyDictionary()


def foreign_key_writes(statement: Any, compiled: Any = None) -> frozenset[str]:
    """Tables whose rows the database changes itself when ``statement`` runs: those
    referencing its table through a foreign key with an ``ON DELETE`` (for a DELETE) or
    ``ON UPDATE`` (for an UPDATE or an upsert) action — CASCADE, SET NULL, SET DEFAULT —
    and, in turn, the tables those changes reach. Found in the table's MetaData (a
    table of another MetaData, or a trigger, is not seen), once per statement object.
    An UPDATE sets off an ``ON UPDATE`` action only if it sets a column the foreign key
    refers to: the columns it sets are read from the statement and from ``compiled``
    (the execution's: the ORM runs one UPDATE object with different SET columns)."""
    if not getattr(statement, "is_dml", False):
        return frozenset()
    try:
        plan = _fk_plans[statement]
    except KeyError:
        plan = _fk_plans[statement] = _fk_plan(statement)
    except TypeError:
        plan = _fk_plan(statement)
    reached, by_key = plan
    if not by_key:
        return reached
    sets = _set_columns(statement, compiled)
    if sets is None:
        return reached
    out: set[str] = set()
    for referred, tables in by_key:
        if not referred.isdisjoint(sets):
            out |= tables
    return frozenset(out)


def _set_columns(statement: Any, compiled: Any) -> set[str] | None:
    """Keys and names of the columns an UPDATE sets (None: not known)."""
    found: set[str] = set()
    values = getattr(statement, "_values", None) or {}
    ordered = getattr(statement, "_ordered_values", None) or ()
    for key in (*values, *(k for k, _ in ordered)):
        if isinstance(key, str):
            found.add(key)
        else:
            found |= {str(getattr(key, "key", None)), str(getattr(key, "name", None))}
    keys = getattr(compiled, "column_keys", None) if compiled is not None else None
    if keys:  # (parameter names: the SET columns', and the WHERE clause's binds)
        found |= set(keys)
    if not found:
        return None
    return found


def _fk_plan(statement: Any) -> _FkPlan:
    table = getattr(statement, "table", None)
    metadata = getattr(table, "metadata", None)
    if not isinstance(table, Table) or metadata is None:
        return frozenset(), ()
    if getattr(statement, "is_delete", False):
        return _reached(metadata, [(table, "delete")]), ()
    if getattr(statement, "_post_values_clause", None) is not None:
        return _reached(metadata, [(table, "update")]), ()  # (an upsert's update: any)
    if not getattr(statement, "is_update", False):
        return frozenset(), ()
    by_key = []
    for child, fk, _ in _actions(metadata, table, "update"):
        referred = frozenset({str(fk.column.key), str(fk.column.name)})
        tables = _moved_by([child]) | _reached(metadata, [(child, "update")])
        by_key.append((referred, frozenset(tables)))
    reached = frozenset().union(*(t for _, t in by_key)) if by_key else frozenset()
    return reached, tuple(by_key)


def _actions(metadata: Any, parent: Any, how: str) -> list[tuple[Any, Any, Any]]:
    """(child table, foreign key, action) of the foreign keys to ``parent`` whose
    ``ON DELETE`` / ``ON UPDATE`` (``how``) does something."""
    out = []
    for child in metadata.tables.values():
        for fk in child.foreign_keys:
            if fk.column.table is not parent:
                continue
            action = (fk.ondelete if how == "delete" else fk.onupdate) or None
            action = action.upper() if isinstance(action, str) else action
            if action not in _NO_ACTION:
                out.append((child, fk, action))
    return out


def _reached(metadata: Any, todo: list[tuple[Any, str]]) -> frozenset[str]:
    """Tables the actions set off by ``todo`` ((table, "delete" or "update")) reach."""
    out: set[str] = set()
    seen: set[tuple[Any, str]] = set()
    while todo:
        parent, how = todo.pop()
        if (parent, how) in seen:
            continue
        seen.add((parent, how))
        for child, _, action in _actions(metadata, parent, how):
            out |= _moved_by([child])
            # a cascaded delete deletes the child's rows; anything else updates them
            deletes = how == "delete" and action == "CASCADE"
            todo.append((child, "delete" if deletes else "update"))
    return frozenset(out)
