"""Stampede protection: single-flight, store leases, guarded fills, background refresh.

`get_or_load` composes them: a hit is served at once, a fresh entry near expiry gets one
background refresh, an expired one inside its stale window is served stale while one
caller reloads it, a miss runs one loader per process and per store (lease). Every fill
is a compare-and-set against the bytes read before loading: a holder whose lease expired
never overwrites a newer value (counted ``fill.conflict``)."""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .backends.base import NO_VALUE, NoValue
from .codec import Envelope, encode
from .codec_peek import other_generations
from .freshness import Freshness, is_fresh
from .stampede_primitives import DEFAULT_LEASE_TTL, Lease, Refresher, SingleFlight, guarded_fill
from .tokens import fill_in_time

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger("sa_cache")

T = TypeVar("T")

_BUSY: Final = object()


class StampedeGuard:
    """Per-`Cache` stampede state (see `guard_for`). ``clock`` (unix seconds) stamps entries
    and decides freshness, ``rand`` drives XFetch: both injectable for tests. ``lease_wait``
    (default ``lease_ttl``) bounds how long a miss waits for another process's fill,
    ``flight_wait`` (default ``lease_wait + lease_ttl``) how long it waits for another
    thread of this process loading the same entry: then it loads by itself."""

    def __init__(
        self,
        *,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        lease_wait: float | None = None,
        flight_wait: float | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        refresher: Refresher | None = None,
    ) -> None:
        if lease_ttl <= 0 or any(w is not None and w < 0 for w in (lease_wait, flight_wait)):
            raise ValueError(
                f"need lease_ttl > 0, lease_wait >= 0, flight_wait >= 0: {lease_ttl}, "
                f"{lease_wait}, {flight_wait}"
            )
        self.lease_ttl = float(lease_ttl)
        self.lease_wait = self.lease_ttl if lease_wait is None else float(lease_wait)
        wait = self.lease_wait + self.lease_ttl if flight_wait is None else float(flight_wait)
        self.flight_wait = wait
        self.clock, self.rand = clock, rand
        self.flight, self.refresher = SingleFlight(), refresher or Refresher()

    def close(self) -> None:
        """Stop the background refresher (waits for running refreshes)."""
        self.refresher.close()


_guards: weakref.WeakKeyDictionary[Cache, StampedeGuard] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def guard_for(cache: Cache) -> StampedeGuard:
    """The guard of ``cache``, made on first use (`Cache.close` stops its refresher)."""
    guard: StampedeGuard | None = cache._guard  # a hit asks for it: no weakref lookup
    if guard is not None:
        return guard
    with _guards_lock:
        guard = _guards.get(cache)
        if guard is None:
            guard = _guards[cache] = StampedeGuard()
            cache._on_close.append(guard.close)
        cache._guard = guard
        return guard


@dataclass(slots=True)
class _Ctx:
    """One `get_or_load` call: its arguments and the guard."""

    cache: Cache
    g: StampedeGuard
    key: str
    loader: Callable[[], Any]
    refresh: Callable[[], Any]
    fresh: Freshness
    gens: tuple[str, ...]
    store_ok: Callable[[], bool]
    prefix: str
    use_lease: bool = True
    background: bool = False
    store_as: Callable[[Any], Any] | None = None
    stale_if_error: bool = True
    seen: bytes | NoValue = NO_VALUE  # the entry as this caller read it

    def incr(self, event: str) -> None:
        self.cache.stats.incr(self.prefix + event)

    def usable(self, raw: bytes | NoValue, seen: bytes | NoValue) -> Envelope | None:
        """The entry in ``raw`` if it changed since ``seen``, has our generations, is fresh."""
        env = NO_VALUE if raw == seen else self.cache.unpack(raw)
        if env is NO_VALUE or env.gens != self.gens:
            return None
        return env if is_fresh(self.g.clock(), env.created_at, env.ttl) else None

    def lease(self) -> Lease:
        return Lease(self.cache, self.key, self.g.lease_ttl)

    @property
    def flight_key(self) -> tuple[str, tuple[str, ...], bytes | NoValue]:
        # Only callers that read the same generations and the same entry share a load: one
        # that read a newer state (a commit's generations, a delete's tombstone) started
        # after what the older load read, and must not get its result.
        return (self.key, self.gens, self.seen)

    def do(self, load: Callable[[], Any], alone: Callable[[], Any]) -> Any:
        """``load()`` in this process's single flight; ``alone()`` when the load it joined
        failed or outlasted ``flight_wait`` (that error is the other caller's)."""

        def fallback(why: str) -> Any:
            self.incr(why)
            return alone()

        return self.g.flight.do(self.flight_key, load, self.g.flight_wait, fallback)


def _undelivered(cache: Cache) -> bool:
    """True while this process holds invalidations the store has not received (after a retry)."""
    if cache._pending_bumps or cache._pending_deletes:
        cache._call(lambda: cache.backend.get_many([cache.clock_key]), None, "replay")
    return bool(cache._pending_bumps or cache._pending_deletes)


def fresh_value(
    cache: Cache,
    env: Envelope | NoValue,
    gens: tuple[str, ...],
    freshness: Freshness,
    prefix: str = "",
) -> Any:
    """The value of the entry ``env`` when it is a plain hit (our generations, fresh, not
    due for an early refresh), counted as ``prefix + "hit"``; `NO_VALUE` when `get_or_load`
    must decide (pass it ``decoded=env``). The common case without `get_or_load`'s context."""
    if env is NO_VALUE or env.gens != gens:
        return NO_VALUE
    g = guard_for(cache)
    if freshness.classify(g.clock(), env.created_at, env.ttl, env.compute_time, g.rand) != "fresh":
        return NO_VALUE
    cache.stats.incr(prefix + "hit")
    return env.value


def get_or_load(
    cache: Cache,
    key: str,
    loader: Callable[[], T],
    freshness: Freshness,
    *,
    gens: Sequence[str] = (),
    store_ok: Callable[[], bool] = lambda: True,
    refresh: Callable[[], T] | None = None,
    prefix: str = "",
    guard: StampedeGuard | None = None,
    raw: bytes | NoValue | None = None,
    lease: bool = True,
    decoded: Envelope | NoValue | None = None,
    fill_later: bool = False,
    store_as: Callable[[Any], Any] | None = None,
    stale_if_error: bool = True,
    known: bool = True,
) -> T:
    """The value of the store key ``key``, loading it with ``loader()`` at most once.

    ``gens``: generation tokens read before this call; an entry with others is
    invalidated (never served, not even stale). ``store_ok()`` is asked after a
    foreground load whether the result may be stored. ``refresh`` loads in a
    background thread (default ``loader``; it must not use the caller's Session).
    ``raw``: the entry's bytes if the caller fetched them already (with its
    generations), ``decoded`` the same decoded. ``lease=False`` keeps single-flight to
    this process (a miss then costs no lease round trips; fills stay guarded by
    compare-and-set). ``fill_later``: the value is never modified after ``loader``
    returns, so a miss may encode and store it in the background (`Cache.fill_later`).
    ``store_as``: the form the value is stored in (a hit returns that form).
    ``stale_if_error=False``: a failed reload of an entry in its stale window raises
    instead of serving it stale (the load ran in a transaction its error may have
    aborted: hiding it would let a later COMMIT roll back silently). ``known=False``:
    the caller's read of the store failed (``raw`` is a guess): load, share nothing.
    Callers in this process that read the same entry and generations share one load;
    one whose leader fails, or takes longer than the guard's ``flight_wait``, loads by
    itself (never raising another caller's error). Events are counted as ``prefix +
    event``. Never raises because of the store; ``loader`` errors propagate unless a
    stale value may be served.
    """
    g = guard if guard is not None else guard_for(cache)
    ctx = _Ctx(
        cache, g, key, loader, refresh or loader, freshness, tuple(gens), store_ok, prefix, lease,
        fill_later, store_as, stale_if_error,
    )  # fmt: skip
    down = False
    if raw is None:
        found: list[bytes | NoValue] | None = None
        if not _undelivered(cache):  # else the store may still hold what we invalidated
            found = cache._call(lambda: cache.backend.get_many([key]), None, "get")
        down, raw = found is None, NO_VALUE if found is None else found[0]
    ctx.seen = raw
    if decoded is None and other_generations(raw, ctx.gens):
        env: Envelope | NoValue = NO_VALUE  # invalidated: not worth decoding
        ctx.incr("invalidated")
    else:
        env = cache.unpack(raw) if decoded is None else decoded
    if env is not NO_VALUE:
        if env.gens != ctx.gens:
            ctx.incr("invalidated")
        else:
            state = freshness.classify(g.clock(), env.created_at, env.ttl, env.compute_time, g.rand)
            if state == "stale":
                return _revalidate(ctx, raw, env)  # type: ignore[no-any-return]
            if state != "expired":
                ctx.incr("hit")
                if state != "fresh":
                    status = g.refresher.submit(key, lambda: _refresh_job(ctx, raw))
                    ctx.incr(f"refresh.{state if status == 'scheduled' else status}")
                return env.value  # type: ignore[no-any-return]
    ctx.incr("miss")
    if down or not known or cache._breaker.state != "closed":
        # No single flight: with the store silent, nothing tells a load begun before an
        # invalidation (remembered, not delivered) from one begun after it.
        ctx.incr("load.store_down")
        return loader()
    return ctx.do(lambda: _fill_missing(ctx, raw), lambda: _load_and_fill(ctx, raw))  # type: ignore[no-any-return]


def _refresh_job(ctx: _Ctx, raw: bytes | NoValue) -> None:
    """Background refresh of a fresh entry: under the lease, unless it changed meanwhile."""
    lease = ctx.lease()
    if not (got := lease.acquire()):
        ctx.incr("refresh.lease_busy" if got is False else "refresh.store_down")
        return
    try:
        if ctx.cache.fetch([ctx.key])[0] != raw:
            ctx.incr("refresh.superseded")  # refreshed or invalidated meanwhile
            return
        _load_and_fill(ctx, raw, bg=True)
        ctx.incr("refresh.done")
    except Exception as exc:
        ctx.incr("refresh.error")
        log.warning("sa_cache: background refresh of %s failed: %r", ctx.key, exc)
    finally:
        lease.release()


def _revalidate(ctx: _Ctx, raw: bytes | NoValue, stale: Envelope) -> Any:
    """An expired entry inside its stale window: one caller reloads, the others get it stale."""
    value: Any = _BUSY
    if not ctx.g.refresher.running(ctx.key):
        try:
            value = ctx.g.flight.try_do(ctx.flight_key, lambda: _reload(ctx, raw, stale), _BUSY)
        except Exception as exc:
            if not ctx.stale_if_error:
                raise
            ctx.incr("stale.if_error")
            log.warning("sa_cache: loading %s failed (%r); serving it stale", ctx.key, exc)
            return stale.value
    if value is _BUSY:
        ctx.incr("stale.served")
        return stale.value
    return value


def _reload(ctx: _Ctx, raw: bytes | NoValue, stale: Envelope) -> Any:
    if not ctx.use_lease:
        return _load_and_fill(ctx, raw)
    lease = ctx.lease()
    if (got := lease.acquire()) is False:
        ctx.incr("stale.served")  # another process is reloading it
        return stale.value
    try:
        return _load_and_fill(ctx, raw, store=bool(got))
    finally:
        if got:
            lease.release()


def _fill_missing(ctx: _Ctx, raw: bytes | NoValue) -> Any:
    """A miss, in this process's single flight: take the lease, or wait for its holder."""
    if not ctx.use_lease:
        return _load_and_fill(ctx, raw)
    cache, g, lease = ctx.cache, ctx.g, ctx.lease()
    got = lease.acquire()
    if got is False:
        ctx.incr("lease.busy")
        deadline, delay = time.monotonic() + g.lease_wait, 0.005
        while got is False:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ctx.incr("lease.wait_timeout")
                return _load_and_fill(ctx, raw)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)  # short polls: one poller per process
            seen = raw
            raw, holder = cache.fetch([ctx.key, lease.key])
            env = ctx.usable(raw, seen)
            if env is not None:
                ctx.incr("lease.wait_hit")
                return env.value
            if holder is NO_VALUE:  # released without a fill, expired, or the store failed
                got = lease.acquire()
    if got is None:
        ctx.incr("load.store_down")
        return _load_and_fill(ctx, raw, store=False)
    try:
        seen, raw = raw, cache.fetch([ctx.key])[0]  # filled between our read and our lease?
        env = ctx.usable(raw, seen)
        if env is not None:
            ctx.incr("lease.recheck_hit")
            return env.value
        return _load_and_fill(ctx, raw)
    finally:
        lease.release()


def _load_and_fill(ctx: _Ctx, raw: bytes | NoValue, *, bg: bool = False, store: bool = True) -> Any:
    """Call ``loader``; store its value over ``raw`` (the bytes read before loading)."""
    clock, fresh = ctx.g.clock, ctx.fresh
    started = clock()
    value = ctx.refresh() if bg else ctx.loader()
    compute_time = max(0.0, clock() - started)
    ctx.incr("load")
    if store and (bg or ctx.store_ok()):
        expected = None if raw is NO_VALUE else raw
        created_at = clock()

        def fill() -> None:
            if not fill_in_time(clock() - started):  # a tombstone left since may be gone
                ctx.incr("fill.too_late")
                return
            try:
                stored = value if ctx.store_as is None else ctx.store_as(value)
                packed = encode(Envelope(stored, created_at, fresh.ttl, ctx.gens, compute_time))
            except TypeError as exc:  # not cacheable: the caller still got its value
                ctx.incr("fill.unencodable")
                log.warning("sa_cache: not caching %s: %s", ctx.key, exc)
                return
            except Exception as exc:  # a fill never fails the caller
                ctx.incr("fill.failed")
                log.warning("sa_cache: not caching %s: %r", ctx.key, exc)
                return
            stored = guarded_fill(ctx.cache, ctx.key, expected, packed, fresh.store_ttl)
            ctx.incr("fill" if stored else "fill.conflict" if stored is False else "fill.failed")

        # Encoded and stored off the request path when the caller allows it (its value is
        # never changed afterwards) and no other process waits on our lease for it.
        if bg or ctx.use_lease or not ctx.background or not ctx.cache.fill_later(fill, (ctx.key,)):
            fill()
    elif store:
        ctx.incr("fill.skipped")
    return value
