"""Write-behind: Redis fails at the confirmation after the database COMMIT, so the
producer writes its changes to the database itself before ``commit()`` returns
(`sa_cache.write_behind_late`). Other Sessions may commit newer changes of the same
rows meanwhile (they read the entries the failed confirmation never updated): queued,
already applied by the worker, or written synchronously. The late write must not undo
them (last commit wins), and a change it cannot order is dead-lettered, never dropped
silently (DESIGN rule 6)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from redis_servers import RedisServer
from test_write_behind import WB, Counter, Order, wb_env

from sa_cache.backends.base import BackendError
from sa_cache.write_behind import WriteBehind
from sa_cache.write_behind_fence import FENCE, ensure_fence_table, mark_synced


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis; row 1 is (1, "new") in the database."""
    with wb_env(engine, redis_url, namespace) as env:
        _seed(env)
        yield env


def _seed(wb: WB) -> None:
    with wb.Session() as s:
        s.add(Counter(id=1, n=1))
        s.commit()
    wb.drain()


@contextmanager
def confirm_fails(mp: pytest.MonkeyPatch, meanwhile: Callable[[], None]) -> Iterator[list[str]]:
    """The next confirmation runs ``meanwhile`` (what other processes do while it waits
    on a stalled Redis), then times out; later ones go through."""
    real = WriteBehind.confirm
    calls: list[str] = []

    def stalled(self: WriteBehind, queued: Any) -> None:
        if calls:
            return real(self, queued)
        calls.append("A")
        meanwhile()
        raise BackendError("Timeout reading from socket")

    mp.setattr(WriteBehind, "confirm", stalled)
    yield calls
    assert calls == ["A"]


def commit_a(wb: WB, **values: Any) -> None:
    """Session A: a write-behind change of row 1 and database work (so its queue write
    takes two steps: prepared before the COMMIT, confirmed after it)."""
    with wb.Session() as a:
        row = a.get(Counter, 1)
        assert row is not None
        for name, value in values.items():
            setattr(row, name, value)
        a.add(Order(id=1, note="A"))
        a.commit()


def apply_now(wb: WB) -> None:
    """A worker applies what is committed in the queue (not waiting, as ``drain`` would,
    for prepare records whose transaction has not confirmed yet)."""
    runner = wb.worker()
    runner.start()
    try:
        for _ in range(3):
            runner.step(force=True)
    finally:
        runner.close()


def commit_b(wb: WB, **values: Any) -> Callable[[], None]:
    """Session B, committing a change of row 1 through the queue."""

    def run() -> None:
        with wb.Session() as b:
            row = b.get(Counter, 1)
            assert row is not None
            for name, value in values.items():
                setattr(row, name, value)
            b.commit()

    return run


def test_a_change_queued_while_the_confirm_fails_is_not_lost(wb_db: WB) -> None:
    """B commits a change of the row after A's COMMIT, while A's confirmation waits:
    B is the last commit. A's late write must not fence B's queued image out (its sync
    mark is the time of A's change, not of the write), nor drop B's entry."""
    wb = wb_db
    with pytest.MonkeyPatch.context() as mp, confirm_fails(mp, commit_b(wb, n=20)):
        commit_a(wb, n=10)
    with wb.Session() as s:
        assert s.get(Counter, 1).n == 20  # type: ignore[union-attr]
    wb.drain()
    assert wb.db() == {1: (20, "new")}
    assert wb.queue.dead_letters() == []
    with wb.Session() as s:
        assert s.get(Counter, 1).n == 20  # type: ignore[union-attr]


def test_changes_of_other_columns_queued_meanwhile_both_count(wb_db: WB) -> None:
    """B changes another column than A, meanwhile: A's column is written late, B's is
    applied by the worker, and B's queued entry stays readable in between."""
    wb = wb_db
    with pytest.MonkeyPatch.context() as mp, confirm_fails(mp, commit_b(wb, label="B")):
        commit_a(wb, n=10)
    assert wb.db() == {1: (10, "new")}  # A's change, written before commit() returned
    with wb.Session() as s:
        assert s.get(Counter, 1).label == "B"  # type: ignore[union-attr]
    wb.drain()
    assert wb.db() == {1: (10, "B")}
    assert wb.queue.dead_letters() == []
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert (row.n, row.label) == (10, "B")  # type: ignore[union-attr]


def _dead_lettered_while_b_applied(wb: WB, caplog: pytest.LogCaptureFixture) -> Any:
    """A commits n=10 while its confirm fails; meanwhile B commits n=20 and the worker
    applies it: A's change is dead-lettered, B's stays. Returns the dead letter."""

    def b_applied() -> None:
        commit_b(wb, n=20)()
        apply_now(wb)

    with (
        pytest.MonkeyPatch.context() as mp,
        confirm_fails(mp, b_applied),
        caplog.at_level(logging.CRITICAL, logger="sa_cache"),
    ):
        commit_a(wb, n=10)
    assert wb.db() == {1: (20, "new")}
    (letter,) = wb.queue.dead_letters()
    assert (letter.table, letter.op, letter.image) == ("sac_wb_counters", "u", [1, 10, "new"])
    assert "applied meanwhile" in letter.error
    return letter


def test_a_change_applied_while_the_confirm_fails_is_not_overwritten(
    wb_db: WB, caplog: pytest.LogCaptureFixture
) -> None:
    """B's change of the same column is committed and applied by the worker while A's
    confirmation waits (a stalled producer). Which of the two is newer, the entry the
    worker left cannot say: A's change goes to the dead-letter stream, where an
    operator can replay it, instead of overwriting B's silently."""
    wb = wb_db
    letter = _dead_lettered_while_b_applied(wb, caplog)
    wb.drain()
    assert wb.db() == {1: (20, "new")}
    with wb.Session() as s:
        assert s.get(Counter, 1).n == 20  # type: ignore[union-attr]
    assert wb.queue.replay([letter.id]) == 1  # the operator's call
    wb.drain()
    assert wb.db() == {1: (10, "new")}


def test_a_change_of_other_columns_applied_meanwhile_is_kept(wb_db: WB) -> None:
    """B's change of another column is applied while A's confirmation waits: A's late
    write of its own column goes through, and B's stays."""
    wb = wb_db

    def b_applied() -> None:
        commit_b(wb, label="B")()
        apply_now(wb)

    with pytest.MonkeyPatch.context() as mp, confirm_fails(mp, b_applied):
        commit_a(wb, n=10)
    assert wb.db() == {1: (10, "B")}
    assert wb.queue.dead_letters() == []
    wb.drain()
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert (row.n, row.label) == (10, "B")  # type: ignore[union-attr]


def test_a_synchronous_write_meanwhile_is_not_overwritten(wb_db: WB) -> None:
    """B commits while Redis refuses its queue write, so B's row is written
    synchronously (with a sync mark) while A's confirmation waits: A's late write finds
    B's newer mark and leaves the row to B."""
    wb = wb_db

    def b_synchronous() -> None:
        with pytest.MonkeyPatch.context() as down:

            def refused(self: WriteBehind, *args: Any, **kwargs: Any) -> Any:
                raise BackendError("Redis went away")

            down.setattr(WriteBehind, "prepare", refused)
            commit_b(wb, n=20)()

    with pytest.MonkeyPatch.context() as mp, confirm_fails(mp, b_synchronous):
        commit_a(wb, n=10)
    assert wb.db() == {1: (20, "new")}
    wb.drain()
    assert wb.db() == {1: (20, "new")}
    assert wb.queue.dead_letters() == []
    with wb.Session() as s:
        assert s.get(Counter, 1).n == 20  # type: ignore[union-attr]


def test_redis_down_at_the_late_write_still_lets_a_newer_queued_change_win(
    engine: sa.Engine, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis goes down after B queued its change and before A's late write, which then
    cannot read the row's entry: it writes A's change with a sync mark as old as that
    change, so the worker still applies B's newer one once Redis is back."""
    appendonly = ["--appendonly", "yes", "--appendfsync", "always"]  # B's change survives
    with RedisServer(args=appendonly) as server, wb_env(engine, server.url, namespace) as wb:
        _seed(wb)
        real_abort = WriteBehind.abort

        def crash() -> None:
            commit_b(wb, n=20)()
            server.kill()

        def back_then_abort(self: WriteBehind, queued: Any) -> bool:
            server.start()  # Redis is back before A aborts its prepare records
            return real_abort(self, queued)

        with (
            pytest.MonkeyPatch.context() as mp,
            confirm_fails(mp, crash),
            caplog.at_level(logging.CRITICAL, logger="sa_cache"),
        ):
            mp.setattr(WriteBehind, "abort", back_then_abort)
            commit_a(wb, n=10)
        assert wb.db() == {1: (10, "new")}  # written late, Redis down
        wb.drain()
        assert wb.db() == {1: (20, "new")}
        assert wb.queue.dead_letters() == []
        with wb.Session() as s:
            assert s.get(Counter, 1).n == 20  # type: ignore[union-attr]


def test_a_sync_mark_never_goes_back(engine: sa.Engine, namespace: str) -> None:
    """A late write marks its rows with the (earlier) time of its change: a newer mark
    already there stays, so older images stay fenced out of that newer write."""
    ensure_fence_table(engine)
    name = f"{namespace}:wb:{{x}}:sync:row"
    try:
        with engine.begin() as conn:
            mark_synced(conn, [name], 2000.0)
        with engine.begin() as conn:
            mark_synced(conn, [name], 1000.0)
        with engine.connect() as conn:
            token = conn.execute(sa.select(FENCE.c.token).where(FENCE.c.stream == name)).scalar()
        assert token == 2000 * 1_000_000
        with engine.begin() as conn:
            mark_synced(conn, [name], 3000.0)
        with engine.connect() as conn:
            token = conn.execute(sa.select(FENCE.c.token).where(FENCE.c.stream == name)).scalar()
        assert token == 3000 * 1_000_000
    finally:
        with engine.begin() as conn:
            conn.execute(FENCE.delete().where(FENCE.c.stream == name))


def reader_caches_the_row(wb: WB) -> Callable[[], None]:
    """Row 1's entry expires (or is evicted), and another Session reads the row: it
    caches the database's row, which the unconfirmed change has not reached."""

    def run() -> None:
        key = wb.cache.entities[sa.inspect(Counter)].key(wb.cache, [1], None)
        wb.cache.backend.unlink_many([key])  # type: ignore[attr-defined]
        with wb.Session() as other:
            row = other.get(Counter, 1)
            assert row is not None
            assert row.n == 1

    return run


@pytest.mark.parametrize("change", ["update", "delete"])
def test_a_late_write_after_a_reader_cached_the_unchanged_row(wb_db: WB, change: str) -> None:
    """While A's confirmation waits, a reader caches row 1 as the database still holds
    it (A's change not there yet): that entry shows no other change, so A's change is
    written late — an update as a delete (a delete was dead-lettered: the entry's row,
    the one it deleted, was taken for another change applied meanwhile)."""
    wb = wb_db
    with (
        pytest.MonkeyPatch.context() as mp,
        confirm_fails(mp, reader_caches_the_row(wb)),
        wb.Session() as a,
    ):
        row = a.scalars(sa.select(Counter).where(Counter.id == 1)).one()
        if change == "update":
            row.n = 10
        else:
            a.delete(row)
        a.add(Order(id=1, note="A"))
        a.commit()
    assert wb.queue.dead_letters() == [], "a committed change was dead-lettered"
    assert wb.db() == ({1: (10, "new")} if change == "update" else {})
    wb.drain()
    assert wb.db() == ({1: (10, "new")} if change == "update" else {})
    with wb.Session() as s:
        got = s.get(Counter, 1)
        assert (None if got is None else got.n) == (10 if change == "update" else None)


def test_a_delete_written_late_over_another_change_applied_meanwhile_is_dead_lettered(
    wb_db: WB, caplog: pytest.LogCaptureFixture
) -> None:
    """B's change of row 1 is applied while A's confirmation of its delete waits: the
    entry shows another row than the one A deleted, and which is newer cannot be told,
    so A's delete goes to the dead-letter stream, B's row stays."""
    wb = wb_db

    def b_applied() -> None:
        commit_b(wb, n=20)()
        apply_now(wb)

    with (
        pytest.MonkeyPatch.context() as mp,
        confirm_fails(mp, b_applied),
        caplog.at_level(logging.CRITICAL, logger="sa_cache"),
        wb.Session() as a,
    ):
        row = a.get(Counter, 1)
        assert row is not None
        a.delete(row)
        a.add(Order(id=1, note="A"))
        a.commit()
    (letter,) = wb.queue.dead_letters()
    assert (letter.table, letter.op) == ("sac_wb_counters", "d")
    assert wb.db() == {1: (20, "new")}


@pytest.fixture
def wb_cluster(engine: sa.Engine, redis_cluster_url: str, namespace: str) -> Iterator[WB]:
    with wb_env(engine, redis_cluster_url, namespace) as env:
        _seed(env)
        yield env


def test_on_a_cluster_a_change_applied_while_the_confirm_fails_is_dead_lettered(
    wb_cluster: WB, caplog: pytest.LogCaptureFixture
) -> None:
    """As on one Redis, on a Redis Cluster (whose pipelines route commands by key:
    the dead letter raised AttributeError out of ``commit()``, regression audit rf3-01)."""
    _dead_lettered_while_b_applied(wb_cluster, caplog)
