"""Which column values a database gives back exactly as they were written.

Write-through caches a flushed object's own values as the row's image. The database
may store something else: a ``Numeric(10, 2)`` rounds ``Decimal("1.005")``, MariaDB's
``DATETIME`` drops microseconds, ``FLOAT`` there is single precision, an ``Integer``
column given ``"7"`` gives back ``7``, JSON turns tuples into lists and int keys into
strings, a ``TypeDecorator`` may change any value on its way in. A row whose image
holds such a value is invalidated instead of written through (the next read loads it).

`exact_checks` makes, once per column list and dialect, the test of one image: what
each value must be for the row to come back as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator, TypeEngine

from .entity_json_checks import json_exact, jsonb_exact

Check = Callable[[Any], bool]
NEVER: Check = lambda value: value is None  # noqa: E731  (only NULL is known to round-trip)

_SINGLE_FLOAT_BITS = 24
"""Float precisions (binary digits) up to this are single precision on every database."""


def exact_checks(columns: Sequence[Any], dialect_name: str) -> list[tuple[int, Check]]:
    """``(position, check)`` of each column: a value ``v`` of that column comes back from
    the database as it is when ``v is None or check(v)``."""
    return [
        (position, _check_for(_resolved(getattr(column, "type", None), dialect_name), dialect_name))
        for position, column in enumerate(columns)
    ]


ByKey = dict[str, tuple[int, Check]]
KeyChecks = tuple[tuple[int, Check], ...]
_by_spec: dict[tuple[int, str], tuple[Any, ByKey, KeyChecks, int]] = {}

AS_GIVEN = 0
"""`key_spelling_of`: the database stores and compares the primary key as it is given,
so an object's identity is the row's key as readers key it (once `key_checks_of` passed)."""
EQUAL_SPELLINGS = 1
"""... it stores the key as given, but finds other spellings equal (a case-insensitive or
``PAD SPACE`` collation: ``'de'`` and ``'DE '`` find the row ``'DE'``)."""
STORED_OTHERWISE = 2
"""... and it may also store another value than the one given (a TypeDecorator's bind
processing, a string UUID: the database's spelling is what a load gives back)."""


def checks_of(spec: Any, dialect_name: str) -> ByKey:
    """`exact_checks` of an `entity.EntitySpec`'s columns, by attribute key (made once
    per spec and dialect)."""
    return _made(spec, dialect_name)[1]


def key_checks_of(spec: Any, dialect_name: str) -> KeyChecks:
    """``(index in the primary key, check)`` of each primary-key column of an
    `entity.EntitySpec` whose type has a check of its own (not `NEVER`). A value that
    passes has the type readers' keys have; whether it is also the row's spelling is
    `key_spelling_of`'s question."""
    return _made(spec, dialect_name)[2]


def key_spelling_of(spec: Any, dialect_name: str) -> int:
    """How far an object's primary key may be spelled otherwise than its row's (the
    most of its columns): `AS_GIVEN`, `EQUAL_SPELLINGS` or `STORED_OTHERWISE`."""
    return _made(spec, dialect_name)[3]


def write_checks_of(spec: Any, dialect_name: str) -> tuple[Any, ByKey, KeyChecks, int]:
    """(spec, `checks_of`, `key_checks_of`, `key_spelling_of`) in one call."""
    return _made(spec, dialect_name)


def _made(spec: Any, dialect_name: str) -> tuple[Any, ByKey, KeyChecks, int]:
    found = _by_spec.get((id(spec), dialect_name))
    if found is not None and found[0] is spec:
        return found
    checks = exact_checks(spec.columns, dialect_name)
    by_key = {spec.attr_keys[position]: (position, check) for position, check in checks}
    key_checks = tuple(
        (index, checks[position][1])
        for index, position in enumerate(spec.pk_positions)
        if checks[position][1] is not NEVER
    )
    spelling = max(
        (
            STORED_OTHERWISE
            if checks[position][1] is NEVER
            else _key_spelling(spec.columns[position], dialect_name)
            for position in spec.pk_positions
        ),
        default=AS_GIVEN,
    )
    made = _by_spec[(id(spec), dialect_name)] = (spec, by_key, key_checks, spelling)
    return made


_EXACT_COLLATIONS = {
    "sqlite": frozenset({"binary"}),
    "postgresql": frozenset({"c", "posix", "ucs_basic", "default", "pg_c_utf8"}),
}
"""Collations known to find two strings equal only when they are the same (MySQL and
MariaDB: see `_key_spelling`)."""


def _key_spelling(column: Any, dialect: str) -> int:
    """`key_spelling_of` of one primary-key column whose type has a check: a string
    compared under a collation that finds other spellings equal is `EQUAL_SPELLINGS`.
    On MySQL / MariaDB that is every collation but the binary ``NO PAD`` ones (the
    defaults are case-insensitive, and ``_bin`` ones still ``PAD SPACE``); elsewhere a
    collation the column names unless it is known to be exact (SQLite's ``NOCASE`` and
    ``RTRIM`` are not, nor are PostgreSQL's nondeterministic ones)."""
    kind = _resolved(getattr(column, "type", None), dialect)
    if not isinstance(kind, sa.String) or isinstance(kind, sa.Enum):
        return AS_GIVEN  # (an Enum's check admits its members only)
    collation = (kind.collation or "").lower()
    if dialect in ("mysql", "mariadb"):
        exact = collation == "binary" or collation.endswith(("_nopad_bin", "_0900_bin"))
        return AS_GIVEN if exact else EQUAL_SPELLINGS
    if not collation or collation in _EXACT_COLLATIONS.get(dialect, ()):
        return AS_GIVEN
    return EQUAL_SPELLINGS


def changes_are_exact(
    image: Sequence[Any], keys: Iterable[str], checks: dict[str, tuple[int, Check]]
) -> bool:
    """Do the values of attributes ``keys`` in ``image`` come back as they are? (An
    update's other values were loaded from the database, or from an entry that holds
    what it gave.)"""
    for key in keys:
        found = checks.get(key)
        if found is not None:
            value = image[found[0]]
            if value is not None and not found[1](value):
                return False
    return True


def image_is_exact(image: Sequence[Any], checks: list[tuple[int, Check]]) -> bool:
    """Does every value of ``image`` come back from the database as it is?"""
    for position, check in checks:
        value = image[position]
        if value is not None and not check(value):
            return False
    return True


_STRICT = "sa_cache.strict_mode"
"""``Connection.info`` key: `strict_mode` of the DBAPI connection."""


def strict_mode(conn: Any) -> bool:
    """Does the database of ``conn`` (a Connection) refuse values it cannot store, as the
    checks assume? MySQL / MariaDB without ``STRICT_TRANS_TABLES`` or
    ``STRICT_ALL_TABLES`` in its ``sql_mode`` truncate a too long string and clamp an
    out-of-range number with only a warning: an image is then not what the row holds.
    Read once per DBAPI connection (kept in its ``info``, which a reconnect clears): a
    ``SET sql_mode`` sent on it later is not seen. True on other databases."""
    if not isinstance(conn, sa.Connection) or conn.dialect.name not in ("mysql", "mariadb"):
        return True
    info = conn.info
    found = info.get(_STRICT)
    if found is None:
        dbapi = conn.connection.dbapi_connection
        if dbapi is None:  # (detached: nothing to ask)
            return True
        cursor = dbapi.cursor()  # (no statement events)
        try:
            cursor.execute("SELECT @@SESSION.sql_mode")
            row = cursor.fetchone()
        finally:
            cursor.close()
        mode = row[0] if row else ""
        if isinstance(mode, bytes):
            mode = mode.decode()
        found = info[_STRICT] = "STRICT_TRANS_TABLES" in mode or "STRICT_ALL_TABLES" in mode
    return bool(found)


def _resolved(kind: TypeEngine[Any] | None, dialect_name: str) -> TypeEngine[Any] | None:
    if kind is None:
        return None
    variants = getattr(kind, "_variant_mapping", None)
    if variants and dialect_name in variants:
        return variants[dialect_name]  # type: ignore[no-any-return]
    return kind


def _check_for(kind: TypeEngine[Any] | None, dialect: str) -> Check:
    """The check of one column type on ``dialect``."""
    if isinstance(kind, sa.Interval):  # a TypeDecorator, native on PostgreSQL
        if not (dialect == "postgresql" and kind.native):
            return NEVER
        fraction = _divisor(kind.second_precision)  # INTERVAL(p) rounds to p digits
        return lambda v: type(v) is timedelta and v.microseconds % fraction == 0
    if kind is None or isinstance(kind, TypeDecorator):
        return NEVER  # a TypeDecorator may change any value on its way in
    if isinstance(kind, sa.Boolean):
        return lambda v: type(v) is bool
    if isinstance(kind, sa.Integer):
        return lambda v: type(v) is int
    if isinstance(kind, sa.Enum):
        return _enum_check(kind)
    if isinstance(kind, (sa.CHAR, sa.NCHAR)):
        # padded to its length (PostgreSQL), stripped of trailing blanks (MariaDB) on
        # the way out, kept as it is (SQLite)
        length = kind.length
        if dialect == "sqlite":
            return lambda v: type(v) is str
        if dialect in ("mysql", "mariadb"):
            return lambda v: type(v) is str and not v.endswith(" ")
        if not length:
            return NEVER
        return lambda v: type(v) is str and len(v) == length
    if isinstance(kind, sa.String):
        return lambda v: type(v) is str
    if isinstance(kind, sa.Float):
        return _float_check(kind, dialect)
    if isinstance(kind, sa.Numeric):
        return _decimal_check(kind, dialect)
    if isinstance(kind, sa.DateTime):
        return _datetime_check(kind, dialect)
    if isinstance(kind, sa.Date):
        return lambda v: type(v) is date
    if isinstance(kind, sa.Time):
        if kind.timezone:
            return NEVER
        fraction = _fraction_divisor(kind, dialect)
        return lambda v: type(v) is time and v.tzinfo is None and v.microsecond % fraction == 0
    if isinstance(kind, sa.LargeBinary):
        return lambda v: type(v) is bytes
    if isinstance(kind, sa.Uuid):
        return (lambda v: type(v) is UUID) if kind.as_uuid else NEVER
    if isinstance(kind, sa.JSON):
        return jsonb_exact if dialect == "postgresql" and isinstance(kind, JSONB) else json_exact
    return NEVER


def _enum_check(kind: sa.Enum) -> Check:
    members = kind.enum_class
    if members is not None:
        return lambda v: isinstance(v, Enum) and type(v) is members
    names = frozenset(kind.enums)
    return lambda v: type(v) is str and v in names


def _float_check(kind: sa.Float[Any], dialect: str) -> Check:
    if kind.asdecimal:
        return NEVER
    precision = kind.precision
    double = isinstance(kind, sa.Double) or (
        precision is not None and precision > _SINGLE_FLOAT_BITS
    )
    if isinstance(kind, sa.REAL) and dialect != "sqlite":
        double = False
    if dialect == "postgresql" and precision is None and not isinstance(kind, sa.REAL):
        double = True  # FLOAT is double precision there
    if dialect == "sqlite":
        double = True  # REAL is 8 bytes
    if not double and dialect in ("mysql", "mariadb"):  # FLOAT: given back as %.6g
        return _single_float_exact
    if not double:
        return NEVER
    if dialect in ("sqlite", "mysql", "mariadb"):  # -0.0 is given back as 0.0
        return lambda v: type(v) is float and math.isfinite(v) and (v != 0 or _positive(v))
    return lambda v: type(v) is float and math.isfinite(v)


_FLOAT32_MIN = 1.1754943508222875e-38
_FLOAT32_MAX = 3.4028234663852886e38
"""The normal range of single precision: below it a FLOAT is stored with fewer digits
(``1e-40`` as ``9.99995e-41``) or as 0 (``1e-50``)."""


def _single_float_exact(v: Any) -> bool:
    """Does MariaDB's (MySQL's) single precision ``FLOAT`` give ``v`` back as it is? Six
    significant digits survive (``%.6g``) in its normal range; zero is given back
    without its sign."""
    if type(v) is not float:
        return False
    if not v:
        return _positive(v)
    return _FLOAT32_MIN <= abs(v) <= _FLOAT32_MAX and float(format(v, ".6g")) == v


def _positive(v: float) -> bool:
    """Is the sign of ``v`` positive (``0.0``, not ``-0.0``)?"""
    return math.copysign(1.0, v) > 0


def _decimal_check(kind: sa.Numeric[Any], dialect: str) -> Check:
    if not kind.asdecimal:
        return NEVER  # a float through a DECIMAL: rounded to its scale
    # A negative zero comes back as zero; an unscaled NUMERIC gives ``1E+2`` back as
    # ``100``: equal values, but not the same Decimal (its str() differs).
    scale = _stored_scale(kind, dialect)
    if scale is None:
        if dialect != "postgresql":
            return NEVER  # ten places on SQLite; unknown elsewhere
        return lambda v: _plain_decimal(v) and v.as_tuple().exponent <= 0
    places = -scale
    if dialect == "sqlite":  # a REAL underneath: 15 significant digits survive
        return lambda v: (
            _plain_decimal(v) and v.as_tuple().exponent == places and len(v.as_tuple().digits) <= 15
        )
    return lambda v: _plain_decimal(v) and v.as_tuple().exponent == places


def _stored_scale(kind: sa.Numeric[Any], dialect: str) -> int | None:
    """The scale the database gives ``kind``'s values back with, as SQLAlchemy's DDL
    makes the column (None: unscaled, or not known). The DDL names a scale only with a
    precision: ``Numeric(scale=2)`` is a plain ``NUMERIC`` — ``DECIMAL(10,0)`` on
    MySQL / MariaDB, unscaled on PostgreSQL — and ``NUMERIC(10)`` has scale 0. SQLite
    stores a REAL, which SQLAlchemy gives back with ``scale`` places (ten without)."""
    if dialect == "sqlite":
        return kind.scale
    if kind.precision is None:
        return 0 if dialect in ("mysql", "mariadb") else None
    return 0 if kind.scale is None else kind.scale


def _plain_decimal(v: Any) -> bool:
    """A finite Decimal, not a negative zero."""
    return type(v) is Decimal and v.is_finite() and not (v.is_zero() and v.is_signed())


def _fraction_divisor(kind: Any, dialect: str) -> int:
    """What the microseconds of a datetime or time of ``kind`` are a multiple of when
    given back: 1 for all kept, 10**6 for none. MariaDB keeps ``fsp`` digits (0 by
    default), PostgreSQL ``precision`` (6 by default); SQLite keeps them all."""
    if dialect in ("mysql", "mariadb"):
        return _divisor(getattr(kind, "fsp", None) or 0)
    if dialect == "postgresql":
        return _divisor(getattr(kind, "precision", None))
    return 1


def _divisor(digits: int | None) -> int:
    """10 ** (6 - digits) for ``digits`` fractional digits of a second (None: 6)."""
    if digits is None:
        return 1
    return int(10 ** (6 - min(max(digits, 0), 6)))


def _datetime_check(kind: sa.DateTime, dialect: str) -> Check:
    fraction = _fraction_divisor(kind, dialect)
    if kind.timezone:
        if dialect == "postgresql":  # an instant: given back in the session's zone
            return lambda v: (
                type(v) is datetime and v.utcoffset() is not None and v.microsecond % fraction == 0
            )
        return NEVER  # stored without a zone
    return lambda v: type(v) is datetime and v.tzinfo is None and v.microsecond % fraction == 0
