"""Key building: every key the library writes is made here.

Layout (``ns`` = namespace, ``ver`` = key version)::

    {ns}:{ver}:k:{user key}        cache-aside values (Cache.get / set)
    {ns}:{ver}:q:{digest}          query results (with_cache)
    {ns}:{ver}:e:{table}:{pk}      entity entries (cache.register)
    {ns}:gen:{{ns}}:{table}        table generations (shared by all versions)
    {ns}:tag:{{ns}}:{tag}          tag generations

Entries carry the version, so a new version never reads an old shape. Generations
do not: an invalidation reaches every live version at once. Generation keys share
the hash tag ``{ns}`` so one MGET reads them all on Redis Cluster too.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_USER_KEY = 512


def check_namespace(namespace: object) -> str:
    """Return ``namespace`` if it is usable in keys, else raise ValueError naming it."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"namespace must be 1-64 characters of letters, digits, '_', '.', '-'; "
            f"got {namespace!r}"
        )
    return namespace


RESERVED_SEGMENTS = frozenset({"meta", "gen", "tag", "wb", "stats", "store"})
"""Second key segments (``{ns}:{segment}:...``) that are not versions: the version
registry, generations, tags, the write-behind queue, access statistics, the store
epoch (`store_epoch`). No version may
take one of these names (``gc`` of such a version would delete them)."""


def check_version(version: object) -> str:
    """Return ``version`` if usable as a key segment, else raise ValueError."""
    if not isinstance(version, str) or not _NAMESPACE_RE.match(version):
        raise ValueError(
            f"version must be 1-64 characters of letters, digits, '_', '.', '-'; got {version!r}"
        )
    if version in RESERVED_SEGMENTS:
        raise ValueError(
            f"version {version!r} is reserved (keys {{ns}}:{version}:... hold other data); "
            f"choose another name than {', '.join(sorted(RESERVED_SEGMENTS))}"
        )
    return version


def digest(data: bytes | str) -> str:
    """A short, stable digest for key material (blake2b, 20 bytes, hex)."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.blake2b(data, digest_size=20).hexdigest()


_EXACT_REPR = frozenset(
    {type(None), bool, int, float, str, bytes, Decimal, datetime, date, time, timedelta, UUID}
)
"""Types whose ``repr()`` spells the value: equal reprs, equal values of one type."""
_CONTAINERS = frozenset({tuple, list, set, frozenset})
_ADDRESS = re.compile(r" at 0x[0-9A-Fa-f]+")
_own_repr: dict[type, bool | None] = {}
"""Per other type: False (``object.__repr__``: the address), True (an Enum: exact),
None (its own ``__repr__``: each value's is looked at)."""


def stable_digest(value: Any) -> str:
    """`digest` of ``repr(value)`` without the object addresses it may name
    (``<function f at 0x7f...>``): the same in every process."""
    return digest(_ADDRESS.sub("", repr(value)))


def unkeyable(values: Iterable[Any]) -> str | None:
    """Why ``repr()`` of one of ``values`` cannot be key material, else None.

    Keys are made of reprs. One that names the object's address
    (``<Cents object at 0x7f...>``, the default ``object.__repr__``) is not the value:
    CPython gives the address of a freed object to the next, so two values would share
    a key (DESIGN rule 4). Cheap for the usual types (`_EXACT_REPR`).
    """
    for value in values:
        if type(value) not in _EXACT_REPR:
            reason = _unkeyable(value)
            if reason is not None:
                return reason
    return None


def _unkeyable(value: Any) -> str | None:
    kind = type(value)
    if kind in _CONTAINERS:
        return unkeyable(value)
    if kind is dict:
        return unkeyable(value) or unkeyable(value.values())
    try:
        own = _own_repr[kind]
    except KeyError:
        own = _repr_kind(kind)
    if own or (own is None and not _ADDRESS.search(repr(value))):
        return None
    return (
        f"a value of type {kind.__module__}.{kind.__qualname__} has no repr() that spells "
        "it (it names the object's address), so no key can be made of it"
    )


def _repr_kind(kind: type) -> bool | None:
    found: bool | None = None
    if kind.__repr__ is object.__repr__:  # type: ignore[comparison-overlap]
        found = False
    elif issubclass(kind, Enum):
        found = True
    _own_repr[kind] = found
    return found


class KeyBuilder:
    """Builds the keys of one namespace and version; cheap to call on the hot path."""

    __slots__ = ("_data", "_gen", "_tag", "namespace", "version")

    def __init__(self, namespace: str, version: str) -> None:
        self.namespace = check_namespace(namespace)
        self.version = check_version(version)
        self._data = f"{namespace}:{version}:"
        self._gen = f"{namespace}:gen:{{{namespace}}}:"
        self._tag = f"{namespace}:tag:{{{namespace}}}:"

    def user(self, key: object) -> str:
        """Key of a cache-aside value. Long keys are digested; non-str keys are refused."""
        if not isinstance(key, str):
            raise TypeError(f"cache keys must be str, got {type(key).__name__}: {key!r}")
        if not key:
            raise ValueError("cache keys must not be empty")
        if len(key) > MAX_USER_KEY:
            key = "#" + digest(key)
        return f"{self._data}k:{key}"

    def query(self, material: str) -> str:
        """Key of a query result; ``material`` is everything that makes it exact."""
        return f"{self._data}q:{digest(material)}"

    def entity(self, table: str, pk: str) -> str:
        """Key of one entity row."""
        return f"{self._data}e:{table}:{pk}"

    def generation(self, table: str) -> str:
        """Key of a table's generation token."""
        return f"{self._gen}{table}"

    def tag(self, tag: str) -> str:
        """Key of a tag's generation token."""
        return f"{self._tag}{tag}"

    def data_prefix(self, version: str | None = None) -> str:
        """Prefix of every entry of ``version`` (default: this builder's)."""
        return f"{self.namespace}:{version or self.version}:"
