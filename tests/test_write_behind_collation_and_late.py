"""Write-behind order per database row, and the late write of a row deleted twice.

- MariaDB, a table with a unique key besides its primary key (`write_behind_mysql`): an
  image whose key the collation finds equal to a row's (``'ABC'`` for the row
  ``'abc'``) is that row, and one batch may hold it and a later image of the row
  spelled as stored. The later image must win, as it does through the plain upsert:
  the images were written by spelling (the one as stored first, the other after), so
  a later change of the row was lost without a dead letter.
- The late write (`write_behind_late`) of a transaction that deleted a row, added it
  again and deleted it again (or changed it after the re-add): a reader that cached
  the row the database still held while the confirmation waited shows no other
  change, so the change is written, as for a plain delete or update; it was
  dead-lettered (the row as first loaded was forgotten at the re-add).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from test_write_behind import FAST, WB, Counter, Order, cleanup, wb_env
from test_write_behind_late_sync import (
    _seed,
    apply_now,
    commit_b,
    confirm_fails,
    reader_caches_the_row,
)

import sa_cache
from sa_cache.backends.base import BackendError
from sa_cache.transaction import collector_for
from sa_cache.write_behind import WriteBehind, write_behind_for
from sa_cache.write_behind_apply import apply_rows
from sa_cache.write_behind_worker import WriteBehindWorker


class CollationBase(DeclarativeBase):
    pass


class Tag(CollationBase):  # MariaDB: case-insensitive, PAD SPACE key; another unique key
    __tablename__ = "sac_wbc_tags"
    code: Mapped[str] = mapped_column(
        sa.String(20).with_variant(sa.String(20, collation="utf8mb4_general_ci"), "mariadb"),
        primary_key=True,
    )
    slug: Mapped[str] = mapped_column(sa.String(20), unique=True)
    n: Mapped[int] = mapped_column(default=0)


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]

    def drain(self) -> WriteBehindWorker:
        runner = WriteBehindWorker(self.cache, self.engine, **{**FAST, "max_attempts": 2})
        runner.run(drain=True)
        return runner

    def rows(self) -> list[tuple[str, str, int]]:
        with self.engine.connect() as conn:
            query = sa.select(Tag.code, Tag.slug, Tag.n).order_by(sa.func.binary(Tag.code))
            return [(r.code, r.slug, r.n) for r in conn.execute(query)]

    def apply(self, rows: list[Any]) -> None:
        spec = self.cache.entities[sa.inspect(Tag)]
        with self.engine.begin() as conn:
            apply_rows(conn, spec, rows)


@pytest.fixture
def tags(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    """Row 'abc' (slug 'db', n=0) in the database; one partition, so that one batch
    holds every change."""
    CollationBase.metadata.drop_all(engine)
    CollationBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Tag), {"code": "abc", "slug": "db", "n": 0})
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=1)
    cache.register(Tag, ttl=60, write="behind")
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        CollationBase.metadata.drop_all(engine)


N = frozenset({2})  # the column n
SLUG_N = frozenset({1, 2})

ORDERS: dict[str, tuple[list[Any], list[tuple[str, str, int]]]] = {
    # the auditor's: an add of 'ABC' (the row 'abc'), then an update of the row as stored
    "other-spelling-then-stored": (
        [(("ABC",), ["ABC", "a1", 1], None, False), (("abc",), ["abc", "a1", 5], N, False)],
        [("abc", "a1", 5)],
    ),
    "stored-then-other-spelling": (
        [(("abc",), ["abc", "db", 5], N, False), (("ABC",), ["ABC", "a1", 1], None, False)],
        [("abc", "a1", 1)],
    ),
    # the first image's columns as another row's: grouping by columns reordered them
    "masks-interleaved": (
        [
            (("q",), ["q", "q1", 1], None, False),
            (("abc ",), ["abc ", "a2", 2], SLUG_N, False),
            (("r",), ["r", "r1", 1], N, False),
            (("ABC",), ["ABC", "a4", 4], SLUG_N, False),
            (("abc",), ["abc", "a4", 3], N, False),
        ],
        [("abc", "a4", 3), ("q", "q1", 1), ("r", "r1", 1)],
    ),
    # one spelling, three images under two sets of columns (`apply_rows` only: the
    # worker coalesces them)
    "one-spelling-repeated-across-masks": (
        [
            (("abc",), ["abc", "db", 1], N, False),
            (("abc",), ["abc", "a2", 2], SLUG_N, False),
            (("abc",), ["abc", "a2", 3], N, False),
        ],
        [("abc", "a2", 3)],
    ),
    # two spellings of a new row, then the first one again
    "new-row-spellings-and-a-repeat": (
        [
            (("xyz",), ["xyz", "x1", 1], None, False),
            (("XYZ",), ["XYZ", "x2", 2], None, False),
            (("xyz",), ["xyz", "x3", 3], SLUG_N, False),
        ],
        [("abc", "db", 0), ("xyz", "x3", 3)],
    ),
    # a new row takes the unique value a row there gives up later in the batch: no
    # collation-equal spellings, so the few-statements way (rows there first)
    "a-value-released-later-in-the-batch": (
        [(("new",), ["new", "db", 1], None, False), (("abc",), ["abc", "free", 0], SLUG_N, False)],
        [("abc", "free", 0), ("new", "db", 1)],
    ),
}


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_collation_equal_keys_are_written_in_batch_order(tags: Env, order: str) -> None:
    """`apply_rows` given images of one row under several spellings the collation finds
    equal, among others: each row ends as its last image in the batch says (regression
    audit RA-01: the spelling not as stored was written after every other image)."""
    rows, expected = ORDERS[order]
    tags.apply(rows)
    assert tags.rows() == expected


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_collation_equal_keys_through_the_worker_keep_commit_order(tags: Env) -> None:
    """T1 adds 'ABC' (the row 'abc' for the collation), then T2 loads the row 'abc'
    and sets n=5; the worker applies both in one batch: the row ends with T2's n=5,
    nothing dead-lettered (the row ended with T1's n=1, T2's update lost silently)."""
    with tags.Session() as s:
        s.add(Tag(code="ABC", slug="a1", n=1))
        s.commit()
    with tags.Session() as s:
        tag = s.get(Tag, "abc")
        assert tag is not None
        tag.n = 5
        s.commit()
    runner = tags.drain()
    assert runner.dead == 0
    assert tags.rows() == [("abc", "a1", 5)]


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_the_synchronous_write_takes_its_savepoint_on_the_sessions_connection(
    tags: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis is down at the commit: the Session writes its rows in its own transaction
    with the worker's function. A new row, the row 'abc' spelled 'ABC', then as stored
    (loaded, n=3): the savepoint on the Session's connection undoes the upsert and the
    rows are written in order. Then a new row and an update of a row there: the
    savepoint is released. The Session's transaction commits as usual."""

    def down(self: Any, *args: Any, **kwargs: Any) -> None:
        raise BackendError("Redis went away")

    monkeypatch.setattr(WriteBehind, "prepare", down)
    with tags.Session() as s:
        s.add_all([Tag(code="new", slug="nw", n=1), Tag(code="ABC", slug="a1", n=2)])
        s.flush()
        tag = s.get(Tag, "abc")
        assert tag is not None
        tag.n = 3
        s.commit()
    assert tags.rows() == [("abc", "a1", 3), ("new", "nw", 1)]
    with tags.Session() as s:
        s.add(Tag(code="zz", slug="z", n=1))
        s.flush()
        tag = s.get(Tag, "new")
        assert tag is not None
        tag.n = 4
        s.commit()
    monkeypatch.undo()
    assert tags.rows() == [("abc", "a1", 3), ("new", "nw", 4), ("zz", "z", 1)]


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("new_first", [False, True], ids=["update-first", "new-row-first"])
def test_a_collision_in_a_batch_with_new_rows_still_raises(tags: Env, new_first: bool) -> None:
    """Row 'def' takes the unique value of the row 'abc' in a batch that also adds a
    row: the batch raises (the worker dead-letters it), whichever comes first — the
    way that undoes the upsert of the rows there and writes the batch row by row must
    not take that collision for a duplicate new key and drop the update."""
    with tags.engine.begin() as conn:
        conn.execute(sa.insert(Tag), {"code": "def", "slug": "de", "n": 0})
    collides = (("def",), ["def", "db", 1], SLUG_N, False)
    new = (("new",), ["new", "nw", 1], None, False)
    with pytest.raises(sa.exc.IntegrityError):
        tags.apply([new, collides] if new_first else [collides, new])
    assert tags.rows() == [("abc", "db", 0), ("def", "de", 0)]


ROWS = 100
_COSTS = ("select", "insert", "update", "delete", "savepoint", "release_savepoint")


def _cost(env: Env, rows: list[Any]) -> int:
    """Data and savepoint statements the MariaDB session ran for ``apply_rows(rows)``."""
    engine = sa.create_engine(env.engine.url, poolclass=sa.pool.StaticPool)
    spec = env.cache.entities[sa.inspect(Tag)]

    def status(conn: sa.Connection) -> dict[str, int]:
        got = conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Com_%%'").all()
        return {name: int(value) for name, value in got if value.isdigit()}

    try:
        with engine.connect() as conn:
            before = status(conn)
            conn.commit()
            with conn.begin():
                apply_rows(conn, spec, rows)
            after = status(conn)
    finally:
        engine.dispose()
    return sum(after[f"Com_{n}"] - before[f"Com_{n}"] for n in _COSTS)


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_batch_without_collation_equal_keys_costs_a_few_statements(tags: Env) -> None:
    """New rows before updates of rows there (a flush's order), many of each: a few
    statements per batch still (the locking SELECT, a SAVEPOINT, the upsert of the rows
    there, the INSERT of the others, RELEASE), not one or two per row; only changes
    where two spellings of one row meet are written one at a time."""
    with tags.engine.begin() as conn:
        there = [{"code": f"t{i}", "slug": f"t{i}", "n": 0} for i in range(ROWS)]
        conn.execute(sa.insert(Tag), there)
    new = [((f"n{i}",), [f"n{i}", f"n{i}", 1], None, False) for i in range(ROWS)]
    updates = [((f"t{i}",), [f"t{i}", f"t{i}", 2], N, False) for i in range(ROWS)]
    assert _cost(tags, new + updates) <= 8
    rows = tags.rows()
    assert len(rows) == 2 * ROWS + 1
    assert {n for _, _, n in rows} == {0, 1, 2}
    # the same with a spelling of row 'abc' first: correct; only the two changes of
    # row 'abc' one at a time (`write_behind_order.split_peers`), the others as before
    ci = [(("ABC",), ["ABC", "a1", 7], None, False)]
    cost = _cost(tags, ci + updates + [(("abc",), ["abc", "a1", 8], N, False)])
    assert cost <= 8 + 2 * 3
    assert tags.rows()[0] == ("abc", "a1", 8)


# -- the late write of a row deleted, added again, ... -------------------------------------


@pytest.fixture
def wb_db(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """Row 1 is (1, "new") in the database (as in test_write_behind_late_sync)."""
    with wb_env(engine, redis_url, namespace) as env:
        _seed(env)
        yield env


def _a_deletes_and_adds(a: Session, sequence: str, id: int = 1) -> None:
    """Session A's changes of row ``id`` (row 1 is n=1 in the database), a flush each."""
    row = None
    if not sequence.startswith("add"):  # (loaded from the database, as in rf2-03's test)
        row = a.scalars(sa.select(Counter).where(Counter.id == id)).one()
    for step in sequence.split("-"):
        if step == "delete":
            a.delete(row)
            row = None
        elif step == "add":
            row = Counter(id=id, n=5)
            a.add(row)
        else:
            assert row is not None
            row.n += 2
        a.flush()


SEQUENCES = {  # (first, the row as A leaves it)
    "delete-add-delete": ("d", None),
    "delete-add": ("d", (5, "new")),
    "delete-add-update": ("d", (7, "new")),
    "update-delete-add": ("d", (5, "new")),
    "update-delete-add-update": ("d", (7, "new")),
    "delete-add-delete-add": ("d", (5, "new")),
    "update-delete": ("u", None),
}


LOADED = [1, 1, "new"]
RECORDED = {  # row, (first, base, changed columns) of its recorded change
    **{sequence: (1, (first, LOADED, None)) for sequence, (first, _) in SEQUENCES.items()},
    "update-update": (1, ("u", LOADED, frozenset({1}))),
    "add-update": (2, ("i", None, None)),
    "add-delete-add": (2, ("i", None, None)),
}


@pytest.mark.parametrize("dialect_name", ["sqlite"])  # (the same on every dialect)
@pytest.mark.parametrize("sequence", list(RECORDED))
def test_the_recorded_change_keeps_the_row_as_first_loaded(
    engine: sa.Engine, redis_url: str, namespace: str, sequence: str
) -> None:
    """Whatever A does to a row after its first load, its change carries the row as
    loaded then (``base``: the row the database holds while the change waits; None for
    a row A added), and the right first operation and columns (a re-add's base was None,
    and a delete after it inherited that)."""
    row, expected = RECORDED[sequence]
    with wb_env(engine, redis_url, namespace) as wb:
        _seed(wb)
        with wb.Session() as a:
            _a_deletes_and_adds(a, sequence, row)
            key = wb.cache.entities[sa.inspect(Counter)].key(wb.cache, [row], None)
            change = collector_for(a, wb.cache).behind_for(key)
            assert change is not None
            assert (change.first, change.base, change.cols) == expected
            a.rollback()


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_a_late_write_of_a_renewed_row_after_a_reader_cached_the_unchanged_row(
    wb_db: WB, sequence: str
) -> None:
    """While A's confirmation waits, a reader caches row 1 as the database still holds
    it: that entry shows no other change, so A's change is written late (regression
    audit RA-05: after a delete and a re-add, it was dead-lettered as "a change
    applied meanwhile")."""
    wb = wb_db
    _, expected = SEQUENCES[sequence]
    with (
        pytest.MonkeyPatch.context() as mp,
        confirm_fails(mp, reader_caches_the_row(wb)),
        wb.Session() as a,
    ):
        _a_deletes_and_adds(a, sequence)
        a.add(Order(id=1, note="A"))
        a.commit()
    assert wb.queue.dead_letters() == [], "a committed change was dead-lettered"
    assert wb.db() == ({} if expected is None else {1: expected})
    wb.drain()
    assert wb.db() == ({} if expected is None else {1: expected})
    with wb.Session() as s:
        got = s.get(Counter, 1)
        assert (None if got is None else (got.n, got.label)) == expected


@pytest.mark.parametrize("sequence", ["delete-add-delete", "delete-add-update"])
def test_a_late_renewal_over_another_change_applied_meanwhile_is_dead_lettered(
    wb_db: WB, sequence: str
) -> None:
    """B's change of row 1 (n=20) is applied while A's confirmation waits: the entry
    shows neither A's row nor the one A first loaded, so A's change is still
    dead-lettered, B's row stays (the row as first loaded does not make everything
    agree)."""
    wb = wb_db

    def b_applied() -> None:
        commit_b(wb, n=20)()
        apply_now(wb)

    with (
        pytest.MonkeyPatch.context() as mp,
        confirm_fails(mp, b_applied),
        wb.Session() as a,
    ):
        _a_deletes_and_adds(a, sequence)
        a.add(Order(id=1, note="A"))
        a.commit()
    (letter,) = wb.queue.dead_letters()
    assert (letter.table, letter.op) == ("sac_wb_counters", "d")
    assert wb.db() == {1: (20, "new")}
