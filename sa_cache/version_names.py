"""Version names, pure: ``r<revisions digest>-s<schema digest>`` (or a manual override).

The ``r`` part follows the database's alembic revision(s), the ``s`` part the shape of
the mapped tables (see `versioning`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import sqlalchemy as sa

from .keys import check_version, digest

HASH_CHARS = 10

_VERSION_RE = re.compile(rf"^(r[0-9a-f]{{{HASH_CHARS}}})-(s[0-9a-f]{{{HASH_CHARS}}})$")
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def _type_string(type_: object) -> str:
    """A dialect-independent description of a column type (repr without addresses)."""
    return _ADDRESS_RE.sub("", repr(type_))


def schema_hash(metadata_or_tables: sa.MetaData | Iterable[sa.Table]) -> str:
    """A short stable digest of tables' names, columns, types and primary keys.

    Independent of table order and of the dialect, but not of column order: entity
    entries are positional (one value per column, in declared order), so two codebases
    declaring the same columns in another order must not share a version.
    """
    tables = (
        metadata_or_tables.tables.values()
        if isinstance(metadata_or_tables, sa.MetaData)
        else metadata_or_tables
    )
    lines = []
    for table in tables:
        cols = [
            f"{c.name}:{_type_string(c.type)}:{'pk' if c.primary_key else ''}"
            for c in table.columns
        ]
        lines.append(f"{table.fullname}({','.join(cols)})")
    return digest("\n".join(sorted(lines)))[:HASH_CHARS]


def revision_part(revisions: Iterable[str]) -> str:
    """The database-revision part of a version: ``r`` + digest of the sorted heads."""
    return "r" + digest(",".join(sorted(revisions)))[:HASH_CHARS]


def compute_version(revisions: Iterable[str], schema_hash: str, manual: str | None = None) -> str:
    """The key version: ``manual`` when given, else ``r<revisions>-s<schema hash>``."""
    if manual is not None:
        return check_version(manual)
    return check_version(f"{revision_part(revisions)}-s{schema_hash}")


def split_version(version: str) -> tuple[str, str] | None:
    """``(revision part, schema part)`` of a computed version; None for a manual one."""
    match = _VERSION_RE.match(version)
    return (match.group(1), match.group(2)) if match else None
