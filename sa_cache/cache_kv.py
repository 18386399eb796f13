"""The cache-aside (key-value) half of `Cache`: ``get`` / ``set`` / ``delete`` /
``get_or_set`` and their batch forms.

Every key-value entry carries the namespace-wide generation (`ALL_TABLES`), read in the
same round trip as the entry: `Cache.invalidate_all` drops key-value entries too, and
so does the namespace-wide bump that a backlog of undeliverable invalidations collapses
into. A write the store could not take is remembered as a tombstone delete, so the
value from before it never comes back once the store answers again.

`Cache` inherits `KeyValue`; nothing here is used on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .backends.base import NO_VALUE, NoValue
from .freshness import Freshness
from .stampede import get_or_load
from .tokens import QUERY_TOMBSTONE_TTL, TOMBSTONE_PREFIX

if TYPE_CHECKING:
    from .backends.base import Backend
    from .cache import Cache
    from .codec import Envelope
    from .keys import KeyBuilder
    from .stats import Stats

T = TypeVar("T")


def _key_list(keys: Iterable[str], method: str) -> list[str]:
    """``keys`` as a list; a bare str (or bytes) is refused: iterated, ``"user:1"`` would
    be the keys ``"u"``, ``"s"``... and the entry meant would stay in place."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(
            f"{method}(keys): keys must be an iterable of keys, not one "
            f"{type(keys).__name__} ({keys!r}); pass [{keys!r}]"
        )
    return list(keys)


class KeyValue:
    """The cache-aside API, for `Cache`."""

    backend: Backend
    keys: KeyBuilder
    stats: Stats
    _all_gen_key: str

    if TYPE_CHECKING:  # provided by Cache and Invalidation

        def _call(self, op: Callable[[], T], fallback: T, what: str) -> T: ...

        def fetch(self, keys: Sequence[str]) -> list[bytes | NoValue]: ...

        def unpack(self, raw: bytes | NoValue) -> Envelope | NoValue: ...

        def pack(
            self,
            value: Any,
            ttl: float | None,
            gens: tuple[str, ...] = (),
            compute_time: float = 0.0,
        ) -> bytes: ...

        def store(self, items: Mapping[str, bytes], ttl: float | None) -> bool: ...

        def _ttl(self, ttl: float | None) -> float | None: ...

        def ensure_generations(
            self,
            gen_keys: Sequence[str],
            raws: Sequence[bytes | NoValue],
            clock: bytes | NoValue | None = None,
        ) -> tuple[str, ...] | None: ...

        def bump(
            self,
            tables: Iterable[str] = (),
            deletes: Iterable[str] = (),
            tags: Iterable[str] = (),
            writes: Sequence[tuple[str, bytes | None, bytes | None, float | None]] = (),
            tombstone: bool = False,
            tombstone_ttl: float = ...,
        ) -> None: ...

        def _remember(
            self,
            bumps: Iterable[str] = (),
            deletes: Iterable[str] = (),
            tombs: Mapping[str, float] | None = None,
        ) -> None: ...

    def _user_key(self, key: str) -> str:
        """The store key of the user key ``key`` (TypeError / ValueError name a bad one)."""
        full = self.keys.user(key)
        if not full.isascii():
            try:
                full.encode()
            except UnicodeEncodeError:
                raise ValueError(f"cache keys must be encodable as UTF-8, got {key!r}") from None
        return full

    def _read(self, full: Sequence[str]) -> tuple[list[bytes | NoValue], tuple[str, ...] | None]:
        """The raw entries of ``full`` and the namespace-wide generation, in one round trip
        (None: the store cannot say which generation is current)."""
        *raws, gen = self.fetch([*full, self._all_gen_key])
        return raws, self.ensure_generations((self._all_gen_key,), (gen,))

    def _value(self, raw: bytes | NoValue, gens: tuple[str, ...] | None) -> Any:
        env = self.unpack(raw)
        if env is NO_VALUE or gens is None or env.gens != gens:
            self.stats.incr("miss")
            return NO_VALUE
        self.stats.incr("hit")
        return env.value

    def get(self, key: str, default: Any = NO_VALUE) -> Any:
        """The value stored under ``key``, or ``default`` (`NO_VALUE`) on a miss."""
        raws, gens = self._read([self._user_key(key)])
        value = self._value(raws[0], gens)
        return default if value is NO_VALUE else value

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """A dict of the keys found (missing keys are absent)."""
        wanted = _key_list(keys, "get_many")
        raws, gens = self._read([self._user_key(k) for k in wanted])
        found: dict[str, Any] = {}
        for key, raw in zip(wanted, raws, strict=True):
            value = self._value(raw, gens)
            if value is not NO_VALUE:
                found[key] = value
        return found

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (default: ``default_ttl``)."""
        self.set_many({key: value}, ttl)

    def set_many(self, mapping: Mapping[str, Any], ttl: float | None = None) -> None:
        """Store every item of ``mapping`` (one round trip, and one for the generation).

        If the store cannot take them, the keys are remembered as deletes (tombstones)
        and replayed: a value from before this call is never served after it."""
        ttl = self._ttl(ttl)
        items = {self._user_key(k): v for k, v in mapping.items()}
        if not items:
            return
        found = self._call(lambda: self.backend.get_many([self._all_gen_key]), None, "set")
        gens = None if found is None else self.ensure_generations((self._all_gen_key,), found)
        packed = {k: self.pack(v, ttl, gens or ()) for k, v in items.items()}  # TypeError first
        if gens is None or not self.store(packed, ttl):
            self.stats.incr("set.failed")
            self._remember(deletes=packed, tombs=dict.fromkeys(packed, QUERY_TOMBSTONE_TTL))

    def delete(self, key: str) -> bool:
        """Remove ``key``; True when it existed. A failed delete is retried later."""
        return self.delete_many([key]) > 0

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove ``keys``; return how many existed.

        Each becomes a tombstone for a while (a miss to every read), so that a
        `get_or_set` load that read its source before the delete cannot store its
        value after it (its fill replaces only what it saw: nothing)."""
        full = [self._user_key(k) for k in _key_list(keys, "delete_many")]
        if not full:
            return 0
        raws = self._call(lambda: self.backend.get_many(full), None, "delete")
        self.bump(deletes=full, tombstone=True, tombstone_ttl=QUERY_TOMBSTONE_TTL)
        if raws is None:
            return 0
        return sum(1 for r in raws if r is not NO_VALUE and not r.startswith(TOMBSTONE_PREFIX))

    def get_or_set(
        self,
        key: str,
        loader: Callable[[], T],
        ttl: float | None = None,
        *,
        stale_ttl: float = 0.0,
        refresh_ahead: float | None = None,
        beta: float = 1.0,
        lease: bool = True,
    ) -> T:
        """The cached value of ``key``; on a miss ``loader()`` runs once across threads and
        processes (single-flight + lease) and its value is stored.

        Near expiry one reader refreshes it in the background (XFetch with ``beta``;
        ``refresh_ahead``: when less than that fraction of the TTL remains). ``stale_ttl``
        serves the expired value while one caller reloads it, or when ``loader`` fails.
        ``lease=False`` keeps single-flight to this process (no lease round trips).
        """
        fresh = Freshness(self._ttl(ttl), stale_ttl, refresh_ahead, beta)
        full = self._user_key(key)
        raws, gens = self._read([full])
        cache = cast("Cache", self)
        if gens is None:  # the store cannot say what is current: load, never store
            return get_or_load(
                cache, full, loader, fresh, store_ok=lambda: False, raw=NO_VALUE, known=False
            )
        return get_or_load(cache, full, loader, fresh, gens=gens, raw=raws[0], lease=lease)
