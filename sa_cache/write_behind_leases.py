"""Which write-behind worker owns which partition: leases, fair shares, the group.

A partition is owned through a lease key holding the worker's name with a TTL; every
read renews it and only the holder reads (`write_behind_scripts.READ`), so a worker
that lost its partition cannot take records out of the new owner's order. Live
workers register in a sorted set so each takes a fair share of the partitions. On
taking a partition the worker claims every pending record of the consumer group
(XAUTOCLAIM): those a previous owner read but did not finish.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .backends.base import BackendError
from .write_behind_records import GROUP, fields_of, redis_errors
from .write_behind_scripts import READ, RELEASE

if TYPE_CHECKING:
    from .write_behind import WriteBehind


class Leases:
    """The partition leases of one worker (``consumer``) on ``queue``."""

    def __init__(self, queue: WriteBehind, consumer: str, lease_ttl: float) -> None:
        self.queue = queue
        self.consumer = consumer
        self.lease_ttl = lease_ttl
        self.ttl_ms = max(1, int(lease_ttl * 1000))

    def key(self, index: int) -> str:
        return f"{self.queue.stream(index)}:lease"

    def fair_share(self) -> int:
        """Renew this worker's registration; how many partitions each live worker gets."""
        client = self.queue.client
        pipe = client.pipeline(transaction=False)
        now = time.time()
        workers = self.queue.workers_key
        pipe.execute_command("ZADD", workers, now + self.lease_ttl, self.consumer)
        pipe.execute_command("ZREMRANGEBYSCORE", workers, "-inf", now)
        pipe.execute_command("ZCARD", workers)
        live = pipe.execute()[-1]  # owned leases are renewed by every read (READ)
        return math.ceil(self.queue.config.partitions / max(1, int(live)))

    def acquire(self, index: int) -> bool:
        """Take the lease of partition ``index`` if nobody holds it."""
        return bool(self.queue.client.set(self.key(index), self.consumer, nx=True, px=self.ttl_ms))

    def release(self, index: int) -> None:
        """Give the lease of ``index`` up, if this worker still holds it."""
        try:
            with redis_errors("release"):
                self.queue.client.execute_command(
                    "EVAL", RELEASE, 1, self.key(index), self.consumer
                )
        except BackendError:
            pass

    def leave(self) -> None:
        """Leave the worker registry (the others take over the partitions)."""
        try:
            with redis_errors("release"):
                self.queue.client.zrem(self.queue.workers_key, self.consumer)
        except BackendError:
            pass

    def join(self, stream: str) -> None:
        """Create the consumer group (and the stream) unless they exist."""
        try:
            self.queue.client.execute_command("XGROUP", "CREATE", stream, GROUP, "0", "MKSTREAM")
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):  # BUSYGROUP: it exists already
                raise

    def claim(self, stream: str) -> Iterator[tuple[str, dict[str, bytes] | None]]:
        """XAUTOCLAIM every pending record of the group (a previous owner's), in order;
        fields None for a record deleted meanwhile (only to acknowledge)."""
        cursor = "0-0"
        while True:
            cursor_raw, entries, *rest = self.queue.client.execute_command(
                "XAUTOCLAIM", stream, GROUP, self.consumer, 0, cursor, "COUNT", 500
            )
            for entry_id, fields in entries:
                if fields is not None:
                    yield entry_id.decode(), fields_of(fields)
            for gone in rest[0] if rest else []:
                yield gone.decode(), None
            cursor = cursor_raw.decode() if isinstance(cursor_raw, bytes) else str(cursor_raw)
            if cursor == "0-0":
                return

    def forget_dead_consumers(self, stream: str) -> None:
        """Remove group consumers that hold nothing and were idle past a lease."""
        client = self.queue.client
        idle_ms = self.lease_ttl * 1000
        for consumer in client.xinfo_consumers(stream, GROUP):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if name != self.consumer and not consumer["pending"] and consumer["idle"] > idle_ms:
                client.xgroup_delconsumer(stream, GROUP, name)

    def read(self, owned: Sequence[tuple[int, str, str]], count: int) -> tuple[list[Any], bool]:
        """Records after the last one the worker has of the partitions ``owned``
        ((index, stream, that id)), one lease-checked script each in one pipeline
        (`write_behind_scripts.READ`: safe to run again after a lost reply): per
        partition ``[0]`` (lease lost), ``[1]`` (no records), ``[1, streams]``, or the
        error; ``[2, streams]``: records delivered before, not necessarily the stream's
        last ones; and whether a `flush` is waiting."""
        pipe = self.queue.client.pipeline(transaction=False)
        for index, stream, last in owned:
            args = (self.consumer, self.ttl_ms, GROUP, count, last)
            pipe.execute_command("EVAL", READ, 2, self.key(index), stream, *args)
        pipe.execute_command("EXISTS", self.queue.flush_key)
        with redis_errors("XREADGROUP"):
            *results, flushing = pipe.execute(raise_on_error=False)
        return results, isinstance(flushing, int) and flushing > 0
