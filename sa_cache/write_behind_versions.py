"""Write-behind across key versions (a rolling deploy: old and new code both live).

An entity key is ``{ns}:{version}:e:{table}:{hash tag}{pk}``; its partition and stream
are version-free, so every change of a row goes to one stream in order, whichever
version wrote it. What else must not depend on the version:

- **The row**: `row_of` (the key without its version). The worker coalesces a row's
  changes by it, in record order (`write_behind_coalesce`), and sync marks name it
  (`write_behind_fence.marker_name`).
- **What other versions read while a change is queued**: the commit script also sets
  the row's key under every other live version (`fan_out`): the queued entry itself
  where that version's model of the table has the same shape (`table_shape`, published
  with each live version: `version_registry.VersionRegistry.publish_shapes`), else a
  marker (`marker_of`) that makes its reads of the row load the database without
  caching what they load (a reader never fills over a lease: `entity.LEASE_PREFIX`).
  The prepare record names those versions, so the worker knows what it must take back.
- **After the worker applied a row**: the key of its last change gets the applied row
  (as before); the queued entries and markers it left under other keys are deleted if
  they still hold what was queued; every other live version's key of the row is
  deleted unless it holds a queued entry or marker (a version that went live while the
  change was queued may have cached the row from the database, which trailed).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .backends.base import BackendError
from .keys import digest
from .version_names import _type_string
from .version_registry import DEFAULT_GRACE

if TYPE_CHECKING:
    from .cache import Cache
    from .entity import EntitySpec
    from .version_registry import VersionRegistry

log = logging.getLogger("sa_cache")

MARKER = b"sac-lease:wb:"
"""Prefix of the marker a queued change leaves under a version whose model of the table
has another shape (or one not known yet), followed by the transaction id. It starts
like a reader's lease (`entity.LEASE_PREFIX`), which readers never fill over: they
load the row from the database and do not cache it."""

Fanned = tuple[tuple[str, bool], ...]
"""Other versions a change was written to: (version, same shape: the queued entry; else
a marker)."""


def row_of(key: str) -> str:
    """The row an entity key names, whatever its key version: the key without it."""
    ns, sep, rest = key.partition(":")
    _, sep2, tail = rest.partition(":")
    return f"{ns}:{tail}" if sep and sep2 else key


def version_of(key: str) -> str:
    """The key version of an entity key."""
    return key.split(":", 2)[1]


def key_in(key: str, version: str) -> str:
    """The key of the same row under ``version``."""
    ns, _, rest = key.partition(":")
    return f"{ns}:{version}:{rest.partition(':')[2]}"


def marker_of(tx: str) -> bytes:
    """The marker transaction ``tx`` leaves under versions of another shape."""
    return MARKER + tx.encode()


def writes_of(
    key: str, entry: bytes, tx: str, fanned: Fanned, own: Collection[str] = ()
) -> dict[str, bytes]:
    """Every key the commit of a change set, with what it set there; ``own``: the keys
    of its transaction's changes, which the commit script never sets for another."""
    out = {key: entry}
    for version, same in fanned:
        other = key_in(key, version)
        if other not in own:
            out[other] = entry if same else marker_of(tx)
    return out


def table_shape(spec: EntitySpec) -> str:
    """A digest of what a queued entry of ``spec``'s table means: its columns in entry
    order (name, type, primary key) and the attributes they load into."""
    cols = [
        f"{c.name}:{_type_string(c.type)}:{'pk' if c.primary_key else ''}:{attr}"
        for c, attr in zip(spec.columns, spec.attr_keys, strict=True)
    ]
    return digest(f"{spec.table}({','.join(cols)})")[:16]


def shapes_of(cache: Cache) -> dict[str, str]:
    """`table_shape` of every write-behind model of ``cache``, by table."""
    # (not ``cache.entities``: this runs at set-up too, when configuring the mappers may
    # be premature; decorated classes are published once registered)
    specs = cache._entities.values()
    return {s.table: table_shape(s) for s in specs if s.write == "behind"}


def publish_shapes(cache: Cache, spec: EntitySpec | None = None) -> None:
    """Record the shapes of ``cache``'s write-behind models (and ``spec``'s, one being
    registered) with its live version, so other versions' commits know whether to give
    it their queued entries (see `fan_out`). A store failure is logged: each heartbeat
    records them again."""
    registry: VersionRegistry | None = cache.registry
    if registry is None:
        return
    shapes = shapes_of(cache)
    if spec is not None:
        shapes[spec.table] = table_shape(spec)
    try:
        registry.publish_shapes(shapes)
    except BackendError as exc:
        log.warning("sa_cache: could not publish the write-behind table shapes (%s)", exc)


def fan_out(cache: Cache, spec: EntitySpec, key: str) -> Fanned:
    """The other live versions the commit of a change of ``key`` also writes to, and
    whether each takes the queued entry (the same shape of the table) or a marker.
    Reads the live versions as `Cache.bump` does (at most `LIVE_REFRESH` old: a version
    is used only `join_wait` after it went live, so every commit reaches it)."""
    registry: VersionRegistry | None = cache.registry
    if registry is None:
        return ()
    live = registry.live_now()
    own = version_of(key)
    others = sorted({*live, cache.version} - {own})
    if not others:
        return ()
    if spec.table not in registry.own_shapes:  # (registered after the version went live)
        publish_shapes(cache)
    mine = registry.own_shapes.get(spec.table) or table_shape(spec)
    shapes = registry.shapes
    return tuple(
        (v, v == cache.version or shapes.get(v, {}).get(spec.table) == mine) for v in others
    )


def sweep_keys(key: str, versions: Iterable[str], skip: Sequence[str] = ()) -> list[str]:
    """``key``'s row under each of ``versions`` but its own and those in ``skip``."""
    own = version_of(key)
    out = []
    for version in versions:
        if version != own:
            other = key_in(key, version)
            if other not in skip:
                out.append(other)
    return out


def live_versions(cache: Cache, reader: list[VersionRegistry]) -> tuple[str, ...]:
    """The live versions of ``cache``'s namespace (read at most once a `LIVE_REFRESH`),
    through its registry, or one made for reading in ``reader`` (a worker whose cache
    announces no version of its own)."""
    registry: VersionRegistry | None = cache.registry
    if registry is None:
        if not reader:
            from .version_registry import VersionRegistry

            reader.append(VersionRegistry(cache, follow=False))
        registry = reader[0]
    return registry.live_now()


def finals_of(
    key: str, entry: bytes, final: bytes, px: str, writes: dict[str, bytes], live: Iterable[str]
) -> list[tuple[str, bytes, bytes, str]]:
    """What `write_behind_finalize.finalize` does with a row once applied (or dead-lettered:
    ``final`` empty): the key of its last change (``key``, which holds ``entry`` while
    nothing newer came) gets ``final``; every other key its changes' commits set
    (``writes``) is deleted if it still holds what they set; the row under every other
    live version is checked too (deleted unless a newer change is queued there)."""
    out = [(key, entry, final, px)]
    out += [(k, queued, b"", "") for k, queued in writes.items() if k != key]
    out += [(k, b"", b"", "") for k in sweep_keys(key, live, [*writes, key])]
    return out


class Models(set[Any]):
    """The mappers registered with write="behind" (`WriteBehind.models`). Adding one (at
    `Cache.register`) on a cache that announces its key version records the shape of
    its table with it, so commits of other live versions give this one their queued
    entries of the table (`fan_out`)."""

    def __init__(self, cache: Cache) -> None:
        super().__init__()
        self._cache = weakref.ref(cache)

    def add(self, mapper: Any) -> None:
        super().add(mapper)
        cache = self._cache()
        if cache is not None and cache.registry is not None:
            from .entity import EntitySpec

            publish_shapes(cache, EntitySpec(mapper, None, "behind"))


def fanned_ttl(cache: Cache) -> int:
    """Milliseconds the copies a commit leaves under other versions live: the versions'
    grace. The worker takes them back once it applied the change; this bounds what a
    worker of an earlier release, which does not, leaves behind."""
    registry: VersionRegistry | None = cache.registry
    grace = DEFAULT_GRACE if registry is None else registry.grace
    return max(1, round(grace * 1000))


def fanned_keys(fanned: Sequence[Fanned], keys: Sequence[str]) -> tuple[list[str], list[int]]:
    """The other versions' keys the commit script of changes of ``keys`` also sets, and
    for each the position of the change whose entry it takes (negative: a marker).
    Never one of ``keys`` (a transaction that wrote a row under two versions)."""
    if not any(fanned):
        return [], []
    more: list[str] = []
    how: list[int] = []
    own = set(keys)
    for i, (key, versions) in enumerate(zip(keys, fanned, strict=True), 1):
        for version, same in versions:
            other = key_in(key, version)
            if other not in own:
                more.append(other)
                how.append(i if same else -i)
    return more, how
