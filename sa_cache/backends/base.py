"""The store contract: a small protocol every backend implements.

Backends move bytes. They know nothing of SQLAlchemy, envelopes or namespaces; the
`Cache` facade builds the keys and the values. A miss is the `NO_VALUE` sentinel,
never ``None``. A backend that cannot reach its store raises `BackendError`; the
facade turns that into a miss (reads) or a logged, counted failure (writes).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal, Protocol, runtime_checkable


class _NoValue(enum.Enum):
    """Type of the `NO_VALUE` sentinel (an enum member, so it pickles and types well)."""

    NO_VALUE = "NO_VALUE"

    def __repr__(self) -> str:
        return "<NO_VALUE>"

    def __bool__(self) -> Literal[False]:
        return False


NO_VALUE: Final = _NoValue.NO_VALUE
"""Returned for a key that has no entry (a cached ``None`` is a real value)."""

NoValue = Literal[_NoValue.NO_VALUE]


class BackendError(Exception):
    """The store could not be reached or answered with an error."""


UNEXPECTED_REPLY: tuple[type[Exception], ...] = (
    TypeError,
    ValueError,
    AttributeError,
    IndexError,
    KeyError,
)
"""What parsing a reply of a shape no Redis gives raises (in redis-py or sa_cache): such a
store is broken, and handled as a failed one (`Cache._guarded`)."""


@runtime_checkable
class Backend(Protocol):
    """What the `Cache` facade needs from a store.

    Every method is one round trip to the store (or none, in process). ``ttl`` is in
    seconds; ``None`` means no expiry.
    """

    def get_many(self, keys: Sequence[str]) -> list[bytes | NoValue]:
        """Values for ``keys`` in order, `NO_VALUE` for each missing key."""
        ...

    def get_many_later(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """`get_many` as of now, its reply collected by calling the result (which raises
        `BackendError` if it failed): the caller's own work overlaps the round trip.
        Stores without a cheap way to do that answer at once."""
        ...

    def get_many_soon(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """`get_many` sent now, its reply read by calling the result, which the caller
        does once and soon (before its next store operation): the work in between
        overlaps the round trip. Stores without a cheap way to do that answer at once."""
        ...

    def swap_many_later(
        self, keys: Sequence[str], value: bytes, ttl: float, read: Sequence[str] = ()
    ) -> Callable[[], list[bytes | NoValue]]:
        """Set each of ``keys`` to ``value`` (expiring in ``ttl`` seconds) and give what
        they held, then the values of ``read``: done now, the reply collected by calling
        the result (`BackendError` if it failed), as `get_many_later`."""
        ...

    def set_many(self, items: Mapping[str, bytes], ttl: float | None = None) -> None:
        """Store every item with the same ``ttl``."""
        ...

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove ``keys``; return how many existed."""
        ...

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` has no entry; True when stored."""
        ...

    def apply(
        self,
        sets: Sequence[tuple[str, bytes, float | None]] = (),
        deletes: Sequence[str] = (),
    ) -> None:
        """Apply many writes (key, value, ttl) and deletes in one round trip."""
        ...

    def advance(self, clock_key: str, keys: Sequence[str], nonce: str) -> int:
        """Atomically move the commit clock forward and stamp ``keys`` with it.

        The clock becomes ``max(store time in microseconds, clock + 1)``; every key in
        ``keys`` is set (no expiry) to ``b"<clock>:<nonce>"``. Returns the new clock.
        The clock key and ``keys`` share one hash tag (one Cluster slot).
        """
        ...

    def cas(
        self, key: str, expected: bytes | None, value: bytes | None, ttl: float | None = None
    ) -> bool:
        """Compare-and-set: if ``key`` holds ``expected`` (None: no entry), store ``value``
        (None: delete) and return True; otherwise change nothing and return False."""
        ...

    def cas_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, float | None]]
    ) -> list[bool]:
        """Many `cas` (key, expected, value, ttl) in one round trip; one result each."""
        ...

    def commit(
        self,
        cas: Sequence[tuple[str, bytes | None, bytes | None, float | None]],
        deletes: Sequence[str],
        clock_key: str,
        gen_keys: Sequence[str],
        nonce: str,
        tomb: tuple[bytes, float] | None = None,
    ) -> list[bool]:
        """What a database commit sends, in one round trip where the store allows.

        Each ``cas`` item (key, expected, value, ttl) is a compare-and-set whose failure
        *deletes* the key; ``deletes`` are removed; ``gen_keys`` are stamped as by
        `advance`. With ``tomb`` (value, ttl), what would be deleted is set to that
        value for ttl seconds instead (a tombstone). Returns, per ``cas`` item, whether
        it was swapped.
        """
        ...

    def ping(self) -> bool:
        """True when the store answers; never raises."""
        ...

    def close(self) -> None:
        """Release connections; the backend is not used afterwards."""
        ...
