"""Write-behind's commit protocol against what surrounds the commit: other
``before_commit`` listeners (one may fail the commit after sa_cache queued), and a
commit slower than ``prepare_timeout`` (the worker may give its records up meanwhile)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from test_write_behind import WB, Counter, Order, wb_env


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


class Rejected(Exception):
    """A validation listener refusing the commit."""


@pytest.mark.parametrize("registered_on", ["session", "sessionmaker"])
def test_a_commit_a_later_listener_fails_queues_nothing(wb_db: WB, registered_on: str) -> None:
    """A transaction with only write-behind changes (no connection: nothing to COMMIT)
    whose commit a ``before_commit`` listener after sa_cache's refuses: commit() raises,
    so the change must not reach the cache nor the database (DESIGN rule 1)."""
    wb = wb_db
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    wb.drain()

    def reject(session: Any) -> None:
        raise Rejected("refused by a later before_commit listener")

    if registered_on == "sessionmaker":
        event.listen(wb.Session, "before_commit", reject)  # after sa_cache's own
    try:
        with wb.Session() as s:
            if registered_on == "session":
                event.listen(s, "before_commit", reject)  # runs after the class's listeners
            wb.log.clear()
            row = s.get(Counter, 1)
            assert row is not None
            assert wb.log.statements == []  # a hit: the transaction has no database work
            row.n = 2
            with pytest.raises(Rejected):
                s.commit()
            s.rollback()
    finally:
        if registered_on == "sessionmaker":
            event.remove(wb.Session, "before_commit", reject)
    with wb.Session() as s:
        assert s.get(Counter, 1).n == 1  # type: ignore[union-attr]
    wb.drain()
    assert wb.db() == {1: (1, "new")}
    assert wb.queue.dead_letters() == []
    with wb.Session() as s:  # and the next commit is queued as usual
        s.get(Counter, 1).n = 3  # type: ignore[union-attr]
        s.commit()
    wb.drain()
    assert wb.db() == {1: (3, "new")}


def test_a_commit_slower_than_prepare_timeout_is_not_lost(
    wb_db: WB, caplog: pytest.LogCaptureFixture
) -> None:
    """A live producer whose commit takes longer than ``prepare_timeout`` (a slow
    listener after sa_cache's): the worker dead-letters its prepare records as "outcome
    unknown" meanwhile, so the producer must not confirm them (they would never be
    applied) but write the changes itself before commit() returns."""
    wb = wb_db
    rows = range(1, 7)  # several partitions: the prepare records go in one pipeline
    with wb.Session() as s:
        s.add_all([Counter(id=i, n=1) for i in rows])
        s.commit()
    wb.drain()
    wb.queue.configure(prepare_timeout=0.2)
    runner = wb.worker()
    runner.start()
    runner.step()  # owns the partitions, has read them to their end

    def slow(session: Any) -> None:  # the worker runs while the commit is still going on
        time.sleep(0.3)
        runner.step()

    try:
        with wb.Session() as s:
            event.listen(s, "before_commit", slow)
            for i in rows:
                s.get(Counter, i).n = 2  # type: ignore[union-attr]
            s.add(Order(id=1, note="database work: prepared before the COMMIT"))
            with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
                s.commit()
        assert runner.dead == len(rows)  # the worker gave the prepare records up
        assert wb.db() == dict.fromkeys(rows, (2, "new"))  # written before commit() returned
        with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
            for _ in range(3):
                runner.step(force=True)
    finally:
        runner.close()
    wb.drain()
    assert wb.db() == dict.fromkeys(rows, (2, "new"))
    with wb.Session() as s:
        assert [s.get(Counter, i).n for i in rows] == [2] * len(rows)  # type: ignore[union-attr]
