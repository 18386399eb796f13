"""Entity cache edge cases: primary-key changes, rows the unit of work writes on its own,
partial flushes, expression column properties, two classes on one table, primary-key
values spelled differently from the row's, user ``do_orm_execute`` listeners, and
primary-key selects with clauses that can exclude the row."""

from __future__ import annotations

import datetime
import decimal
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, StatementLog, make_env
from sqlalchemy import event, func, insert, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    mapped_column,
    relationship,
    sessionmaker,
    with_loader_criteria,
)

import sa_cache
from sa_cache.backends.base import NO_VALUE
from sa_cache.codec import Envelope, encode


class EdgeBase(DeclarativeBase):
    pass


class Item(EdgeBase):
    __tablename__ = "sac_edge_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))
    tenant: Mapped[int] = mapped_column(default=1)


class Parent(EdgeBase):
    __tablename__ = "sac_edge_parents"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kids: Mapped[list[Kid]] = relationship(cascade="all, delete-orphan", order_by="Kid.id")
    pets: Mapped[list[Pet]] = relationship(order_by="Pet.id")  # no cascade: FK set to NULL


class Kid(EdgeBase):
    __tablename__ = "sac_edge_kids"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("sac_edge_parents.id"))
    tally_id: Mapped[int | None]


class Pet(EdgeBase):
    __tablename__ = "sac_edge_pets"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("sac_edge_parents.id"))


class Tallied(EdgeBase):
    __tablename__ = "sac_edge_tallied"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))
    kid_count: Mapped[int] = column_property(
        select(func.count(Kid.id)).where(Kid.tally_id == id).correlate_except(Kid).scalar_subquery()
    )


class Code(EdgeBase):
    __tablename__ = "sac_edge_codes"
    code: Mapped[str] = mapped_column(sa.String(2), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(20))


@pytest.fixture
def write() -> str:
    """The write mode the models are registered with (parametrized by some tests)."""
    return "through"


@pytest.fixture
def edge(engine: sa.Engine, cache_url: str, namespace: str, write: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    for model in (Item, Kid, Pet, Tallied, Code):
        cache.register(model, ttl=300, write=write)
    yield from make_env(engine, cache, EdgeBase.metadata)


def names(engine: sa.Engine, model: Any) -> dict[Any, Any]:
    """The rows of ``model`` as the database has them: primary key -> name or parent."""
    with Session(engine) as plain:
        rows = plain.scalars(select(model)).all()
        column = "name" if hasattr(model, "name") else "parent_id"
        return {sa.inspect(r).identity[0]: getattr(r, column) for r in rows}


# -- 1: a primary-key change ---------------------------------------------------------------


@pytest.mark.parametrize("write", ["through", "invalidate"])
def test_primary_key_change_drops_the_old_entry(edge: Env, write: str) -> None:
    with edge.Session() as s:
        s.add_all([Item(id=1, name="a"), Item(id=5, name="e")])
        s.commit()
    with edge.Session() as s:
        assert s.get(Item, 1) is not None  # the entry of key 1 holds the row
    with edge.Session() as s:
        s.get(Item, 1).id = 2  # type: ignore[union-attr]
        s.commit()
    with edge.Session() as s:
        item = s.get(Item, 5)
        assert item is not None
        item.id = 6  # a second flush moves it again
        s.flush()
        item.id = 7
        s.commit()
    with edge.Session() as s:
        assert s.get(Item, 1) is None
        assert s.get(Item, 5) is None
        assert s.get(Item, 6) is None
        assert s.get(Item, 2).name == "a"  # type: ignore[union-attr]
        assert s.get(Item, 7).name == "e"  # type: ignore[union-attr]
    assert names(edge.engine, Item) == {2: "a", 7: "e"}


# -- 2, 3: the rows the flush itself wrote -------------------------------------------------


@pytest.mark.parametrize("write", ["through", "invalidate"])
def test_rows_the_unit_of_work_deletes_or_updates_on_its_own(edge: Env, write: str) -> None:
    """A delete-orphan cascade deletes a child the Session never marked deleted, and a
    collection without a cascade sets the child's foreign key to NULL."""
    with edge.Session() as s:
        s.add(Parent(id=1, kids=[Kid(id=1), Kid(id=2)], pets=[Pet(id=1), Pet(id=2)]))
        s.commit()
    with edge.Session() as s:  # the entries hold the rows
        assert [s.get(Kid, k).parent_id for k in (1, 2)] == [1, 1]  # type: ignore[union-attr]
        assert [s.get(Pet, k).parent_id for k in (1, 2)] == [1, 1]  # type: ignore[union-attr]
    with edge.Session() as s:
        parent = s.get(Parent, 1)
        assert parent is not None
        parent.kids.remove(parent.kids[1])  # kid 2: an orphan, deleted by the flush
        parent.pets.remove(parent.pets[0])  # pet 1: parent_id set to NULL by the flush
        s.commit()
    assert names(edge.engine, Kid) == {1: 1}
    assert names(edge.engine, Pet) == {1: None, 2: 1}
    with edge.Session() as s:
        assert s.get(Kid, 2) is None
        assert s.get(Kid, 1).parent_id == 1  # type: ignore[union-attr]
        assert s.get(Pet, 1).parent_id is None  # type: ignore[union-attr]
        assert s.get(Pet, 2).parent_id == 1  # type: ignore[union-attr]


def test_partial_flush_records_only_the_objects_flushed(edge: Env) -> None:
    """``session.flush([obj])`` writes ``obj`` alone: the other pending changes, discarded
    before the commit, never reach the database, so never the cache either."""
    with edge.Session() as s:
        s.add_all([Item(id=1, name="one"), Item(id=2, name="two")])
        s.commit()
    with edge.Session() as s:
        one, two = s.get(Item, 1), s.get(Item, 2)
        assert one is not None
        assert two is not None
        one.name, two.name = "one-flushed", "two-never"
        three = Item(id=3, name="three-never")
        s.add(three)
        with pytest.warns(sa.exc.SADeprecationWarning, match="objects"):
            s.flush([one])
        s.expire(two)  # the pending change is dropped
        s.expunge(three)  # and so is the pending insert
        s.commit()
    assert names(edge.engine, Item) == {1: "one-flushed", 2: "two"}
    with edge.Session() as s:
        assert s.get(Item, 1).name == "one-flushed"  # type: ignore[union-attr]
        assert s.get(Item, 2).name == "two"  # type: ignore[union-attr]
        assert s.get(Item, 3) is None


# -- 4, 5: expression column properties ---------------------------------------------------


def test_expression_column_property_is_loaded_from_the_database(edge: Env) -> None:
    """A correlated count is not a column of the row: inserts of the model work, and the
    count is never served from the entry (it would go stale when the counted rows change)."""
    with edge.Session() as s:
        s.add(Tallied(id=1, name="t1"))  # an INSERT of a model with an expression property
        s.commit()
    with Session(edge.engine) as plain:  # not written through: the first read fills
        plain.add(Tallied(id=2, name="t2"))
        plain.commit()
    for tid in (1, 2, 2):
        with edge.Session() as s:
            edge.log.clear()
            tallied = s.get(Tallied, tid)
            assert tallied is not None
            assert tallied.kid_count == 0
    assert edge.cache.stats["entity.hit"] >= 2  # 1 written through, 2 filled
    with edge.Session() as s:
        s.add(Kid(id=1, tally_id=1))
        s.add(Kid(id=2, tally_id=2))
        s.commit()
        s.execute(insert(Kid), [{"id": 3, "tally_id": 2}])
        s.commit()
    for tid, count in ((1, 1), (2, 2)):
        with edge.Session() as s:
            edge.log.clear()
            tallied = s.get(Tallied, tid)
            assert tallied is not None
            assert edge.log.selects == []  # the row is served from the entry
            assert tallied.kid_count == count  # the count comes from the database
            assert tallied.name == f"t{tid}"
            tallied.name = f"renamed{tid}"
            s.commit()
    with edge.Session() as s:
        tallied = s.get(Tallied, 2)
        assert tallied is not None
        assert (tallied.name, tallied.kid_count) == ("renamed2", 2)
        s.add(Kid(id=4, tally_id=2))
        s.commit()
        assert tallied.kid_count == 3  # expired by the commit, loaded again


# -- 6: two classes on one table, entries of another shape ---------------------------------


def test_two_classes_on_one_table_are_refused() -> None:
    class LocalBase(DeclarativeBase):
        pass

    table = sa.Table(
        "sac_edge_accounts",
        LocalBase.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(20)),
        sa.Column("email", sa.String(50)),
    )

    class Account(LocalBase):
        __table__ = table

    class AccountName(LocalBase):
        __table__ = table
        __mapper_args__ = {"include_properties": ["id", "name"]}  # noqa: RUF012

    class AccountEmail(LocalBase):
        __table__ = table
        __mapper_args__ = {"include_properties": ["id", "email"]}  # noqa: RUF012

    class Special(Account):  # single-table inheritance: refused as before
        pass

    cache = sa_cache.Cache.from_url("memory://")
    try:
        cache.register(AccountName)
        for other in (Account, AccountEmail):
            with pytest.raises(ValueError, match="sac_edge_accounts") as raised:
                cache.register(other)
            assert "AccountName" in str(raised.value)
            assert other.__name__ in str(raised.value)
        with pytest.raises(ValueError, match="inheritance"):
            cache.register(Special)
        assert list(cache.entities) == [sa.inspect(AccountName)]
        cache.register(AccountName)  # the same class again: fine
    finally:
        cache.close()


def test_entry_of_another_shape_is_a_counted_miss(edge: Env) -> None:
    with edge.Session() as s:
        s.add(Item(id=1, name="one"))
        s.commit()  # written through
    spec = edge.cache.entities[sa.inspect(Item)]
    key = spec.key(edge.cache, [1])
    env = edge.cache.unpack(edge.cache.fetch([key])[0])
    assert env is not sa_cache.NO_VALUE
    for value in (env.value[:2], [*env.value, "extra"], "not a row"):
        entry = encode(Envelope(value, env.created_at, 300, env.gens))
        edge.cache.backend.set_many({key: entry}, 300)
        with edge.Session() as s:
            item = s.get(Item, 1)
            assert item is not None
            assert item.name == "one"
    assert edge.cache.stats["entity.foreign"] == 3


# -- 7: primary-key values spelled differently ----------------------------------------------


def test_lookup_by_a_differently_spelled_key_never_fills(edge: Env, dialect_name: str) -> None:
    """1.0 or Decimal(1) for the int key 1 finds the row, but an entry stored under that
    spelling would never be written through: no fill, every time the database."""
    with edge.Session() as s:
        s.add_all([Item(id=1, name="old"), Code(code="DE", name="old")])
        s.commit()
    spellings: list[Any] = [1.0]
    if dialect_name != "sqlite":
        spellings.append(decimal.Decimal(1))
    if dialect_name != "postgresql":
        spellings.append("1")
    for value in spellings:
        with edge.Session() as s:
            assert s.get(Item, value).name == "old"  # type: ignore[union-attr]
        with edge.Session() as s:
            assert s.scalars(select(Item).where(Item.id == value)).one().name == "old"
    if dialect_name == "mariadb":  # a case-insensitive collation
        with edge.Session() as s:
            assert s.get(Code, "de").name == "old"  # type: ignore[union-attr]
    with edge.Session() as s:
        s.get(Item, 1).name = "new"  # type: ignore[union-attr]
        s.get(Code, "DE").name = "new"  # type: ignore[union-attr]
        s.commit()
    for value in spellings:
        with edge.Session() as s:
            assert s.get(Item, value).name == "new"  # type: ignore[union-attr]
        with edge.Session() as s:
            assert s.scalars(select(Item).where(Item.id == value)).one().name == "new"
    if dialect_name == "mariadb":
        with edge.Session() as s:
            assert s.get(Code, "de").name == "new"  # type: ignore[union-attr]
    assert edge.cache.stats["entity.fill_skipped"] >= 2 * len(spellings)


# -- 8: user do_orm_execute listeners -------------------------------------------------------


def test_get_honours_a_global_filter_listener(edge: Env) -> None:
    """SQLAlchemy's global-filter recipe: a ``do_orm_execute`` listener adding
    ``with_loader_criteria``. A row it excludes is never served from the entry."""

    def tenant_filter(state: Any) -> None:
        tenant = state.session.info.get("tenant")
        if tenant is not None and state.is_select and not state.is_column_load:
            state.statement = state.statement.options(
                with_loader_criteria(
                    Item, lambda cls: cls.tenant == tenant, track_closure_variables=True
                )
            )

    event.listen(edge.Session, "do_orm_execute", tenant_filter)
    with edge.Session() as s:
        s.add(Item(id=1, name="tenant-1 secret", tenant=1))
        s.commit()  # written through
    with edge.Session(info={"tenant": 1}) as s:
        assert s.get(Item, 1) is not None
    with edge.Session(info={"tenant": 2}) as s:
        assert s.get(Item, 1) is None


# -- 13: primary-key selects that are not plain lookups ---------------------------------------


def test_pk_select_with_clauses_that_exclude_the_row_is_not_a_lookup(
    edge: Env, dialect_name: str
) -> None:
    with edge.Session() as s:
        s.add(Item(id=1, name="one"))
        s.commit()  # written through: a lookup would be a hit
    statements = {
        "select_from another table (empty)": select(Item).select_from(Code).where(Item.id == 1),
        "join to another table (empty)": select(Item)
        .join(Code, Code.name == Item.name)
        .where(Item.id == 1),
        "limit 0": select(Item).where(Item.id == 1).limit(0),
        "offset 1": select(Item).where(Item.id == 1).offset(1),
        "group by, having": select(Item)
        .where(Item.id == 1)
        .group_by(Item.id, Item.name, Item.tenant)
        .having(func.count() > 1),
        "cte": select(Item).where(Item.id == 1).add_cte(select(Code.code).cte("c")),
    }
    if dialect_name != "sqlite":  # no FETCH FIRST on SQLite
        statements["fetch 0"] = select(Item).where(Item.id == 1).fetch(0)
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import distinct_on

        statements["distinct on"] = select(Item).where(Item.id == 1).ext(distinct_on(Item.name))
    for label, statement in statements.items():
        with warnings.catch_warnings():  # select_from(Code): a cartesian product, on purpose
            warnings.filterwarnings("ignore", "SELECT statement has a cartesian", sa.exc.SAWarning)
            with Session(edge.engine) as plain:
                expected = [o.name for o in plain.scalars(statement)]
            with edge.Session() as s:
                assert [o.name for o in s.scalars(statement)] == expected, label
    with edge.Session() as s:  # the plain lookup is still one
        edge.log.clear()
        assert s.scalars(select(Item).where(Item.id == 1)).one().name == "one"
        assert edge.log.statements == []


class Reading(EdgeBase):
    """Columns whose database stores some Python values otherwise than given."""

    __tablename__ = "sac_edge_readings"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    amount: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2))
    at: Mapped[datetime.datetime] = mapped_column(sa.DateTime)
    count: Mapped[int] = mapped_column(sa.Integer)
    ratio: Mapped[float] = mapped_column(sa.Float)
    doc: Mapped[Any] = mapped_column(sa.JSON)


EXACT = {
    "amount": decimal.Decimal("1.25"),
    "at": datetime.datetime(2024, 1, 1, 12, 0, 0),
    "count": 7,
    "ratio": 0.5,
    "doc": {"a": [1, 2]},
}


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("amount", decimal.Decimal("1.005")),  # rounded to 1.01 (1.00 on some)
        ("amount", 3),  # given back as Decimal("3.00")
        ("at", datetime.datetime(2024, 1, 1, 12, 0, 0, 999999)),  # MariaDB: whole seconds
        ("count", "8"),  # given back as 8
        ("ratio", 0.123456789),  # MariaDB: FLOAT is given back with 6 digits
        ("doc", {"t": (1, 2), 3: "x"}),  # given back as a list and a str key
    ],
)
def test_write_through_never_caches_a_value_the_database_stores_otherwise(
    engine: sa.Engine, cache_url: str, namespace: str, column: str, value: Any
) -> None:
    """Insert and update alike: what a Session reads after the commit is what a plain
    Session loads from the database (an inexact image is invalidated instead), and an
    exact one is still written through (no SELECT)."""
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Reading, ttl=300)
    Reading.__table__.drop(engine, checkfirst=True)
    Reading.__table__.create(engine)
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)

    def row(pk: int) -> tuple[Any, ...]:
        with factory() as s:
            got = s.get(Reading, pk)
            assert got is not None
            return tuple(getattr(got, k) for k in EXACT)

    def loaded(pk: int) -> tuple[Any, ...]:
        with Session(engine) as plain:
            got = plain.get(Reading, pk)
            assert got is not None
            return tuple(getattr(got, k) for k in EXACT)

    try:
        with factory() as s:
            s.add(Reading(id=1, **EXACT))
            s.add(Reading(id=2, **{**EXACT, column: value}))
            s.commit()
        assert row(2) == loaded(2)  # insert
        with factory() as s:
            reading = s.get(Reading, 1)
            assert reading is not None
            setattr(reading, column, value)
            s.commit()
        assert row(1) == loaded(1)  # update
        with factory() as s:
            reading = s.get(Reading, 1)
            assert reading is not None
            setattr(reading, column, EXACT[column])
            s.commit()
        log = StatementLog()
        event.listen(engine, "before_cursor_execute", log)
        try:
            assert row(1) == loaded(1)
        finally:
            event.remove(engine, "before_cursor_execute", log)
        assert len(log.statements) == 1  # only the plain load: written through
    finally:
        Reading.__table__.drop(engine, checkfirst=True)
        cache.close()


def test_loaded_as_persistent_listeners_see_every_get(edge: Env) -> None:
    """Only the ORM's loading runs Session ``loaded_as_persistent`` listeners: with one,
    ``session.get`` is a database load every time (as ``load`` listeners make it)."""
    with edge.Session() as s:
        s.add(Item(id=1, name="one"))
        s.commit()
    seen: list[Any] = []
    event.listen(edge.Session, "loaded_as_persistent", lambda session, obj: seen.append(obj))
    for _ in range(3):
        with edge.Session() as s:
            item = s.get(Item, 1)
            assert item is not None
            assert item.name == "one"
    assert len(seen) == 3


def test_first_is_a_lookup_and_limit_0_is_not(edge: Env) -> None:
    """``first()`` (LIMIT 1) of a primary-key select is a lookup; the same shape with
    LIMIT 0 (another value of the same bind parameter) returns no row."""
    with edge.Session() as s:
        s.add(Item(id=1, name="one"))
        s.commit()  # written through
    edge.log.clear()
    with edge.Session() as s:
        found = s.query(Item).filter_by(id=1).first()
        assert found is not None
        assert found.name == "one"
    with edge.Session() as s:
        assert [i.name for i in s.scalars(select(Item).where(Item.id == 1).limit(1))] == ["one"]
    assert edge.log.selects == []  # both answered from the entry
    for _ in range(2):
        with edge.Session() as s:
            assert s.scalars(select(Item).where(Item.id == 1).limit(0)).all() == []


class Pair(EdgeBase):
    __tablename__ = "sac_edge_pairs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    a: Mapped[int]
    b: Mapped[int]


def test_a_writer_never_publishes_an_image_without_an_earlier_commit(
    engine: sa.Engine, cache_url: str, namespace: str
) -> None:
    """B commits a change of ``b``; before B's image reaches the store, A — which loaded
    the row before B's commit — commits a change of ``a``. A's image would lack B's
    change: no read may see it (the row the database holds is (5, 2))."""
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Pair, ttl=300)
    Pair.__table__.drop(engine, checkfirst=True)
    Pair.__table__.create(engine)
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)

    def read() -> tuple[int, int]:
        with factory() as s:
            pair = s.get(Pair, 1)
            assert pair is not None
            return pair.a, pair.b

    try:
        with factory() as s:
            s.add(Pair(id=1, a=1, b=1))
            s.commit()
        assert read() == (1, 1)  # the entry holds it
        a_side, b_side = factory(), factory()
        held_by_a = a_side.get(Pair, 1)  # loaded before B's commit
        b_obj = b_side.get(Pair, 1)
        assert held_by_a is not None
        assert b_obj is not None
        b_obj.b = 2
        seen: list[tuple[int, int]] = []

        def between(session: Session) -> None:  # B's COMMIT done, its image not sent yet
            if seen:
                return
            held_by_a.a = 5
            a_side.commit()
            seen.append(read())

        event.listen(b_side, "after_commit", between)
        b_side.commit()
        seen.append(read())
        a_side.close()
        b_side.close()
        assert seen == [(5, 2), (5, 2)]
    finally:
        Pair.__table__.drop(engine, checkfirst=True)
        cache.close()


def _write_then_roll_back(factory: Any) -> None:
    """Item 1 "one" committed (written through); then renamed, flushed, rolled back."""
    with factory() as s:
        s.add(Item(id=1, name="one"))
        s.commit()
    with factory() as s:
        item = s.get(Item, 1)
        assert item is not None
        item.name = "never"
        s.flush()
        s.rollback()


def test_a_rolled_back_flush_leaves_the_entry_as_it_was(edge: Env) -> None:
    """A flush marks the rows it wrote in the store (readers read the database until the
    commit); a rollback puts back what the entries held: still hits, no SQL."""
    _write_then_roll_back(edge.Session)
    edge.log.clear()
    with edge.Session() as s:
        item = s.get(Item, 1)
        assert item is not None
        assert item.name == "one"
    assert edge.log.statements == []


def test_write_through_and_rollback_on_a_cluster(
    engine: sa.Engine, redis_cluster_url: str, namespace: str
) -> None:
    """On Redis Cluster the flush's marks and the commit's images go per node: a commit
    is read back without SQL, a rolled-back flush leaves the entry as it was."""
    cache = sa_cache.Cache.from_url(redis_cluster_url, namespace=namespace)
    cache.register(Item, ttl=300)
    made = make_env(engine, cache, EdgeBase.metadata)
    env = next(made)
    try:
        with env.Session() as s:
            s.add_all([Item(id=i, name=f"v{i}") for i in range(1, 6)])
            s.commit()
        with env.Session() as s:
            for i in range(1, 6):
                item = s.get(Item, i)
                assert item is not None
                item.name = f"w{i}"
            s.commit()
        with env.Session() as s:
            for i in range(1, 6):
                item = s.get(Item, i)
                assert item is not None
                item.name = "never"
            s.flush()
            s.rollback()
        env.log.clear()
        with env.Session() as s:
            assert [s.get(Item, i).name for i in range(1, 6)] == [  # type: ignore[union-attr]
                f"w{i}" for i in range(1, 6)
            ]
        assert env.log.statements == []
    finally:
        made.close()


def test_a_restored_entry_keeps_expiring(
    engine: sa.Engine, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry a rollback puts back expires like the one that was there."""
    clock = [1000.0]
    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    monkeypatch.setattr(cache.backend, "_clock", lambda: clock[0])
    cache.register(Item, ttl=60)
    made = make_env(engine, cache, EdgeBase.metadata)
    env = next(made)
    try:
        _write_then_roll_back(env.Session)
        key = cache.entities[sa.inspect(Item)].key(cache, [1])
        assert cache.fetch([key])[0] is not NO_VALUE
        clock[0] += 61
        assert cache.fetch([key])[0] is NO_VALUE
    finally:
        made.close()
