"""Remembered invalidations: what the store could not take at a commit, kept and
replayed by a background thread (not only by this process's next store operation:
other processes read the store meanwhile) until it is delivered.

`Invalidation` (and so `Cache`) inherits `Replay`; nothing here is used on its own.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .backends.base import Backend
from .tokens import TOMBSTONE_PREFIX, new_nonce

if TYPE_CHECKING:
    from .stats import Stats

T = TypeVar("T")
log = logging.getLogger("sa_cache")

MAX_PENDING_INVALIDATIONS = 10_000

_replaying: weakref.WeakSet[Any] = weakref.WeakSet()
"""Caches that started a replayer (see `Replay._replayer_after_fork`)."""


def _replayers_after_fork() -> None:
    for cache in list(_replaying):
        try:
            cache._replayer_after_fork()
        except Exception:  # one cache's failure must not leave the others unfixed
            log.exception("sa_cache: restarting the invalidation replayer after fork")


if hasattr(os, "register_at_fork"):  # not on Windows (no fork there)
    os.register_at_fork(after_in_child=_replayers_after_fork)

REPLAY_INTERVAL = 0.1
"""Seconds between background tries to deliver remembered invalidations: fixed, so other
processes stop reading what they drop soon after the store answers again (a try costs
one store call, bounded by the socket timeout, while it does not)."""
REPLAY_IDLE = 5.0
"""Seconds the replayer sleeps with nothing to deliver (`_remember` wakes it)."""
REPLAY_STUCK = 50
"""Background replays failed in a row (about 5 s) after which the store is pinged: if it
answers, invalidations fail while the store works (an error is logged, again after as
many more)."""


class Replay:
    """Invalidations kept for replay, and the thread that replays them."""

    backend: Backend
    stats: Stats
    clock_key: str
    _all_gen_key: str
    _closed: bool
    _pending_lock: threading.Lock
    _pending_bumps: set[str]
    _pending_deletes: set[str]
    _pending_tombs: dict[str, float]  # deletes to replay as tombstones: key -> ttl
    _pending_seq: dict[str, int]  # pending key -> the `_remember` call that last added it
    _pending_next: int
    _on_close: list[Callable[[], None]]

    if TYPE_CHECKING:  # provided by Cache / Invalidation

        def _guarded(self, op: Callable[[], T], fallback: T, what: str) -> T: ...

        def _replayed(self) -> bool: ...

        def _write_invalidation(self, gen_keys: Sequence[str], deletes: Sequence[str]) -> None: ...

    def _remember(
        self,
        bumps: Iterable[str] = (),
        deletes: Iterable[str] = (),
        tombs: Mapping[str, float] | None = None,
    ) -> None:
        """Keep invalidations for replay; ``tombs``: deletes that leave a tombstone (ttl)."""
        bumps, deletes = list(bumps), list(deletes)
        with self._pending_lock:
            seq = self._pending_next = self._pending_next + 1
            # A replay running now delivers what it read before this call: these keys stay
            # pending until one that read them delivers them (see `_replay_pending`).
            self._pending_seq.update(dict.fromkeys([*bumps, *deletes], seq))
            self._pending_bumps.update(bumps)
            self._pending_deletes.update(deletes)
            for key, ttl in (tombs or {}).items():
                self._pending_tombs[key] = max(ttl, self._pending_tombs.get(key, 0.0))
            if len(self._pending_bumps) + len(self._pending_deletes) > MAX_PENDING_INVALIDATIONS:
                # Too much to remember: replaying the namespace-wide bump drops everything
                # (key-value entries too: they carry the namespace-wide generation).
                self._pending_bumps = {self._all_gen_key}
                self._pending_deletes.clear()
                self._pending_tombs.clear()
                self._pending_seq = {self._all_gen_key: seq}
        self.stats.incr("invalidate.deferred")
        self._start_replayer()

    def _start_replayer(self) -> None:
        with self._pending_lock:
            if getattr(self, "_replay_stop", None) is not None:
                self._wake_replayer()
                return
            stop = self._replay_stop = threading.Event()
            self._replay_wake = threading.Event()
            _replaying.add(self)
        thread = threading.Thread(
            target=self._replay_loop, args=(stop,), name="sa-cache-replay", daemon=True
        )
        self._on_close.append(lambda: self._stop_replayer(stop, thread))
        thread.start()

    def _replayer_after_fork(self) -> None:
        """In a forked child: the parent's replayer thread is not there (and the lock
        may have been held at the fork). Remembered invalidations get a replayer of
        their own: delivered even if the child never uses the store again."""
        self._pending_lock = threading.Lock()
        self.__dict__.pop("_replay_stop", None)  # (`_start_replayer` makes them again)
        self.__dict__.pop("_replay_wake", None)
        if (self._pending_bumps or self._pending_deletes) and not self._closed:
            self._start_replayer()

    def _wake_replayer(self) -> None:
        """Have the replayer try now (a store call just succeeded, or there is news)."""
        wake: threading.Event | None = getattr(self, "_replay_wake", None)
        if wake is not None:
            wake.set()

    def _replay_loop(self, stop: threading.Event) -> None:
        wake: threading.Event = self._replay_wake
        failed = 0  # in a row
        while not stop.is_set():
            pending = bool(self._pending_bumps or self._pending_deletes)
            wake.wait(REPLAY_INTERVAL if pending else REPLAY_IDLE)
            wake.clear()
            if stop.is_set():
                return
            if self._pending_bumps or self._pending_deletes:
                failed = 0 if self._guarded(self._replayed, False, "replay") else failed + 1
                if failed and failed % REPLAY_STUCK == 0 and self.backend.ping():
                    log.error(
                        "sa_cache: %d invalidations failed %d times in a row although the "
                        "store answers PING (see the warnings for the error); other "
                        "processes are served what they drop until they are delivered",
                        len(self._pending_bumps) + len(self._pending_deletes),
                        failed,
                    )

    def _stop_replayer(self, stop: threading.Event, thread: threading.Thread) -> None:
        """At `Cache.close`: stop the replayer, try once more, say what could not go."""
        stop.set()
        self._wake_replayer()
        thread.join(REPLAY_IDLE + 1)
        if self._pending_bumps or self._pending_deletes:
            self._guarded(self._replayed, False, "replay at close")
        left = len(self._pending_bumps) + len(self._pending_deletes)
        if left:
            log.warning(
                "sa_cache: closed with %d invalidations the store never took; entries "
                "they stand for may be served until their TTL",
                left,
            )

    def _replay_pending(self) -> None:
        """Deliver remembered invalidations; they stay pending (visible) until delivered."""
        with self._pending_lock:
            bumps, dels = set(self._pending_bumps), set(self._pending_deletes)
            tombs = {k: t for k, t in self._pending_tombs.items() if k in dels}
            seqs = dict(self._pending_seq)
        if not bumps and not dels:
            return
        # BackendError: still pending (tombstones sent twice are still only tombstones)
        if tombs:
            nonce = new_nonce()
            tomb = (TOMBSTONE_PREFIX + nonce.encode(), max(tombs.values()))
            self.backend.commit([], sorted(tombs), self.clock_key, [], nonce, tomb)
        plain = sorted(dels.difference(tombs))
        if bumps or plain:
            self._write_invalidation(sorted(bumps), plain)
        with self._pending_lock:  # only what nobody remembered again since we read it
            done = {k for k in bumps | dels if self._pending_seq.get(k) == seqs.get(k)}
            self._pending_bumps -= done
            self._pending_deletes -= done
            for key in done:
                self._pending_tombs.pop(key, None)
                self._pending_seq.pop(key, None)
        self.stats.incr("invalidate.replayed")
