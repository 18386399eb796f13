"""Fills off the request path: a miss returns its rows without waiting for the store.

A fill is safe to delay: the entry carries the generations read before the query ran,
so a fill that lands after a commit bumped them is never served (DESIGN rule 3), and
a fill's compare-and-set still runs against the bytes read before loading. Writes
that others must see at once — write-through images, invalidations, lease-guarded
fills that other processes wait for — never come here.

One daemon thread per `Cache` stores the fills in submission order. A thread that
submitted fills waits for them before its next read of the store, so what a thread
just loaded is a hit for that thread's next read (other threads never wait for it).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger("sa_cache")

WAIT_LIMIT = 2.0
"""Seconds a thread waits for its own fills before reading anyway (a store that hangs
is bounded by its socket timeout well before this)."""
MAX_QUEUED = 1000
"""Fills waiting beyond this are dropped (counted): the store is too slow to keep up."""


class _Tickets:
    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0  # this thread's fills not stored yet


class Filler:
    """Runs fill jobs on a background thread (see the module docstring)."""

    def __init__(self, on_drop: Callable[[], None] = lambda: None) -> None:
        self._cond = threading.Condition()
        self._jobs: deque[tuple[_Tickets, Callable[[], None]]] = deque()
        self._local = threading.local()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._on_drop = on_drop

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False (not queued: run it yourself) once closed, or when called
        from a fill itself (it would wait for its own thread)."""
        self._after_fork()
        if threading.current_thread() is self._thread:
            return False
        tickets = self._tickets()
        with self._cond:
            if self._closed:
                return False
            if len(self._jobs) >= MAX_QUEUED:
                self._on_drop()
                return True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sa_cache-fill", daemon=True)
                self._thread.start()
            tickets.open += 1
            self._jobs.append((tickets, job))
            self._cond.notify_all()
        return True

    def wait_own(self) -> None:
        """Wait until the fills this thread submitted are stored (bounded)."""
        self._after_fork()
        tickets: _Tickets | None = getattr(self._local, "tickets", None)
        if tickets is None or not tickets.open:
            return
        with self._cond:
            self._cond.wait_for(lambda: not tickets.open, WAIT_LIMIT)

    def _after_fork(self) -> None:
        """In a forked child, start afresh: the parent's thread, queue and the tickets of
        its fills (which no thread here will ever store) are not this process's, and its
        lock may have been held by a thread that does not exist here."""
        if self._pid != os.getpid():
            self._pid, self._thread = os.getpid(), None
            self._cond = threading.Condition()
            self._jobs = deque()
            self._local = threading.local()

    def close(self) -> None:
        """Store what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(WAIT_LIMIT)

    def _tickets(self) -> _Tickets:
        tickets: _Tickets | None = getattr(self._local, "tickets", None)
        if tickets is None:
            tickets = self._local.tickets = _Tickets()
        return tickets

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return  # closed and drained
                tickets, job = self._jobs.popleft()
            try:
                job()
            except Exception as exc:  # a fill never matters to anyone but the stats
                log.warning("sa_cache: a background fill failed: %r", exc)
            finally:
                with self._cond:
                    tickets.open -= 1
                    self._cond.notify_all()
