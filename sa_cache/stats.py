"""Counters: every hit, miss, fill and failure passes `Stats.incr`."""

from __future__ import annotations

import threading
from collections import Counter


class Stats:
    """Thread-safe event counters of one `Cache` (read with `snapshot`)."""

    __slots__ = ("_counts", "_lock")

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def incr(self, event: str, n: int = 1) -> None:
        """Count ``n`` occurrences of ``event`` (e.g. ``"hit"``, ``"query.miss"``)."""
        with self._lock:
            self._counts[event] += n

    def __getitem__(self, event: str) -> int:
        return self._counts[event]

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self._counts.clear()
