"""Reads whose replies are collected later: one connection, replies in send order.

`RedisBackend.get_many_later` sends an MGET now and returns a function that reads its
reply when called. Redis runs the command when it arrives, so the caller gets the
values as of the send, while its own work (e.g. the database COMMIT that follows a
flush) overlaps the round trip.

All deferred reads of a backend share one connection, guarded by a lock: replies
come back in the order the commands were sent, so collecting one reply first reads
(and keeps) the replies of earlier commands. A reply nobody collects (a transaction
that rolled back) is read and dropped by a later collection; an error on the
connection fails every command still waiting on it, and the next send reconnects.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from .base import BackendError

_PENDING = object()
MAX_WAITING = 32
"""Replies kept unread at most: beyond that a send first reads the oldest ones (their
commands ran long ago), so replies nobody collects never pile up in either buffer."""


class _Ticket:
    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: Any = _PENDING
        self.error: BaseException | None = None


class LaterReads:
    """Send now, read later, on one connection of ``pool`` (see the module docstring)."""

    def __init__(self, pool: Any, errors: tuple[type[BaseException], ...]) -> None:
        self._pool = pool
        self._errors = errors
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid = os.getpid()
        self._waiting: deque[_Ticket] = deque()

    def send(self, *args: Any) -> Callable[[], Any]:
        """Send one command; the returned function returns its reply (BackendError)."""
        ticket = _Ticket()
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's socket is not ours
                self._pid, self._conn = os.getpid(), None
                self._waiting.clear()
            while len(self._waiting) >= MAX_WAITING:
                self._read_head()
            try:
                if self._conn is None:
                    self._conn = self._pool.get_connection()
                self._conn.send_command(*args)
            except self._errors as exc:
                self._drop(exc)
                raise BackendError(f"{args[0]} failed: {exc}") from exc
            self._waiting.append(ticket)
        return lambda: self._collect(ticket)

    def close(self) -> None:
        with self._lock:
            self._drop(BackendError("closed"))

    def _collect(self, ticket: _Ticket) -> Any:
        with self._lock:
            while ticket.value is _PENDING and ticket.error is None:
                self._read_head()
        if ticket.error is not None:
            raise BackendError(f"deferred read failed: {ticket.error}") from ticket.error
        return ticket.value

    def _read_head(self) -> None:
        """Read the oldest waiting reply (lock held)."""
        head = self._waiting[0]
        try:
            head.value = self._conn.read_response()
        except ResponseError as exc:  # that command failed; the connection is fine
            head.error = exc
        except self._errors as exc:
            self._drop(exc)  # fails head and everything behind it
            return
        self._waiting.popleft()

    def _drop(self, exc: BaseException) -> None:
        """Fail every waiting command and forget the connection (lock held)."""
        for waiting in self._waiting:
            waiting.error = exc
        self._waiting.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.disconnect()
            finally:
                self._pool.release(conn)
