"""The `Cache` facade: envelopes and failure handling (the cache-aside API: `cache_kv`;
generations and invalidation: `cache_invalidation`).

Everything the SQLAlchemy integration stores goes through here; it never calls a
backend directly. A store failure is counted, logged and turned into a miss (reads)
or a remembered invalidation (writes): the application never sees it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, urlsplit

from .backends.base import NO_VALUE, UNEXPECTED_REPLY, Backend, BackendError, NoValue
from .breaker import CircuitBreaker
from .cache_invalidation import ALL_TABLES, Invalidation
from .cache_kv import KeyValue
from .codec import CodecError, Envelope, decode, encode
from .config import CacheConfig
from .filler import Filler
from .freshness import check_seconds
from .keys import KeyBuilder
from .stats import Stats
from .store_epoch import unwatch as unwatch_epoch
from .store_epoch import watch as watch_epoch
from .tokens import CLOCK, TOMBSTONE_PREFIX

if TYPE_CHECKING:
    from .write_behind import WriteBehind

log = logging.getLogger("sa_cache")

_STORE_FAILED: tuple[type[Exception], ...] = (BackendError, *UNEXPECTED_REPLY)

T = TypeVar("T")

DEFAULT_VERSION = "v1"
_REDIS_SCHEMES = frozenset(
    {
        "redis",
        "rediss",
        "unix",
        "redis+sentinel",
        "rediss+sentinel",
        "redis+cluster",
        "rediss+cluster",
    }
)


class Cache(KeyValue, Invalidation):
    """A namespaced cache over one `Backend`.

    Build it with `Cache.from_url` (``memory://``, ``redis://``, ...) or pass a backend.
    """

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a Cache cannot be pickled or copied: it holds store connections, locks and "
            "threads; build one per process with Cache.from_url() (workers: pass the URL)"
        )

    def __init__(
        self, backend: Backend, config: CacheConfig | None = None, **settings: Any
    ) -> None:
        if not isinstance(backend, Backend):
            got = f"the str {backend!r}" if isinstance(backend, str) else type(backend).__name__
            raise TypeError(
                f"Cache() takes a Backend (see sa_cache.backends), got {got}; for a URL use "
                "Cache.from_url(url, **settings)"
            )
        if config is not None and settings:
            raise TypeError("pass either config= or keyword settings, not both")
        self.config = config if config is not None else CacheConfig.build(**settings)
        self.backend = backend
        self.stats = Stats()
        self.registry: Any = None
        """The `versioning.VersionRegistry` when versioning is tracked (see `versioning.track`)."""
        self._on_close: list[Callable[[], None]] = []
        self._filler: Filler | None = None
        self._guard: Any = None  # the stampede guard (see stampede.guard_for)
        self._entities: dict[Any, Any] = {}  # (`entities`)
        self._deferred: list[tuple[Any, float | None, str]] = []  # decorated, not yet ready
        self._deferred_error: Exception | None = None
        self._registering = 0  # threads registering decorated classes (`entities` waits)
        self.keys = KeyBuilder(self.config.namespace, self.config.version or DEFAULT_VERSION)
        self._breaker = CircuitBreaker(self.config.breaker_threshold, self.config.breaker_cooldown)
        self._pending_lock = threading.Lock()
        self._pending_bumps: set[str] = set()
        self._pending_deletes: set[str] = set()
        self._pending_tombs: dict[str, float] = {}
        self._pending_seq: dict[str, int] = {}
        self._pending_next = 0
        self._all_gen_key = self.keys.generation(ALL_TABLES)
        self.clock_key = self.keys.generation(CLOCK)
        self._last_error_log = 0.0
        self._closed = False
        watch_epoch(self)  # a Redis that comes back with older contents: see store_epoch

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str | None = None, **settings: Any) -> Cache:
        """A cache for ``url`` (default: ``$SA_CACHE_URL``, then ``memory://``).

        ``memory://[?max_entries=N]`` is the in-process store; ``redis://``,
        ``rediss://``, ``unix://``, ``redis+sentinel://`` and ``redis+cluster://``
        go to Redis. Never connects here: an unreachable server shows later as misses.
        """
        url = url or os.environ.get("SA_CACHE_URL") or "memory://"
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {type(url).__name__}")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        config = CacheConfig.build(**settings)
        if scheme == "memory":
            from .backends.memory import MemoryBackend

            if parts.netloc or parts.path not in ("", "/"):
                raise ValueError(
                    f"memory:// takes no host or path, got {parts.netloc + parts.path!r} in {url!r}"
                )
            max_entries = config.max_entries
            for name, value in parse_qsl(parts.query, keep_blank_values=True):
                if name != "max_entries":
                    raise ValueError(f"unknown memory:// option {name!r} in {url!r}")
                try:
                    max_entries = int(value)
                except ValueError:
                    raise ValueError(
                        f"memory:// max_entries must be an int, got {value!r}"
                    ) from None
            return cls(MemoryBackend(max_entries=max_entries), config)
        if scheme in _REDIS_SCHEMES:
            from .backends.redis_url import backend_from_url

            backend = backend_from_url(
                url, socket_timeout=config.socket_timeout, connect_timeout=config.connect_timeout
            )
            return cls(backend, config)
        raise ValueError(
            f"unknown cache URL scheme {parts.scheme!r} in {url!r}; expected memory, redis, "
            "rediss, unix, redis+sentinel or redis+cluster"
        )

    @property
    def namespace(self) -> str:
        return self.keys.namespace

    @property
    def version(self) -> str:
        """The key version every entry is written under."""
        return self.keys.version

    def use_version(self, version: str) -> None:
        """Write and read entries under ``version`` from now on (generations are shared)."""
        self.keys = KeyBuilder(self.namespace, version)

    def attach_versioning(self, registry: Any, on_close: Callable[[], None]) -> None:
        """Fan entry deletes out to ``registry``'s live versions; ``on_close`` at `close`."""
        self.registry = registry
        self._on_close.append(on_close)

    def fan_out(self, keys: Iterable[str]) -> list[str]:
        """``keys`` plus the same entries under every other live key version."""
        if self.registry is None:
            return list(keys)
        return list(self.registry.fan_out(keys))

    def close(self) -> None:
        """Stop background work and release the store's connections."""
        self._closed = True
        for stop in self._on_close:
            stop()
        self._on_close.clear()
        unwatch_epoch(self)
        self.backend.close()

    # -- store access: the one place failures are handled -------------------------------

    def _call(
        self,
        op: Callable[[], T],
        fallback: T,
        what: str,
        probe: bool = False,
        reads: Sequence[str] | None = None,
    ) -> T:
        """``op()`` through the breaker (``probe``: tried while it is open too, one call
        at a time, see `CircuitBreaker.probe`), remembered invalidations delivered first.
        ``reads``: ``op`` only reads those keys (else it may write anything)."""
        if self._filler is not None:  # this thread's operations reach the store in order
            self._filler.wait_own(reads)
        if not (self._breaker.probe() if probe else self._breaker.allow()):
            self.stats.incr("store.skipped")
            return fallback
        if (self._pending_bumps or self._pending_deletes) and not self._guarded(
            self._replayed, False, what
        ):
            return fallback  # before the operation: a read must never see what this
            # process invalidated
        return self._guarded(op, fallback, what)

    def _replayed(self) -> bool:
        self._replay_pending()
        return True

    def _guarded(self, op: Callable[[], T], fallback: T, what: str) -> T:
        """``op()``, or ``fallback`` if the store failed (counted, logged, breaker told).
        Any other exception is raised, and told to the breaker as a failure too (a
        half-open breaker's probe must always end in a verdict)."""
        try:
            result = op()
        except _STORE_FAILED as exc:
            # (the latter: a reply of a shape no Redis gives — a proxy, another server
            # on the port — met our parsing: the store is broken, not the application)
            self.stats.incr("store.error")
            opened = self._breaker.failure()
            now = time.monotonic()
            if opened or now - self._last_error_log > 5.0:
                self._last_error_log = now
                log.warning("sa_cache: store failed during %s (%s); using the database", what, exc)
            return fallback
        except BaseException:
            self._breaker.failure()
            raise
        self._breaker.success()
        if op != self._replayed and (self._pending_bumps or self._pending_deletes):
            self._wake_replayer()  # the store answers: deliver what it missed now
        return result

    def fetch(self, keys: Sequence[str]) -> list[bytes | NoValue]:
        """Raw values for ``keys`` (one round trip); all misses when the store fails."""
        fallback: list[bytes | NoValue] = [NO_VALUE] * len(keys)
        return self._call(lambda: self.backend.get_many(keys), fallback, "get", reads=keys)

    def fetch_later(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """`fetch` as of now; call the result for the values (all misses if the store
        failed). The round trip overlaps whatever the caller does before that."""
        send = lambda: self.backend.get_many_later(keys)  # noqa: E731
        return self._later(send, len(keys), "get", reads=keys)

    def swap_later(
        self, keys: Sequence[str], value: bytes, ttl: float, read: Sequence[str] = ()
    ) -> Callable[[], list[bytes | NoValue]]:
        """Put ``value`` in ``keys`` now (one round trip, with a read of ``read``); call
        the result for what they held, then the values of ``read`` (all misses if the
        store failed). As `fetch_later`, the round trip overlaps the caller's work."""
        send = lambda: self.backend.swap_many_later(keys, value, ttl, read)  # noqa: E731
        return self._later(send, len(keys) + len(read), "swap")

    def _later(
        self,
        send: Callable[[], Callable[[], list[bytes | NoValue]]],
        size: int,
        what: str,
        reads: Sequence[str] | None = None,
    ) -> Callable[[], list[bytes | NoValue]]:
        """A deferred store operation: ``send()`` now, its reply read once on the first
        call of the result (``size`` misses if the store failed either time); ``reads``
        as for `_call`."""
        fallback: list[bytes | NoValue] = [NO_VALUE] * size
        read = self._call(send, None, what, reads=reads)
        if read is None:
            return lambda: fallback
        got: list[list[bytes | NoValue]] = []

        def result() -> list[bytes | NoValue]:
            if not got:
                got.append(self._call(read, fallback, what, reads=reads))
            return got[0]

        return result

    @property
    def in_process(self) -> bool:
        """Is the store in this process (``memory://``): no round trip to overlap?"""
        return bool(getattr(self.backend, "in_process", False))

    def fetch_soon(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """`fetch` sent now; call the result, once and before this thread's next store
        operation, for the values (all misses if the store failed). Whatever the caller
        does in between overlaps the round trip."""
        fallback: list[bytes | NoValue] = [NO_VALUE] * len(keys)
        read = self._call(lambda: self.backend.get_many_soon(keys), None, "get", reads=keys)
        if read is None:
            return lambda: fallback
        # Read whatever happens meanwhile (an open breaker too): the connection is ours
        # until its reply is read.
        return lambda: self._guarded(read, fallback, "get")

    def wait_for_fills(self) -> None:
        """Wait until the fills this thread left to the background are stored (every read
        does this itself; call it before writing to the store around the cache)."""
        if self._filler is not None:
            self._filler.wait_own()

    def fill_later(self, job: Callable[[], None], keys: Sequence[str] | None = None) -> bool:
        """Run the fill ``job``, which writes ``keys`` (None: unknown), off the request
        path (see `sa_cache.filler`); False when the caller should run it now (an
        in-process store, or a closed cache)."""
        if self.in_process:
            return False
        filler = self._filler
        if filler is None:
            with self._pending_lock:
                filler = self._filler
                if filler is None:
                    filler = self._filler = Filler(lambda: self.stats.incr("fill.dropped"))
                    self._on_close.append(filler.close)
        return filler.submit(job, keys)

    def unpack(self, raw: bytes | NoValue) -> Envelope | NoValue:
        """Decode one stored value; corrupt or foreign bytes are a counted miss, a
        tombstone (`Cache.bump`) a plain one."""
        if raw is NO_VALUE:
            return NO_VALUE
        try:
            return decode(raw)
        except CodecError:
            if not raw.startswith(TOMBSTONE_PREFIX):
                self.stats.incr("decode_error")
            return NO_VALUE

    def pack(
        self, value: Any, ttl: float | None, gens: tuple[str, ...] = (), compute_time: float = 0.0
    ) -> bytes:
        """Encode ``value`` in an envelope (TypeError names a type that cannot be encoded)."""
        return encode(Envelope(value, time.time(), ttl, gens, compute_time))

    def store(self, items: Mapping[str, bytes], ttl: float | None) -> bool:
        """Write encoded entries; False when the store failed (logged and counted)."""

        def write() -> bool:
            self.backend.set_many(items, ttl)
            return True

        return self._call(write, False, "set")

    def _ttl(self, ttl: float | None) -> float | None:
        if ttl is None:
            return self.config.default_ttl
        return check_seconds("ttl", ttl)

    # -- SQLAlchemy integration (imported lazily: it sits above this module) ------------

    def attach(self, target: Any) -> Any:
        """Cache every Session of a sessionmaker, scoped_session or Session subclass."""
        from .session import attach

        return attach(self, target)

    @property
    def entities(self) -> dict[Any, Any]:
        """The registered models: mapper -> `entity.EntitySpec`. Classes registered by the
        decorator are added once SQLAlchemy's mappers are configured (configured here
        if they are not yet)."""
        if self._deferred or self._deferred_error is not None or self._registering:
            from .entity import register_deferred

            register_deferred(self, configure=True)
        return self._entities

    def register(
        self, model: Any = None, *, ttl: float | None = None, write: str = "through"
    ) -> Any:
        """Cache ``model`` rows by primary key; ``write`` is ``"through"``, ``"invalidate"``
        or ``"behind"`` (a durable queue in Redis Streams applied by ``sa-cache worker``).

        ``session.get(Model, pk)``, ``select(Model).where(Model.pk == v)`` and many-to-one
        lazy loads are served from the entry; commits write the new column image through
        (or invalidate the entry with ``write="invalidate"``). Also a class decorator:
        ``@cache.register(ttl=60)``; the decorated class is registered once SQLAlchemy has
        configured its mappers (its relationships may name classes defined after it).
        """
        if ttl is not None:
            check_seconds("ttl", ttl)  # at the call: a bad TTL would fail every fill
        if self.config.version is not None and self.registry is None:
            from .versioning import attach_registry

            attach_registry(self)  # a manual version: announce it, fan commits out to it
        from .entity import register, register_when_configured

        if model is None:

            def decorate(cls: Any) -> Any:
                register_when_configured(self, cls, ttl, write)
                return cls

            return decorate
        register(self, model, ttl, write)
        return model

    @property
    def write_behind(self) -> WriteBehind:
        """The write-behind queue: ``configure()``, ``flush()``, ``pending()``,
        ``dead_letters()``, ``replay()`` (see `sa_cache.write_behind`)."""
        from .write_behind import write_behind_for

        return write_behind_for(self)
