"""Generations and invalidation: the half of `Cache` that moves table generations and
drops entries, in one round trip per commit, remembering what the store could not take.

`Cache` inherits `Invalidation`; nothing here is used on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .backends.base import NO_VALUE, Backend, NoValue
from .cache_replay import Replay
from .invalidation import moved
from .tokens import (
    QUERY_TOMBSTONE_TTL,
    TOMBSTONE_PREFIX,
    TOMBSTONE_TTL,
    clock_of,
    new_nonce,
    token_text,
)

if TYPE_CHECKING:
    from .breaker import CircuitBreaker
    from .cache import Cache
    from .keys import KeyBuilder
    from .stats import Stats

T = TypeVar("T")
log = logging.getLogger("sa_cache")

ALL_TABLES = "*"
"""Pseudo-table whose generation is part of every entry: bumping it drops everything."""


class Invalidation(Replay):
    """Generations, the commit clock and invalidation, for `Cache`."""

    backend: Backend
    keys: KeyBuilder
    stats: Stats
    clock_key: str
    _all_gen_key: str
    _breaker: CircuitBreaker

    if TYPE_CHECKING:  # provided by Cache

        def _call(self, op: Callable[[], T], fallback: T, what: str, probe: bool = False) -> T: ...

        def fetch(self, keys: Sequence[str]) -> list[bytes | NoValue]: ...

        def fan_out(self, keys: Iterable[str]) -> list[str]: ...

    # -- generations ----------------------------------------------------------------------

    def generation_keys(self, tables: Iterable[str]) -> tuple[str, ...]:
        """Generation keys for ``tables``, the namespace-wide one first."""
        return (self._all_gen_key, *(self.keys.generation(t) for t in tables))

    def ensure_generations(
        self,
        gen_keys: Sequence[str],
        raws: Sequence[bytes | NoValue],
        clock: bytes | NoValue | None = None,
    ) -> tuple[str, ...] | None:
        """Current tokens for ``gen_keys`` given their fetched values (and ``clock``, the
        commit clock's, if fetched with them).

        A missing generation (never written, or evicted) gets a fresh random token
        stamped with the current clock, so an entry written before an eviction can never
        match again. Without a clock (the store restarted empty, or it is garbage) the
        clock is first started from the store's time, as a commit would: a stamp of 0
        would pass as older than a snapshot taken before the restart. None when the store
        cannot answer (the fetch failed, or a token is garbage: counted ``decode_error``
        and replaced): the caller must not fill.
        """
        if NO_VALUE not in raws:  # the common case: every generation exists
            try:
                return tuple([raw.decode() for raw in raws])  # type: ignore[union-attr]
            except UnicodeDecodeError:
                pass
        if self._breaker.failing:  # those misses may be what a failed fetch returned
            return None
        missing = [k for k, raw in zip(gen_keys, raws, strict=True) if raw is NO_VALUE]
        garbage = [
            (k, raw)
            for k, raw in zip(gen_keys, raws, strict=True)
            if raw is not NO_VALUE and token_text(raw) is None
        ]
        backend, clock_key = self.backend, self.clock_key

        def create() -> bool:
            found = backend.get_many([clock_key])[0] if clock is None else clock
            now = clock_of(found)
            if now is None:  # absent or garbage: start it from the store's time
                now = backend.advance(clock_key, [], new_nonce())
            stamp = f"{now}:".encode()
            for k in missing:
                backend.add(k, stamp + new_nonce().encode())
            for k, raw in garbage:  # a new token, unless a commit replaced it meanwhile
                backend.cas(k, raw, stamp + new_nonce().encode())
            return True

        if not self._call(create, False, "generation"):
            return None
        if garbage:
            self.stats.incr("decode_error", len(garbage))
            return None
        raws = self.fetch(gen_keys)
        tokens = [None if raw is NO_VALUE else token_text(raw) for raw in raws]
        if None in tokens:
            return None
        return tuple(t for t in tokens if t is not None)

    def read_clock(self) -> int | None:
        """The commit clock now (None when the store cannot say: it failed, or the clock
        is garbage, counted ``decode_error``). One store call when the store answers."""
        found = self._call(lambda: self.backend.get_many([self.clock_key]), None, "clock")
        if found is None:
            return None
        raw = found[0]
        advance = lambda: self.backend.advance(self.clock_key, [], new_nonce())  # noqa: E731
        if raw is NO_VALUE:
            # Never advanced (or evicted, or the store restarted empty): start it from the
            # store's time, so later stamps are comparable and newer than any before.
            return self._call(advance, None, "clock")
        clock = clock_of(raw)
        if clock is None:
            self.stats.incr("decode_error")
            self._call(advance, None, "clock")  # replaced by the store's time
        return clock

    def bump(
        self,
        tables: Iterable[str] = (),
        deletes: Iterable[str] = (),
        tags: Iterable[str] = (),
        writes: Sequence[tuple[str, bytes | None, bytes | None, float | None]] = (),
        tombstone: bool = False,
        tombstone_ttl: float = TOMBSTONE_TTL,
    ) -> None:
        """Invalidate: new generation tokens for ``tables`` and ``tags``, delete entry keys,
        and write entity images through (``writes``: key, expected, image, ttl — an
        image whose compare fails deletes its entry, or tombstones it, instead). One
        round trip.

        ``tombstone``: instead of deleting the keys, leave a tombstone (unique to this
        call) for ``tombstone_ttl`` seconds, which readers treat as a miss and fills
        replace, but which an image or fill written over what its writer read before
        (an *empty* entry, or an older tombstone) does not match: a late insert image,
        or a query fill loaded before the call, can never land after it.

        The one function every invalidation goes through (so the generations a table's
        write moves are named here: `invalidation.moved`). If the store cannot take it
        now, it is remembered (images as deletes, tombstones as tombstones) and
        replayed when the store answers.
        """
        # (a schema-qualified table's writes move its ``*.name`` too: see `moved`)
        gen_keys = [self.keys.generation(n) for n in dict.fromkeys(chain(*map(moved, tables)))]
        gen_keys += [self.keys.tag(t) for t in tags]
        dels = self.fan_out(deletes)
        if writes:  # other live key versions cannot take these images: their entries go
            written = {w[0] for w in writes}
            dels += [k for k in self.fan_out(written) if k not in written]
        if not gen_keys and not dels and not writes:
            return
        self.stats.incr("invalidate")
        nonce = new_nonce()
        tomb = (TOMBSTONE_PREFIX + nonce.encode(), tombstone_ttl) if tombstone else None
        swapped = self._call(
            lambda: self.backend.commit(writes, dels, self.clock_key, gen_keys, nonce, tomb),
            None,
            "invalidate",
            probe=True,  # while the breaker is open too: delivered as soon as it can be
        )
        if swapped is None:
            gone = [*dels, *(w[0] for w in writes)]
            tombs = dict.fromkeys(gone, tombstone_ttl) if tombstone else None
            self._remember(bumps=gen_keys, deletes=gone, tombs=tombs)
        elif writes:
            self.stats.incr("entity.write_through", sum(swapped))

    def _write_invalidation(self, gen_keys: Sequence[str], deletes: Sequence[str]) -> None:
        self.backend.commit([], deletes, self.clock_key, gen_keys, new_nonce())

    # -- explicit invalidation ------------------------------------------------------------

    def invalidate(self, *targets: Any) -> None:
        """Drop cached results that read these models, tables or table names."""
        from .invalidation import rows_generation, table_name

        names: list[str] = []
        for target in targets:
            if isinstance(target, str):
                if not target:
                    raise ValueError("invalidate() got an empty table name")
                names.append(target)
                continue
            mapper = getattr(target, "__mapper__", None)
            tables = mapper.tables if mapper is not None else [target]
            for table in tables:
                if not hasattr(table, "name"):
                    raise TypeError(
                        f"invalidate() takes mapped classes, Tables or table names, got {target!r}"
                    )
                names.append(table_name(table))
        self.bump([*names, *(rows_generation(n) for n in names)])

    def invalidate_tags(self, *tags: str) -> None:
        """Drop cached results of queries declared with any of these ``tags``."""
        for tag in tags:
            if not isinstance(tag, str):
                raise TypeError(f"tags are str, got {type(tag).__name__}")
        self.bump(tags=tags)

    def invalidate_query(
        self,
        statement: Any,
        bind: Any,
        params: Any = None,
        identity_token: Any = None,
        schema_translate_map: Any = None,
    ) -> None:
        """Drop the cached result of ``statement`` (a select, or a legacy ``Query``) run
        on ``bind`` with ``params`` — and, under an ``identity_token`` or a
        ``schema_translate_map`` execution option, with that (the engine's or
        connection's own translate map is taken from ``bind``). A primary-key select of
        a registered model drops that row's entity entry too (what serves it).

        Its entries become tombstones: a fill of that query whose reader read before
        this call (and so may have loaded the old rows) cannot store them after it.
        """
        from .query import query_keys

        if not hasattr(bind, "dialect"):
            raise TypeError(
                "invalidate_query(statement, bind): bind must be the Engine or Connection "
                f"the read ran on, got {type(bind).__name__}"
                + ("; pass session.get_bind()" if hasattr(bind, "get_bind") else "")
            )
        keys = query_keys(
            cast("Cache", self), statement, bind, params, identity_token, schema_translate_map
        )
        self.bump(deletes=keys, tombstone=True, tombstone_ttl=QUERY_TOMBSTONE_TTL)

    def invalidate_all(self) -> None:
        """Drop every entry of this namespace (all versions) by bumping the global generation."""
        self.bump([ALL_TABLES])
