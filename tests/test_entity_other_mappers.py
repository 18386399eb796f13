"""Rows of a registered model's table written through another mapper: a second class
mapped to the same table (an admin or read model), a subclass of the registered class
(joined or single table, also one declared after `register`), a mapping of the table
keyed by another column. The flush names those rows, so no statement-level row
generation covers them: after the commit the registered model must not be served the
row as it was (nor a deleted row). Each row's entry goes when its key is the registered
model's (the table's other entries stay); otherwise the table's row generation moves.
(Audit d2, D2-01.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_cache


class OBase(DeclarativeBase):
    pass


class Country(OBase):
    __tablename__ = "sac_om_country"
    code: Mapped[str] = mapped_column(sa.String(2), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    capital: Mapped[str | None] = mapped_column(sa.String(50))


class CountryAdmin(OBase):
    """A second class mapped to the registered class's table (not registered itself:
    registering both is refused)."""

    __table__ = Country.__table__
    code: Mapped[str]
    name: Mapped[str]


class CountryByName(OBase):
    """A mapping of the table keyed by another column: its identity is no key of the
    registered model's entries."""

    __table__ = Country.__table__
    __mapper_args__ = {"primary_key": [Country.__table__.c.name]}  # noqa: RUF012
    capital: Mapped[str | None]


class Animal(OBase):
    """A plain base class (no discriminator): `register()` accepts it."""

    __tablename__ = "sac_om_animal"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50))


class Dog(Animal):
    """Joined-table subclass: its rows live in the base table too."""

    __tablename__ = "sac_om_dog"
    id: Mapped[int] = mapped_column(sa.ForeignKey("sac_om_animal.id"), primary_key=True)
    bark: Mapped[str | None] = mapped_column(sa.String(50))


class Cat(Animal):
    """Single-table subclass (no table of its own)."""


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Country)
    cache.register(Animal)
    yield from make_env(engine, cache, OBase.metadata)


def _served(env: Env, model: Any, pk: Any, attr: str = "name") -> Any:
    """What the cached Session gives (None: no row)."""
    env.cache.wait_for_fills()
    with env.Session() as s:
        obj = s.get(model, pk)
        return None if obj is None else getattr(obj, attr)


def _stored(env: Env, model: Any, pk: Any, attr: str = "name") -> Any:
    with Session(env.engine) as s:
        obj = s.get(model, pk)
        return None if obj is None else getattr(obj, attr)


def _seeded_countries(env: Env, *codes: str) -> None:
    with Session(env.engine) as s:
        s.add_all([Country(code=c, name=f"old {c}") for c in codes])
        s.commit()
    for code in codes:
        assert _served(env, Country, code) == f"old {code}"
        assert _served(env, Country, code) == f"old {code}"  # from the entry


def _hit(env: Env, model: Any, pk: Any) -> Any:
    """The name served without SQL (asserted)."""
    env.cache.wait_for_fills()
    env.log.clear()
    name = _served(env, model, pk)
    assert env.log.statements == []
    return name


@pytest.mark.parametrize("how", ["update", "delete"])
def test_a_write_through_a_second_class_of_the_table_reaches_the_entry(env: Env, how: str) -> None:
    """An update or delete through another class mapped to the registered table: the
    registered model is served the new row (or none), and only that row's entry went."""
    _seeded_countries(env, "DE", "FR")
    with env.Session() as s:
        admin = s.get(CountryAdmin, "DE")
        assert admin is not None
        if how == "update":
            admin.name = "Deutschland"
        else:
            s.delete(admin)
        s.commit()
    expected = "Deutschland" if how == "update" else None
    assert _stored(env, Country, "DE") == expected
    assert _served(env, Country, "DE") == expected
    assert _hit(env, Country, "FR") == "old FR"  # another row's entry stays


def test_an_insert_through_a_second_class_of_the_table_is_served(env: Env) -> None:
    """A row inserted through the other class is read from the database (its image is
    of another mapping), then cached."""
    with env.Session() as s:
        s.add(CountryAdmin(code="IT", name="Italia"))
        s.commit()
    assert _served(env, Country, "IT") == "Italia"
    assert _hit(env, Country, "IT") == "Italia"


@pytest.mark.parametrize("subclass", [Dog, Cat], ids=["joined", "single"])
@pytest.mark.parametrize("how", ["update", "delete"])
def test_a_subclass_write_reaches_the_registered_base_entry(
    env: Env, subclass: Any, how: str
) -> None:
    """A subclass of the registered class (joined or single table) writes the base
    table's row: the base's entry of it goes, the others stay."""
    with env.Session() as s:
        s.add_all([subclass(id=1, name="rex"), Animal(id=2, name="tom")])
        s.commit()
    assert _served(env, Animal, 1) == "rex"
    assert _hit(env, Animal, 2) == "tom"
    with env.Session() as s:
        pet = s.get(subclass, 1)
        assert pet is not None
        if how == "update":
            pet.name = "max"
        else:
            s.delete(pet)
        s.commit()
    expected = "max" if how == "update" else None
    assert _stored(env, Animal, 1) == expected
    assert _served(env, Animal, 1) == expected
    assert _hit(env, Animal, 2) == "tom"


def test_a_subclass_declared_after_register_is_seen(
    engine: sa.Engine, cache_url: str, namespace: str
) -> None:
    """`register` cannot refuse a subclass that does not exist yet: its writes are
    noticed at the flush, whenever it was declared."""

    class LateBase(DeclarativeBase):
        pass

    class Plant(LateBase):
        __tablename__ = "sac_om_plant"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(50))

    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Plant)

    class Tree(Plant):
        __tablename__ = "sac_om_tree"
        id: Mapped[int] = mapped_column(sa.ForeignKey("sac_om_plant.id"), primary_key=True)

    for env in make_env(engine, cache, LateBase.metadata):
        with env.Session() as s:
            s.add(Tree(id=1, name="oak"))
            s.commit()
        assert _served(env, Plant, 1) == "oak"
        assert _served(env, Plant, 1) == "oak"
        with env.Session() as s:
            tree = s.get(Tree, 1)
            assert tree is not None
            tree.name = "elm"
            s.commit()
        assert _served(env, Plant, 1) == "elm"


def test_a_mapping_keyed_otherwise_moves_the_tables_rows(env: Env) -> None:
    """A mapping of the table whose identity is another column names no entry: all of
    the table's entries go."""
    _seeded_countries(env, "DE", "FR")
    with env.Session() as s:
        by_name = s.get(CountryByName, "old DE")
        assert by_name is not None
        by_name.capital = "Berlin"
        s.commit()
    assert _served(env, Country, "DE", "capital") == "Berlin"
    assert _served(env, Country, "FR") == "old FR"


def test_a_later_image_of_a_row_written_through_another_class_is_not_trusted(
    env: Env,
) -> None:
    """One transaction changes a row's name through the other class, then another
    column through the registered object (loaded before, so holding the old name): its
    UPDATE sets only that column, so its image (the old name) is not the row."""
    _seeded_countries(env, "DE")
    with env.Session() as s:
        country = s.get(Country, "DE")
        admin = s.get(CountryAdmin, "DE")
        assert country is not None
        assert admin is not None
        admin.name = "Deutschland"
        s.flush()
        country.capital = "Berlin"
        s.commit()
    assert (_stored(env, Country, "DE"), _stored(env, Country, "DE", "capital")) == (
        "Deutschland",
        "Berlin",
    )
    assert _served(env, Country, "DE") == "Deutschland"
    assert _served(env, Country, "DE", "capital") == "Berlin"


def test_an_autocommit_write_through_another_class_is_invalidated_as_it_runs(
    env: Env,
) -> None:
    """On an AUTOCOMMIT connection the database committed the UPDATE as it ran: other
    Sessions are served the new row while the writer is still open."""
    _seeded_countries(env, "DE")
    autocommit = env.engine.execution_options(isolation_level="AUTOCOMMIT")
    with env.Session(bind=autocommit) as writer:
        admin = writer.get(CountryAdmin, "DE")
        assert admin is not None
        admin.name = "Deutschland"
        writer.flush()
        assert _stored(env, Country, "DE") == "Deutschland"
        assert _served(env, Country, "DE") == "Deutschland"
