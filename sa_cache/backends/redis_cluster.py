"""`RedisClusterBackend`: the `Backend` on a Redis Cluster through redis-py's
``RedisCluster`` (keys that must be touched together share a hash tag); the client it
builds is a `redis_cluster_client.ClusterClient` (pipelines routed by key slot, the
slot map refreshed in the background after a failure)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from .base import BackendError, NoValue
from .redis import _ERRORS, _errors, _fail, _px, _RedisBase, _slot, _values
from .redis_cluster_client import Batch, ClusterClient


class RedisClusterBackend(_RedisBase):
    """A `Backend` on Redis Cluster; batches may span slots (one pipeline per node).

    The client (a `ClusterClient`) is built on first use, since building it discovers
    the slots (connects). A failed discovery raises `BackendError` from that operation
    and is tried again by the next one. Pass ``client`` to wrap a ready client instead
    (this backend's own pipelines are still `Batch` es; the write-behind queue's are
    the client's own unless it is a `ClusterClient`).
    """

    _cluster_mode = True

    def __init__(
        self,
        startup_nodes: Sequence[tuple[str, int]] = (),
        *,
        client: RedisCluster | None = None,
        retry: Retry | None = None,
        **client_kwargs: Any,
    ) -> None:
        if client is None and not startup_nodes:
            raise ValueError("RedisClusterBackend needs startup_nodes or a client")
        self.startup_nodes = tuple(startup_nodes)  # (host, port) to discover from
        self.client_kwargs = client_kwargs  # for RedisCluster and its node connections
        # No retry: a failed command costs one timeout (a MOVED reply is followed anyway,
        # and the slot map is refreshed in the background: see `ClusterClient`).
        self.retry = retry if retry is not None else Retry(NoBackoff(), 0)
        self._cluster = client
        self._lock = threading.Lock()
        self._closed = False

    @property
    def client(self) -> RedisCluster:
        """The ``RedisCluster`` client; discovers the cluster on first use."""
        cluster = self._cluster
        if cluster is not None:
            return cluster
        with self._lock:
            if self._closed:
                raise BackendError("RedisClusterBackend is closed")
            if self._cluster is None:
                nodes = [ClusterNode(h, p) for h, p in self.startup_nodes]  # type: ignore[no-untyped-call]
                try:
                    self._cluster = ClusterClient(
                        startup_nodes=nodes, retry=self.retry, **self.client_kwargs
                    )
                except _ERRORS as exc:
                    for node in nodes:  # a failed discovery may leave a connection open
                        if node.redis_connection is not None:
                            node.redis_connection.close()
                    raise _fail("cluster discovery", exc) from exc
            return self._cluster

    _c: Any = client  # the same property

    def _pipeline(self) -> Batch:
        return Batch(self._c)

    def get_many_later(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """Answered at once: keys in several slots are several round trips anyway."""
        values = self.get_many(keys)
        return lambda: values

    get_many_soon = get_many_later

    def swap_many_later(
        self, keys: Sequence[str], value: bytes, ttl: float, read: Sequence[str] = ()
    ) -> Callable[[], list[bytes | NoValue]]:
        """Answered at once: one pipeline (``SET ... GET`` per key), a round trip a node."""
        if not keys and not read:
            return list
        with _errors("swap"):
            pipe = self._pipeline()
            for key in keys:  # (the reply: the old value; ``get``: so parsed)
                pipe.execute_command("SET", key, value, "PX", _px(ttl), "GET", get=True)
            for key in read:
                pipe.execute_command("GET", key)
            values = _values("swap", pipe.execute(), len(keys) + len(read))
        return lambda: values

    def get_many(self, keys: Sequence[str]) -> list[bytes | NoValue]:
        if not keys:
            return []
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(_slot(key), []).append(i)
        try:
            if len(by_slot) == 1:  # e.g. keys with one hash tag
                raw = self._c.execute_command("MGET", *keys)
            else:  # one MGET per slot, one round trip per node
                pipe = self._pipeline()
                for slot in by_slot.values():
                    pipe.execute_command("MGET", *(keys[i] for i in slot))
                raw = [None] * len(keys)
                for slot, reply in zip(by_slot.values(), pipe.execute(), strict=True):
                    if type(reply) is not list or len(reply) != len(slot):
                        raw = reply  # (refused below)
                        break
                    for i, value in zip(slot, reply, strict=True):
                        raw[i] = value
        except _ERRORS as exc:
            raise _fail("MGET", exc) from exc
        return _values("MGET", raw, len(keys))

    def ping(self) -> bool:
        """True when every primary answers PING."""
        try:
            return bool(self._c.ping(target_nodes=RedisCluster.PRIMARIES))
        except Exception:
            return False

    def close(self) -> None:
        with self._lock:
            cluster, self._cluster, self._closed = self._cluster, None, True
        if cluster is not None:
            cluster.close()

    def server_info(self, section: str | None = None) -> dict[str, Any]:
        """INFO of every primary, by node name (``"host:port"``)."""
        c = self._c
        with _errors("INFO"):
            return {n.name: dict(c.info(section, target_nodes=n)) for n in c.get_primaries()}
