"""Noticing a Redis server that came back with older contents than it had.

A Redis restarted from its RDB or AOF file (AOF ``everysec`` loses up to a second), or
a Sentinel failover to a replica that lagged, serves the state of some moment before:
the entries *and* the generations that invalidated them roll back together, into an
older state that is consistent with itself. Nothing in it tells that commits after
that moment invalidated some of its entries, so they would be served as fresh hits.

What does tell: the server's ``run_id`` (``INFO server``) is new at every start, and no
snapshot holds it. Every new connection of a `Cache`'s Redis client (standalone or
Sentinel) reads it, before the connection serves anything, and compares it with the
namespace's *epoch key*, which holds the ``run_id`` of the server it was last checked
on. Another value (or none: a server new to this namespace, or one restored from a
file saved before) means the contents may be older than the last invalidations: the
namespace-wide generation is advanced (every entry of every key version misses, as
`Cache.invalidate_all`) and the epoch key set. A restart therefore empties the cache
of every namespace using that server, whether or not anything was lost.

Not covered: Redis Cluster (a node's restart is not seen), and a server that is
restored without restarting (``DEBUG RELOAD``). Write-behind changes queued after the
restored moment are lost with it: durability needs AOF (see README).
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import redis

from .backends.redis_scripts import ADVANCE
from .tokens import new_nonce

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger("sa_cache")

ATTRIBUTE = "_sa_cache_epoch_check"
"""Attribute of a redis-py connection pool holding its `EpochCheck`."""


def epoch_key(cache: Cache) -> str:
    """The key holding the ``run_id`` of the server ``cache``'s namespace was checked on."""
    namespace = cache.namespace
    return f"{namespace}:store:{{{namespace}}}:epoch"


class EpochCheck:
    """The ``redis_connect_func`` of one connection pool: the handshake, then the
    check of every `Cache` (namespace) that uses the pool."""

    def __init__(self) -> None:
        self.caches: weakref.WeakSet[Cache] = weakref.WeakSet()

    def __call__(self, conn: Any) -> None:
        conn.on_connect()
        caches = list(self.caches)
        if not caches:
            return
        try:
            conn.send_command("INFO", "server")
            info = conn.read_response()
            run_id = _run_id(info)
            if not run_id:
                return  # not a Redis that says (a proxy): nothing to compare
            for cache in caches:
                check(conn, cache, run_id.encode())
        except redis.RedisError:
            raise
        except Exception as exc:  # as a failed connection: the caller's command fails
            raise redis.ConnectionError(f"sa_cache: store epoch check failed: {exc!r}") from exc


def _run_id(info: Any) -> str | None:
    """The ``run_id`` line of an ``INFO server`` reply."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip() or None
    return None


def check(conn: Any, cache: Cache, run_id: bytes) -> None:
    """On connection ``conn`` to a server started as ``run_id``: advance ``cache``'s
    namespace-wide generation unless the epoch key says it was checked on this run."""
    key = epoch_key(cache)
    conn.send_command("GET", key)
    last = conn.read_response()
    if last == run_id:
        return
    conn.send_command("EVAL", ADVANCE, 2, cache.clock_key, cache._all_gen_key, new_nonce())
    conn.read_response()
    conn.send_command("SET", key, run_id)
    conn.read_response()
    cache.stats.incr("store.epoch_changed")
    if last is None:  # new to this namespace (or restored from before its first check)
        log.info("sa_cache: namespace %r: first check on this Redis run", cache.namespace)
        return
    log.warning(
        "sa_cache: the Redis server of namespace %r was restarted (run_id %s); its "
        "contents may be older than the last invalidations, so every entry of the "
        "namespace was invalidated",
        cache.namespace,
        run_id.decode(),
    )


def watch(cache: Cache) -> None:
    """Check ``cache``'s namespace on every new connection of its Redis client (a
    standalone or Sentinel client; nothing for others)."""
    from .backends.redis import RedisBackend

    backend = cache.backend
    if not isinstance(backend, RedisBackend):
        return
    pool = backend.client.connection_pool
    found: EpochCheck | None = getattr(pool, ATTRIBUTE, None)
    if found is None:
        found = EpochCheck()
        setattr(pool, ATTRIBUTE, found)
        pool.connection_kwargs["redis_connect_func"] = found
    found.caches.add(cache)
