"""`RedisClusterBackend`: the `Backend` on a Redis Cluster through redis-py's
``RedisCluster`` (keys that must be touched together share a hash tag)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from .base import BackendError, NoValue
from .redis import _ERRORS, _errors, _fail, _px, _RedisBase, _slot, _values


class RedisClusterBackend(_RedisBase):
    """A `Backend` on Redis Cluster; batches may span slots (one pipeline per node).

    The ``RedisCluster`` client is built on first use, since building it discovers the
    slots (connects). A failed discovery raises `BackendError` from that operation and
    is tried again by the next one. Pass ``client`` to wrap a ready client instead.
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
        # One retry: a failover or a moved slot refreshes the slot map once, then fails.
        self.retry = retry if retry is not None else Retry(NoBackoff(), 1)
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
                    self._cluster = RedisCluster(
                        startup_nodes=nodes, retry=self.retry, **self.client_kwargs
                    )
                except _ERRORS as exc:
                    for node in nodes:  # a failed discovery may leave a connection open
                        if node.redis_connection is not None:
                            node.redis_connection.close()
                    raise _fail("cluster discovery", exc) from exc
            return self._cluster

    _c: Any = client  # the same property

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
            pipe = self._c.pipeline(transaction=False)
            for key in keys:
                pipe.set(key, value, px=_px(ttl), get=True)  # (its reply: the old value)
            for key in read:
                pipe.execute_command("GET", key)
            values = _values("swap", pipe.execute(), len(keys) + len(read))
        return lambda: values

    def get_many(self, keys: Sequence[str]) -> list[bytes | NoValue]:
        if not keys:
            return []
        c = self._c
        try:
            one_slot = len({_slot(k) for k in keys}) == 1  # e.g. keys with one hash tag
            raw = c.execute_command("MGET", *keys) if one_slot else c.mget_nonatomic(keys)
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
