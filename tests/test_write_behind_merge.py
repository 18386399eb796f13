"""Write-behind updates of different columns of one row both count (`write_behind_merge`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from test_write_behind import WB, Counter, Order, wb_env

from sa_cache.codec import decode, pack, unpack
from sa_cache.transaction import BehindChange
from sa_cache.write_behind_coalesce import Slot
from sa_cache.write_behind_merge import overlay
from sa_cache.write_behind_records import prepare_record, queued_entry, read_prepare


@pytest.fixture
def wb(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


@pytest.fixture
def wb_cluster(tmp_path: Any, redis_cluster_url: str, namespace: str) -> Iterator[WB]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/wb.db")
    try:
        with wb_env(engine, redis_cluster_url, namespace) as env:
            yield env
    finally:
        engine.dispose()


def _seed(wb: WB, n: int = 0, label: str = "a", applied: bool = True) -> None:
    with wb.Session() as s:
        s.add(Counter(id=1, n=n, label=label))
        s.commit()
    if applied:
        wb.drain()


def _read(wb: WB) -> tuple[int, str]:
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert row is not None
        return row.n, row.label


def _retries(wb: WB) -> int:
    return int(wb.cache.stats.snapshot().get("write_behind.merge_retry", 0))


def _two_sessions(wb: WB, n: int, label: str) -> None:
    """Two Sessions read row 1 from the cache; one sets ``n``, the other ``label``;
    they commit one after the other."""
    a, b = wb.Session(), wb.Session()
    try:
        a.get(Counter, 1).n = n  # type: ignore[union-attr]
        b.get(Counter, 1).label = label  # type: ignore[union-attr]
        a.commit()
        b.commit()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("applied", [True, False], ids=["entry", "queued"])
def test_two_sessions_changing_different_columns_both_count(wb: WB, applied: bool) -> None:
    """With whole images the second commit put back the first one's column as it read
    it."""
    _seed(wb, applied=applied)
    _two_sessions(wb, 5, "b")
    assert _read(wb) == (5, "b")  # the queued entry, in every process
    assert _retries(wb) == 1  # b's guess (the entry it read) was replaced by a's commit
    wb.drain()
    assert wb.db() == {1: (5, "b")}
    assert _read(wb) == (5, "b")


def test_a_row_loaded_through_another_query_keeps_a_queued_column(wb: WB) -> None:
    """Another query reads the database, which trails the queue: its object's other
    columns are stale, and must not overwrite a change still queued."""
    _seed(wb)
    with wb.Session() as s:
        s.get(Counter, 1).n = 7  # type: ignore[union-attr]
        s.commit()  # queued, not in the database yet
    with wb.Session() as s:
        row = s.scalars(sa.select(Counter).where(Counter.label == "a")).one()
        assert row.n == 0  # the database's
        row.label = "y"
        s.add(Order(id=1, note="same transaction"))  # database work: a two-step commit
        s.commit()
    assert _read(wb) == (7, "y")
    wb.drain()
    assert wb.db() == {1: (7, "y")}


def _commit_while_another_commits(wb: WB, mine: tuple[str, Any], other: tuple[str, Any]) -> None:
    """Set ``mine`` on row 1 in a transaction with database work (prepare records, then
    the COMMIT, then the commit script); at its database COMMIT another Session sets
    ``other`` and commits (no database work: queued in one step)."""
    done: list[bool] = []

    def other_commit(conn: Any) -> None:
        if not done:
            done.append(True)
            with wb.Session() as s:
                setattr(s.get(Counter, 1), *other)
                s.commit()

    with wb.Session() as s:
        setattr(s.get(Counter, 1), *mine)
        s.add(Order(id=1, note="database work"))
        event.listen(wb.engine, "commit", other_commit)
        try:
            s.commit()
        finally:
            event.remove(wb.engine, "commit", other_commit)
    assert done


def test_a_commit_between_prepare_and_confirm_is_merged(wb: WB) -> None:
    """Another process commits a change to the row between this transaction's prepare
    records and its commit script (at its database COMMIT): the commit script finds a
    newer entry, and the image is merged over it and prepared again."""
    _seed(wb)
    _commit_while_another_commits(wb, ("label", "z"), ("n", 9))
    assert _read(wb) == (9, "z")
    assert _retries(wb) == 1
    wb.drain()
    assert wb.db() == {1: (9, "z")}
    assert wb.queue.dead_letters() == []


def test_the_worker_writes_only_the_changed_columns(wb: WB) -> None:
    """A row with no entry: the update's other columns are its object's, which a
    direct database write made stale. The worker must leave them, and make the row as
    it reads it back (not the queued image) the row's entry once applied."""
    _seed(wb, n=1, label="a")
    with wb.Session() as s:
        row = s.scalars(sa.select(Counter).where(Counter.n == 1)).one()  # the database's
        wb.cache.backend.delete_many([wb.cache.entities[Counter.__mapper__].key(wb.cache, [1])])
        with wb.engine.begin() as conn:  # another writer, straight to the database
            conn.execute(sa.update(Counter).where(Counter.id == 1).values(label="db"))
        row.n = 2
        s.commit()
    assert _read(wb) == (2, "a")  # the queued image: its object's label (see the docs)
    wb.drain()
    assert wb.db() == {1: (2, "db")}
    wb.log.clear()
    assert _read(wb) == (2, "db")
    assert not wb.log.selects  # from the entry


def test_a_held_object_after_the_worker_applied_it_needs_no_retry(wb: WB) -> None:
    """The worker turns a queued entry into an ordinary one: other bytes, the same
    image. The commit script compares images, so the next commit is not retried."""
    _seed(wb)
    with wb.Session(expire_on_commit=False) as s:
        row = s.get(Counter, 1)
        assert row is not None
        for i in range(1, 4):
            row.n = i
            s.commit()
            wb.drain()  # applied: the entry becomes an ordinary one
    assert _retries(wb) == 0
    assert wb.db() == {1: (3, "a")}


def test_on_cluster(wb_cluster: WB) -> None:
    wb = wb_cluster
    _seed(wb)
    _two_sessions(wb, 3, "c")
    assert _read(wb) == (3, "c")
    wb.drain()
    assert wb.db() == {1: (3, "c")}


# -- pure parts ---------------------------------------------------------------------------


def test_overlay() -> None:
    assert overlay([1, "a", None], [9, "b", 3], {1}) == [1, "b", None]
    assert overlay([1, "a"], [9, "b"], ()) == [1, "a"]


def _prepared(image: list[Any] | None, cols: set[int] | None, whole: bool) -> Any:
    entry = queued_entry(image, 0.0, "tx", cols, whole)
    return read_prepare(prepare_record("t", "k", "u", entry, [1]))


def test_queued_entries_name_their_columns_and_old_ones_are_whole_rows() -> None:
    old = read_prepare(prepare_record("t", "k", "u", queued_entry([1, 2], 0.0, "tx"), [1]))
    assert old[7:] == (None, True)
    assert _prepared([1, 2], {1}, False)[7:] == (frozenset({1}), False)
    # the record itself keeps the five fields an earlier worker unpacks
    entry = queued_entry([1, 2], 0.0, "tx", {1}, True)
    assert len(unpack(prepare_record("t", "k", "u", entry, [1]))) == 5
    bad = prepare_record("t", "k", "u", queued_entry([1, 2], 0.0, "tx", {5}, True), [1])
    with pytest.raises(ValueError, match="outside an image of 2"):
        read_prepare(bad)


def test_coalescing_overlays_column_updates_in_commit_order() -> None:
    slot = Slot("k", "t", "u")
    slot.take(_prepared([1, 10, "a"], {1}, True))
    slot.take(_prepared([1, 0, "b"], {2}, False))  # its other columns are stale
    assert (slot.image, slot.cols, slot.whole) == ([1, 10, "b"], frozenset({1, 2}), False)
    slot.take(_prepared([1, 11, "c"], {1}, True))  # a whole image: taken as it is
    assert (slot.image, slot.cols) == ([1, 11, "c"], frozenset({1, 2}))
    fresh = Slot("k", "t", "u")
    fresh.take(_prepared([1, 0, "b"], {2}, False))
    assert (fresh.cols, fresh.whole) == (frozenset({2}), False)
    full = Slot("k", "t", "i")
    full.take(_prepared([1, 1, "a"], None, True))  # an insert: the whole row
    full.take(_prepared([1, 0, "z"], {2}, False))
    assert (full.image, full.cols, full.whole) == ([1, 1, "z"], None, False)
    full.take(_prepared(None, None, True))  # a delete
    assert (full.image, full.cols) == (None, None)


def test_a_change_names_its_columns_over_flushes(wb: WB) -> None:
    _seed(wb)
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert row is not None
        row.n = 1
        s.flush()
        row.label = "q"
        s.flush()
        from sa_cache.transaction import collector_for

        changes = collector_for(s, wb.cache).behind_changes()
        (change,) = changes.values()
        assert isinstance(change, BehindChange)
        spec = wb.cache.entities[Counter.__mapper__]
        assert {spec.attr_keys[i] for i in change.cols or ()} == {"n", "label"}
        s.rollback()
    entry = wb.cache.backend.get_many([spec.key(wb.cache, [1])])[0]
    assert decode(entry).value[1:] == [0, "a"]


def test_after_the_last_attempt_the_update_is_queued_unchecked(
    wb: WB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries that keep changing under a commit: after ``ATTEMPTS`` runs it is queued
    over the last entry it saw without a check, so not as the whole row: the worker
    writes its column, and the row's entry is the row as it reads it back."""
    import sa_cache.write_behind_merge as merging

    _seed(wb)
    monkeypatch.setattr(merging, "ATTEMPTS", 0)  # the first run is the last
    with wb.Session() as s:
        s.get(Counter, 1).n = 4  # type: ignore[union-attr]
        s.commit()
    assert _read(wb) == (4, "a")
    wb.drain()
    assert wb.db() == {1: (4, "a")}
    key = wb.cache.entities[Counter.__mapper__].key(wb.cache, [1])
    entry = decode(wb.cache.backend.get_many([key])[0])  # type: ignore[arg-type]
    assert entry.value == [1, 4, "a"]
    assert entry.meta is None  # an ordinary entry, not the queued one


def test_a_row_loaded_from_the_database_is_guessed_as_loaded(wb: WB) -> None:
    """No entry seen by this Session: the first guess is the row as its object loaded
    it, which the row's entry holds, so the commit is not retried."""
    _seed(wb)
    with wb.Session() as s:
        row = s.scalars(sa.select(Counter).where(Counter.label == "a")).one()  # database
        row.n = 6
        s.commit()
    assert _retries(wb) == 0
    assert _read(wb) == (6, "a")


# -- a change that cannot be applied, coalesced with others -------------------------------


def test_a_poison_change_coalesced_with_valid_ones_is_dead_lettered_alone(
    wb: WB, caplog: pytest.LogCaptureFixture
) -> None:
    """Three committed changes of one row reach the worker together: a valid one, one
    the database refuses (CHECK n >= 0), another valid one of another column. Coalesced,
    the write fails; applied one at a time, only the refused one is dead-lettered."""
    _seed(wb, n=1)
    for change in ({"n": 2}, {"n": -1}, {"label": "after"}):
        with wb.Session() as s:
            row = s.get(Counter, 1)
            assert row is not None
            for name, value in change.items():
                setattr(row, name, value)
            s.commit()
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
        runner = wb.drain(max_attempts=2)
    assert runner.dead == 1
    (letter,) = wb.queue.dead_letters()
    assert letter.image is not None
    assert -1 in letter.image
    assert wb.db() == {1: (2, "after")}  # before and after the refused change
    # the entry showed n=-1 (queued after it); the worker dropped it: reads load the row
    assert _read(wb) == (2, "after")


def test_an_update_of_a_row_deleted_outside_the_queue_brings_it_back(wb: WB) -> None:
    """The worker UPDATEs the changed columns; a row the database no longer has (a
    direct DELETE) gets its queued image inserted, as the whole-row upsert did."""
    _seed(wb, n=1)
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert row is not None
        row.n = 3
        s.commit()
    with wb.engine.begin() as conn:
        conn.execute(sa.delete(Counter).where(Counter.id == 1))
    with wb.Session() as s:
        s.add(Counter(id=2, n=0))  # another row in the same batch, which does exist
        s.commit()
    wb.drain()
    assert wb.db() == {1: (3, "a"), 2: (0, "new")}
    with wb.Session() as s:  # one UPDATE of n for both rows; one of them is gone again
        s.get(Counter, 2).n = 4  # type: ignore[union-attr]
        s.get(Counter, 1).n = 5  # type: ignore[union-attr]
        s.commit()
    with wb.engine.begin() as conn:
        conn.execute(sa.delete(Counter).where(Counter.id == 1))
    wb.drain()
    assert wb.db() == {1: (5, "a"), 2: (4, "new")}


def test_a_column_set_on_an_expired_object_is_not_loaded_over(wb: WB) -> None:
    """After a commit (expire_on_commit) a column is set without reading the object:
    loading the other columns for the image (from the queued entry) must keep it."""
    _seed(wb)
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert row is not None
        row.label = "b"
        s.commit()  # queued; row is expired
        row.n = 5  # set before any attribute was loaded again
        s.commit()
    assert _read(wb) == (5, "b")
    wb.drain()
    assert wb.db() == {1: (5, "b")}


def test_a_record_made_again_at_the_commit_replaces_the_prepared_one(
    wb: WB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A two-step commit's prepare record was merged over a guess; another Session's
    change lands before its commit script, which makes the record again (here without
    a check: the last attempt). The worker must take only the record made again: the
    prepared one would put back the other Session's column as the guess had it."""
    import sa_cache.write_behind_merge as merging

    _seed(wb)
    monkeypatch.setattr(merging, "ATTEMPTS", 0)
    _commit_while_another_commits(wb, ("n", 5), ("label", "b"))
    wb.drain()
    assert wb.db() == {1: (5, "b")}


def test_after_the_worker_applied_an_update_the_entry_is_the_row_as_stored(wb: WB) -> None:
    """A bulk UPDATE outside the queue changes another column while an update is queued:
    the queued image shows the old value until the worker has applied it; then the
    row's entry is the row as the database holds it (read back in the batch)."""
    _seed(wb)
    with wb.Session() as s:
        s.get(Counter, 1).n = 7  # type: ignore[union-attr]
        s.commit()
    with wb.Session() as s:
        s.execute(sa.update(Counter).where(Counter.id == 1).values(label="z"))
        s.commit()
    wb.drain()
    assert wb.db() == {1: (7, "z")}
    wb.log.clear()
    assert _read(wb) == (7, "z")
    assert not wb.log.selects  # the entry, kept: no need to load the row


def _drop_check(wb: WB) -> None:
    """Let the database take n < 0 from now on (the operator fixed the cause)."""
    if wb.engine.dialect.name == "sqlite":  # no DROP CONSTRAINT: ignore checks instead
        event.listen(
            wb.engine, "connect", lambda conn, _: conn.execute("PRAGMA ignore_check_constraints=1")
        )
        wb.engine.dispose()
        return
    with wb.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE sac_wb_counters DROP CONSTRAINT sac_wb_n_nonneg")


def test_a_replayed_column_update_writes_only_its_columns(
    wb: WB, caplog: pytest.LogCaptureFixture
) -> None:
    _seed(wb, n=1)
    with wb.Session() as s:
        s.get(Counter, 1).n = -1  # type: ignore[union-attr]
        s.commit()
    with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
        wb.drain(max_attempts=1)
    (letter,) = wb.queue.dead_letters()
    spec = wb.cache.entities[Counter.__mapper__]
    assert letter.cols == [spec.attr_keys.index("n")]
    with wb.Session() as s:  # a later change of another column, applied
        s.get(Counter, 1).label = "b"  # type: ignore[union-attr]
        s.commit()
    wb.drain()
    assert wb.db() == {1: (1, "b")}
    _drop_check(wb)
    assert wb.queue.replay() == 1
    wb.drain()
    assert wb.db() == {1: (-1, "b")}  # the replayed column only
    assert _read(wb) == (-1, "b")


def test_a_synchronous_write_of_one_column_leaves_an_older_update_of_others(
    wb: WB,
) -> None:
    """Redis fails at one commit, which writes its column to the database at once and
    marks it. An older queued update of that row must still be applied for its other
    columns, and not for the column written since."""
    from test_write_behind_edges import _redis_fails

    _seed(wb)
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert row is not None
        row.n, row.label = 7, "queued"
        s.commit()  # queued; the worker has not run yet
    with wb.Session() as s, pytest.MonkeyPatch.context() as mp:
        s.get(Counter, 1).label = "sync"  # type: ignore[union-attr]
        _redis_fails("prepare", mp)
        s.commit()  # written to the database before commit() returned
    assert wb.db() == {1: (0, "sync")}
    wb.drain()
    assert wb.db() == {1: (7, "sync")}
    assert _read(wb) == (7, "sync")


def test_populate_existing_loads_a_write_behind_row_from_its_queue(wb: WB) -> None:
    """``populate_existing`` reloads the object as the database would: here the row is
    its queued image (the Session's own flushed change included), not the database's,
    which the queue has not reached."""
    _seed(wb)
    by_pk = sa.select(Counter).where(Counter.id == 1).execution_options(populate_existing=True)
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert row is not None
        row.label = "t1"
        s.commit()  # queued
        row.n = 5  # autoflushed before the load: this Session's own queued change
        got = s.scalars(by_pk).one()
        assert got is row
        assert (row.n, row.label) == (5, "t1")
        assert row not in s.dirty
        s.commit()
    with wb.Session() as s:
        row = s.get(Counter, 1)
        assert row is not None
        row.n = 9  # not flushed: populate_existing without autoflush overwrites it
        got = s.scalars(by_pk.execution_options(autoflush=False)).one()
        assert (got.n, got.label) == (5, "t1")
        assert got not in s.dirty
    wb.drain()
    assert wb.db() == {1: (5, "t1")}


def test_an_older_update_coalesced_with_a_newer_one_keeps_out_of_a_synced_column(
    wb: WB,
) -> None:
    """n=2 is queued; Redis fails at another commit, which writes n=5 at once (marking
    n); label="b" is queued after it. The worker holds both updates in one slot: n=2
    is older than the mark and must not be applied, label must."""
    from test_write_behind_edges import _redis_fails

    _seed(wb)
    with wb.Session() as s:
        s.get(Counter, 1).n = 2  # type: ignore[union-attr]
        s.commit()
    with wb.Session() as s, pytest.MonkeyPatch.context() as mp:
        s.get(Counter, 1).n = 5  # type: ignore[union-attr]
        _redis_fails("prepare", mp)
        # that process reaches no Redis at all: its invalidation of the entry is only
        # remembered, so the queued n=2 entry stays (and label="b" merges over it)
        mp.setattr(wb.cache, "bump", lambda *args, **kwargs: None)
        s.commit()  # written at once, marked
    with wb.Session() as s:
        s.get(Counter, 1).label = "b"  # type: ignore[union-attr]
        s.commit()
    wb.drain()
    assert wb.db() == {1: (5, "b")}


def test_replaying_two_dead_letters_of_one_row_applies_both(
    wb: WB, caplog: pytest.LogCaptureFixture
) -> None:
    _seed(wb, n=1)
    for change in ({"label": "z", "n": -1}, {"n": -2}):
        with wb.Session() as s:
            row = s.get(Counter, 1)
            assert row is not None
            for name, value in change.items():
                setattr(row, name, value)
            s.commit()
        with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
            wb.drain(max_attempts=1)
    assert len(wb.queue.dead_letters()) == 2
    _drop_check(wb)
    assert wb.queue.replay() == 2
    wb.drain()
    assert wb.db() == {1: (-2, "z")}
    assert wb.queue.dead_letters() == []


def test_a_failing_change_is_dead_lettered_under_steady_traffic_on_its_row(
    wb: WB, caplog: pytest.LogCaptureFixture
) -> None:
    """New changes of the row keep arriving while a change of it keeps failing: they
    must not reset its attempts, or it is never split and dead-lettered."""
    _seed(wb, n=1)
    with wb.Session() as s:
        s.get(Counter, 1).n = -1  # type: ignore[union-attr]
        s.commit()
    runner = wb.worker(max_attempts=2, backoff=0.0, max_backoff=0.0)
    runner.start()
    try:
        with caplog.at_level(logging.CRITICAL, logger="sa_cache"):
            for i in range(8):
                with wb.Session() as s:
                    s.get(Counter, 1).label = f"v{i}"  # type: ignore[union-attr]
                    s.commit()
                runner.step(force=True)
    finally:
        runner.close()
    assert runner.dead == 1
    assert wb.db()[1][1].startswith("v")  # applied while the traffic went on


def test_a_driver_that_cannot_count_rows_still_writes_only_the_changed_columns(
    wb: WB, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(wb)
    with wb.Session() as s:
        s.get(Counter, 1).n = 5  # type: ignore[union-attr]
        s.commit()
    with wb.engine.begin() as conn:  # outside the queue, before the worker runs
        conn.execute(sa.update(Counter).where(Counter.id == 1).values(label="db"))
    monkeypatch.setattr(wb.engine.dialect, "supports_sane_multi_rowcount", False)
    wb.drain()
    assert wb.db() == {1: (5, "db")}


def test_records_that_carry_their_columns_in_the_list_are_read() -> None:
    """Records of a development version carried the columns after the five fields."""
    entry = queued_entry([1, 2], 0.0, "tx")
    raw = pack(["t", "k", "u", entry, [1], [1], False])
    assert read_prepare(raw)[7:] == (frozenset({1}), False)
