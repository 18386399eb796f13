"""What the write-behind queue stores: stream IDs, partitions, records, queued entries.

The producer (`write_behind`), the dead-letter replay (`write_behind_dead`) and the
worker (`write_behind_worker`) all read and write these formats; they live here once.

A stream entry has fields ``t`` (kind: ``p`` prepare, ``c`` commit, ``a`` abort),
``x`` (the transaction) and, for a prepare record, ``c``: the msgpack list
``[table, key, first operation, queued cache entry, primary key]``; the entry of an
update of some columns names them (see `queued_entry`). A change also written under
other live key versions (`write_behind_versions`) adds ``None, None`` (fields an
earlier format used) and the list of those ``[version, same shape]``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from .backends.base import BackendError
from .codec import Envelope, decode, encode, pack, unpack
from .transaction import BehindChange

GROUP = "sa_cache"
"""Consumer group of every partition stream."""

_REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turn redis-py errors into `BackendError` (cause chained)."""
    try:
        yield
    except _REDIS_ERRORS as exc:
        raise BackendError(
            f"write-behind queue: {what} failed: {type(exc).__name__}: {exc}"
        ) from exc


def redis_error_of(result: Any) -> Any:
    """A pipeline result; a redis-py error in it as a `BackendError`."""
    if isinstance(result, _REDIS_ERRORS):
        error = BackendError(f"write-behind queue: {type(result).__name__}: {result}")
        error.__cause__ = result
        return error
    return result


def stream_id(raw: bytes | str) -> tuple[int, int]:
    """A stream entry ID as a comparable tuple."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def partition_of_key(key: str) -> int:
    """The partition of a write-behind entity key (the number in its hash tag)."""
    start = key.index("{") + 1
    return int(key[start : key.index("}", start)].rpartition(":")[2])


class Queued:
    """One transaction's changes as prepared in the queue, by partition."""

    __slots__ = (
        "changes",
        "committed",
        "entries",
        "expected",
        "fanned",
        "made",
        "partitions",
        "remade",
        "since",
        "tx",
    )

    def __init__(self, tx: str, committed: bool) -> None:
        self.tx = tx
        self.committed = committed  # prepare and commit records in one step
        self.changes: dict[int, list[BehindChange]] = {}
        self.entries: dict[int, list[bytes]] = {}  # the queued cache entry of each change
        # when each change was made (prepared): an image made again at the commit keeps it
        self.made: dict[int, list[float]] = {}
        # the entry each change's image was merged over (`write_behind_merge`): the
        # commit script checks it is still there
        self.expected: dict[int, list[bytes]] = {}
        # prepare records made again at the commit (merged over a newer entry), by index
        self.remade: dict[int, dict[int, bytes]] = {}
        # the other live key versions each change is also written to, and how
        # (`write_behind_versions.fan_out`): the commit script sets those keys too
        self.fanned: dict[int, list[tuple[tuple[str, bool], ...]]] = {}
        self.partitions: list[int] = []  # those that got their records
        # the stream time (ms, Redis's clock) of each partition's first prepare record
        # of a two-step transaction: how old the worker will find them (`confirm_by`)
        self.since: dict[int, int] = {}

    def keys(self, partition: int) -> list[str]:
        """The entity keys of the changes queued in ``partition``."""
        return [c.key for c in self.changes[partition]]


CONFIRM_SHARE = 0.5
"""Share of ``prepare_timeout`` within which a two-step transaction may be confirmed
(`confirm_by`); the rest is the margin for a worker's clock running ahead of Redis's."""


def confirm_by(queued: Queued, partition: int, prepare_timeout: float) -> int:
    """Until when (ms, Redis's clock; 0: no limit) the commit script may confirm the
    prepare records of ``queued`` in ``partition``: `CONFIRM_SHARE` of ``prepare_timeout``
    after the first of them. Later, a worker may have moved them to the dead letters as
    "outcome unknown" (it does once they are older than ``prepare_timeout`` by its clock
    when it read the stream to its end): the script refuses, and the producer writes
    the changes itself (`write_behind_commit.finish`)."""
    since = queued.since.get(partition)
    if since is None:
        return 0
    return since + int(prepare_timeout * 1000 * CONFIRM_SHARE)


class WriteBehindUnavailable(BackendError):
    """The queue could not take a commit's write-behind changes (``on_queue_error="raise"``)."""


class PrepareFailed(BackendError):
    """Some prepare records could not be stored; ``queued.partitions`` got one."""

    def __init__(self, queued: Queued, error: BaseException) -> None:
        super().__init__(f"write-behind queue: prepare failed: {type(error).__name__}: {error}")
        self.queued = queued


def queued_entry(
    image: list[Any] | None,
    now: float,
    tx: str,
    cols: Collection[int] | None = None,
    whole: bool = True,
) -> bytes:
    """The entity-cache entry of a queued image: marked queued (``meta["wb"]``); for an
    update of some columns (`write_behind_merge`) also their positions (``meta["c"]``)
    and whether the image is known to be the whole row (``meta["w"]``). In the entry,
    not in the record's list, so a worker of an earlier version reads the record (and
    writes it as a whole row)."""
    meta: dict[str, Any] = {"wb": tx}
    if cols is not None:
        meta.update(c=sorted(cols), w=whole)
    return encode(Envelope(image, now, None, (), 0.0, meta))


def prepare_record(
    table: str,
    key: str,
    first: str,
    entry: bytes,
    pk: Sequence[Any],
    fanned: Sequence[tuple[str, bool]] = (),
) -> bytes:
    """The ``c`` field of a prepare record; ``fanned``: the other key versions its commit
    writes to (`write_behind_versions.fan_out`)."""
    if not fanned:
        return pack([table, key, first, entry, pk])
    return pack([table, key, first, entry, pk, None, None, [[v, s] for v, s in fanned]])


# A prepared change: table, key, first operation, queued entry, primary key, image,
# when its producer made it (its clock), changed columns (None: all), whole image.
Prepared = tuple[
    str, str, str, bytes, list[Any], list[Any] | None, float, frozenset[int] | None, bool
]


def read_prepare(raw: bytes) -> Prepared:
    """A prepare record's ``c`` field (see `Prepared`)."""
    return read_record(raw)[0]


def read_record(raw: bytes) -> tuple[Prepared, tuple[tuple[str, bool], ...]]:
    """A prepare record's ``c`` field, and the other key versions its commit wrote to."""
    fields = unpack(raw)
    fanned: tuple[tuple[str, bool], ...] = ()
    if len(fields) >= 8 and fields[7]:
        fanned = tuple((str(v), bool(same)) for v, same in fields[7])
    table, key, first, entry, pk = fields[:5]
    env = decode(entry)
    image = None if env.value is None else list(env.value)
    meta = env.meta or {}
    cols: frozenset[int] | None = None
    whole = True
    if "c" in meta:
        cols, whole = frozenset(int(i) for i in meta["c"]), bool(meta.get("w", False))
    elif len(fields) >= 7 and fields[5] is not None:  # (the columns in the record's list)
        cols, whole = frozenset(int(i) for i in fields[5]), bool(fields[6])
    if image is not None and cols is not None and not all(0 <= i < len(image) for i in cols):
        raise ValueError(f"changed columns {sorted(cols)} outside an image of {len(image)}")
    return (table, key, first, entry, list(pk), image, env.created_at, cols, whole), fanned


def image_of(entry: bytes) -> list[Any] | None:
    """The column image in a queued entry (None: a delete)."""
    value = decode(entry).value
    return None if value is None else list(value)


def fields_of(raw: dict[bytes, bytes]) -> dict[str, bytes]:
    """Stream entry fields with text names."""
    return {k.decode(): v for k, v in raw.items()}
