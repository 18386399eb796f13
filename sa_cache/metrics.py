"""What a namespace holds in the store, for ``sa-cache stats`` and health checks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .backends.base import BackendError

if TYPE_CHECKING:
    from .cache import Cache

KINDS = {"k": "cache-aside values", "q": "query results", "e": "entity rows"}
BOOKKEEPING = {"gen": "generations", "tag": "tags", "meta": "version bookkeeping"}


def _all_keys(cache: Cache) -> Iterable[str]:
    backend: Any = cache.backend
    prefix = f"{cache.namespace}:"
    if hasattr(backend, "scan_keys"):
        return backend.scan_keys(prefix + "*")  # type: ignore[no-any-return]
    if hasattr(backend, "keys"):
        return backend.keys(prefix)  # type: ignore[no-any-return]
    raise TypeError(f"{type(backend).__name__} cannot list keys")


BOOKKEEPING = {
    "gen": "generations",
    "tag": "tags",
    "meta": "version bookkeeping",
    "store": "store epoch",  # see store_epoch
}


def store_report(cache: Cache, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Entries by version and kind, generations, write-behind backlog, server facts.

    Scans the namespace's keys (SCAN on Redis, every primary on Cluster); raises
    `BackendError` when the store does not answer.
    """
    ns = cache.namespace
    entries: Counter[tuple[str, str]] = Counter()
    other: Counter[str] = Counter()
    seen = 0
    for key in _all_keys(cache):
        seen += 1
        if progress is not None and seen % 1000 == 0:
            progress(seen)
        parts = key[len(ns) + 1 :].split(":", 2)
        if len(parts) >= 2 and parts[0] in BOOKKEEPING:
            other[BOOKKEEPING[parts[0]]] += 1
        elif len(parts) >= 2 and parts[1] in KINDS:
            entries[(parts[0], KINDS[parts[1]])] += 1
        else:
            other["other"] += 1
    report: dict[str, Any] = {
        "namespace": ns,
        "version": cache.version,
        "keys": seen,
        "entries": {f"{v} {kind}": n for (v, kind), n in sorted(entries.items())},
        "bookkeeping": dict(sorted(other.items())),
    }
    info = getattr(cache.backend, "server_info", None)
    if info is not None:
        server = info()
        nodes = server.values() if all(isinstance(v, dict) for v in server.values()) else [server]
        report["server"] = {
            "used_memory": sum(int(n.get("used_memory", 0)) for n in nodes),
            "aof_enabled": all(str(n.get("aof_enabled", "0")) == "1" for n in nodes),
            "maxmemory_policy": sorted({str(n.get("maxmemory_policy", "?")) for n in nodes}),
        }
        try:
            backlog: Any = sum(cache.write_behind.pending().values())
        except BackendError as exc:  # a partition could not be read: no count
            backlog = f"unknown ({exc})"
        except (TypeError, ValueError):
            backlog = 0
        report["write_behind_backlog"] = backlog
    report["this_process"] = cache.stats.snapshot()
    return report
