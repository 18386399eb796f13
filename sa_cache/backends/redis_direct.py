"""Sending one command the shortest way redis-py allows: straight to a connection.

Cache reads and the write-behind queue write are on the application's hot path, and
redis-py's per-command wrapper (retry loop, metrics hooks) and pool checkout (lock, bookkeeping,
a poll of the socket) cost about 20 µs next to a round trip of 60-80 µs on a local
server. On a standalone server whose client retries nothing (as sa_cache's own
clients are built), `Direct` packs the command and sends it on a connection of the
client's pool itself, and keeps that connection for the next command (checked as the
pool checks it once it sat idle; given back to the pool on any error); otherwise
(Cluster, a client with retries, client-side caching or a single connection) it
calls ``execute_command``. Errors are redis-py's either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import redis

KEEP = 4
"""Connections kept out of the pool between commands (about one per producing thread)."""

IDLE_CHECK = 1.0
"""Seconds a kept connection may sit unused before it is checked for a close by the
server (restart, idle timeout) as the pool checks a connection it hands out."""


class Direct:
    """Sends commands for ``client`` (see the module docstring)."""

    __slots__ = ("client", "kept", "pid", "pool")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pool = direct_pool(client)
        self.kept: list[tuple[Any, float]] = []  # (connection, when it was last used)
        self.pid = os.getpid()

    def execute(self, *args: Any) -> Any:
        """One command and its reply."""
        pool = self.pool
        if pool is None:
            return self.client.execute_command(*args)
        conn = self._take(pool)
        try:  # on a socket error or an interrupt, the connection disconnects itself
            conn.send_packed_command(conn.pack_command(*args))
            reply = conn.read_response()
        except BaseException:
            pool.release(conn)  # the pool decides what becomes of it (e.g. after a failover)
            raise
        self._keep(pool, conn)
        return reply

    def send(self, *args: Any) -> Callable[[], Any]:
        """Send one command now; the returned function reads its reply. It must be called
        (once): until then the connection is the caller's alone."""
        pool = self.pool
        if pool is None:
            answered = self.client.execute_command(*args)
            return lambda: answered
        conn = self._take(pool)
        try:
            conn.send_packed_command(conn.pack_command(*args))
        except BaseException:
            pool.release(conn)
            raise

        def reply() -> Any:
            try:
                answer = conn.read_response()
            except BaseException:
                pool.release(conn)
                raise
            self._keep(pool, conn)
            return answer

        return reply

    def _keep(self, pool: Any, conn: Any) -> None:
        if len(self.kept) < KEEP:
            self.kept.append((conn, time.monotonic()))
        else:
            pool.release(conn)

    def _take(self, pool: Any) -> Any:
        if self.pid != os.getpid():  # a forked child: the parent's sockets are not its own
            self.kept, self.pid = [], os.getpid()
        try:
            conn, since = self.kept.pop()
        except IndexError:
            try:
                return pool.get_connection()
            except TypeError:  # redis-py < 5.3 wants a command name
                return pool.get_connection("EVALSHA")
        if time.monotonic() - since > IDLE_CHECK:
            try:
                stale = conn.can_read()  # an EOF or unexpected data
            except Exception:
                stale = True
            if stale:
                conn.disconnect()  # the next send connects again
        return conn


def direct_pool(client: Any) -> Any:
    """The connection pool `Direct` may use for ``client``, or None."""
    if not isinstance(client, redis.Redis) or client.connection is not None:
        return None  # a cluster client, or one that holds a single connection
    retry = client.get_connection_kwargs().get("retry")
    if retry is not None and getattr(retry, "_retries", 1) != 0:
        return None  # the caller configured retries: let redis-py run them
    pool = client.connection_pool
    if getattr(pool, "cache", None) is not None:
        return None  # client-side caching wraps connections: leave them to redis-py
    return pool
