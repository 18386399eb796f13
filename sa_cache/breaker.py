"""A small circuit breaker for the store: fail fast while it is down, probe to recover."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; lets one probe through per ``cooldown``.

    Closed: every call goes to the store. Open: calls are refused (the caller falls
    back to the database) until ``cooldown`` passes; then one call is allowed
    (half-open) and its outcome closes or re-opens the circuit.
    """

    __slots__ = ("_clock", "_failures", "_lock", "_opened_at", "_probing", "cooldown", "threshold")

    def __init__(
        self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``."""
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self.cooldown:
            return "half-open"
        return "open"

    @property
    def failing(self) -> bool:
        """Did the store's last answer fail (or is the circuit open)? Then values it seemed
        to miss may only be what a failed read falls back to."""
        return bool(self._failures) or self._opened_at is not None

    def allow(self) -> bool:
        """May a call go to the store now?"""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            if not self._probing and self._clock() - self._opened_at >= self.cooldown:
                self._probing = True
                return True
            return False

    def probe(self) -> bool:
        """May a call go to the store now, as a probe even before the cooldown has passed?
        One at a time while the circuit is open: a commit's invalidation is worth one
        bounded try, since other processes read what it drops until it is delivered."""
        if self._opened_at is None:
            return True
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        """Record a call that worked: the circuit closes."""
        if self._failures or self._opened_at is not None:
            with self._lock:
                self._failures = 0
                self._opened_at = None
                self._probing = False

    def failure(self) -> bool:
        """Record a failed call; True when this failure opened the circuit."""
        with self._lock:
            self._failures += 1
            if self._probing:
                self._probing = False
                self._opened_at = self._clock()
                return False
            if self._opened_at is None and self._failures >= self.threshold:
                self._opened_at = self._clock()
                return True
            return False
