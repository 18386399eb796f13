"""Copies of values that can be changed in place (a JSON column's dicts and lists), for
what is encoded later than it is taken: a query's captured rows, a flush's images."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

MUTABLE = frozenset({dict, list, set, bytearray, tuple})
"""Value types a driver or an application may give that can be changed in place."""


def detached(value: Any) -> Any:
    """A deep copy of ``value`` (dicts and lists of plain values: a few times faster than
    `copy.deepcopy`, which the rest is left to). A value nested deeper than the
    interpreter's stack allows (JSON the database takes) is copied without recursion."""
    try:
        return _copied(value)
    except RecursionError:
        return _copied_deep(value)


def _copied(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _copied(v) for k, v in value.items()}
    if kind is list:
        return [_copied(v) for v in value]
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    return deepcopy(value)


def _copied_deep(value: Any) -> Any:
    """`_copied`, iterative. A dict or list met twice is copied once, as
    `copy.deepcopy` does (so a cycle ends)."""
    copies: dict[int, Any] = {}  # id of a dict or list -> its copy
    pending: list[tuple[Any, Any]] = []  # (dict or list, its copy, still empty)

    def copied(item: Any) -> Any:
        kind = type(item)
        if kind is not dict and kind is not list:
            return _copied(item)
        key = id(item)
        found = copies.get(key)
        if found is None:
            found = copies[key] = {} if kind is dict else []
            pending.append((item, found))
        return found

    top = copied(value)
    while pending:
        source, copy = pending.pop()
        if type(source) is dict:
            for k, v in source.items():
                copy[k] = copied(v)
        else:
            copy.extend(map(copied, source))
    return top
