"""Write-behind: an object deleted and a new one of its primary key added in one
transaction replace the row, as without the cache (the ORM's "row switch" turns them
into an UPDATE): in the queue, in the entity cache, in the Session and in the database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from test_write_behind import WB, Counter, wb_env


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Every dialect, standalone Redis."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


def _read(wb: WB, id_: int) -> tuple[int, str] | None:
    """The row as another Session reads it (the entity cache, while queued)."""
    with wb.Session() as s:
        obj = s.get(Counter, id_)
        return None if obj is None else (obj.n, obj.label)


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "queued"])
def test_delete_and_add_of_one_key_in_one_flush_replace_the_row(wb_db: WB, applied: bool) -> None:
    wb = wb_db
    with wb.Session() as s:
        s.add_all([Counter(id=1, n=1, label="old"), Counter(id=2, n=2, label="other")])
        s.commit()
    if applied:
        wb.drain()
    with wb.Session() as s:
        old = s.get(Counter, 1)
        assert old is not None
        s.delete(old)
        new = Counter(id=1, n=5, label="replaced")
        s.add(new)
        s.flush()
        assert s.get(Counter, 1) is new
        s.commit()
        assert sa.inspect(old).was_deleted
        assert s.get(Counter, 1) is new
        assert (new.n, new.label) == (5, "replaced")
    assert _read(wb, 1) == (5, "replaced")  # while queued
    if applied:  # (the database trails the queue: the read above was the queue's)
        assert wb.db() == {1: (1, "old"), 2: (2, "other")}
    wb.drain()
    assert wb.db() == {1: (5, "replaced"), 2: (2, "other")}
    assert _read(wb, 1) == (5, "replaced")


@pytest.mark.parametrize("flushes", ["one", "several"])
def test_an_update_then_a_row_switch_write_the_new_row(wb_db: WB, flushes: str) -> None:
    """The row updated (and flushed) first: the new object's insert is the whole row,
    not an update of the columns changed before the delete."""
    wb = wb_db
    with wb.Session() as s:
        s.add(Counter(id=1, n=1, label="old"))
        s.commit()
    wb.drain()
    with wb.Session() as s:
        old = s.get(Counter, 1)
        assert old is not None
        old.n = 2
        s.flush()
        s.delete(old)
        if flushes == "several":
            s.flush()
            assert s.get(Counter, 1) is None
        s.add(Counter(id=1, n=7, label="again"))
        s.commit()
    assert _read(wb, 1) == (7, "again")
    wb.drain()
    assert wb.db() == {1: (7, "again")}
    assert _read(wb, 1) == (7, "again")


def test_a_row_switch_in_a_rolled_back_savepoint_leaves_the_row(wb_db: WB) -> None:
    wb = wb_db
    with wb.Session() as s:
        s.add(Counter(id=1, n=1, label="old"))
        s.commit()
    with wb.Session() as s:
        old = s.get(Counter, 1)
        assert old is not None
        savepoint = s.begin_nested()
        s.delete(old)
        s.add(Counter(id=1, n=9, label="dropped"))
        s.flush()
        savepoint.rollback()
        assert s.get(Counter, 1) is old
        old.n = 3
        s.commit()
    assert _read(wb, 1) == (3, "old")
    wb.drain()
    assert wb.db() == {1: (3, "old")}
