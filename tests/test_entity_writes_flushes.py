"""Write-through of a row flushed more than once in a transaction, and of columns an
UPDATE sets from ``onupdate``.

A later flush's image is the object's values; its UPDATE sends only what changed. A
value changed in place after the earlier flush (no UPDATE sends it), or an
``onupdate`` value the database stores otherwise, must not reach the cache: the
row is invalidated instead. An ``onupdate`` value the database does keep is written
through (the old value of such a column does not matter: the UPDATE sets it).
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import sa_cache


class FBase(DeclarativeBase):
    pass


class Doc(FBase):
    __tablename__ = "sac_wf_docs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))
    data: Mapped[dict[str, Any]] = mapped_column(sa.JSON)


class Priced(FBase):  # an onupdate value the database rounds
    __tablename__ = "sac_wf_priced"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))
    price: Mapped[decimal.Decimal] = mapped_column(
        sa.Numeric(10, 2),
        default=decimal.Decimal("1.00"),
        onupdate=lambda: decimal.Decimal("9.999"),
    )


class Post(FBase):  # the common "updated_at" recipe
    __tablename__ = "sac_wf_posts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(sa.String(20))
    updated_at: Mapped[datetime.datetime] = mapped_column(
        sa.DateTime, server_default=sa.func.now(), onupdate=datetime.datetime.now
    )


class Versioned(FBase):  # an onupdate value every database keeps as it is
    __tablename__ = "sac_wf_versioned"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(sa.String(20))
    touched: Mapped[int] = mapped_column(default=0, onupdate=7)


class Parent(FBase):
    __tablename__ = "sac_wf_parents"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))
    n: Mapped[int]
    children: Mapped[list[Child]] = relationship(cascade="all, delete-orphan")


class Child(FBase):
    __tablename__ = "sac_wf_children"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_wf_parents.id"))


class Priced2(FBase):  # a decimal primary key: Decimal("1.0") names the row 1.00
    __tablename__ = "sac_wf_priced2"
    id: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(20))


class Lowered(sa.TypeDecorator[str]):  # a key type with no exactness check
    impl = sa.String(20)
    cache_ok = True


class Tagged(FBase):
    __tablename__ = "sac_wf_tagged"
    id: Mapped[str] = mapped_column(Lowered(), primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(20))


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    for model in (Doc, Priced, Post, Versioned, Parent, Child, Priced2, Tagged):
        cache.register(model, ttl=300)
    yield from make_env(engine, cache, FBase.metadata)


def _served_and_stored(env: Env, model: Any, pk: int, column: str) -> tuple[Any, Any]:
    env.cache.wait_for_fills()
    with env.Session() as s:
        served = getattr(s.get(model, pk), column)
    with Session(env.engine) as plain:
        stored = getattr(plain.get(model, pk), column)
    return served, stored


def test_a_value_changed_in_place_after_an_inserts_flush_is_not_cached(env: Env) -> None:
    with env.Session() as s:
        doc = Doc(id=1, name="a", data={"k": "old"})
        s.add(doc)
        s.flush()
        doc.data["k"] = "new"  # not seen by the ORM: no UPDATE sends it
        doc.name = "b"
        s.commit()
    served, stored = _served_and_stored(env, Doc, 1, "data")
    assert stored == {"k": "old"}
    assert served == stored


def test_an_onupdate_value_of_a_second_flush_is_checked(env: Env) -> None:
    with env.Session() as s:
        row = Priced(id=1, name="x")
        s.add(row)
        s.flush()
        row.name = "y"  # the UPDATE sets price = 9.999, stored as 10.00
        s.commit()
    served, stored = _served_and_stored(env, Priced, 1, "price")
    assert stored == decimal.Decimal("10.00")
    assert served == stored


def test_the_updated_at_recipe_never_caches_a_timestamp_the_database_rounded(env: Env) -> None:
    """MariaDB's DATETIME drops the microseconds of ``datetime.now()``; elsewhere they
    are kept. Either way the served value is the stored one."""
    with env.Session() as s:
        s.add(Post(id=1, title="x"))
        s.flush()
        s.get(Post, 1).title = "y"  # type: ignore[union-attr]
        s.commit()
    served, stored = _served_and_stored(env, Post, 1, "updated_at")
    assert served == stored
    with env.Session() as s:
        s.get(Post, 1).title = "z"  # type: ignore[union-attr]  # one flush, loaded row
        s.commit()
    served, stored = _served_and_stored(env, Post, 1, "updated_at")
    assert served == stored


def test_an_exact_onupdate_value_is_written_through(env: Env) -> None:
    with Session(env.engine) as plain:
        plain.add(Versioned(id=1, title="a"))
        plain.commit()
    with env.Session() as s:
        assert s.get(Versioned, 1).touched == 0  # type: ignore[union-attr]  # cached
    env.cache.wait_for_fills()
    with env.Session() as s:
        s.get(Versioned, 1).title = "b"  # type: ignore[union-attr]
        s.commit()
    env.log.clear()
    with env.Session() as s:
        row = s.get(Versioned, 1)
        assert row is not None
        assert (row.title, row.touched) == ("b", 7)
    assert env.log.statements == []  # written through, not invalidated


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
@pytest.mark.parametrize("second", ["collection", "column"])
def test_a_bulk_update_between_two_flushes_of_a_row_is_not_hidden(env: Env, second: str) -> None:
    """The first flush records the parent (only its collection changed: no UPDATE, no
    row lock); another transaction's bulk UPDATE of the row commits; the second flush's
    image must not be written under the generations read after that bulk write."""
    with Session(env.engine) as plain:
        plain.add(Parent(id=1, name="a", n=0, children=[Child(id=11), Child(id=12)]))
        plain.commit()
    with env.Session() as s:
        s.get(Parent, 1)  # the entry is filled
    env.cache.wait_for_fills()
    writer = env.Session()
    parent = writer.get(Parent, 1)
    assert parent is not None
    parent.children.remove(parent.children[0])
    writer.flush()
    with env.Session() as other:
        other.execute(sa.update(Parent).where(Parent.id == 1).values(n=5))
        other.commit()
    if second == "collection":
        parent.children.remove(parent.children[0])
    else:
        parent.name = "b"  # an UPDATE of name: the row keeps n=5
    writer.commit()
    writer.close()
    served, stored = _served_and_stored(env, Parent, 1, "n")
    assert stored == 5
    assert served == stored


@pytest.mark.parametrize("listener", ["before_flush", "after_flush"])
def test_an_orm_bulk_update_from_a_flush_event_is_invalidated(env: Env, listener: str) -> None:
    """A flush event runs ``session.execute(update(Model), [rows by primary key])``: the
    ORM runs it as it runs the flush's own UPDATEs, but the flush names none of its
    rows, so their entries go (the rows generation moves)."""
    with Session(env.engine) as plain:
        plain.add_all([Versioned(id=1, title="new"), Doc(id=1, name="order", data={})])
        plain.commit()
    assert _served_and_stored(env, Versioned, 1, "title") == ("new", "new")  # cached

    def ship(session: Session, *args: Any) -> None:
        if any(isinstance(o, Doc) for o in session.dirty):
            session.execute(sa.update(Versioned), [{"id": 1, "title": "shipped"}])

    sa.event.listen(env.Session, listener, ship)
    try:
        with env.Session() as s:
            s.get(Doc, 1).name = "shipped"  # type: ignore[union-attr]
            s.commit()
    finally:
        sa.event.remove(env.Session, listener, ship)
    assert _served_and_stored(env, Versioned, 1, "title") == ("shipped", "shipped")


@pytest.mark.parametrize("how", ["flush", "bulk"])
def test_a_rollback_on_an_autocommit_connection_takes_nothing_back(env: Env, how: str) -> None:
    """With ``isolation_level="AUTOCOMMIT"`` the database kept the write when it ran: a
    Session's rollback invalidates what it wrote instead of putting the old entry back."""
    with Session(env.engine) as plain:
        plain.add(Versioned(id=1, title="old"))
        plain.commit()
    assert _served_and_stored(env, Versioned, 1, "title") == ("old", "old")  # cached
    autocommit = env.engine.execution_options(isolation_level="AUTOCOMMIT")
    with env.Session(bind=autocommit) as s:
        if how == "flush":
            s.get(Versioned, 1).title = "new"  # type: ignore[union-attr]
            s.flush()
        else:
            s.execute(sa.update(Versioned).where(Versioned.id == 1).values(title="new"))
        s.rollback()
    assert _served_and_stored(env, Versioned, 1, "title") == ("new", "new")
    query = sa.select(Versioned.title).options(sa_cache.with_cache())
    with env.Session() as s:
        assert s.scalars(query).all() == ["new"]


@pytest.mark.parametrize("how", ["flush", "bulk", "core", "driver_sql", "delete"])
def test_an_autocommit_write_is_invalidated_as_it_runs(env: Env, how: str) -> None:
    """On an AUTOCOMMIT connection each statement is committed when it returns: other
    Sessions must not be served the rows it replaced while the writing Session is still
    open (a long-lived worker Session may never commit)."""
    with Session(env.engine) as plain:
        plain.add(Versioned(id=1, title="old"))
        plain.commit()
    query = sa.select(Versioned.title).options(sa_cache.with_cache())
    with env.Session() as s:
        assert s.scalars(query).all() == ["old"]
    assert _served_and_stored(env, Versioned, 1, "title") == ("old", "old")  # cached
    autocommit = env.engine.execution_options(isolation_level="AUTOCOMMIT")
    table = Versioned.__tablename__
    with env.Session(bind=autocommit) as writer:
        if how == "flush":
            writer.get(Versioned, 1).title = "new"  # type: ignore[union-attr]
            writer.flush()
        elif how == "delete":
            writer.delete(writer.get(Versioned, 1))
            writer.flush()
            env.cache.wait_for_fills()
            with env.Session() as s:  # the writer is still open
                assert s.scalars(query).all() == []
                assert s.get(Versioned, 1) is None
            return
        elif how == "bulk":
            writer.execute(sa.update(Versioned).where(Versioned.id == 1).values(title="new"))
        elif how == "core":
            writer.connection().execute(
                sa.update(Versioned.__table__).where(Versioned.id == 1).values(title="new")
            )
        else:
            writer.connection().exec_driver_sql(f"UPDATE {table} SET title = 'new' WHERE id = 1")
        env.cache.wait_for_fills()
        with env.Session() as s:  # the writer is still open
            assert s.scalars(query).all() == ["new"]
            got = s.get(Versioned, 1)
            assert got is not None
            assert got.title == "new"


@pytest.mark.parametrize("how", ["merge", "held", "deleted"])
def test_a_key_spelled_otherwise_than_the_row_invalidates_its_entry(env: Env, how: str) -> None:
    """Readers key a row by the database's spelling of its primary key (``5``,
    ``Decimal("1.00")``); an object may hold another (``5.0`` from ``merge()``, ``"5"``
    or ``Decimal("1.0")`` given at insert and kept with ``expire_on_commit=False``): its
    write must not miss the entry readers use."""
    with Session(env.engine) as plain:
        plain.add_all([Versioned(id=5, title="v1"), Priced2(id=decimal.Decimal("1.00"), name="v1")])
        plain.commit()
    for model, pk in ((Versioned, 5), (Priced2, decimal.Decimal("1.00"))):
        with env.Session() as s:
            assert s.get(model, pk) is not None  # type: ignore[call-overload]
    env.cache.wait_for_fills()
    if how == "merge":
        with env.Session() as s:
            s.merge(Versioned(id=5.0, title="v2"))  # type: ignore[arg-type]
            s.merge(Priced2(id=decimal.Decimal("1.0"), name="v2"))
            s.commit()
    else:
        with Session(env.engine) as plain:  # rows inserted by another spelling
            plain.execute(sa.delete(Versioned))
            plain.execute(sa.delete(Priced2))
            plain.commit()
        with env.Session(expire_on_commit=False) as s:
            held = [Versioned(id="5", title="v1"), Priced2(id=decimal.Decimal("1.0"), name="v1")]
            s.add_all(held)  # type: ignore[arg-type]
            s.commit()
            for model, pk in ((Versioned, 5), (Priced2, decimal.Decimal("1.00"))):
                with env.Session() as reader:
                    assert reader.get(model, pk) is not None  # type: ignore[call-overload]
            env.cache.wait_for_fills()
            for obj in held:
                if how == "held":
                    setattr(obj, "title" if isinstance(obj, Versioned) else "name", "v2")
                else:
                    s.delete(obj)
            s.commit()
    for model, pk, column in ((Versioned, 5, "title"), (Priced2, decimal.Decimal("1.00"), "name")):
        env.cache.wait_for_fills()
        with env.Session() as s:
            got = s.get(model, pk)  # type: ignore[call-overload]
            served = None if got is None else getattr(got, column)
        with Session(env.engine) as plain:
            row = plain.get(model, pk)  # type: ignore[call-overload]
            stored = None if row is None else getattr(row, column)
        assert served == stored == (None if how == "deleted" else "v2")


def test_a_flush_that_sends_no_update_checks_its_onupdate_columns_too(env: Env) -> None:
    """An attribute set to the value it had: the flush sends no UPDATE, so the row keeps
    its ``onupdate`` column as another transaction left it, and an image holding the
    object's older value must not be written."""
    with Session(env.engine) as plain:
        plain.add(Versioned(id=1, title="a"))
        plain.commit()
    assert _served_and_stored(env, Versioned, 1, "touched") == (0, 0)  # cached
    writer = env.Session()
    held = writer.get(Versioned, 1)  # touched=0
    assert held is not None
    with env.Session() as other:
        other.get(Versioned, 1).touched = 99  # type: ignore[union-attr]  # written through
        other.commit()
    held.title = "a"  # the value it had: no UPDATE is sent
    writer.commit()
    writer.close()
    assert _served_and_stored(env, Versioned, 1, "touched") == (99, 99)


def test_an_exact_primary_key_of_a_type_without_a_check_moves_no_rows_generation(
    env: Env,
) -> None:
    """Keys of types whose values have no exactness check of their own (a
    ``TypeDecorator``, a string ``Uuid``) are taken as readers' keys: writing a row does
    not drop the entries of the table's other rows."""
    with Session(env.engine) as plain:
        plain.add_all([Tagged(id="a", title="x"), Tagged(id="b", title="x")])
        plain.commit()
    assert _served_and_stored(env, Tagged, "b", "title") == ("x", "x")  # cached
    with env.Session() as s:
        s.get(Tagged, "a").title = "y"  # type: ignore[union-attr]
        s.commit()
    env.log.clear()
    assert _served_and_stored(env, Tagged, "b", "title") == ("x", "x")
    assert len(env.log.statements) == 1  # the plain read: the cached one was a hit
