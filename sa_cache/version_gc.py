"""gc of retired key versions: their entries deleted with SCAN + UNLINK (Redis, every
primary on Cluster) or the key list (the memory store); `VersionRegistry.gc` calls it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .backends.base import NO_VALUE
from .keys import check_version

if TYPE_CHECKING:
    from .version_registry import VersionRegistry

Progress = Callable[[str, int], None]
"""``progress(version, n)``: ``n`` more keys of ``version`` were deleted (or counted)."""


@runtime_checkable
class Scanning(Protocol):
    """Redis backends: SCAN (every primary on Cluster) and UNLINK."""

    def scan_keys(self, match: str, count: int) -> Iterable[str | bytes]: ...

    def unlink_many(self, keys: Sequence[str]) -> int: ...


@runtime_checkable
class _Listing(Protocol):
    """The memory backend: a list of live keys with a prefix."""

    def keys(self, prefix: str = "") -> list[str]: ...

    def delete_many(self, keys: Sequence[str]) -> int: ...


def is_version(name: str) -> bool:
    """Can ``name`` be a version? (gc must never scan ``{ns}:wb:*``, nor a pattern.)"""
    try:
        check_version(name)
    except ValueError:
        return False
    return True


def _batches(keys: Iterable[str | bytes], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for key in keys:
        batch.append(key.decode() if isinstance(key, bytes) else key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def collect(
    registry: VersionRegistry, dry_run: bool, batch: int, progress: Progress | None
) -> dict[str, int]:
    """Delete the entries of retired versions; keys deleted (or found) per version.

    Uses SCAN + UNLINK on Redis (every primary on Cluster) and the key list on
    the memory store. Live versions and the cache's own version are never touched.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch!r}")
    backend = registry.cache.backend
    counts: dict[str, int] = {}
    for version in registry.retired_versions():
        if version in registry.live_versions() or not is_version(version):
            continue  # a heartbeat arrived since we looked
        prefix = registry.cache.keys.data_prefix(version)
        if isinstance(backend, Scanning):
            found: Iterable[str | bytes] = backend.scan_keys(prefix + "*", batch)
            remove: Callable[[Sequence[str]], int] = backend.unlink_many
        elif isinstance(backend, _Listing):
            found = backend.keys(prefix)
            remove = backend.delete_many
        else:
            raise TypeError(f"{type(backend).__name__} cannot list keys; gc needs it")
        done = 0
        for keys in _batches(found, batch):
            if not dry_run:
                remove(keys)
            done += len(keys)
            if progress is not None:
                progress(version, len(keys))
        counts[version] = done
    if counts and not dry_run:
        collected = [v for v in counts if v not in registry.live_versions()]

        def forget(index: dict[str, float]) -> bool:
            found = [v for v in collected if index.pop(v, None) is not None]
            return bool(found)

        registry._update_index(forget)
        # A heartbeat that came in between wrote its live key before it read the index:
        # if it read it before ``forget``, put its version back (else it re-adds it).
        keys = [registry.live_key(v) for v in collected]
        raws = backend.get_many(keys) if keys else []
        back = [v for v, raw in zip(collected, raws, strict=True) if raw is not NO_VALUE]
        if back:
            now = time.time()

            def restore(index: dict[str, float]) -> bool:
                return any([index.setdefault(v, now) == now for v in back])  # noqa: C419 (all)

            registry._update_index(restore)
    return counts
