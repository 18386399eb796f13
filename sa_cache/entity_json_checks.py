"""Does a JSON value come back from the database as it was written (the JSON checks of
`entity_types`): str keys, lists, finite floats, nested at most `_JSON_DEPTH_LIMIT` deep;
PostgreSQL's ``jsonb`` also orders object keys and gives big floats and ``-0.0`` back
otherwise."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]


_JSON_DEPTH_LIMIT = 500
"""Lists and dicts nested deeper than this are not written through: an entry holds
about 1,000 levels (msgpack's limits), an image's value two fewer."""


def json_exact(value: Any) -> bool:
    """Does ``value`` survive a JSON round trip as it is (str keys, lists, no tuples)?"""
    kind = type(value)
    if kind is list or kind is dict:
        return _tree_exact(value, _json_leaf, _str_keys)
    return _json_leaf(value)


def _json_leaf(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is bool or kind is int or value is None:
        return True
    return kind is float and math.isfinite(value)


def _str_keys(value: dict[Any, Any]) -> bool:
    return all(type(k) is str for k in value)


def _tree_exact(
    value: list[Any] | dict[Any, Any], leaf: Check, keys: Callable[[dict[Any, Any]], bool]
) -> bool:
    """Is ``value`` nested at most `_JSON_DEPTH_LIMIT` deep, every dict in it ``keys``
    and every other value in it ``leaf``? (Iterative: a value nested deeper than the
    interpreter's stack, which the database takes, must not make a commit raise.)"""
    if type(value) is dict and not keys(value):
        return False
    stack = [iter(value.values() if type(value) is dict else value)]  # one per level
    while stack:
        for item in stack[-1]:
            kind = type(item)
            if kind is list or kind is dict:
                if len(stack) >= _JSON_DEPTH_LIMIT:
                    return False
                if kind is dict:
                    if not keys(item):
                        return False
                    stack.append(iter(item.values()))
                else:
                    stack.append(iter(item))
                break
            if not leaf(item):
                return False
        else:
            stack.pop()
    return True


_JSONB_FLOAT_LIMIT = 1e16
"""jsonb stores numbers as ``numeric`` and prints them without an exponent: a float this
large comes back as an int (``1e16`` as ``10000000000000000``)."""


def jsonb_exact(value: Any) -> bool:
    """As `json_exact`, for PostgreSQL's ``jsonb``, which also orders object keys (by
    length in bytes, then bytewise), and gives big floats and ``-0.0`` back otherwise."""
    kind = type(value)
    if kind is list or kind is dict:
        return _tree_exact(value, _jsonb_leaf, _jsonb_keys)
    return _jsonb_leaf(value)


def _jsonb_leaf(value: Any) -> bool:
    if type(value) is float:
        return (
            math.isfinite(value)
            and abs(value) < _JSONB_FLOAT_LIMIT
            and (value != 0 or math.copysign(1.0, value) > 0)
        )
    return _json_leaf(value)


def _jsonb_keys(value: dict[Any, Any]) -> bool:
    """Are the keys of ``value`` str, in the order jsonb gives them back in?"""
    if not _str_keys(value):
        return False
    encoded = [k.encode() for k in value]
    return encoded == sorted(encoded, key=lambda k: (len(k), k))
