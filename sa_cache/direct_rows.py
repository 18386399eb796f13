"""The stored form of a direct shape's rows (see `direct`).

Entries of 8 rows or more store their rows by column, Decimal and datetime columns typed
(`pack_columns`): decoding makes one list a column instead of one a row, and a typed
column is rebuilt by one C-level map over it, where the codec would call back into
Python for each value. Entries stored by row, column-typed, as earlier releases wrote
them, are still read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

_BY_COLUMN = "colm"
"""First item of rows stored by column: ``[_BY_COLUMN, codes, columns, zones, nulls]``."""
_TYPED = "cols"
"""First item of rows stored by row, column-typed (``[_TYPED, codes, rows]``), as earlier
releases wrote them; still read."""
_fromisoformat = datetime.fromisoformat
_FROM_TEXT: dict[str, Callable[[str], Any]] = {"D": Decimal, "T": _fromisoformat}
_datetime: Any = datetime  # datetime(state, tzinfo): the constructor pickle uses


def _column_code(values: list[Any], types: set[type]) -> tuple[str, str | None]:
    """How a column is stored, and its time zone: ``D`` Decimals as text; ``T`` naive
    datetimes and ``Z`` datetimes of one named zone (``ZoneInfo``, as PostgreSQL drivers
    give ``timestamptz``) as their 10-byte pickle state (wall time and fold) and the
    zone's key; ``-`` as the codec stores it. Each typed column is rebuilt by one C-level
    map over it, where the codec would call back into Python for each value. ``types``:
    the types of ``values``."""
    if len(types) != 1:
        return "-", None
    if Decimal in types:
        return "D", None
    if datetime in types:
        zones = set(map(_tzinfo, values))
        if len(zones) == 1:
            zone = zones.pop()
            if zone is None:
                return "T", None
            # ZoneInfo(key) gives this very zone back: the rebuilt value is equal and alike.
            if type(zone) is ZoneInfo and zone.key:
                return "Z", zone.key
    return "-", None


BY_COLUMN_MIN_ROWS = 8
"""Fewer rows are stored as they are: storing by column pays for itself per value, and
costs a little per entry."""


def _states(values: list[datetime]) -> list[bytes]:
    """The pickle state of each datetime (wall time and fold), by C-level maps:
    ``__reduce_ex__(4)`` is ``(datetime, (state, tzinfo))``."""
    reduced = map(_reduce_ex, values, repeat(4))
    return list(map(_first, map(_second, reduced)))


_tzinfo = attrgetter("tzinfo")
_NONE_TYPE = type(None)
_reduce_ex: Any = datetime.__reduce_ex__
_first, _second = itemgetter(0), itemgetter(1)
_STORED: dict[str, Callable[[Any], list[Any]]] = {
    "D": lambda values: list(map(str, values)),
    "T": _states,
    "Z": _states,
}


def pack_columns(rows: list[list[Any]]) -> list[Any]:
    """``rows`` in the form a direct entry stores (see `unpack_columns`): as they are
    when few, else by column; a typed column without its NULLs, whose positions are
    kept apart."""
    if len(rows) < BY_COLUMN_MIN_ROWS:
        return rows
    columns = [list(column) for column in zip(*rows, strict=True)]
    codes, zones, nulls = "", [], []
    for i, column in enumerate(columns):
        types = set(map(type, column))  # not `None in column`: Decimal == None is slow
        has_nulls = _NONE_TYPE in types
        if has_nulls:
            types.discard(_NONE_TYPE)
        values = [v for v in column if v is not None] if has_nulls else column
        code, zone = _column_code(values, types)
        codes += code
        if zone is not None:
            zones.append(zone)
        if code != "-":
            nulls.append([n for n, v in enumerate(column) if v is None] if has_nulls else [])
            columns[i] = _STORED[code](values)
    return [_BY_COLUMN, codes, columns, zones, nulls]


def unpack_columns(value: list[Any]) -> Sequence[Sequence[Any]]:
    """The rows of a stored direct entry: as stored, or rebuilt from `pack_columns`."""
    if not value or value[0] not in (_BY_COLUMN, _TYPED):
        return value
    if value[0] == _TYPED:
        return _unpack_typed_rows(value[1], value[2])
    _, codes, columns, zones, nulls = value
    zone_of, nulls_of = iter(zones), iter(nulls)
    for i, code in enumerate(codes):
        if code == "-":
            continue
        column: list[Any]
        if code == "D":
            column = list(map(Decimal, columns[i]))
        elif code == "T":
            column = list(map(_datetime, columns[i]))
        else:
            column = list(map(_datetime, columns[i], repeat(ZoneInfo(next(zone_of)))))
        for position in next(nulls_of):  # ascending: each lands where it was
            column.insert(position, None)
        columns[i] = column
    return list(zip(*columns, strict=True))


def _unpack_typed_rows(codes: str, rows: list[list[Any]]) -> list[list[Any]]:
    convert = [(i, _FROM_TEXT[code]) for i, code in enumerate(codes) if code != "-"]
    for row in rows:  # decoded for this read alone: rebuilt in place
        for i, f in convert:
            if row[i] is not None:
                row[i] = f(row[i])
    return rows


# -- rows kept decoded for reuse (an in-process store: see `query_fast`) ------------------

_IMMUTABLE = frozenset(
    {type(None), bool, int, float, str, bytes, Decimal, datetime, date, time, timedelta, UUID}
)


def mutable_columns(rows: Sequence[Sequence[Any]]) -> tuple[int, ...] | None:
    """The positions of the columns of ``rows`` that hold a value its holder could change
    in place (a JSON ``dict`` or ``list``, say): rows kept for reuse hand out copies of
    those (`thawed`). None if such a value cannot be copied (then keep nothing)."""
    found: set[int] = set()
    for row in rows:
        for i, value in enumerate(row):
            if type(value) not in _IMMUTABLE and not isinstance(value, Enum):
                found.add(i)
    if not found:
        return ()
    try:
        thawed(rows, tuple(found))
    except Exception:  # (a value that refuses copying)
        return None
    return tuple(sorted(found))


def thawed(rows: Sequence[Sequence[Any]], columns: tuple[int, ...]) -> Sequence[Sequence[Any]]:
    """``rows`` for one use: the values at ``columns`` copied (`mutable_columns`)."""
    if not columns:
        return rows
    out = []
    for row in rows:
        mine = list(row)
        for i in columns:
            mine[i] = _copy(mine[i])
        out.append(mine)
    return out


def _copy(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _copy(v) for k, v in value.items()}
    if kind is list:
        return [_copy(v) for v in value]
    if kind in _IMMUTABLE or isinstance(value, Enum):
        return value
    return copy.deepcopy(value)
