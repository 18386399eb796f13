"""The parts `stampede.get_or_load` is built from: a per-process single flight, a
bounded background refresher, a store lease, and a guarded (compare-and-set) fill."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger("sa_cache")

T = TypeVar("T")

DEFAULT_LEASE_TTL: Final = 2.0
"""Seconds a lease lives: a dead holder delays other processes at most this long."""
LEASE_SUFFIX: Final = ":lease"


_forgotten_at_fork: weakref.WeakSet[SingleFlight | Refresher] = weakref.WeakSet()


def _forget_at_fork() -> None:
    for owner in list(_forgotten_at_fork):
        owner._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows (no fork there)
    os.register_at_fork(after_in_child=_forget_at_fork)


class SingleFlight:
    """Concurrent ``do(key, fn)`` calls run ``fn`` once; the others get its result (the very
    object) or its error. Entries live only while their call runs: no unbounded growth.

    With ``alone``, a caller that joined is never handed the leader's *error* (it
    belongs to the leader's own Session and transaction: a statement timeout, a lock
    wait cancelled) and waits at most ``wait`` seconds (a leader blocked on a lock the
    caller holds would otherwise wait for it forever): it runs ``alone`` instead."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, Future[Any]] = {}
        _forgotten_at_fork.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the calls in flight are the parent's threads', which the
        child does not have (nothing would resolve them), and the lock may be held."""
        self._lock, self._calls = threading.Lock(), {}

    def do(
        self,
        key: Hashable,
        fn: Callable[[], T],
        wait: float | None = None,
        alone: Callable[[str], T] | None = None,
    ) -> T:
        """Run ``fn`` unless a call for ``key`` is in flight; then wait (at most ``wait``
        seconds: TimeoutError) for that one's outcome. With ``alone``: if that call fails
        or takes longer, return ``alone(why)`` (``why``: ``"flight.leader_failed"`` or
        ``"flight.wait_timeout"``) instead."""
        with self._lock:
            call = self._calls.get(key)
            lead = call is None
            if call is None:
                call = self._calls[key] = Future()
        if lead:
            return self._run(key, call, fn)
        if alone is None:
            return call.result(wait)  # type: ignore[no-any-return]
        try:
            return call.result(wait)  # type: ignore[no-any-return]
        except FutureTimeout:  # our wait ran out (or the leader raised one)
            why = "flight.leader_failed" if call.done() else "flight.wait_timeout"
        except Exception:
            why = "flight.leader_failed"
        return alone(why)

    def try_do(self, key: Hashable, fn: Callable[[], T], default: T) -> T:
        """Run ``fn`` unless a call for ``key`` is in flight; then return ``default`` at once."""
        with self._lock:
            if key in self._calls:
                return default
            call = self._calls[key] = Future()
        return self._run(key, call, fn)

    def _run(self, key: Hashable, call: Future[Any], fn: Callable[[], T]) -> T:
        try:
            result = fn()
        except BaseException as exc:
            call.set_exception(exc)
            raise
        else:
            call.set_result(result)
            return result
        finally:
            with self._lock:
                del self._calls[key]


class Refresher:
    """Background refreshes on ``max_workers`` threads, at most one per key in flight and
    ``max_queue`` waiting; beyond that `submit` drops the job (the caller counts it)."""

    def __init__(self, max_workers: int = 2, max_queue: int = 32) -> None:
        if max_workers < 1 or max_queue < 0:
            raise ValueError(f"need max_workers >= 1, max_queue >= 0: {max_workers}, {max_queue}")
        self.max_workers, self.max_queue = max_workers, max_queue
        self._cond, self._inflight, self._pid = threading.Condition(), set[Hashable](), os.getpid()
        self._executor = ThreadPoolExecutor(max_workers, "sa_cache-refresh")
        _forgotten_at_fork.add(self)

    def _after_fork(self) -> None:
        """In a forked child: no refresh runs (the parent's threads are not ours), so
        `running` must not say one does (stale entries would never be reloaded)."""
        self._cond, self._inflight, self._pid = threading.Condition(), set(), os.getpid()
        self._executor = ThreadPoolExecutor(self.max_workers, "sa_cache-refresh")

    def submit(self, key: Hashable, fn: Callable[[], object]) -> str:
        """Queue ``fn``: ``"scheduled"``, or dropped: ``"running"``, ``"full"``, ``"closed"``."""
        with self._cond:
            if self._pid != os.getpid():  # forked: the parent's threads are not ours
                self._pid, self._inflight = os.getpid(), set()
                self._executor = ThreadPoolExecutor(self.max_workers, "sa_cache-refresh")
            if key in self._inflight:
                return "running"
            if len(self._inflight) >= self.max_workers + self.max_queue:
                return "full"
            try:
                self._executor.submit(self._run, key, fn)
            except RuntimeError:  # closed, or the interpreter is exiting
                return "closed"
            self._inflight.add(key)
        return "scheduled"

    def _run(self, key: Hashable, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception:
            log.exception("sa_cache: background refresh failed")
        finally:
            with self._cond:
                self._inflight.discard(key)
                self._cond.notify_all()

    def running(self, key: Hashable) -> bool:
        """True while a refresh of ``key`` is queued or running."""
        return key in self._inflight

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no refresh is queued or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._inflight, timeout)

    def close(self, wait: bool = True) -> None:
        """Stop accepting jobs and shut the threads down."""
        self._executor.shutdown(wait=wait)


class Lease:
    """``{entry_key}:lease`` holding a random token: SET NX PX, released by compare-and-delete
    (a holder whose lease expired can never release a newer holder's lease). The lease
    key lives in the entry's Redis Cluster slot, so both are read in one MGET."""

    __slots__ = ("cache", "key", "token", "ttl")

    def __init__(self, cache: Cache, entry_key: str, ttl: float = DEFAULT_LEASE_TTL) -> None:
        # The entry's Cluster slot: reuse its hash tag, or make the whole entry key the tag.
        start = entry_key.find("{")
        tagged = start >= 0 and entry_key.find("}", start + 1) > start + 1
        self.key = entry_key + LEASE_SUFFIX if tagged else f"{{{entry_key}}}{LEASE_SUFFIX}"
        self.cache, self.ttl, self.token = cache, ttl, secrets.token_hex(16).encode()

    def acquire(self) -> bool | None:
        """True: ours now; False: someone else holds it; None: the store did not answer."""
        add, key, token, ttl = self.cache.backend.add, self.key, self.token, self.ttl
        return self.cache._call(lambda: add(key, token, ttl), None, "lease")

    def release(self) -> bool:
        """Delete the lease if it still holds our token; True when it did."""
        cas = self.cache.backend.cas
        return self.cache._call(lambda: cas(self.key, self.token, None), False, "lease")


def guarded_fill(
    cache: Cache, key: str, expected: bytes | None, value: bytes, ttl: float | None
) -> bool | None:
    """Store ``value`` if ``key`` still holds ``expected`` (None: no entry): True when stored,
    False when the entry changed since it was read, None when the store did not answer."""
    cas = cache.backend.cas
    return cache._call(lambda: cas(key, expected, value, ttl), None, "fill")
