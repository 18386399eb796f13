"""A hit of an entity select gives what a database load gives (audit h1).

Each test reads the same statement without the cache, then on a miss and on a hit
(through `CachingSession`'s short way, and so through the ``do_orm_execute`` hook
whenever the short way steps aside), and compares what the application sees: mapper
events, the Python values and types of the objects, ``unique()``, and the rows for
bind values that changed in place.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import bindparam, event, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    Session,
    mapped_column,
    relationship,
)

import sa_cache
from sa_cache import codec, query_shape, with_cache


class Color(enum.Enum):
    RED = "r"
    BLUE = "b"


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "sac_fid_accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int]
    notes: Mapped[list[Note]] = relationship(order_by="Note.id")


class Note(Base):
    __tablename__ = "sac_fid_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_fid_accounts.id"))


class Item(Base):
    """The application's mapping of ``sac_fid_items``."""

    __tablename__ = "sac_fid_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    flag: Mapped[bool] = mapped_column(sa.Boolean)
    color: Mapped[Color] = mapped_column(sa.Enum(Color, native_enum=False, length=10))
    price: Mapped[Decimal] = mapped_column(sa.Numeric(10, 2))


class _Reporting(DeclarativeBase):  # another module's mapping of the same table
    pass


class ItemRow(_Reporting):
    __tablename__ = "sac_fid_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    flag: Mapped[int] = mapped_column(sa.Integer)
    color: Mapped[str] = mapped_column(sa.String(10))
    price: Mapped[float] = mapped_column(sa.Numeric(10, 2, asdecimal=False))


class _Dataclasses(MappedAsDataclass, DeclarativeBase):
    metadata = Base.metadata


class Card(_Dataclasses):
    """A mapped dataclass: ``eq=True`` makes it unhashable."""

    __tablename__ = "sac_fid_cards"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))


class Label(Base):
    """Equal by value: two rows with one name are equal objects."""

    __tablename__ = "sac_fid_labels"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Label) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def seed(session: Session) -> None:
    session.add_all([Account(id=i, balance=10 * i) for i in (1, 2, 3)])
    session.add(Item(id=1, flag=True, color=Color.BLUE, price=Decimal("9.99")))
    session.add_all([Card(id=1, name="a"), Card(id=2, name="b")])
    session.add_all([Label(id=1, name="x"), Label(id=2, name="x")])
    session.commit()


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache, Base.metadata, seed)


def uncached_miss_hit(env: Env, read: Callable[[Session], Any]) -> tuple[Any, Any, Any]:
    """What ``read`` returns in a plain Session, then in a caching one twice (a miss
    and a hit, asserted: the hit sends no SELECT)."""
    with Session(env.engine) as s:
        uncached = read(s)
    with env.Session() as s:
        miss = read(s)
    env.cache.wait_for_fills()
    env.log.clear()
    with env.Session() as s:
        hit = read(s)
    assert env.log.selects == [], "the second cached read was not a hit"
    return uncached, miss, hit


# -- mapper events ---------------------------------------------------------------------


def test_hit_fires_refresh_for_objects_in_the_identity_map(env: Env) -> None:
    """The ORM fires ``refresh`` when a load fills unloaded attributes of an object it
    already holds (expired columns, a lazy relationship never loaded): a hit too."""
    calls: list[tuple[int, list[str]]] = []

    def on_refresh(target: Account, context: Any, attrs: Any) -> None:
        calls.append((target.id, sorted(attrs or ())))

    def read(s: Session) -> Any:
        first, second = s.get(Account, 1), s.get(Account, 2)
        assert first is not None
        assert second is not None
        s.expire(first)  # as after a commit; `second` has only `notes` unloaded
        env.log.clear()  # (the gets are not what is compared)
        calls.clear()
        stmt = select(Account).where(Account.id < 3).order_by(Account.id)
        assert s.scalars(stmt.options(with_cache())).all() == [first, second]
        return first.balance, sorted(calls)

    event.listen(Account, "refresh", on_refresh)
    try:
        uncached, miss, hit = uncached_miss_hit(env, read)
    finally:
        event.remove(Account, "refresh", on_refresh)
    assert uncached == (10, [(1, ["balance", "id", "notes"]), (2, ["notes"])])
    assert miss == hit == uncached


def test_a_primary_key_select_of_a_registered_model_fires_refresh(
    engine: sa.Engine, cache_url: str, namespace: str
) -> None:
    """The entity cache's path too: an object already held, with a relationship never
    loaded, is refreshed by a primary-key select, which fires ``refresh``."""
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Account)
    calls: list[list[str]] = []

    def on_refresh(target: Account, context: Any, attrs: Any) -> None:
        calls.append(sorted(attrs or ()))

    def read(s: Session) -> list[list[str]]:
        held = s.get(Account, 1)
        calls.clear()
        stmt = select(Account).where(Account.id == 1).options(with_cache())
        assert s.scalars(stmt).one() is held
        return list(calls)

    for env in make_env(engine, cache, Base.metadata, seed):
        event.listen(Account, "refresh", on_refresh)
        try:
            with Session(env.engine) as s:
                uncached = read(s)
            seen = []
            for _ in range(2):  # (the second time, its entry is in the cache)
                with env.Session() as s:
                    seen.append(read(s))
                env.cache.wait_for_fills()
        finally:
            event.remove(Account, "refresh", on_refresh)
        assert uncached == [["notes"]]
        assert seen == [uncached, uncached]


def test_a_refresh_listener_leaves_session_get_hits_alone(
    engine: sa.Engine, cache_url: str, namespace: str
) -> None:
    """``session.get`` of a row the Session does not hold refreshes nothing: a
    ``refresh`` listener is no reason to load it from the database."""
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Account)
    calls: list[Any] = []

    def on_refresh(target: Account, context: Any, attrs: Any) -> None:
        calls.append(target)

    for env in make_env(engine, cache, Base.metadata, seed):
        event.listen(Account, "refresh", on_refresh)
        try:
            with env.Session() as s:
                s.get(Account, 2)  # a miss: fills the entry
            env.cache.wait_for_fills()
            env.log.clear()
            with env.Session() as s:
                got = s.get(Account, 2)
                assert got is not None
                assert got.balance == 20
        finally:
            event.remove(Account, "refresh", on_refresh)
        assert env.log.statements == []  # a hit
        assert calls == []  # (as a database load: nothing to refresh)


# -- processed values ------------------------------------------------------------------


def item_values(cls: type[Any]) -> Callable[[Session], Any]:
    def read(s: Session) -> Any:
        item = s.scalars(select(cls).options(with_cache())).one()
        return [(type(v).__name__, v) for v in (item.flag, item.color, item.price)]

    return read


def test_two_mappings_of_one_table_do_not_share_processed_values(env: Env) -> None:
    """``select(ItemRow)`` and ``select(Item)`` compile to the same SQL; the values a
    hit builds objects from are processed by the class's column types (Integer or
    Boolean, String or Enum, float or Decimal), so they are not one entry."""
    with Session(env.engine) as s:
        expected = item_values(Item)(s)
    with env.Session() as s:
        other = item_values(ItemRow)(s)  # fills the entry of the other mapping
    env.cache.wait_for_fills()
    assert other[1] == ("str", "BLUE")
    uncached, miss, hit = uncached_miss_hit(env, item_values(Item))
    assert expected[1] == ("Color", Color.BLUE)
    assert uncached == miss == hit == expected


# -- unique() ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Card, Label], ids=["dataclass", "value-equal"])
def test_unique_tells_objects_apart_by_identity(env: Env, cls: type[Any]) -> None:
    """The ORM's ``unique()`` of an entity select compares objects by identity: a mapped
    dataclass is unhashable, and two value-equal objects are two rows."""

    def read(s: Session) -> Any:
        stmt = select(cls).order_by(cls.id).options(with_cache())
        legacy = s.query(cls).order_by(cls.id).options(with_cache())  # unique() inside
        return [o.id for o in s.scalars(stmt).unique().all()], [o.id for o in legacy.all()]

    uncached, miss, hit = uncached_miss_hit(env, read)
    assert uncached == ([1, 2], [1, 2])
    assert miss == hit == uncached


@pytest.fixture
def registered_env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Card)
    yield from make_env(engine, cache, Base.metadata, seed)


def test_unique_of_an_entity_cache_hit(registered_env: Env) -> None:
    """A primary-key select served from the entity cache is a Result like the ORM's."""

    def read(s: Session) -> Any:
        stmt = select(Card).where(Card.id == 2).options(with_cache())
        return [o.name for o in s.scalars(stmt).unique().all()]

    hits = registered_env.cache.stats["entity.hit"]
    uncached, miss, hit = uncached_miss_hit(registered_env, read)
    assert uncached == miss == hit == ["b"]
    assert registered_env.cache.stats["entity.hit"] == hits + 1


# -- bind values changed in place ---------------------------------------------------------


@pytest.mark.parametrize("how", ["bindparam", "params"])
def test_a_list_changed_in_place_is_a_new_key(env: Env, how: str) -> None:
    """SQLAlchemy reads a bind's value at each execution: after ``ids.append(3)`` a
    reused statement object asks for three rows, also on the short way."""
    ids = [1, 2]
    if how == "bindparam":
        in_ids = Account.id.in_(bindparam("ids", value=ids, expanding=True))
        stmt = select(Account).where(in_ids).order_by(Account.id).options(with_cache())
    else:
        in_ids = Account.id.in_(bindparam("ids", expanding=True))
        stmt = (
            select(Account).where(in_ids).order_by(Account.id).options(with_cache()).params(ids=ids)
        )
    seen = []
    for _ in range(2):
        with env.Session() as s:
            seen.append([a.id for a in s.scalars(stmt)])
        env.cache.wait_for_fills()
    ids.append(3)
    for _ in range(2):
        with env.Session() as s:
            seen.append([a.id for a in s.scalars(stmt)])
        env.cache.wait_for_fills()
    assert seen == [[1, 2], [1, 2], [1, 2, 3], [1, 2, 3]]
    env.log.clear()
    ids.append(4)
    with env.Session() as s:
        assert [a.id for a in s.scalars(stmt)] == [1, 2, 3]  # id 4 does not exist
    assert len(env.log.selects) == 1  # a miss: a key of its own


# -- Enum classes inside ARRAY --------------------------------------------------------------


class Mood(enum.Enum):
    HAPPY = "h"
    SAD = "s"


class _Arrays(DeclarativeBase):
    pass


class Diary(_Arrays):
    __tablename__ = "sac_fid_diaries"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    moods: Mapped[list[Mood]] = mapped_column(postgresql.ARRAY(sa.Enum(Mood, name="sac_mood")))


@pytest.fixture
def array_env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:

    def seed_diary(s: Session) -> None:
        s.add(Diary(id=1, moods=[Mood.HAPPY, Mood.SAD]))
        s.commit()

    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache, _Arrays.metadata, seed_diary)


@pytest.mark.parametrize("dialect_name", ["postgresql"])  # ARRAY is PostgreSQL's
def test_enum_inside_array_decodes_in_a_fresh_process(array_env: Env) -> None:
    """A process that never encoded a ``Mood`` itself still decodes another process's
    entry of ``ARRAY(Enum(Mood))`` values: the shape registers the Enum for the codec."""
    env = array_env
    with env.Session() as s:
        assert s.scalars(select(Diary).options(with_cache())).one().moods == [
            Mood.HAPPY,
            Mood.SAD,
        ]
    env.cache.wait_for_fills()
    # As in a process that has not met the statement or the Enum class yet:
    query_shape._shapes.clear()
    del codec._ENUMS[codec._ENUM_NAMES.pop(Mood)]
    env.log.clear()
    with env.Session() as s:
        diary = s.scalars(select(Diary).options(with_cache())).one()
    assert diary.moods == [Mood.HAPPY, Mood.SAD]
    assert env.log.selects == [], "the entry could not be decoded: a miss"
