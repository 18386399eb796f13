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
of every namespace using that server, whether or not anything was lost. A namespace
without its namespace-wide generation holds nothing that could be served (every entry
carries it): the run is only noted, nothing is invalidated.

Not covered: Redis Cluster (a node's restart is not seen), a server that is restored
without restarting (``DEBUG RELOAD``), and a user the server does not allow ``INFO``
(the check is then skipped, with a warning). Connections the client opened before the
`Cache` was made are not checked. Write-behind changes queued after the
restored moment are lost with it: durability needs AOF (see README).
"""

from __future__ import annotations

import logging
import threading
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
    """The ``redis_connect_func`` of one connection pool: the handshake (the client's
    own ``redis_connect_func`` if it had one), then the check of every `Cache`
    (namespace) that uses the pool, in one round trip when nothing changed."""

    def __init__(self, previous: Any = None) -> None:
        self.caches: weakref.WeakSet[Cache] = weakref.WeakSet()
        self.previous = previous
        self.lock = threading.Lock()
        self.refused = False  # the server refused the check (an ACL without INFO, say)

    def add(self, cache: Cache) -> None:
        with self.lock:
            self.caches.add(cache)

    def discard(self, cache: Cache) -> None:
        with self.lock:
            self.caches.discard(cache)

    def __call__(self, conn: Any) -> None:
        if self.previous is not None:
            self.previous(conn)
        else:
            conn.on_connect()
        with self.lock:
            caches = list(self.caches)
        if not caches or self.refused:
            return
        try:
            # each namespace's epoch key and namespace-wide generation (every entry
            # carries it: without it the namespace holds nothing that could be served)
            keys = [k for cache in caches for k in (epoch_key(cache), cache._all_gen_key)]
            conn.send_packed_command(conn.pack_commands([("INFO", "server"), ("MGET", *keys)]))
            info, lasts = _reply(conn), _reply(conn)  # both, so that none is left unread
            for reply in (info, lasts):
                if isinstance(reply, redis.ResponseError):
                    raise reply
            run_id = _run_id(info)
            if not run_id:
                return  # not a Redis that says (a proxy): nothing to compare
            for cache, last, generation in zip(caches, lasts[::2], lasts[1::2], strict=True):
                if last == run_id.encode():
                    continue
                if generation is None:  # nothing could be served: only note the run
                    conn.send_command("SET", epoch_key(cache), run_id)
                    conn.read_response()
                else:
                    check(conn, cache, run_id.encode(), last)
        except redis.ResponseError as exc:  # refused (NOPERM): cannot check, never blocks
            self.refused = True
            for cache in caches:
                cache.stats.incr("store.epoch_unchecked")
            log.warning(
                "sa_cache: Redis refused the store epoch check (%s): a Redis restarted from "
                "an older file is not noticed (grant the cache's user INFO, MGET, EVAL and "
                "SET, or invalidate_all() after restoring Redis)",
                exc,
            )
        except redis.RedisError:
            raise
        except Exception as exc:  # as a failed connection: the caller's command fails
            raise redis.ConnectionError(f"sa_cache: store epoch check failed: {exc!r}") from exc


def _reply(conn: Any) -> Any:
    """The next reply on ``conn``; an error reply as its exception (returned)."""
    try:
        return conn.read_response()
    except redis.ResponseError as exc:
        return exc


def _run_id(info: Any) -> str | None:
    """The ``run_id`` line of an ``INFO server`` reply."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip() or None
    return None


def check(conn: Any, cache: Cache, run_id: bytes, last: Any) -> None:
    """On connection ``conn`` to a server started as ``run_id``, whose epoch key for
    ``cache``'s namespace holds ``last``: advance the namespace-wide generation and
    record this run."""
    conn.send_command("EVAL", ADVANCE, 2, cache.clock_key, cache._all_gen_key, new_nonce())
    conn.read_response()
    conn.send_command("SET", epoch_key(cache), run_id)
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
        found = EpochCheck(pool.connection_kwargs.get("redis_connect_func"))
        setattr(pool, ATTRIBUTE, found)
        pool.connection_kwargs["redis_connect_func"] = found
    found.add(cache)


def unwatch(cache: Cache) -> None:
    """At `Cache.close`: no more checks for ``cache``'s namespace."""
    from .backends.redis import RedisBackend

    backend = cache.backend
    if isinstance(backend, RedisBackend):
        found: EpochCheck | None = getattr(backend.client.connection_pool, ATTRIBUTE, None)
        if found is not None:
            found.discard(cache)
