"""Settings of the write-behind queue (`WriteBehindConfig`) and of its workers
(`WorkerConfig`): frozen dataclasses, unknown keys rejected by their users."""

from __future__ import annotations

from dataclasses import dataclass

from .freshness import check_seconds

QUEUE_ERRORS = ("sync", "raise")


@dataclass(frozen=True, slots=True)
class WriteBehindConfig:
    """Settings shared by the producers and workers of one namespace."""

    partitions: int = 16
    """Streams the queue is split into, by key hash; each is applied in order by one
    worker at a time. Producers and workers must agree: drain before changing it."""

    on_queue_error: str = "sync"
    """When Redis cannot take a commit's changes: ``"sync"`` writes them to the database
    in the committing transaction; ``"raise"`` fails the commit before anything is stored."""

    prepare_timeout: float = 60.0
    """Seconds a prepared change may wait for its commit (or abort) record before the
    worker dead-letters it as "outcome unknown" (its producer died mid-commit)."""

    def __post_init__(self) -> None:
        if not isinstance(self.partitions, int) or not 1 <= self.partitions <= 1024:
            raise ValueError(f"partitions must be an int in 1..1024, got {self.partitions!r}")
        if self.on_queue_error not in QUEUE_ERRORS:
            raise ValueError(
                f"on_queue_error must be 'sync' or 'raise', got {self.on_queue_error!r}"
            )
        check_seconds("prepare_timeout", self.prepare_timeout)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Settings of one `WriteBehindWorker`."""

    batch_size: int = 500
    """Keys per database transaction at most."""

    max_delay: float = 0.2
    """Seconds a ready change may wait for its batch to fill."""

    max_attempts: int = 5
    """Failed applications of a key before it goes to the dead-letter stream."""

    backoff: float = 0.5
    """Seconds before the first retry; doubled per attempt up to ``max_backoff``."""

    max_backoff: float = 30.0
    """Upper bound of the retry delay."""

    lease_ttl: float = 10.0
    """Seconds a partition stays owned by a worker that stopped renewing its lease."""

    foreign_key_wait: float = 60.0
    """Seconds a key refused for a foreign-key violation is retried before its failures
    count toward ``max_attempts``: the row it refers to (or, for a delete, that refers
    to it) may be queued in another partition and applied later, as late as ``lease_ttl``
    plus a batch after its worker died. Keep it above that; 0 counts them at once."""

    poll_interval: float = 0.05
    """Seconds to sleep when no partition had anything to read."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_attempts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_delay", "backoff", "max_backoff", "foreign_key_wait", "poll_interval"):
            check_seconds(name, getattr(self, name), zero=True)
        check_seconds("lease_ttl", self.lease_ttl)
