"""Copies of values that can be changed in place (a JSON column's dicts and lists), for
what is encoded later than it is taken: a query's captured rows, a flush's images."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

MUTABLE = frozenset({dict, list, set, bytearray, tuple})
"""Value types a driver or an application may give that can be changed in place."""


def detached(value: Any) -> Any:
    """A deep copy of ``value`` (dicts and lists of plain values: a few times faster than
    `copy.deepcopy`, which the rest is left to)."""
    kind = type(value)
    if kind is dict:
        return {k: detached(v) for k, v in value.items()}
    if kind is list:
        return [detached(v) for v in value]
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    return deepcopy(value)
