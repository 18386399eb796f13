"""Write-behind batch order of one row's changes under several spellings of its key.

On MySQL / MariaDB a case-insensitive, ``PAD SPACE`` collation (the default utf8mb4
one) makes ``'ABC'``, ``'abc'`` and ``'abc '`` one primary key. The queue coalesces
by the key as spelled, so one batch may hold two changes of one row under two
spellings, in commit order. The plain upsert path (a table without another unique
key) grouped the images by their columns and ran the deletes after every image, so
an earlier change could be written after a later one: the later change was lost,
silently (no error, no dead letter). Such changes are now written in batch order,
one at a time, deletes among the images; a batch without them (every other batch,
and every batch on SQLite / PostgreSQL) is written as before, in a few statements.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from test_write_behind import FAST, cleanup

import sa_cache
from sa_cache.write_behind import write_behind_for
from sa_cache.write_behind_apply import apply_in_order, apply_rows
from sa_cache.write_behind_worker import WriteBehindWorker


class OrderBase(DeclarativeBase):
    pass


class Item(OrderBase):  # the default collation of the database; no other unique key
    __tablename__ = "sac_wbo_items"
    code: Mapped[str] = mapped_column(sa.String(20), primary_key=True)
    label: Mapped[str] = mapped_column(sa.String(20))
    n: Mapped[int] = mapped_column(default=0)


class Slug(OrderBase):  # the same, with another unique key (`write_behind_mysql`)
    __tablename__ = "sac_wbo_slugs"
    code: Mapped[str] = mapped_column(sa.String(20), primary_key=True)
    label: Mapped[str] = mapped_column(sa.String(20), unique=True)
    n: Mapped[int] = mapped_column(default=0)


class Part(OrderBase):  # refers to Item, no ON DELETE action (RESTRICT)
    __tablename__ = "sac_wbo_parts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    item: Mapped[str] = mapped_column(sa.ForeignKey(Item.code))


MODELS = {"plain": Item, "unique": Slug}


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]
    model: Any

    def drain(self) -> WriteBehindWorker:
        runner = WriteBehindWorker(self.cache, self.engine, **{**FAST, "max_attempts": 2})
        runner.run(drain=True)
        return runner

    def rows(self) -> list[tuple[str, str, int]]:
        m = self.model
        with self.engine.connect() as conn:
            query = sa.select(m.code, m.label, m.n).order_by(m.code)
            return [(r.code, r.label, r.n) for r in conn.execute(query)]

    def apply(self, rows: list[Any]) -> int:
        """`apply_rows` of ``rows`` in one transaction; the statements it ran."""
        spec = self.cache.entities[sa.inspect(self.model)]
        count = [0]

        def one(*args: Any) -> None:
            count[0] += 1

        sa.event.listen(self.engine, "before_cursor_execute", one)
        try:
            with self.engine.begin() as conn:
                apply_rows(conn, spec, rows)
        finally:
            sa.event.remove(self.engine, "before_cursor_execute", one)
        return count[0]


@pytest.fixture(params=list(MODELS))
def items(
    engine: sa.Engine, redis_url: str, namespace: str, request: pytest.FixtureRequest
) -> Iterator[Env]:
    """Rows 'abc' (label 'db', n=0) and 'x' (label 'x', n=0); one partition, so that
    one batch holds every change."""
    model = MODELS[request.param]
    OrderBase.metadata.drop_all(engine)
    OrderBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(model),
            [{"code": "abc", "label": "db", "n": 0}, {"code": "x", "label": "x", "n": 0}],
        )
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=1)
    cache.register(model, ttl=60, write="behind")
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        yield Env(engine, cache, factory, model)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        OrderBase.metadata.drop_all(engine)


N = frozenset({2})  # the column n
X = ("x", "x", 1)

ORDERS: dict[str, tuple[list[Any], list[tuple[str, str, int]]]] = {
    # finding 1: 'abc' grouped with x's update (same columns), written before 'ABC'
    "update-grouped-with-another-rows": (
        [
            (("x",), ["x", "x", 1], N, False),
            (("ABC",), ["ABC", "a1", 1], None, False),
            (("abc",), ["abc", "a1", 5], N, False),
        ],
        [("abc", "a1", 5), X],
    ),
    # finding 2: the delete ran after every image
    "delete-then-update": (
        [(("ABC",), None, None, False), (("abc",), ["abc", "a1", 5], N, False)],
        [("abc", "a1", 5), ("x", "x", 0)],
    ),
    "update-then-delete": (
        [(("abc",), ["abc", "db", 5], N, False), (("ABC ",), None, None, False)],
        [("x", "x", 0)],
    ),
    "delete-then-whole-image-among-others": (
        [
            (("x",), ["x", "x", 1], N, False),
            (("abc",), None, None, False),
            (("Abc",), ["Abc", "a2", 2], None, False),
        ],
        [("Abc", "a2", 2), X],
    ),
    "image-delete-image": (
        [
            (("ABC",), ["ABC", "a1", 1], None, False),
            (("x",), None, None, False),
            (("abc",), None, None, False),
            (("aBc",), ["aBc", "a3", 3], N, False),
        ],
        [("aBc", "a3", 3)],
    ),
    # accents and trailing spaces: the same row to the collation too
    "accent-and-trailing-space": (
        [(("ABC ",), None, None, False), (("àbc",), ["àbc", "a6", 6], None, False)],
        [("àbc", "a6", 6), ("x", "x", 0)],
    ),
}


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_changes_of_one_row_under_several_spellings_keep_batch_order(
    items: Env, order: str
) -> None:
    """`apply_rows` given changes of row 'abc' under spellings the collation finds
    equal, among changes of other rows: each row ends as its last change in the batch
    says (the images were grouped by columns, the deletes ran after all of them)."""
    rows, expected = ORDERS[order]
    items.apply(rows)
    assert items.rows() == expected


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_an_update_grouped_with_another_rows_through_the_worker(items: Env) -> None:
    """T0 sets x.n=1, T1 adds 'ABC' (the row 'abc' for the collation), T2 loads the row
    'abc' and sets n=5; one batch: the row ends with T2's n=5, nothing dead-lettered
    (T2's update went with T0's, before T1's image, and was lost)."""
    with items.Session() as s:
        s.get_one(items.model, "x").n = 1
        s.commit()
    with items.Session() as s:
        s.add(items.model(code="ABC", label="a1", n=1))
        s.commit()
    with items.Session() as s:
        s.get_one(items.model, "abc").n = 5
        s.commit()
    runner = items.drain()
    assert runner.dead == 0
    assert items.rows() == [("abc", "a1", 5), X]


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_delete_then_an_update_of_another_spelling_through_the_worker(items: Env) -> None:
    """T1 adds 'ABC' (written: the row 'abc' takes its label), T2 deletes 'ABC' (its
    cached entry), T3 loads the row 'abc' and sets n=5; one batch holds the delete of
    'ABC' and the update of 'abc': the update comes later, so the row ends with n=5
    (the worker upserts: an update of a missing row inserts its image). The delete ran
    after every image, and the row was gone."""
    with items.Session() as s:
        s.add(items.model(code="ABC", label="a1", n=1))
        s.commit()
    assert items.drain().dead == 0
    with items.Session() as s:
        s.delete(s.get_one(items.model, "ABC"))
        s.commit()
    with items.Session() as s:
        s.get_one(items.model, "abc").n = 5
        s.commit()
    runner = items.drain()
    assert runner.dead == 0
    assert items.rows() == [("abc", "a1", 5), ("x", "x", 0)]


ROWS = 60


COSTS = {"sqlite": 5, "postgresql": 5, "mariadb": 6}  # (as before the peers' order)


def _distinct_batch() -> list[Any]:
    """Updates of rows there, whole images of new rows, deletes; on a case-sensitive
    key 'ABC' and 'abc' are two rows (SQLite, PostgreSQL: nothing to order)."""
    updates = [((f"t{i}",), [f"t{i}", f"t{i}", 2], N, False) for i in range(ROWS)]
    new = [((f"n{i}",), [f"n{i}", f"n{i}", 1], None, False) for i in range(ROWS)]
    deletes = [((f"d{i}",), None, None, False) for i in range(ROWS)]
    mixed = [x for trio in zip(updates, new, deletes, strict=True) for x in trio]
    return [*mixed, (("ABC",), ["ABC", "A", 1], None, False)]


@pytest.mark.parametrize("items", ["plain"], indirect=True)
def test_a_batch_of_distinct_keys_is_written_in_a_few_statements(
    engine: sa.Engine, items: Env, dialect_name: str
) -> None:
    """Updates, new rows and deletes interleaved, many of each: a few statements per
    batch on every dialect (the rows one at a time only where two keys of the batch may
    be one row); on SQLite / PostgreSQL 'ABC' and 'abc' are two rows, written as such."""
    with engine.begin() as conn:
        there = [{"code": f"{p}{i}", "label": f"{p}{i}", "n": 0} for p in "td" for i in range(ROWS)]
        conn.execute(sa.insert(Item), there)
    assert items.apply(_distinct_batch()) <= COSTS[dialect_name]
    rows = items.rows()
    assert len(rows) == 2 * ROWS + (3 if dialect_name != "mariadb" else 2)
    assert {n for _, _, n in rows} == {0, 1, 2}
    if dialect_name != "mariadb":
        assert ("ABC", "A", 1) in rows
        assert ("abc", "db", 0) in rows
    else:  # (the row 'abc', one change of it: no pair, the upsert as usual)
        assert ("abc", "A", 1) in rows
        # a pair among them: those two one at a time, the others as before
        pair = [(("aBC",), None, None, False), (("abc",), ["abc", "B", 3], None, False)]
        assert items.apply(_distinct_batch()[:-1] + pair) <= COSTS["mariadb"] + 3
        assert ("abc", "B", 3) in items.rows()


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("items", ["plain"], indirect=True)
def test_a_delete_among_them_waits_for_the_rows_in_its_way(items: Env) -> None:
    """Part 1 refers to row 'abc'; a batch deletes part 1, sets n of 'ABC', then
    deletes 'abc'. Written in batch order at the items' turn, the delete of 'abc' comes
    before the parts' deletes and is refused (RESTRICT); the batch is written again,
    the deletes first (the fallback of any batch of images and deletes), and goes
    through: the row and its part are gone."""
    items.cache.register(Part, write="behind")
    with items.engine.begin() as conn:
        conn.execute(sa.insert(Part), {"id": 1, "item": "abc"})
    entities = items.cache.entities
    changes = {
        entities[sa.inspect(Part)]: [((1,), None, None, False)],
        entities[sa.inspect(Item)]: [
            (("ABC",), ["ABC", "db", 4], N, False),
            (("abc",), None, None, False),
        ],
    }
    with items.engine.begin() as conn:
        apply_in_order(conn, changes)
    assert items.rows() == [("x", "x", 0)]
