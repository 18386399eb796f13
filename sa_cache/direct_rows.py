"""The stored form of a direct shape's rows (see `direct`).

Entries of 8 rows or more store their rows by column, Decimal and datetime columns typed
(`pack_columns`): decoding makes one list a column instead of one a row, and a typed
column is rebuilt by one C-level map over it, where the codec would call back into
Python for each value. Entries stored by row, column-typed, as earlier releases wrote
them, are still read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from itertools import repeat
from typing import Any
from zoneinfo import ZoneInfo

_BY_COLUMN = "colm"
"""First item of rows stored by column: ``[_BY_COLUMN, codes, columns, zones, nulls]``."""
_TYPED = "cols"
"""First item of rows stored by row, column-typed (``[_TYPED, codes, rows]``), as earlier
releases wrote them; still read."""
_fromisoformat = datetime.fromisoformat
_FROM_TEXT: dict[str, Callable[[str], Any]] = {"D": Decimal, "T": _fromisoformat}
_datetime: Any = datetime  # datetime(state, tzinfo): the constructor pickle uses


def _column_code(values: list[Any]) -> tuple[str, str | None]:
    """How a column is stored, and its time zone: ``D`` Decimals as text; ``T`` naive
    datetimes and ``Z`` datetimes of one named zone (``ZoneInfo``, as PostgreSQL drivers
    give ``timestamptz``) as their 10-byte pickle state (wall time and fold) and the
    zone's key; ``-`` as the codec stores it. Each typed column is rebuilt by one C-level
    map over it, where the codec would call back into Python for each value."""
    if not values:
        return "-", None
    first = values[0]
    if all(type(v) is Decimal for v in values):
        return "D", None
    if all(type(v) is datetime for v in values):
        zone = first.tzinfo
        if zone is None and all(v.tzinfo is None for v in values):
            return "T", None
        # ZoneInfo(key) gives this very zone back: the rebuilt value is equal and alike.
        if type(zone) is ZoneInfo and zone.key and all(v.tzinfo is zone for v in values):
            return "Z", zone.key
    return "-", None


BY_COLUMN_MIN_ROWS = 8
"""Fewer rows are stored as they are: storing by column pays for itself per value, and
costs a little per entry."""


def _state(value: datetime) -> bytes:
    reduced: Any = value.__reduce_ex__(4)  # (datetime, (state, tzinfo)) with the fold
    state: bytes = reduced[1][0]
    return state


_STORED: dict[str, Callable[[Any], Any]] = {"D": str, "T": _state, "Z": _state}


def pack_columns(rows: list[list[Any]]) -> list[Any]:
    """``rows`` in the form a direct entry stores (see `unpack_columns`): as they are
    when few, else by column; a typed column without its NULLs, whose positions are
    kept apart."""
    if len(rows) < BY_COLUMN_MIN_ROWS:
        return rows
    columns = [list(column) for column in zip(*rows, strict=True)]
    codes, zones, nulls = "", [], []
    for i, column in enumerate(columns):
        code, zone = _column_code([v for v in column if v is not None])
        codes += code
        if zone is not None:
            zones.append(zone)
        if code != "-":
            nulls.append([n for n, v in enumerate(column) if v is None])
            columns[i] = list(map(_STORED[code], (v for v in column if v is not None)))
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
