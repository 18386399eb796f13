"""The ``RedisCluster`` client `RedisClusterBackend` builds: every pipeline routed by
its commands' key slots (`Batch`), and the slot map refreshed off the caller's time
after a node fails (`Refresher`).

redis-py's own cluster pipeline (8.x) does three things a cache cannot afford:

- it asks the client's *default node* for the keys of every ``EVAL`` (``COMMAND
  GETKEYS``: one more round trip per script); once that node has died, every such
  pipeline fails before it is sent, and nothing on that path picks another default
  node, so a failover stopped the process's invalidations for good;
- a node that times out has each of its commands sent again one by one, each
  waiting for its own timeout;
- after each timeout it rediscovers the slots from the startup nodes, one after the
  other, each with its own timeout.

So one failed command could cost many socket timeouts. A `Batch` costs about one
however many nodes fail: it writes to every node before reading; a node that has not
answered within the socket timeout of its write fails at once; once a node has failed
and the timeout has passed it connects to no further node (nodes that failed last go
last, so a dead node does not starve the others); a failed node's commands are not
sent again (a write may have run). Rediscovery runs on a background thread (one at a
time, at most every `REFRESH_INTERVAL` seconds; a MOVED reply, which a live node gave,
still refreshes at once as redis-py does).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    RedisClusterException,
    RedisError,
    TimeoutError,
    TryAgainError,
)

log = logging.getLogger("sa_cache")

REFRESH_INTERVAL = 0.5
"""Seconds between the starts of two background slot-map refreshes."""

_NODE_ERRORS = (ConnectionError, TimeoutError, OSError)
"""A node that did not answer: its commands fail, its replies are not read further."""


class ClusterClient(RedisCluster):
    """A ``RedisCluster`` whose pipelines are `Batch` es and whose slot-map refreshes
    after a failure run in the background (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # discovers the slots (raises if it cannot)
        self.refresher = Refresher(self)
        self.failed_at: dict[str, float] = {}  # node name -> when a `Batch` last saw it fail

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        """A `Batch` (a MULTI transaction: redis-py's own pipeline)."""
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)  # type: ignore[no-untyped-call]
        return Batch(self)

    def close(self) -> None:
        self.refresher.closed = True
        super().close()


class Refresher:
    """Takes over ``client.nodes_manager.initialize`` after discovery: a refresh asked
    for after a failure starts a background thread instead (one at a time, at most one
    start per `REFRESH_INTERVAL`); one that follows a MOVED reply runs at once."""

    def __init__(self, client: RedisCluster) -> None:
        manager = client.nodes_manager
        self._manager = manager
        self._initialize = manager.initialize  # (bound: the original)
        self._lock = threading.Lock()
        self._running = False
        self._started = float("-inf")
        self._pid = os.getpid()
        self.closed = False
        manager.initialize = self.initialize  # type: ignore[method-assign]

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        if self._pid != os.getpid():
            self._forked()
        if kwargs.get("additional_startup_nodes_info"):  # MOVED: the node answered
            self._initialize(*args, **kwargs)
            return
        self.soon()

    def soon(self) -> None:
        """Refresh the slot map on a background thread, unless one runs or started
        less than `REFRESH_INTERVAL` seconds ago."""
        if self._pid != os.getpid():
            self._forked()
        now = time.monotonic()
        with self._lock:
            if self.closed or self._running or now - self._started < REFRESH_INTERVAL:
                return
            self._running, self._started = True, now
        try:
            threading.Thread(target=self._run, name="sa-cache-cluster-refresh", daemon=True).start()
        except RuntimeError:  # interpreter shutting down
            self._running = False

    def _forked(self) -> None:
        """In a forked child no thread of the parent's runs: a refresh it had under way
        holds locks here and in the nodes manager that nothing would release."""
        self._lock, self._running, self._pid = threading.Lock(), False, os.getpid()
        for name in ("_initialization_lock", "_lock"):
            if hasattr(self._manager, name):
                setattr(self._manager, name, threading.RLock())

    def _run(self) -> None:
        try:
            self._initialize()
        except Exception as exc:  # the next failure asks again
            log.debug("sa_cache: Redis Cluster slot map refresh failed: %s", exc)
        finally:
            self._running = False


Commands = list[tuple[tuple[Any, ...], dict[str, Any]]]


class _Node:
    """The commands of one `Batch` for one node, on one connection."""

    __slots__ = ("conn", "failed", "indexes", "node", "pool", "read", "redis", "sent_at", "tried")

    def __init__(self, client: RedisCluster, node: ClusterNode) -> None:
        self.node = node
        self.redis: Any = client.get_redis_connection(node)
        self.pool = self.redis.connection_pool
        self.indexes: list[int] = []
        self.conn: Any = None
        self.sent_at = 0.0
        self.read = 0  # replies read
        self.failed = False
        self.tried = False

    @property
    def timeout(self) -> float | None:
        timeout: float | None = self.pool.connection_kwargs.get("socket_timeout")
        return timeout

    def send(self, commands: Commands, out: list[Any], lost: float | None) -> None:
        """Connect and write; ``lost``: when the batch started, if a node failed since
        (then, once the timeout has passed, this one is not tried)."""
        timeout = self.timeout
        if lost is not None and timeout and time.monotonic() - lost >= timeout:
            error = TimeoutError(
                f"{self.node.name} not tried: the pipeline's time went to a failed node"
            )
            self.fail(error, out)
            return
        self.tried = True
        try:
            try:
                self.conn = self.pool.get_connection()
            except TypeError:  # redis-py < 5.3 wants a command name
                self.conn = self.pool.get_connection("EVAL")
            packed = self.conn.pack_commands([commands[i][0] for i in self.indexes])
            self.conn.send_packed_command(packed)
        except _NODE_ERRORS as exc:
            self.fail(exc, out)
        self.sent_at = time.monotonic()

    def receive(self, commands: Commands, out: list[Any]) -> None:
        if self.failed:
            return
        conn, timeout = self.conn, self.timeout
        try:
            if timeout and time.monotonic() - self.sent_at >= timeout and not conn.can_read(0):
                # (another node's wait used this one's time: it did not answer in time)
                raise TimeoutError(f"Timeout reading from {self.node.name}")
            for i in self.indexes:
                args, options = commands[i]
                try:
                    out[i] = self.redis.parse_response(conn, args[0], **options)
                except _NODE_ERRORS:
                    raise
                except RedisError as exc:  # this command's error reply
                    out[i] = exc
                self.read += 1
        except _NODE_ERRORS as exc:
            self.fail(exc, out)

    def fail(self, exc: BaseException, out: list[Any]) -> None:
        self.failed = True
        for i in self.indexes[self.read :]:
            out[i] = exc

    def release(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.read < len(self.indexes):  # replies left on the socket: not reusable
            conn.disconnect()
        self.pool.release(conn)


class Batch:
    """Commands for a Redis Cluster sent as one pipeline per node: all written before
    any reply is read. A command goes to the primary of its key's slot (``EVAL``: its
    first key's; every key of one script shares a slot by design), or to the one node
    given as ``target_nodes``.

    `execute` returns the replies in order (``raise_on_error=False``: an error in
    place of a reply; else the first error is raised). A command answered with a
    redirection (MOVED, ASK, TRYAGAIN: it did not run) is sent again through the
    client, which follows it. A node that failed (no connection, a timeout) fails each
    of its commands not yet answered, which are not sent again, and has the slot map
    refreshed in the background; so does a CLUSTERDOWN reply."""

    def __init__(self, client: RedisCluster) -> None:
        self.client: Any = client  # (redis-py's cluster methods are untyped)
        self._commands: Commands = []

    def execute_command(self, *args: Any, **options: Any) -> Batch:
        self._commands.append((args, options))
        return self

    def __len__(self) -> int:
        return len(self._commands)

    def reset(self) -> None:
        self._commands = []

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        commands, self._commands = self._commands, []
        out: list[Any] = [None] * len(commands)
        nodes: dict[str, _Node] = {}
        client: RedisCluster = self.client
        for i, (args, options) in enumerate(commands):
            try:
                node = self._node_of(args, options.pop("target_nodes", None))
                entry = nodes.get(node.name)
                if entry is None:
                    entry = nodes[node.name] = _Node(client, node)
            except (RedisClusterException, RedisError) as exc:  # e.g. a slot not covered
                out[i] = exc
                continue
            entry.indexes.append(i)
        failed_at: dict[str, float] = getattr(client, "failed_at", {})
        order = sorted(nodes.values(), key=lambda n: failed_at.get(n.node.name, 0.0))
        started, lost = time.monotonic(), None
        try:
            for entry in order:  # (the nodes that failed last, last)
                entry.send(commands, out, lost)
                if entry.failed:
                    lost = started
            for entry in order:
                entry.receive(commands, out)
        finally:
            for entry in order:
                entry.release()
        failed = [n.node for n in order if n.failed and n.tried]
        now = time.monotonic()
        for entry in order:
            if entry.failed and entry.tried:
                failed_at[entry.node.name] = now
            elif failed_at and entry.tried:
                failed_at.pop(entry.node.name, None)
        self._after(commands, out, failed)
        if raise_on_error:
            for result in out:
                if isinstance(result, BaseException):
                    raise result
        return out

    def _node_of(self, args: tuple[Any, ...], target: Any) -> ClusterNode:
        if target is not None:
            if isinstance(target, ClusterNode):
                return target
            if isinstance(target, list | tuple) and len(target) == 1:
                return target[0]  # type: ignore[no-any-return]
            raise RedisClusterException(f"a Batch command goes to one node, got {target!r}")
        client = self.client
        if args[0] in ("EVAL", "EVALSHA") and int(args[2]) > 0:
            slot = client.keyslot(args[3])  # (redis-py would check every key)
        else:
            slot = client.determine_slot(*args)  # a fixed key position: parsed here
        node: ClusterNode = client.nodes_manager.get_node_from_slot(slot)
        return node

    def _after(self, commands: Commands, out: list[Any], failed: list[ClusterNode]) -> None:
        """Redirected commands sent again; a refresh after a failure."""
        client = self.client
        refresh = bool(failed)
        for i, result in enumerate(out):
            if isinstance(result, AskError | TryAgainError):  # (MovedError is an AskError)
                args, options = commands[i]
                try:
                    out[i] = client.execute_command(*args, **options)
                except (RedisClusterException, RedisError) as exc:
                    out[i] = exc
            elif isinstance(result, ClusterDownError):
                refresh = True
        if not refresh:
            return
        if client.get_default_node() in failed:  # (what redis-py asks keyless commands)
            client.replace_default_node()
        refresher = getattr(client, "refresher", None)
        if refresher is not None:
            refresher.soon()
        else:  # a client sa_cache did not build
            client.nodes_manager.initialize()
