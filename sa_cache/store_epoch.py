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
        self.refused = False  # the server refused a check (an ACL): warned once

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
        if not caches:
            return
        try:
            self._check(conn, caches)
        except redis.RedisError:
            raise  # the connection fails: reads go to the database, the next one checks
        except Exception as exc:
            raise redis.ConnectionError(f"sa_cache: store epoch check failed: {exc!r}") from exc

    def _check(self, conn: Any, caches: list[Cache]) -> None:
        """INFO, and per namespace its epoch key and namespace-wide generation (every
        entry carries it: without it the namespace holds nothing that could be served),
        in one round trip; every reply is read, so none is left on the connection."""
        commands: list[tuple[str, ...]] = [("INFO", "server")]
        commands += [("MGET", epoch_key(c), c._all_gen_key) for c in caches]
        conn.send_packed_command(conn.pack_commands(commands))
        info, *found = [_reply(conn) for _ in commands]
        if isinstance(info, redis.exceptions.NoPermissionError):
            self._unchecked(caches, info)
            return
        if isinstance(info, Exception):
            raise info
        run_id = _run_id(info)
        if not run_id:
            return  # not a Redis that says (a proxy): nothing to compare
        run = run_id.encode()
        for cache, reply in zip(caches, found, strict=True):
            if isinstance(reply, redis.exceptions.NoPermissionError):
                self._unchecked([cache], reply)  # (this namespace's keys only)
                continue
            if isinstance(reply, Exception):
                raise reply
            last, generation = reply
            if last == run:
                continue
            if generation is None:  # nothing could be served: only note the run
                conn.send_command("SET", epoch_key(cache), run)
                conn.read_response()
            else:  # an error here (READONLY, OOM) fails the connection: checked next time
                check(conn, cache, run, last)

    def _unchecked(self, caches: list[Cache], exc: Exception) -> None:
        """The server does not let this user check (an ACL): never blocks the cache."""
        for cache in caches:
            cache.stats.incr("store.epoch_unchecked")
        if not self.refused:  # (once per pool)
            self.refused = True
            log.warning(
                "sa_cache: Redis refused the store epoch check (%s): a Redis restarted from "
                "an older file is not noticed (grant the cache's user INFO, MGET, EVAL and "
                "SET on its keys, or invalidate_all() after restoring Redis)",
                exc,
            )


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
