"""What the column types of a statement's result mean for caching it.

A column's declared type is not always the type that processes its values: a
``with_variant()`` type is another one on some dialects, a ``TypeDecorator`` hands
values to its ``impl`` (chosen per dialect by ``load_dialect_impl``), an ``ARRAY``
to its item type. `types_within` walks all of them, and from it:

- `unpickles`: would a hit run ``pickle.loads`` on bytes read from the store (a
  ``PickleType`` anywhere in a result column's types)? Never done (DESIGN rule 7).
- `plain_type`: does a column give values the codec stores as they are (no
  ``TypeDecorator`` or user-defined type that may return any object)?
- `enum_classes`: the Enum classes whose members a column's values may be, which the
  codec must know to decode an entry it did not write itself.
- `type_key`: how a column type turns database values into Python values, as key
  material (two mappings of one table with other types never share processed rows).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any

from sqlalchemy import PickleType
from sqlalchemy.types import TypeDecorator, TypeEngine, UserDefinedType

_MAX_TYPES = 64
"""More nested types than this in one column is not a real schema: the walk stops."""


def types_within(type_: Any, dialect: Any = None) -> Iterator[Any]:
    """``type_`` and every type that may process its values: its variants, a
    ``TypeDecorator``'s implementation, an ``ARRAY``'s item type, recursively; with a
    ``dialect``, also each one's implementation for that dialect (and theirs)."""
    seen: set[int] = set()
    declared = list(_walk(type_, seen))
    yield from declared
    if dialect is None:
        return
    for found in declared:
        try:
            impl = found.dialect_impl(dialect)
        except Exception:  # a type that cannot adapt: the statement fails on its own
            continue
        yield from _walk(impl, seen)


def _walk(type_: Any, seen: set[int]) -> Iterator[Any]:
    todo = [type_]
    while todo and len(seen) < _MAX_TYPES:
        found = todo.pop()
        if not isinstance(found, TypeEngine) or id(found) in seen:
            continue
        seen.add(id(found))
        yield found
        todo.extend(getattr(found, "_variant_mapping", {}).values())
        if isinstance(found, TypeDecorator):
            todo.append(found.impl_instance)
        todo.append(getattr(found, "item_type", None))


def unpickles(compiled: Any) -> str | None:
    """Why a hit of ``compiled`` would run ``pickle.loads`` on bytes from the cache (a
    ``PickleType`` result processor, however reached), or None."""
    dialect = compiled.dialect
    for entry in getattr(compiled, "_result_columns", ()):
        if any(isinstance(t, PickleType) for t in types_within(entry[3], dialect)):
            return f"its column {entry[0]!r} is a PickleType (a hit would unpickle cached bytes)"
    return None


def plain_type(type_: Any) -> bool:
    """Does this column type give values the codec stores as they are, on every dialect?
    A ``TypeDecorator`` or user-defined type (also as a variant or an item type) may
    return any object."""
    return not any(isinstance(t, (TypeDecorator, UserDefinedType)) for t in types_within(type_))


def enum_classes(type_: Any) -> Iterator[type[enum.Enum]]:
    """The Enum classes of ``type_`` (an ``Enum`` column, an ``ARRAY`` of one, a variant)."""
    for found in types_within(type_):
        enum_class = getattr(found, "enum_class", None)
        if isinstance(enum_class, type) and issubclass(enum_class, enum.Enum):
            yield enum_class


def type_key(type_: Any) -> str:
    """How ``type_`` processes the values of a column, as key material: each type
    within it by its class and ``repr()`` (arguments such as ``asdecimal`` or
    ``timezone``), and its Enum class. The dialect is part of the key elsewhere."""
    parts = []
    for found in types_within(type_):
        cls = type(found)
        part = f"{cls.__module__}.{cls.__qualname__}:{found!r}"
        enum_class = getattr(found, "enum_class", None)
        if isinstance(enum_class, type):
            part += f":{enum_class.__module__}.{enum_class.__qualname__}"
        parts.append(part)
    return "|".join(parts)
