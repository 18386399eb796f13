"""Cache configuration: one frozen dataclass, every field documented, typos rejected."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Settings of a `Cache`. Build with keywords; unknown keywords raise TypeError."""

    namespace: str = "sa_cache"
    """Prefix of every key; caches with different namespaces never see each other."""

    default_ttl: float | None = 300.0
    """Seconds an entry lives when no ttl is given; None keeps entries until evicted."""

    version: str | None = None
    """Manual key version; None means ``"v1"``, or the computed one once
    `sa_cache.versioning.track` runs (alembic revision and schema digests)."""

    socket_timeout: float = 0.25
    """Seconds a Redis command may take before it counts as a failure (and a miss)."""

    connect_timeout: float = 0.25
    """Seconds to wait for a Redis connection before giving up on this operation."""

    max_entries: int = 100_000
    """Bound of the ``memory://`` store (LRU beyond it)."""

    breaker_threshold: int = 5
    """Consecutive store failures that open the circuit (reads go to the database)."""

    breaker_cooldown: float = 2.0
    """Seconds the circuit stays open before one probe is let through."""

    def __post_init__(self) -> None:
        from .freshness import check_seconds
        from .keys import check_namespace, check_version

        check_namespace(self.namespace)
        if self.version is not None:
            check_version(self.version)
        # NaN / inf / bool refused here: redis-py would raise them from a socket call,
        # after the database COMMIT (timeouts), and every fill would fail (default_ttl)
        for name in ("socket_timeout", "connect_timeout", "breaker_cooldown"):
            check_seconds(name, getattr(self, name))
        if self.default_ttl is not None:
            check_seconds("default_ttl", self.default_ttl)
        for name in ("max_entries", "breaker_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @classmethod
    def build(cls, **kwargs: Any) -> CacheConfig:
        """Like the constructor, with an error that lists the known settings."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown cache setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**kwargs)
