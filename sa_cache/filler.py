"""Fills off the request path: a miss returns its rows without waiting for the store.

A fill is safe to delay: the entry carries the generations read before the query ran,
so a fill that lands after a commit bumped them is never served (DESIGN rule 3), and
a fill's compare-and-set still runs against the bytes read before loading. Writes
that others must see at once — write-through images, invalidations, lease-guarded
fills that other processes wait for — never come here.

One daemon thread per `Cache` stores the fills in submission order. A thread that
submitted fills waits for them before its next write to the store, and before a read
of a key one of them stores, so that what a thread just loaded is a hit for that
thread's next read (other threads never wait for it). A read of other keys does not
wait: a run of misses on different keys costs one round trip each, not two.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Collection

log = logging.getLogger("sa_cache")

WAIT_LIMIT = 2.0
"""Seconds a thread waits for its own fills before reading anyway (a store that hangs
is bounded by its socket timeout well before this)."""
MAX_QUEUED = 1000
"""Fills waiting beyond this are dropped (counted): the store is too slow to keep up."""


class _Tickets:
    __slots__ = ("keys", "open", "unkeyed")

    def __init__(self) -> None:
        self.open = 0  # this thread's fills not stored yet
        self.unkeyed = 0  # ... of them, those that did not name their keys
        self.keys: dict[str, int] = {}  # key -> fills not stored yet that write it


class Filler:
    """Runs fill jobs on a background thread (see the module docstring)."""

    def __init__(self, on_drop: Callable[[], None] = lambda: None) -> None:
        self._cond = threading.Condition()
        self._jobs: deque[tuple[_Tickets, Callable[[], None], Collection[str] | None]] = deque()
        self._local = threading.local()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        self._on_drop = on_drop

    def submit(self, job: Callable[[], None], keys: Collection[str] | None = None) -> bool:
        """Queue ``job``, which writes ``keys`` (None: unknown); False (not queued: run it
        yourself) once closed, or when called from a fill itself (it would wait for its
        own thread)."""
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
            if keys is None:
                tickets.unkeyed += 1
            else:
                for key in keys:
                    tickets.keys[key] = tickets.keys.get(key, 0) + 1
            self._jobs.append((tickets, job, keys))
            self._cond.notify_all()
        return True

    def wait_own(self, reads: Collection[str] | None = None) -> None:
        """Wait until the fills this thread submitted are stored (bounded); ``reads``:
        the caller only reads those keys, so only fills that write one of them count."""
        self._after_fork()
        tickets: _Tickets | None = getattr(self._local, "tickets", None)
        if tickets is None or not tickets.open:
            return
        if reads is not None and not tickets.unkeyed:
            pending = tickets.keys
            if not any(key in pending for key in reads):
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
                tickets, job, keys = self._jobs.popleft()
            try:
                job()
            except Exception as exc:  # a fill never matters to anyone but the stats
                log.warning("sa_cache: a background fill failed: %r", exc)
            finally:
                with self._cond:
                    tickets.open -= 1
                    if keys is None:
                        tickets.unkeyed -= 1
                    else:
                        for key in keys:
                            left = tickets.keys.pop(key) - 1
                            if left:
                                tickets.keys[key] = left
                    self._cond.notify_all()
