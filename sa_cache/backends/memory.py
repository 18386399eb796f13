"""The embedded store: a bounded, thread-safe LRU with per-entry TTL, in one process."""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from .base import NO_VALUE, NoValue

GUARD_PREFIX = b"sac-"
"""Values that guard a key rather than cache a value: tombstones (``sac-tomb:``) and
entity leases (``sac-lease:``); see `MemoryBackend._evict_one`."""


class MemoryBackend:
    """In-process store for ``memory://``: LRU bounded by entry count, TTL per entry.

    ``clock`` is injectable so expiry can be tested without sleeping.
    """

    in_process = True  # fills are stored at once (see Cache.fill_later)

    def __init__(
        self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._clock = clock
        # key -> (value, expires_at or None): the LRU
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        # Guards — tombstones and leases (values ``sac-...`` with a TTL) — live outside
        # the LRU and go only by their TTL: evicted, one would read as "absent", which a
        # fill loaded before it compares equal to (an older value stored). Bounded by
        # ``guard_limit``: past it the soonest to expire go first (counted).
        self._guards: dict[str, tuple[bytes, float]] = {}
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, key) of guards
        self.guard_limit = max(10 * max_entries, 100_000)
        self.guards_dropped = 0
        self._lock = threading.Lock()

    def _get_locked(self, key: str, now: float) -> bytes | NoValue:
        item = self._data.get(key)
        if item is None:
            guard = self._guards.get(key)
            if guard is None:
                return NO_VALUE
            if guard[1] <= now:
                del self._guards[key]
                return NO_VALUE
            return guard[0]
        value, expires = item
        if expires is not None and expires <= now:
            del self._data[key]
            return NO_VALUE
        self._data.move_to_end(key)
        return value

    def _drop_locked(self, key: str) -> None:
        self._data.pop(key, None)
        self._guards.pop(key, None)  # (its heap item goes when it comes up)

    def _set_locked(self, key: str, value: bytes, ttl: float | None, now: float) -> None:
        if ttl is not None and ttl <= 0:
            self._drop_locked(key)
            return
        if ttl is not None and value.startswith(GUARD_PREFIX):
            self._data.pop(key, None)
            expires = now + ttl
            self._guards[key] = (value, expires)
            heapq.heappush(self._expiry, (expires, key))
            self._purge_guards(now)
            return
        self._guards.pop(key, None)
        self._data[key] = (value, None if ttl is None else now + ttl)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def _purge_guards(self, now: float) -> None:
        """Forget expired guards (and, past ``guard_limit``, the soonest to expire)."""
        heap, guards = self._expiry, self._guards
        while heap:
            expires, key = heap[0]
            found = guards.get(key)
            if found is not None and found[1] != expires:  # set again since: a stale item
                heapq.heappop(heap)
                continue
            if found is not None and expires > now and len(guards) <= self.guard_limit:
                break
            heapq.heappop(heap)
            if found is not None:
                del guards[key]
                if expires > now:
                    self.guards_dropped += 1
        if len(heap) > 2 * len(guards) + 64:  # items of keys set again or dropped
            self._expiry = [(e, k) for k, (_, e) in guards.items()]
            heapq.heapify(self._expiry)

    def get_many(self, keys: Sequence[str]) -> list[bytes | NoValue]:
        now = self._clock()
        with self._lock:
            return [self._get_locked(k, now) for k in keys]

    def get_many_later(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        values = self.get_many(keys)
        return lambda: values

    get_many_soon = get_many_later

    def swap_many_later(
        self, keys: Sequence[str], value: bytes, ttl: float, read: Sequence[str] = ()
    ) -> Callable[[], list[bytes | NoValue]]:
        now = self._clock()
        with self._lock:
            values = [self._get_locked(k, now) for k in keys]
            for key in keys:
                self._set_locked(key, value, ttl, now)
            values += [self._get_locked(k, now) for k in read]
        return lambda: values

    def set_many(self, items: Mapping[str, bytes], ttl: float | None = None) -> None:
        now = self._clock()
        with self._lock:
            for key, value in items.items():
                self._set_locked(key, value, ttl, now)

    def delete_many(self, keys: Sequence[str]) -> int:
        now = self._clock()
        removed = 0
        with self._lock:
            for key in keys:
                if self._get_locked(key, now) is not NO_VALUE:
                    removed += 1
                self._drop_locked(key)
        return removed

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        now = self._clock()
        with self._lock:
            if self._get_locked(key, now) is not NO_VALUE:
                return False
            self._set_locked(key, value, ttl, now)
            return True

    def apply(
        self,
        sets: Sequence[tuple[str, bytes, float | None]] = (),
        deletes: Sequence[str] = (),
    ) -> None:
        now = self._clock()
        with self._lock:
            for key, value, ttl in sets:
                self._set_locked(key, value, ttl, now)
            for key in deletes:
                self._drop_locked(key)

    def advance(self, clock_key: str, keys: Sequence[str], nonce: str) -> int:
        now = self._clock()
        with self._lock:
            current = _clock(self._get_locked(clock_key, now))
            clock = time.time_ns() // 1000
            if current is not None and clock <= current:
                clock = current + 1
            self._set_locked(clock_key, str(clock).encode(), None, now)
            token = f"{clock}:{nonce}".encode()
            for key in keys:
                self._set_locked(key, token, None, now)
            return clock

    def cas(
        self, key: str, expected: bytes | None, value: bytes | None, ttl: float | None = None
    ) -> bool:
        with self._lock:
            return self._cas_locked(key, expected, value, ttl, delete_on_fail=False)

    def _cas_locked(
        self,
        key: str,
        expected: bytes | None,
        value: bytes | None,
        ttl: float | None,
        delete_on_fail: bool = True,
    ) -> bool:
        now = self._clock()
        current = self._get_locked(key, now)
        if (current is NO_VALUE and expected is not None) or (
            current is not NO_VALUE and current != expected
        ):
            if delete_on_fail:
                self._drop_locked(key)
            return False
        if value is None:
            self._drop_locked(key)
        else:
            self._set_locked(key, value, ttl, now)
        return True

    def cas_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, float | None]]
    ) -> list[bool]:
        return [self.cas(key, expected, value, ttl) for key, expected, value, ttl in items]

    def commit(
        self,
        cas: Sequence[tuple[str, bytes | None, bytes | None, float | None]],
        deletes: Sequence[str],
        clock_key: str,
        gen_keys: Sequence[str],
        nonce: str,
        tomb: tuple[bytes, float] | None = None,
    ) -> list[bool]:
        with self._lock:  # the lock is reentrant-free: call the unlocked helpers
            out = [self._cas_locked(*item, delete_on_fail=tomb is None) for item in cas]
            gone = [item[0] for item, ok in zip(cas, out, strict=True) if not ok]
            for key in deletes if tomb is None else ():
                self._drop_locked(key)
            if tomb is not None:
                now = self._clock()
                for key in (*gone, *deletes):
                    self._set_locked(key, tomb[0], tomb[1], now)
        if gen_keys:
            self.advance(clock_key, gen_keys, nonce)
        return out

    def keys(self, prefix: str = "") -> list[str]:
        """Live keys starting with ``prefix`` (for tests, ``gc`` and ``stats``)."""
        now = self._clock()
        with self._lock:
            items = [*self._data.items(), *self._guards.items()]
            return [
                k for k, (_, exp) in items if k.startswith(prefix) and (exp is None or exp > now)
            ]

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        with self._lock:
            self._data.clear()
            self._guards.clear()
            self._expiry.clear()


def _clock(raw: bytes | NoValue) -> int | None:
    """A stored commit clock; None if absent or not a number in [0, 2**53) (as in Redis)."""
    if raw is NO_VALUE:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if 0 <= value < 2**53 else None
