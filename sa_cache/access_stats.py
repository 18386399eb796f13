"""Sampled access statistics: what is read, by time of day, as a decaying top-K.

Predictive warming (`Warmer.predictive`) re-warms what was most used in the coming time
bucket; this module measures it. The read paths call `record_entity` / `record_query`
on every access; the call is cheap by design:

- **sampled**: a countdown keeps about 1 call in ``sample_every`` (random gaps, so a
  request that reads the same keys in the same order is not aliased); the others
  return after a decrement;
- **buffered**: kept samples are counted in process and flushed in one round trip once
  ``flush_every`` samples or ``flush_interval`` seconds have accumulated;
- **bounded**: each time-of-day bucket (``bucket_seconds``, UTC) keeps at most about
  ``capacity`` members, trimmed by lowest score;
- **decaying**: once per day a bucket's scores are multiplied by ``0.5 ** (1 /
  half_life_days)``, so last week's traffic fades and members that stop being read
  drop out.

On Redis a bucket is a sorted set updated by one Lua script (decay, increments, trim,
expiry: atomic across processes); ``{ns}:stats:{{ns}}:access:{seconds}:{bucket}`` with a
day marker beside it, in the namespace's hash slot. Elsewhere (``memory://`` or any
other backend) the buckets are a dict beside the backend, in this process.

Members are msgpack (the cache's codec, never pickle): ``("e", table, [pk...], token)``
for an entity key, ``("q", name)`` for a named query. Statistics are best effort: a
store failure drops the samples it was flushing (counted ``access_stats.dropped``).
"""

from __future__ import annotations

import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .backends.base import BackendError
from .codec import CodecError, pack, unpack

if TYPE_CHECKING:
    from .cache import Cache

ATTRIBUTE: Final = "access_stats"
"""Where a `Cache` keeps its `AccessStats` (created on first use)."""
DAY: Final = 86_400
_NEVER: Final = 1 << 62

# KEYS[1] the bucket's sorted set, KEYS[2] its day marker.
# ARGV: today, daily decay factor, capacity, ttl ms, then member, increment pairs.
_FLUSH: Final = """local today = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[2]) or ARGV[1])
if last < today then
  local f = string.format('%.17g', tonumber(ARGV[2]) ^ (today - last))
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', f)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(1')
end
redis.call('SET', KEYS[2], math.max(last, today), 'PX', ARGV[4])
for i = 5, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i])
end
local n = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[3])
if n > cap + math.floor(cap / 4) then
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - cap - 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return n"""


@dataclass(frozen=True, slots=True)
class Member:
    """One thing that was read: an entity row (``kind="e"``) or a named query (``"q"``)."""

    kind: str
    name: str
    """The table (entities) or the query name."""
    pk: tuple[Any, ...] = ()
    identity_token: Any = None


def _item(member: Member) -> tuple[Any, ...]:
    if member.kind == "q":
        return ("q", member.name)
    return ("e", member.name, tuple(member.pk), member.identity_token)


def _encode(item: tuple[Any, ...]) -> bytes:
    """The stored form of a buffered member (TypeError when a value cannot be encoded)."""
    if item[0] == "q":
        return pack(["q", item[1]])
    return pack(["e", item[1], list(item[2]), item[3]])


def decode_member(raw: bytes) -> Member | None:
    """The member stored as ``raw``; None for anything foreign or corrupt."""
    try:
        value = unpack(raw)
    except CodecError:
        return None
    if type(value) is not list or len(value) < 2 or type(value[1]) is not str:
        return None
    if value[0] == "q" and len(value) == 2:
        return Member("q", value[1])
    if value[0] == "e" and len(value) == 4 and type(value[2]) is list:
        return Member("e", value[1], tuple(value[2]), value[3])
    return None


class _LocalBuckets:
    """The in-process twin of the Redis sorted sets, for ``memory://`` and other stores."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, tuple[int, dict[bytes, float]]] = {}

    def flush(
        self, key: str, today: int, decay: float, capacity: int, counts: dict[bytes, float]
    ) -> None:
        with self.lock:
            last, scores = self.buckets.get(key, (today, {}))
            if last < today:
                factor = decay ** (today - last)
                scores = {m: s * factor for m, s in scores.items() if s * factor >= 1}
            for member, n in counts.items():
                scores[member] = scores.get(member, 0.0) + n
            if len(scores) > capacity + capacity // 4:
                ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
                scores = dict(ranked[:capacity])
            self.buckets[key] = (max(last, today), scores)

    def top(self, key: str, n: int) -> list[tuple[bytes, float]]:
        with self.lock:
            scores = self.buckets.get(key, (0, {}))[1]
            return sorted(scores.items(), key=lambda item: item[1], reverse=True)[:n]


_local: weakref.WeakKeyDictionary[Any, _LocalBuckets] = weakref.WeakKeyDictionary()
_local_lock = threading.Lock()


def _local_for(backend: Any) -> _LocalBuckets:
    with _local_lock:
        found = _local.get(backend)
        if found is None:
            found = _local[backend] = _LocalBuckets()
        return found


def _redis_backend(backend: Any) -> Any:
    """``backend`` when it is a Redis one (its ``client`` is redis-py's), else None."""
    from .backends.redis import RedisBackend, RedisClusterBackend

    if isinstance(backend, (RedisBackend, RedisClusterBackend)):
        return backend
    return None


@contextmanager
def _redis_errors(what: str) -> Iterator[None]:
    """Turn redis-py errors into `BackendError`, as the backends do."""
    from redis.exceptions import RedisClusterException, RedisError

    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise BackendError(f"Redis {what} failed: {type(exc).__name__}: {exc}") from exc


class AccessStats:
    """Sampled, buffered access counts of one `Cache`; see the module docstring."""

    def __init__(
        self,
        cache: Cache,
        *,
        sample_every: int = 16,
        flush_every: int = 64,
        flush_interval: float = 5.0,
        bucket_seconds: int = 3600,
        capacity: int = 10_000,
        half_life_days: float = 7.0,
        retention_days: float = 35.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(sample_every, int) or sample_every < 0:
            raise ValueError(f"sample_every must be an int >= 0 (0: off), got {sample_every!r}")
        if not isinstance(bucket_seconds, int) or bucket_seconds < 60 or DAY % bucket_seconds:
            raise ValueError(
                f"bucket_seconds must divide a day and be >= 60, got {bucket_seconds!r}"
            )
        if flush_every < 1 or capacity < 1 or half_life_days <= 0 or retention_days <= 0:
            raise ValueError("flush_every, capacity, half_life_days and retention_days must be > 0")
        self.cache = cache
        self.sample_every = sample_every
        self.flush_every = flush_every
        self.flush_interval = flush_interval
        self.bucket_seconds = bucket_seconds
        self.capacity = capacity
        self.decay = 0.5 ** (1.0 / half_life_days)
        self.ttl_ms = int(retention_days * DAY * 1000)
        self.clock = clock
        self._countdown = self._next_countdown()
        self._lock = threading.Lock()
        # (key prefix, day, bucket) -> {member tuple: count}; encoded when flushed
        self._buffer: dict[tuple[str, int, int], dict[tuple[Any, ...], float]] = {}
        self._buffered = 0
        self._last_flush = clock()

    # -- the hot path -----------------------------------------------------------------

    def record_entity(self, table: str, pk: Sequence[Any], identity_token: Any = None) -> None:
        """Note a read of one entity row (sampled: usually returns at once)."""
        self._countdown -= 1
        if self._countdown <= 0:
            self._sample(("e", table, tuple(pk), identity_token))

    def record_query(self, name: str) -> None:
        """Note a read of the named query ``name`` (sampled)."""
        self._countdown -= 1
        if self._countdown <= 0:
            self._sample(("q", name))

    def record(self, member: Member, weight: float = 1.0) -> None:
        """Count ``weight`` reads of ``member``, unsampled (imports, tests)."""
        self._keep(_item(member), weight)

    def _next_countdown(self) -> int:
        if not self.sample_every:
            return _NEVER
        # Random gaps averaging sample_every: a fixed 1-in-N would alias with requests
        # that read the same N keys in the same order, and count only one of them.
        return random.randint(1, 2 * self.sample_every - 1)

    def _sample(self, item: tuple[Any, ...]) -> None:
        self._countdown = self._next_countdown()
        if self.sample_every:
            self._keep(item, float(self.sample_every))

    def _keep(self, item: tuple[Any, ...], weight: float) -> None:
        now = self.clock()
        slot = (self.namespace_key(), int(now // DAY), self.bucket_of(now))
        with self._lock:
            counts = self._buffer.setdefault(slot, {})
            try:
                counts[item] = counts.get(item, 0.0) + weight
            except TypeError:
                return  # an unhashable identity token: not counted
            self._buffered += 1
            due = (
                self._buffered >= self.flush_every or now - self._last_flush >= self.flush_interval
            )
        if due:
            self.flush()

    # -- buckets ------------------------------------------------------------------------

    def namespace_key(self) -> str:
        ns = self.cache.namespace
        return f"{ns}:stats:{{{ns}}}:access:{self.bucket_seconds}:"

    def bucket_of(self, when: float) -> int:
        """The time-of-day bucket (UTC) that unix time ``when`` falls in."""
        return int((when % DAY) // self.bucket_seconds)

    @property
    def buckets(self) -> int:
        """How many buckets a day has."""
        return DAY // self.bucket_seconds

    # -- store ----------------------------------------------------------------------------

    def flush(self) -> int:
        """Send the buffered samples (one round trip per bucket touched); how many members."""
        with self._lock:
            buffer, self._buffer = self._buffer, {}
            self._buffered = 0
            self._last_flush = self.clock()
        sent = 0
        for (prefix, day, bucket), items in buffer.items():
            counts: dict[bytes, float] = {}
            for item, n in items.items():
                try:
                    raw = _encode(item)
                except TypeError:
                    continue  # a key value the codec cannot store: not counted
                counts[raw] = counts.get(raw, 0.0) + n
            if self._send(f"{prefix}{bucket}", day, counts):
                sent += len(counts)
            else:
                self.cache.stats.incr("access_stats.dropped", len(counts))
        return sent

    def _send(self, key: str, day: int, counts: dict[bytes, float]) -> bool:
        backend = _redis_backend(self.cache.backend)
        if backend is None:
            _local_for(self.cache.backend).flush(key, day, self.decay, self.capacity, counts)
            return True
        args: list[Any] = [day, repr(self.decay), self.capacity, self.ttl_ms]
        for member, n in counts.items():
            args += [member, repr(n)]

        def op() -> bool:
            with _redis_errors("access stats"):
                backend.client.eval(_FLUSH, 2, key, key + ":day", *args)
            return True

        return self.cache._call(op, False, "access stats")

    def top(self, bucket: int, n: int) -> list[tuple[Member, float]]:
        """The ``n`` most read members of ``bucket``, best first (raises `BackendError`)."""
        key = f"{self.namespace_key()}{bucket}"
        backend = _redis_backend(self.cache.backend)
        if backend is None:
            ranked = _local_for(self.cache.backend).top(key, n)
        else:
            with _redis_errors("ZREVRANGE"):
                ranked = backend.client.zrevrange(key, 0, n - 1, withscores=True)
        out: list[tuple[Member, float]] = []
        for raw, score in ranked:
            member = decode_member(raw)
            if member is not None:
                out.append((member, float(score)))
        return out

    def forget(self, buckets: Iterable[int] | None = None) -> None:
        """Delete the stored statistics of ``buckets`` (default: all of them)."""
        wanted = range(self.buckets) if buckets is None else buckets
        keys = [f"{self.namespace_key()}{b}" for b in wanted]
        backend = _redis_backend(self.cache.backend)
        if backend is None:
            local = _local_for(self.cache.backend)
            with local.lock:
                for key in keys:
                    local.buckets.pop(key, None)
            return
        backend.delete_many([k for key in keys for k in (key, key + ":day")])


_create_lock = threading.Lock()


def stats_for(cache: Cache) -> AccessStats:
    """The `AccessStats` of ``cache`` (made with the defaults on first use)."""
    found: AccessStats | None = cache.__dict__.get(ATTRIBUTE)
    if found is None:
        with _create_lock:
            found = cache.__dict__.get(ATTRIBUTE)
            if found is None:
                found = AccessStats(cache)
                setattr(cache, ATTRIBUTE, found)
    return found


def configure(cache: Cache, **settings: Any) -> AccessStats:
    """Replace the `AccessStats` of ``cache`` with one built from ``settings``
    (``sample_every=0`` turns recording off); pending samples are flushed first."""
    old: AccessStats | None = cache.__dict__.get(ATTRIBUTE)
    if old is not None:
        old.flush()
    stats = AccessStats(cache, **settings)
    setattr(cache, ATTRIBUTE, stats)
    return stats


def record_entity(cache: Cache, table: str, pk: Sequence[Any], identity_token: Any = None) -> None:
    """The entity read paths' hook: note a read of one row (sampled, buffered)."""
    stats: AccessStats = cache.__dict__.get(ATTRIBUTE) or stats_for(cache)
    stats._countdown -= 1
    if stats._countdown <= 0:
        stats._sample(("e", table, tuple(pk), identity_token))


def record_query(cache: Cache, name: str) -> None:
    """The query read path's hook: note a read of the named query ``name``."""
    stats: AccessStats = cache.__dict__.get(ATTRIBUTE) or stats_for(cache)
    stats._countdown -= 1
    if stats._countdown <= 0:
        stats._sample(("q", name))
