"""The write-behind worker's pace: how often it reads, and how `flush` hurries it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from test_write_behind import WB, Counter

from sa_cache.write_behind_leases import Leases


def test_flush_does_not_wait_for_batches_to_fill(wb_sqlite: WB) -> None:
    wb = wb_sqlite
    with wb.Session() as s:
        s.add_all([Counter(id=i, n=i) for i in range(20)])
        s.commit()
    with wb.running(max_delay=30.0, poll_interval=0.01) as runner:
        started = time.monotonic()
        wb.queue.flush(timeout=20)
        waited = time.monotonic() - started
        assert runner.applied == 20
    assert waited < 5  # not the 30 s a batch may wait to fill
    assert len(wb.db()) == 20
    with wb.running(max_delay=0.3, poll_interval=0.01) as runner:  # no flush: batches fill
        with wb.Session() as s:
            s.get(Counter, 1).n += 1  # type: ignore[union-attr]
            s.commit()
        time.sleep(0.1)
        assert runner.applied == 0
        time.sleep(0.6)
        assert runner.applied == 1


def test_a_caught_up_worker_reads_at_its_poll_interval(
    wb_sqlite: WB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A steady trickle of commits does not make the worker read without pause."""
    wb = wb_sqlite
    reads: list[float] = []
    original = Leases.read

    def counting(self: Leases, *args: Any, **kwargs: Any) -> Any:
        reads.append(time.monotonic())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Leases, "read", counting)
    with wb.Session() as s:
        s.add_all([Counter(id=i) for i in range(5)])
        s.commit()
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        while not stop.is_set():
            with wb.Session() as s:
                s.get(Counter, i % 5).n += 1  # type: ignore[union-attr]
                s.commit()
            i += 1

    with wb.running(max_delay=0.2, poll_interval=0.05) as runner:
        wb.queue.flush(timeout=10)
        producer = threading.Thread(target=trickle, daemon=True)
        producer.start()
        time.sleep(0.3)
        del reads[:]
        time.sleep(1.0)
        stop.set()
        producer.join(5)
        assert runner.applied > 5
    # about one read per poll interval (and per batch), not one per commit
    assert len(reads) <= 35, len(reads)  # 1 s / 0.05 s, plus one per batch due
    wb.drain()
    with wb.Session() as s:
        total = sum(s.get(Counter, i).n for i in range(5))  # type: ignore[union-attr]
    assert sum(n for n, _ in wb.db().values()) == total
