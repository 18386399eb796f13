"""Write-through edge cases found by an audit: a row flushed more than once in a
transaction after a flush found its image untrustworthy, values changed in place after
their flush, rows the database changes on its own (foreign-key actions), statements a
flush runs that are not the flush's own rows, a COMMIT whose outcome is unknown, and a
rolled-back flush over another reader's lease."""

from __future__ import annotations

import datetime
import decimal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import event, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import sa_cache


class WBase(DeclarativeBase):
    pass


class Product(WBase):
    __tablename__ = "sac_we_products"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))
    price: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2))


class Event(WBase):
    __tablename__ = "sac_we_events"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[datetime.datetime] = mapped_column(sa.DateTime(timezone=True))


class Doc(WBase):
    __tablename__ = "sac_we_docs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    data: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


class Customer(WBase):
    __tablename__ = "sac_we_customers"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    orders: Mapped[int] = mapped_column(default=0)


class Sale(WBase):  # its after_insert listener counts it on the customer's row
    __tablename__ = "sac_we_sales"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    # (a foreign key: the flush writes customers' rows first)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_we_customers.id"))


@event.listens_for(Sale, "after_insert")
def _count_sale(mapper: Any, connection: sa.Connection, target: Sale) -> None:
    t = Customer.__table__
    connection.execute(
        sa.update(t).where(t.c.id == target.customer_id).values(orders=t.c.orders + 1)
    )


class Team(WBase):
    __tablename__ = "sac_we_teams"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Member(WBase):  # a registered model of a relationship's secondary table
    __tablename__ = "sac_we_members"
    person_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_we_people.id"), primary_key=True)
    team_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_we_teams.id"), primary_key=True)


class Person(WBase):
    __tablename__ = "sac_we_people"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    teams: Mapped[list[Team]] = relationship(secondary="sac_we_members")


class Holder(WBase):
    __tablename__ = "sac_we_holders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(sa.String(20))
    pieces: Mapped[list[Piece]] = relationship(passive_deletes=True, passive_updates=True)


class Piece(WBase):  # deleted and re-keyed by the database with its holder
    __tablename__ = "sac_we_pieces"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    holder_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("sac_we_holders.id", ondelete="CASCADE", onupdate="CASCADE")
    )


class Label(WBase):  # no relationship: a foreign key the database sets to NULL
    __tablename__ = "sac_we_labels"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    holder_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("sac_we_holders.id", ondelete="SET NULL")
    )


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    for model in (Product, Doc, Customer, Member, Holder, Piece, Label, Event):
        cache.register(model, ttl=300)
    yield from make_env(engine, cache, WBase.metadata)


def database_row(engine: sa.Engine, model: Any, pk: Any) -> Any:
    with Session(engine) as plain:
        return plain.get(model, pk)


def cached_row(env: Env, model: Any, pk: Any) -> Any:
    """``session.get`` through the cache, in a fresh Session."""
    env.cache.wait_for_fills()
    with env.Session() as s:
        return s.get(model, pk)


# -- a row flushed again after a flush found its image untrustworthy ----------------------


def _prices(env: Env, pk: int) -> tuple[Any, Any]:
    db = database_row(env.engine, Product, pk)
    cached = cached_row(env, Product, pk)
    return db.price, cached.price


def test_an_inexact_value_flushed_then_another_change_is_not_written_through(env: Env) -> None:
    """Decimal("1.005") in a Numeric(10, 2) is stored as 1.01 (or 1.00): the flush that
    wrote it invalidates; a later flush of another column in the same transaction must
    not write the object's 1.005 through (it used to, over an absent entry)."""
    with env.Session() as s:
        p = Product(id=1, name="a", price=decimal.Decimal("1.005"))
        s.add(p)
        s.flush()
        p.name = "b"
        s.commit()
    db, cached = _prices(env, 1)
    assert cached == db != decimal.Decimal("1.005")

    with Session(env.engine) as plain:
        plain.add(Product(id=3, name="x", price=decimal.Decimal("3.00")))
        plain.commit()
    with env.Session() as s:  # loaded by a query: no entry, no pre-image check
        p = s.scalars(select(Product).where(Product.name == "x")).one()
        p.price = decimal.Decimal("3.675")
        s.flush()
        p.name = "y"
        s.commit()
    db, cached = _prices(env, 3)
    assert cached == db != decimal.Decimal("3.675")


def test_an_inexact_value_in_a_released_savepoint_stays_untrusted(env: Env) -> None:
    with env.Session() as s:
        s.add(Product(id=1, name="a", price=decimal.Decimal("1.00")))
        s.commit()
    with env.Session() as s:
        p = s.scalars(select(Product).where(Product.id >= 1)).one()
        p.name = "outer"
        s.flush()  # an image, trusted
        with s.begin_nested():
            p.price = decimal.Decimal("1.005")  # the database stores 1.01 or 1.00
        p.name = "later"
        s.commit()
    db, cached = _prices(env, 1)
    assert cached == db != decimal.Decimal("1.005")


# -- a value changed in place after its flush ----------------------------------------------


def test_a_value_changed_in_place_after_its_flush_is_not_written_through(env: Env) -> None:
    """The ORM does not see a JSON dict changed in place: the database keeps what the
    flush sent, and so must the entry (the image used to be encoded at the commit)."""
    with env.Session() as s:
        doc = Doc(id=1, data={"n": 1})
        s.add(doc)
        s.flush()
        doc.data["n"] = 2  # not tracked: not written
        s.commit()
    with env.Session() as s:
        doc2 = s.get(Doc, 1)
        assert doc2 is not None
        doc2.data = {"n": 10}
        s.flush()  # an UPDATE
        doc2.data["n"] = 11
        s.commit()
    assert database_row(env.engine, Doc, 1).data == {"n": 10}
    assert cached_row(env, Doc, 1).data == {"n": 10}


class BehindDoc(WBase):
    __tablename__ = "sac_we_behind_docs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    data: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


def test_a_write_behind_value_changed_in_place_after_its_flush_is_not_queued(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    from test_write_behind import cleanup

    from sa_cache.write_behind_worker import WriteBehindWorker

    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    cache.register(BehindDoc, ttl=60, write="behind")
    WBase.metadata.drop_all(engine)
    WBase.metadata.create_all(engine)
    factory = sa.orm.sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        with factory() as s:
            doc = BehindDoc(id=1, data={"n": 1})
            s.add(doc)
            s.flush()  # the image is taken here
            doc.data["n"] = 2  # not tracked: not written
            s.commit()
        with factory() as s:
            assert s.get(BehindDoc, 1).data == {"n": 1}  # type: ignore[union-attr]  # queued
        WriteBehindWorker(cache, engine, batch_size=10, max_delay=0.0).run(drain=True)
        assert database_row(engine, BehindDoc, 1).data == {"n": 1}
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        WBase.metadata.drop_all(engine)


# -- statements a flush runs that are not its objects' rows --------------------------------


def test_a_flush_event_writing_a_registered_row_invalidates_it(env: Env) -> None:
    with env.Session() as s:
        s.add(Customer(id=1, orders=0))
        s.commit()
    assert cached_row(env, Customer, 1).orders == 0  # the entry holds the row
    with env.Session() as s:
        s.add(Sale(id=1, customer_id=1))  # after_insert: UPDATE the customer's row
        s.commit()
    assert database_row(env.engine, Customer, 1).orders == 1
    assert cached_row(env, Customer, 1).orders == 1


def test_a_flush_event_writing_another_row_of_a_table_the_flush_writes(env: Env) -> None:
    """The flush updates customer 1 (its own row, named by it), then a flush event
    updates customer 2 of the same table (named by nothing): 2's entry must go."""
    with env.Session() as s:
        s.add_all([Customer(id=1, orders=0), Customer(id=2, orders=0)])
        s.commit()
    assert [cached_row(env, Customer, i).orders for i in (1, 2)] == [0, 0]
    with env.Session() as s:
        s.get(Customer, 1).orders = 10  # type: ignore[union-attr]
        s.add(Sale(id=1, customer_id=2))
        s.commit()
    assert [database_row(env.engine, Customer, i).orders for i in (1, 2)] == [10, 1]
    assert [cached_row(env, Customer, i).orders for i in (1, 2)] == [10, 1]


def test_bulk_update_mappings_then_a_flush_invalidates_the_bulk_rows(env: Env) -> None:
    with env.Session() as s:
        s.add_all([Customer(id=1, orders=0), Customer(id=2, orders=0)])
        s.commit()
    assert [cached_row(env, Customer, i).orders for i in (1, 2)] == [0, 0]
    with env.Session() as s:
        s.bulk_update_mappings(Customer, [{"id": 1, "orders": 5}, {"id": 2, "orders": 5}])
        one = s.get(Customer, 1)
        assert one is not None
        one.orders = 6  # an ordinary flush of row 1 after the bulk update
        s.flush()
        s.commit()
    assert [database_row(env.engine, Customer, i).orders for i in (1, 2)] == [6, 5]
    assert [cached_row(env, Customer, i).orders for i in (1, 2)] == [6, 5]


def test_rows_of_a_secondary_table_written_by_a_relationship_invalidate_their_entries(
    env: Env,
) -> None:
    with Session(env.engine) as plain:
        plain.add(Person(id=1, teams=[Team(id=1)]))
        plain.commit()
    assert cached_row(env, Member, (1, 1)) is not None
    with env.Session() as s:
        person = s.get(Person, 1)
        assert person is not None
        person.teams.clear()  # DELETE FROM the secondary table, in the flush
        s.commit()
    assert database_row(env.engine, Member, (1, 1)) is None
    assert cached_row(env, Member, (1, 1)) is None


# -- rows the database changes on its own: foreign-key actions -----------------------------


def test_foreign_key_actions_of_the_database_invalidate_the_rows_they_change(env: Env) -> None:
    """ON DELETE CASCADE / SET NULL and ON UPDATE CASCADE change rows no statement
    named: their entity entries and the cached queries of their tables must go."""
    if env.engine.dialect.name == "sqlite":
        sa.event.listen(env.engine, "connect", lambda c, _: c.execute("PRAGMA foreign_keys=ON"))
        env.engine.dispose()
    with Session(env.engine) as plain:
        plain.add_all([Holder(id=1), Holder(id=2)])
        plain.flush()
        plain.add_all([Piece(id=10, holder_id=1), Piece(id=20, holder_id=2)])
        plain.add(Label(id=100, holder_id=1))
        plain.commit()
    count = select(sa.func.count(Piece.id)).options(sa_cache.with_cache())
    with env.Session() as s:
        assert s.scalar(count) == 2
        assert [s.get(Piece, 10), s.get(Piece, 20), s.get(Label, 100)] != [None] * 3
    env.cache.wait_for_fills()
    with env.Session() as s:
        holder = s.get(Holder, 1)
        s.delete(holder)  # the database deletes piece 10, sets label 100's holder NULL
        s.get(Holder, 2).id = 3  # type: ignore[union-attr]  # piece 20 follows: holder 3
        s.commit()
    assert database_row(env.engine, Piece, 10) is None
    assert cached_row(env, Piece, 10) is None
    assert cached_row(env, Piece, 20).holder_id == 3
    assert cached_row(env, Label, 100).holder_id is None
    with env.Session() as s:
        assert s.scalar(count) == 1


def test_an_update_of_a_parents_other_columns_keeps_its_childrens_entries(env: Env) -> None:
    """``ON UPDATE CASCADE`` changes children only when the key they refer to changes:
    an UPDATE of another column of the parent leaves their entries alone."""
    with Session(env.engine) as plain:
        plain.add(Holder(id=1, name="a", pieces=[Piece(id=1)]))
        plain.commit()
    assert cached_row(env, Piece, 1).holder_id == 1
    with env.Session() as s:
        s.get(Holder, 1).name = "b"  # type: ignore[union-attr]
        s.commit()
    env.log.clear()
    assert cached_row(env, Piece, 1).holder_id == 1
    assert env.log.statements == []  # (every child entry used to go)
    with env.Session() as s:  # the key: the database changes the children
        s.get(Holder, 1).id = 2  # type: ignore[union-attr]
        s.commit()
    stored = database_row(env.engine, Piece, 1).holder_id  # (SQLite: no FK actions here)
    assert stored == (1 if env.engine.dialect.name == "sqlite" else 2)
    assert cached_row(env, Piece, 1).holder_id == stored


def test_foreign_key_writes_follow_the_actions_a_statement_sets_off() -> None:
    """Pure: which tables a DELETE / UPDATE / upsert of a table reaches, transitively
    (an UPDATE only through the foreign keys whose columns it sets)."""
    from sa_cache.invalidation import foreign_key_writes

    md = sa.MetaData()
    a = sa.Table(
        "a", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String)
    )

    def child(name: str, parent: str, **actions: str) -> sa.Table:
        fk = sa.ForeignKey(f"{parent}.id", **actions)
        return sa.Table(name, md, sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("p", sa.Integer, fk))  # fmt: skip

    child("b", "a", ondelete="CASCADE")
    child("c", "b", ondelete="set null")  # reached through b's cascaded delete
    child("d", "a", ondelete="RESTRICT", onupdate="CASCADE")
    child("e", "c", ondelete="CASCADE")  # c is only updated (SET NULL): not deleted
    child("f", "a")  # no action
    assert foreign_key_writes(sa.delete(a)) == {"b", "c"}
    assert foreign_key_writes(sa.update(a).values(id=2)) == {"d"}
    # an UPDATE that sets no column a foreign key refers to changes no child row
    assert foreign_key_writes(sa.update(a).values(name="x")) == frozenset()
    by_pk = sa.update(a).where(a.c.id == sa.bindparam("a_id"))  # the ORM's flush UPDATE
    assert foreign_key_writes(by_pk, by_pk.compile(column_keys=["name", "a_id"])) == frozenset()
    assert foreign_key_writes(by_pk, by_pk.compile(column_keys=["id", "a_id"])) == {"d"}
    assert foreign_key_writes(by_pk) == {"d"}  # columns not known: all it may reach
    assert foreign_key_writes(sa.insert(a)) == frozenset()
    upsert = (
        sqlite_insert(a).values(id=1).on_conflict_do_update(index_elements=["id"], set_={"id": 2})
    )
    assert foreign_key_writes(upsert) == {"d"}  # its update part
    assert foreign_key_writes(sa.select(a)) == frozenset()


# -- REPEATABLE READ: a reader's older snapshot ---------------------------------------------


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
def test_a_load_from_an_older_snapshot_does_not_fill_the_entry(env: Env) -> None:
    """Under REPEATABLE READ (MariaDB's default) a transaction reads the snapshot of its
    first statement: a row it loads after another transaction's commit is the old one,
    and must not become the entry (nor bring a deleted row back)."""
    with Session(env.engine) as plain:
        plain.add_all([Customer(id=1, orders=0), Customer(id=2, orders=0)])
        plain.commit()
    rr = env.Session(bind=env.engine.execution_options(isolation_level="REPEATABLE READ"))
    with rr as reader:
        reader.execute(select(Sale.id)).all()  # the snapshot is taken here
        with env.Session() as writer:  # (loaded by a query: the entries are tombstoned)
            one, two = writer.scalars(select(Customer).order_by(Customer.id)).all()
            one.orders = 7
            writer.delete(two)
            writer.commit()
        assert reader.get(Customer, 1).orders == 0  # type: ignore[union-attr]  # its snapshot
        assert reader.get(Customer, 2) is not None  # deleted since, not in its snapshot
        env.cache.wait_for_fills()
    assert cached_row(env, Customer, 1).orders == 7
    assert cached_row(env, Customer, 2) is None


def test_a_statement_the_listener_cannot_read_invalidates_everything(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The statement listener never fails the application: if working out what a
    statement wrote raises, it counts as a write of every table."""
    from sa_cache import statements

    with Session(env.engine) as plain:
        plain.add(Customer(id=1, orders=0))
        plain.commit()
    assert cached_row(env, Customer, 1).orders == 0

    def broken(statement: Any) -> frozenset[str]:
        raise RuntimeError("unreadable")

    monkeypatch.setattr(statements, "foreign_key_writes", broken)
    with env.Session() as s:
        s.execute(sa.update(Customer).where(Customer.id == 1).values(orders=3))
        s.commit()
    monkeypatch.undo()
    assert "cannot tell which tables" in caplog.text
    assert cached_row(env, Customer, 1).orders == 3


# -- a COMMIT whose outcome is unknown ---------------------------------------------------


def _commit_then_fail(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database commits, then the client hears an error (the connection dropped)."""
    dialect = engine.dialect
    real = dialect.do_commit

    def commit_then_fail(dbapi_connection: Any) -> None:
        real(dbapi_connection)
        raise dialect.loaded_dbapi.OperationalError("connection lost after COMMIT")

    monkeypatch.setattr(dialect, "do_commit", commit_then_fail)


def test_a_commit_whose_outcome_is_unknown_invalidates_what_it_wrote(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to count as a rollback: the entries the flush had tombstoned were put
    back, so the cache kept the old row the database no longer had."""
    with Session(env.engine) as plain:
        plain.add_all([Customer(id=1, orders=0), Customer(id=2, orders=0)])
        plain.commit()
    count = select(sa.func.sum(Customer.orders)).options(sa_cache.with_cache())
    with env.Session() as s:
        assert s.scalar(count) == 0
    assert cached_row(env, Customer, 1).orders == 0
    with env.Session() as s:
        s.get(Customer, 1).orders = 5  # type: ignore[union-attr]
        _commit_then_fail(env.engine, monkeypatch)
        with pytest.raises(sa.exc.OperationalError, match="connection lost"):
            s.commit()
        monkeypatch.undo()
        s.rollback()
    assert database_row(env.engine, Customer, 1).orders == 5  # it did commit
    assert cached_row(env, Customer, 1).orders == 5
    with env.Session() as s:
        assert s.scalar(count) == 5


def test_a_write_behind_change_whose_commit_outcome_is_unknown_is_kept(
    engine: sa.Engine, redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not aborted (it may be committed): left prepared, it ends as an "outcome
    unknown" dead letter for the operator, never dropped."""
    from test_write_behind import Counter, Order, wb_env

    with wb_env(engine, redis_url, namespace, prepare_timeout=0.2) as wb:
        with wb.Session() as s:
            s.add_all([Counter(id=1, n=5, label="maybe"), Order(id=1, note="db work")])
            _commit_then_fail(engine, monkeypatch)
            with pytest.raises(sa.exc.OperationalError, match="connection lost"):
                s.commit()
            monkeypatch.undo()
            s.rollback()
        time.sleep(0.25)
        wb.drain()
        (letter,) = wb.queue.dead_letters()
        assert "outcome unknown" in letter.error
        assert wb.queue.replay() == 1
        wb.drain()
        assert wb.db() == {1: (5, "maybe")}


# -- a rolled-back flush over another reader's lease --------------------------------------


def test_a_rolled_back_flush_does_not_put_back_a_readers_lease(env: Env) -> None:
    """The reader's fill loses to the flush's tombstone; the rollback used to put the
    reader's lease back with the entry's TTL, so nobody could fill the row for that long."""
    with Session(env.engine) as plain:
        plain.add(Customer(id=1, orders=0))
        plain.commit()
    held: list[Any] = []
    real = env.cache.fill_later
    env.cache.fill_later = lambda job, keys=None: held.append(job) or True  # type: ignore[method-assign]
    with env.Session() as reader:
        reader.get(Customer, 1)  # a miss: a lease, the row loaded, its swap held
    env.cache.fill_later = real  # type: ignore[method-assign]
    with env.Session() as writer:
        writer.scalars(select(Customer).where(Customer.orders == 0)).one().orders = 9
        writer.flush()  # swaps the reader's lease for its tombstone
        for job in held:
            job()  # the reader's fill loses (as it must)
        writer.rollback()
    for _ in range(2):
        assert cached_row(env, Customer, 1).orders == 0
    env.log.clear()
    assert cached_row(env, Customer, 1).orders == 0
    assert env.log.statements == []  # filled again: a hit


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
def test_a_transaction_on_an_older_snapshot_is_not_served_newer_rows(env: Env) -> None:
    """A REPEATABLE READ transaction reads its snapshot: an entry written through by a
    later commit is newer than what its database reads return, so it is not served to
    it (it was: the transaction saw one row after the commit and others before it).
    Entries of tables no commit wrote since its snapshot are still served."""
    with Session(env.engine) as plain:
        plain.add_all([Customer(id=1, orders=0), Product(id=1, name="p", price=1)])
        plain.commit()
    assert cached_row(env, Customer, 1).orders == 0
    assert cached_row(env, Product, 1).name == "p"
    rr = env.Session(bind=env.engine.execution_options(isolation_level="REPEATABLE READ"))
    with rr as reader:
        reader.execute(select(Sale.id)).all()  # the snapshot is taken here
        with env.Session() as writer:
            writer.get(Customer, 1).orders = 7  # type: ignore[union-attr]
            writer.commit()  # written through: the entry holds 7
        assert cached_row(env, Customer, 1).orders == 7
        env.log.clear()
        assert reader.get(Product, 1).name == "p"  # type: ignore[union-attr]
        assert env.log.statements == []  # a hit: nothing wrote products since
        assert reader.get(Customer, 1).orders == 0  # type: ignore[union-attr]  # its snapshot
        assert len(env.log.statements) == 1
    assert cached_row(env, Customer, 1).orders == 7


# -- a schema translate map ----------------------------------------------------------------


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
def test_writes_under_a_schema_translate_map_are_never_written_through(
    env: Env, namespace: str
) -> None:
    """Entries are keyed by the table as mapped: a tenant schema's row written through
    would be served to the default schema's readers."""
    tenant = "sacwe_" + "".join(c for c in namespace if c.isalnum())[-10:].lower()
    drop = (
        "DROP SCHEMA IF EXISTS {} CASCADE"
        if env.engine.dialect.name == "postgresql"
        else ("DROP DATABASE IF EXISTS {}")
    )
    with env.engine.begin() as conn:
        conn.exec_driver_sql(drop.format(tenant))
        conn.exec_driver_sql(f"CREATE SCHEMA {tenant}")
    try:
        tenant_engine = env.engine.execution_options(schema_translate_map={None: tenant})
        Customer.__table__.create(tenant_engine)
        with Session(env.engine) as plain:
            plain.add(Customer(id=1, orders=0))
            plain.commit()
        with Session(tenant_engine) as plain:
            plain.add(Customer(id=1, orders=100))
            plain.commit()
        assert cached_row(env, Customer, 1).orders == 0  # the default schema's entry
        with env.Session(bind=tenant_engine) as s:
            row = s.get(Customer, 1)
            assert row is not None
            assert row.orders == 100
            row.orders = 101
            s.add(Customer(id=2, orders=200))
            s.commit()
        assert cached_row(env, Customer, 1).orders == 0
        assert cached_row(env, Customer, 2) is None  # the default schema has no row 2
        with env.Session() as s:  # the Connection's own map, given at the start
            s.connection(execution_options={"schema_translate_map": {None: tenant}})
            s.add(Customer(id=3, orders=300))
            s.commit()
        assert cached_row(env, Customer, 3) is None
    finally:
        with env.engine.begin() as conn:
            conn.exec_driver_sql(drop.format(tenant))


# -- PostgreSQL timestamptz ------------------------------------------------------------------


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_an_aware_datetime_is_cached_in_the_zone_the_database_gives_back(env: Env) -> None:
    """PostgreSQL stores an instant and gives it back in the session's TimeZone: an image
    written through is that value, not the zone the application happened to use."""
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    with env.Session() as s:
        s.add(Event(id=1, at=datetime.datetime(2024, 6, 1, 12, 0, tzinfo=plus_two)))
        s.commit()
    loaded = database_row(env.engine, Event, 1).at
    cached = cached_row(env, Event, 1).at
    assert cached == loaded
    assert (cached.isoformat(), cached.tzinfo) == (loaded.isoformat(), loaded.tzinfo)


# -- what a statement writes, and which rows a flush names --------------------------------


def test_a_multiple_table_update_writes_the_tables_of_its_set_columns() -> None:
    """MySQL / MariaDB's ``UPDATE a, b SET b.x = ...`` (SQLAlchemy's UPDATE..FROM whose
    SET names another table's columns): both tables count as written."""
    from sa_cache.invalidation import tables_written

    c, p = Customer.__table__, Product.__table__
    both = sa.update(c).where(c.c.id == p.c.id).values({c.c.orders: 1, p.c.name: "x"})
    assert tables_written(both) == {"sac_we_customers", "sac_we_products"}
    ordered = sa.update(c).ordered_values((c.c.orders, 1), (p.c.name, "x"))
    assert tables_written(ordered) == {"sac_we_customers", "sac_we_products"}
    assert tables_written(sa.update(c).values(orders=2)) == {"sac_we_customers"}


def test_a_flush_in_a_process_that_did_not_register_the_model_invalidates_it(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """Another process on the namespace (a worker) that never registered the model
    writes its rows: its flush names no rows of it, so their entries must go."""
    web = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    web.register(Customer, ttl=300)
    worker = sa_cache.Cache.from_url(redis_url, namespace=namespace)  # no register()
    made = make_env(engine, web, WBase.metadata)
    env = next(made)
    try:
        with Session(engine) as plain:
            plain.add(Customer(id=1, orders=0))
            plain.commit()
        assert cached_row(env, Customer, 1).orders == 0
        factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=worker)
        with factory() as s:
            s.scalars(select(Customer).where(Customer.id == 1)).one().orders = 5
            s.commit()
        assert cached_row(env, Customer, 1).orders == 5
    finally:
        worker.close()
        web.backend.unlink_many(web.backend.scan_keys(f"{namespace}:*"))  # type: ignore[attr-defined]
        web.close()
        made.close()  # (drops the tables)


def test_sql_text_not_known_to_read_counts_as_a_write_of_every_table() -> None:
    """Text is a write unless it is known to read: procedures, anonymous blocks,
    ``EXPLAIN ANALYZE``, ``EXECUTE``, MySQL ``#`` comments before DML, and a second
    statement after a ``;`` used to be taken for reads."""
    from sa_cache.invalidation import ALL, tables_written

    writes = [
        "CALL refresh_totals()",
        "DO $$ BEGIN UPDATE t SET x = 1; END $$",
        "EXPLAIN ANALYZE UPDATE t SET x = 1",
        "EXPLAIN (ANALYZE) DELETE FROM t",
        "EXECUTE IMMEDIATE 'UPDATE t SET x = 1'",
        "# a comment\nUPDATE t SET x = 1",
        "SELECT 1; UPDATE t SET x = 1",
        "WITH a AS (UPDATE t SET x = 1 RETURNING *) SELECT * FROM a",
        "TRUNCATE t",
    ]
    reads = [
        "SELECT * FROM t FOR UPDATE",
        "/* hint */ select 1;",
        "EXPLAIN SELECT 1",
        "WITH a AS (SELECT 1) SELECT * FROM a",
        "SHOW TABLES",
        "SET LOCAL statement_timeout = 5000",
        "SAVEPOINT sp",
    ]
    for sql in writes:
        assert tables_written(sql) == {ALL}, sql
        assert tables_written(sa.text(sql)) == {ALL}, sql
    for sql in reads:
        assert tables_written(sql) is None, sql
