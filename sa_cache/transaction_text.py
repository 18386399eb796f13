"""A transaction ended by SQL text: ``COMMIT`` / ``ROLLBACK`` (``END``, ``ABORT``) sent
with ``session.execute(text(...))`` or ``exec_driver_sql`` — e.g. before PostgreSQL's
``CREATE INDEX CONCURRENTLY`` — or by a statement before which MySQL / MariaDB commit
on their own (DDL, ``BEGIN``, ``LOCK TABLES``, ``SET autocommit = 1``...: their
"implicit commit"; compiled DDL too). SQLAlchemy does not see it: its transaction goes
on (the driver begins a new one at the next statement), while the database has
committed or rolled back what the Session wrote so far.

sa_cache cannot tell which of the two the database did in every case (a COMMIT of a
failed PostgreSQL transaction is a rollback), and need not: what was written so far is
invalidated as the statement returns (`ended_by_text`), and the Session's end then
handles its transaction as one whose outcome is unknown — no images written, no old
entries put back (`transaction.Collector.text_ended`).

The text is read statement by statement, without its comments and with its literals
kept whole (`split_statements`): a comment inside ``ROLLBACK /* c */ TO SAVEPOINT``
changes nothing, ``SELECT ';COMMIT'`` and a PostgreSQL ``DO $$ ... $$`` body end
nothing. Taking a statement for an end that is none costs invalidation only — except
that an end restarts the count of the connection's statements (its next one takes the
new transaction's snapshot): that is done only for text that is certainly nothing but
a transaction end (`RESTARTS`, `ROLLS_BACK`).

SQLite's default driver (pysqlite) sends no BEGIN before a SAVEPOINT: one that is the
transaction's first statement starts it, and its RELEASE commits it, while SQLAlchemy's
transaction goes on (`committed_by_release`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.engine import Connection
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.elements import ReleaseSavepointClause

if TYPE_CHECKING:
    from .transaction import Collector

End = Literal["ends", "restarts", "rolls_back"] | None
"""What SQL did to its connection's transaction: None (nothing), ``"ends"`` (ended it,
or may have: committed or rolled back), ``"restarts"`` (nothing but a COMMIT / ROLLBACK /
BEGIN: the next statement takes the new transaction's snapshot), ``"rolls_back"`` (nothing
but a ROLLBACK, and so also restarts)."""
ENDS: End = "ends"
RESTARTS: End = "restarts"
ROLLS_BACK: End = "rolls_back"

_MYSQL = ("mysql", "mariadb")

_ENDS = re.compile(
    r"\s*(?:commit|end|rollback|abort)\b"
    # not ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] x, nor COMMIT / ROLLBACK PREPARED
    # (PostgreSQL's two-phase: another, prepared, transaction)
    r"(?!\s+(?:(?:work|transaction)\s+)?to\b)(?!\s+prepared\b)",
    re.IGNORECASE,
)
_CHAIN = r"(?:\s+and\s+(?:no\s+)?chain)?"
_RESTARTS = re.compile(
    r"\s*(?:commit|end|rollback|abort)(?:\s+(?:work|transaction))?" + _CHAIN + r"\s*$",
    re.IGNORECASE,
)
_ROLLS_BACK = re.compile(
    r"\s*(?:rollback|abort)(?:\s+(?:work|transaction))?" + _CHAIN
    + r"(?:\s+(?:no\s+)?release)?\s*$",
    re.IGNORECASE,
)  # fmt: skip

_MYSQL_ENDS = re.compile(
    r"\s*(?:(?:commit|rollback)\b(?!\s+(?:work\s+)?to\b)"
    r"|(?:create|alter|drop|rename|truncate|grant|revoke|analyze|optimize|repair|flush"
    r"|install|uninstall|shutdown)\b"
    r"|begin\b(?!\s+not\s+atomic\b)|(?:lock|unlock)\s+tables?\b|check\s+tables?\b"
    r"|start\s+(?:transaction|slave|replica|all\s+slaves)\b"
    r"|stop\s+(?:slave|replica|all\s+slaves)\b|change\s+(?:master|replication)\b"
    r"|cache\s+index\b|load\s+index\b|reset\b(?!\s+persist\b)|set\s+password\b"
    r"|execute\b)",  # (EXECUTE [IMMEDIATE]: runs SQL not seen here, e.g. DDL)
    re.IGNORECASE,
)
"""Statements before which MySQL / MariaDB commit the open transaction on their own
(their "implicit commit"; a few, e.g. ``CREATE TEMPORARY TABLE``, do not — taken all the
same: more invalidation, never less). Not ``END`` (MySQL's ends a compound statement,
``BEGIN NOT ATOMIC ... END``, which commits nothing), nor ``SET autocommit``
(`_MYSQL_AUTOCOMMIT_ON`)."""
_MYSQL_AUTOCOMMIT_ON = re.compile(
    r"\s*set\b(?:.*,)?\s*(?:(?:session|local)\s+|@@(?:session\.|local\.)?)?`?autocommit`?\s*:?="
    r"(?!\s*(?:0+|off|false|'(?:0|off|false)'|\"(?:0|off|false)\")\s*(?:,|$))",
    re.IGNORECASE | re.DOTALL,
)
"""``SET autocommit = 1`` in any spelling (``SET SESSION autocommit = TRUE``, ``SET
@@local.autocommit = 'ON'``, ``SET @x = 1, autocommit = 1``...): any value but an "off"
one commits (an expression, a variable: it may be on)."""
_MYSQL_RESTARTS = re.compile(
    r"\s*(?:(?:commit|rollback)(?:\s+work)?" + _CHAIN + r"(?:\s+(?:no\s+)?release)?"
    r"|begin(?:\s+work)?|start\s+transaction(?:\s+read\s+(?:only|write)"
    r"(?:\s*,\s*read\s+(?:only|write))*)?)\s*$",
    re.IGNORECASE,
)
"""(not ``START TRANSACTION WITH CONSISTENT SNAPSHOT``, nor DDL: they may take the new
transaction's snapshot as they run, and so stay counted)"""


def transaction_end(conn: Connection, sql: str | None, element: Any = None) -> End:
    """What ``sql`` (one statement or several; None: compiled ``element``) does to the
    connection's transaction."""
    name = conn.dialect.name
    if name == "sqlite" and committed_by_release(conn, sql, element):
        return ENDS
    if sql is None:
        return ENDS if name in _MYSQL and isinstance(element, ExecutableDDLElement) else None
    if "--" not in sql and "/*" not in sql and "#" not in sql:
        semicolons = sql.count(";")  # (the usual case: one statement, no comments)
        if semicolons == 0 or (semicolons == 1 and sql.rstrip().endswith(";")):
            return _end_of([sql.rstrip().rstrip(";")], name)
    if "\\" in sql and name in ("postgresql", *_MYSQL):
        # a backslash in a literal may escape its quote or not (MySQL's
        # NO_BACKSLASH_ESCAPES, PostgreSQL's standard_conforming_strings): read both ways
        one = _end_of(split_statements(sql, name, backslash=True), name)
        other = _end_of(split_statements(sql, name, backslash=False), name)
        return one if one == other else (ENDS if one or other else None)
    return _end_of(split_statements(sql, name), name)


_RELEASE = re.compile(r"\s*release\b", re.IGNORECASE)


def committed_by_release(conn: Connection, sql: str | None, element: Any = None) -> bool:
    """Did this RELEASE SAVEPOINT commit SQLite's transaction? It does when the
    SAVEPOINT started it (pysqlite begins one only before DML, not before a SAVEPOINT:
    ``begin_nested()`` as a Session's first statement), and the driver then says it is
    in no transaction; SQLAlchemy's later rollback takes nothing back."""
    if not isinstance(element, ReleaseSavepointClause) and not (
        sql and "release" in sql.lower()
        and any(_RELEASE.match(s) for s in split_statements(sql, "sqlite"))
    ):  # fmt: skip
        return False
    try:
        dbapi = conn.connection.dbapi_connection
    except Exception:  # closed, invalidated: nothing to tell
        return False
    return getattr(dbapi, "in_transaction", None) is False


_SET_STATEMENT = re.compile(r"\s*set\s+statement\b.*?\bfor\b", re.IGNORECASE | re.DOTALL)
"""MariaDB's ``SET STATEMENT var = value [, ...] FOR <statement>``: what it runs is the
statement after FOR (``SET STATEMENT lock_wait_timeout = 5 FOR ALTER TABLE ...``)."""


def _end_of(statements: list[str], name: str) -> End:
    mysql = name in _MYSQL
    if mysql:
        statements = [_SET_STATEMENT.sub("", s, count=1) for s in statements]
    ends = _MYSQL_ENDS if mysql else _ENDS
    found = [s for s in statements if s and not s.isspace()]
    if not any(ends.match(s) or (mysql and _MYSQL_AUTOCOMMIT_ON.match(s)) for s in found):
        return None
    if len(found) != 1:
        return ENDS  # (what ran after the end may have taken the new snapshot)
    if _ROLLS_BACK.match(found[0]):
        return ROLLS_BACK
    return RESTARTS if (_MYSQL_RESTARTS if mysql else _RESTARTS).match(found[0]) else ENDS


_TOKENS = {
    "postgresql": re.compile(r"--|/\*|'|\"|\$|;"),
    "mysql": re.compile(r"--(?=[\x00-\x20]|$)|#|/\*|'|\"|`|;"),
    "sqlite": re.compile(r"--|/\*|'|\"|`|\[|;"),
    "": re.compile(r"--|/\*|'|\"|;"),
}
_MYSQL_RUN = re.compile(r"--(?=[\x00-\x20]|$)|#|/\*|\*/|'|\"|`|;")
"""(inside MySQL's executable comment ``/*! ... */``: its end too)"""
_NESTED = re.compile(r"/\*|\*/")
_EXECUTABLE = re.compile(r"/\*M?!\d*")
_DOLLAR = re.compile(r"\$([A-Za-z_\x80-\uffff][\w\x80-\uffff]*)?\$")
_LINE_END = re.compile(r"[\r\n]")  # (PostgreSQL's line comments end at either)
_LINE_END_LF = re.compile(r"\n")  # (MySQL / MariaDB's and SQLite's: at \n only)


def split_statements(sql: str, dialect: str, backslash: bool | None = None) -> list[str]:
    """The statements of ``sql`` as the database reads them: comments taken out
    (replaced by a space), quoted literals and identifiers kept whole, split at the
    semicolons outside them. ``backslash``: does ``\\`` escape a quote in a string
    literal (None: as by default — yes on MySQL / MariaDB, no elsewhere; PostgreSQL's
    ``E'...'`` always; `transaction_end` reads text with a backslash both ways). A line
    comment ends at the first line break (see below); an unterminated comment or
    literal runs to the end (the database refuses such text)."""
    # (a line comment ends at the first line break: a \r too on PostgreSQL only)
    mysql = dialect in _MYSQL
    pg = dialect == "postgresql"
    escapes = mysql if backslash is None else backslash
    tokens = _TOKENS["mysql" if mysql else dialect if dialect in _TOKENS else ""]
    statements: list[str] = []
    parts: list[str] = []
    pos, size, running = 0, len(sql), False  # ``running``: in MySQL's ``/*! ... */``
    while pos < size:
        found = (_MYSQL_RUN if running else tokens).search(sql, pos)
        if found is None:
            break
        start, token = found.start(), found.group()
        parts.append(sql[pos:start])
        if token == ";":
            statements.append("".join(parts))
            parts, pos = [], start + 1
            continue
        if token in ("'", '"', "`", "["):
            quoted = escapes and (token == "'" or (mysql and token == '"'))
            if pg and token == "'" and not quoted:
                quoted = _e_string(sql, start)
            pos = _quote_end(sql, start + 1, "]" if token == "[" else token, quoted)
            parts.append(sql[start:pos])
            continue
        if token == "$":  # (postgresql) a dollar-quoted literal, or a parameter
            pos = _dollar_end(sql, start)
            parts.append(sql[start:pos])
            continue
        parts.append(" ")  # a comment
        if token == "*/":  # (mysql) the end of an executable comment
            pos, running = start + 2, False
        elif token in ("--", "#"):
            line_end = (_LINE_END if pg else _LINE_END_LF).search(sql, start)
            pos = size if line_end is None else line_end.end()
        elif mysql and (executable := _EXECUTABLE.match(sql, start)):
            pos, running = executable.end(), True  # MySQL / MariaDB run what it holds
        else:
            pos = _comment_end(sql, start, nested=pg)
    parts.append(sql[pos:])
    statements.append("".join(parts))
    return statements


def _comment_end(sql: str, start: int, nested: bool) -> int:
    """The end of the ``/* */`` comment at ``start`` (PostgreSQL's nest)."""
    if not nested:
        end = sql.find("*/", start + 2)
        return len(sql) if end < 0 else end + 2
    depth = 0
    for mark in _NESTED.finditer(sql, start):
        depth += 1 if mark.group() == "/*" else -1
        if depth == 0:
            return mark.end()
    return len(sql)


def _quote_end(sql: str, pos: int, quote: str, escapes: bool) -> int:
    """The end of the literal whose text starts at ``pos``: its closing ``quote`` (a
    doubled one, or one after a backslash if ``escapes``, is part of it)."""
    size = len(sql)
    while True:
        end = sql.find(quote, pos)
        if escapes:
            slash = sql.find("\\", pos, size if end < 0 else end)
            if slash >= 0:
                pos = slash + 2
                continue
        if end < 0:
            return size
        if quote != "]" and sql.startswith(quote, end + 1):
            pos = end + 2
            continue
        return end + 1


def _e_string(sql: str, quote_at: int) -> bool:
    """PostgreSQL's ``E'...'``: backslash escapes whatever the settings."""
    before = sql[quote_at - 1 : quote_at] if quote_at else ""
    if before not in ("e", "E"):
        return False
    return quote_at < 2 or not (sql[quote_at - 2].isalnum() or sql[quote_at - 2] in "_$")


def _dollar_end(sql: str, start: int) -> int:
    """The end of PostgreSQL's ``$tag$ ... $tag$`` at ``start`` (past the ``$`` if
    there is none: a parameter, or part of an identifier)."""
    if start and (sql[start - 1].isalnum() or sql[start - 1] in "_$"):
        return start + 1
    opening = _DOLLAR.match(sql, start)
    if opening is None:
        return start + 1
    end = sql.find(opening.group(), opening.end())
    return len(sql) if end < 0 else end + len(opening.group())


AUTOCOMMIT_SET = "sa_cache.autocommit_set"
"""``Connection.info`` key: SQL text turned autocommit on (MySQL / MariaDB's ``SET
autocommit = 1``): ask the driver whether it still is (`statements.autocommits`)."""


def driver_autocommits(conn: Connection) -> bool:
    """Does ``conn``'s DBAPI connection commit each statement as it runs, as its driver
    tells (False if it cannot)?"""
    detect = getattr(conn.dialect, "detect_autocommit_setting", None)
    if detect is None:
        return False
    try:
        dbapi = conn.connection.dbapi_connection
        if not detect(dbapi):
            return False
    except Exception:  # a driver that cannot tell: as without autocommit
        return False
    # pysqlite's SAVEPOINT recipe: no implicit transactions (``isolation_level = None``),
    # and a BEGIN sent at each SQLAlchemy begin. While that transaction is open (the
    # driver says so), statements are not committed as they run.
    return not (conn.dialect.name == "sqlite" and getattr(dbapi, "in_transaction", False))


def ended_by_text(conn: Connection, collector: Collector, end: End) -> None:
    """``conn`` ran SQL that ended (``end``) its database transaction: invalidate what the
    Session wrote so far, and — if that SQL was nothing but a transaction end
    (`RESTARTS`, `ROLLS_BACK`) — start counting ``conn``'s statements (and its snapshot)
    afresh, as for a new transaction. SQL that may take the new transaction's snapshot as
    it runs (MariaDB's ``START TRANSACTION WITH CONSISTENT SNAPSHOT``, DDL, a SELECT after
    the COMMIT) stays counted, under the clock read before the old one's first statement:
    older, so safe. After MySQL's ``SET autocommit = 1`` (or a text end on SQLite under
    pysqlite's SAVEPOINT recipe, which begins no transaction until its next BEGIN) every
    later statement is committed as it runs: the Session's later flushes are
    invalidated as they run."""
    collector.text_ended = True
    written, entities = collector.written(), collector.entity_changes()
    if written or entities:
        collector.cache.bump(sorted(written), deletes=list(entities), tombstone=True)
    if conn.dialect.name in (*_MYSQL, "sqlite") and driver_autocommits(conn):
        conn.info[AUTOCOMMIT_SET] = True
        collector.autocommit = True
    if end == ENDS:
        return
    key = id(conn)
    if key in collector.statements:
        collector.statements[key] = 0
    if key in collector.snapshot_clocks:  # the next statement takes a new snapshot
        collector.snapshot_clocks[key] = collector.cache.read_clock()
