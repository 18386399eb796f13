"""The worker's reads when a reply is lost: the server ran the read (XREADGROUP moved
the records into the worker's pending list) but the worker never got the answer (a
timeout, a dropped connection, a client that retried the command). '>' never returns
those records again, so the worker must read them from its pending list, before the
records that follow them — else it applies later changes first, `flush()` waits
forever, and the next owner of the partition applies the older image last."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from test_write_behind import WB, Counter, wb_env

from sa_cache.write_behind_records import GROUP
from sa_cache.write_behind_worker import WriteBehindWorker


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


def _set(wb: WB, n: int) -> None:
    with wb.Session() as s:
        s.get(Counter, 1).n = n  # type: ignore[union-attr]
        s.commit()


def _settle(wb: WB, worker: WriteBehindWorker, rounds: int = 100) -> None:
    """Step ``worker`` until the queue holds nothing pending (or ``rounds`` ran out)."""
    for _ in range(rounds):
        worker.step(force=True)
        if not wb.queue.pending():
            return
        time.sleep(0.01)


def _lose_a_read(wb: WB, worker: WriteBehindWorker) -> int:
    """What a read whose reply never arrived leaves behind: the worker's own read on
    the server, its answer dropped. Returns how many records it took."""
    client: Any = wb.queue.client
    taken = 0
    for index in worker.parts:
        stream = wb.queue.stream(index)
        reply = client.execute_command(
            "XREADGROUP", "GROUP", GROUP, worker.consumer, "COUNT", 100, "STREAMS", stream, ">"
        )
        taken += sum(len(entries) for _, entries in reply or [])
    return taken


def _worker_over_one_row(wb: WB) -> WriteBehindWorker:
    """Row 1 (n=0) applied by a started worker that holds its partitions."""
    with wb.Session() as s:
        s.add(Counter(id=1, n=0))
        s.commit()
    worker = wb.worker(lease_ttl=10.0)
    worker.start()
    _settle(wb, worker)
    assert wb.db() == {1: (0, "new")}
    return worker


def test_records_of_a_lost_read_are_read_again_in_order(wb_db: WB) -> None:
    wb = wb_db
    worker = _worker_over_one_row(wb)
    _set(wb, 1)
    assert _lose_a_read(wb, worker) > 0  # n=1's records: in its pending list, unseen
    _set(wb, 2)  # the last write
    _settle(wb, worker)
    assert wb.queue.pending() == {}  # (they stayed pending: flush() never returned)
    assert wb.db() == {1: (2, "new")}
    worker.close()
    wb.drain()  # the next owner finds nothing older to apply
    assert wb.db() == {1: (2, "new")}
    with wb.Session() as s:
        assert s.get(Counter, 1).n == 2  # type: ignore[union-attr]


def test_a_lost_read_of_a_record_deleted_since_is_acknowledged(wb_db: WB) -> None:
    """A record the lost read delivered and the stream no longer has (trimmed, or
    deleted by an operator) comes back without fields: it is acknowledged, and the
    records after it are applied."""
    wb = wb_db
    worker = _worker_over_one_row(wb)
    _set(wb, 1)
    client: Any = wb.queue.client
    lost: list[tuple[str, bytes]] = []
    for index in worker.parts:
        stream = wb.queue.stream(index)
        reply = client.execute_command(
            "XREADGROUP", "GROUP", GROUP, worker.consumer, "COUNT", 100, "STREAMS", stream, ">"
        )
        lost += [(stream, entry_id) for _, entries in reply or [] for entry_id, _ in entries]
    assert lost
    for stream, entry_id in lost:  # gone from the stream, still pending
        client.execute_command("XDEL", stream, entry_id)
    _set(wb, 2)
    _settle(wb, worker)
    assert wb.queue.pending() == {}
    assert wb.db() == {1: (2, "new")}
    worker.close()
