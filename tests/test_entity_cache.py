"""Entity cache with write-through: cache.register(), session.get served from the entry."""

from __future__ import annotations

import datetime
import decimal
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env, read_paused_after_load, transactional_engine
from models import Address, Base, Country, Tier, User
from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import sa_cache
from sa_cache import entity as entity_module
from sa_cache.backends.base import NO_VALUE


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=300)
    cache.register(Country, ttl=3600)
    yield from make_env(engine, cache)


def warm(env: Env, *uids: int) -> None:
    with env.Session() as s:
        for uid in uids:
            assert s.get(User, uid) is not None


def test_register_validates() -> None:
    cache = sa_cache.Cache.from_url("memory://")
    cache.register(User, ttl=60)
    cache.register(User, ttl=60)  # same settings: fine
    with pytest.raises(ValueError, match="already registered"):
        cache.register(User, ttl=30)
    with pytest.raises(TypeError, match="mapped class"):
        cache.register(object)
    with pytest.raises(ValueError, match="write must be one of"):
        cache.register(Country, write="sideways")

    class Local(DeclarativeBase):
        pass

    @cache.register(ttl=10, write="invalidate")
    class Thing(Local):
        __tablename__ = "sac_things"
        id: Mapped[int] = mapped_column(primary_key=True)

    cache.register(Thing, ttl=10, write="invalidate")
    assert cache.entities[sa.inspect(Thing)].write == "invalidate"
    with pytest.raises(TypeError, match="mapped class"):
        cache.register(Local)
    with pytest.raises(ValueError, match="write='behind' is not available"):
        cache.register(Address, write="behind")


def test_the_decorator_takes_a_class_whose_relationships_name_later_classes(
    tmp_path: Path,
) -> None:
    """``@cache.register`` runs when the class is mapped, before the classes its
    relationships name exist: configuring the mappers then failed (and left them failed
    for good). It is registered once they are configured, and serves reads."""
    cache = sa_cache.Cache.from_url("memory://")

    class Local(DeclarativeBase):
        pass

    @cache.register(ttl=60)
    class Author(Local):
        __tablename__ = "sac_authors"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(20))
        books: Mapped[list[Book]] = relationship(back_populates="author")

    class Book(Local):  # defined after the decorator ran
        __tablename__ = "sac_books"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        author_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_authors.id"))
        author: Mapped[Author] = relationship(back_populates="books")

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'authors.db'}")
    Local.metadata.create_all(engine)
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        with factory() as s:
            s.add(Author(id=1, name="ann", books=[Book(id=1)]))
            s.commit()
        assert sa.inspect(Author) in cache.entities
        assert sa.inspect(Book) not in cache.entities
        before = cache.stats["entity.hit"]
        with factory() as s:  # (written through at the commit)
            author = s.get(Author, 1)
            assert author is not None
            assert author.name == "ann"
            assert [b.id for b in author.books] == [1]
        assert cache.stats["entity.hit"] == before + 1
    finally:
        engine.dispose()
        cache.close()


def test_decorated_classes_are_registered_at_the_first_look_at_the_entities() -> None:
    """Code that consults ``cache.entities`` before anything configured the mappers (a
    worker that only imported the app; a fresh process's first ``session.get``) sees
    the decorated classes: the look configures them. A decorated class that is refused
    raises at every look, never leaving the class silently uncached."""
    cache = sa_cache.Cache.from_url("memory://")

    class Local(DeclarativeBase):
        pass

    @cache.register(ttl=60)
    class Gadget(Local):
        __tablename__ = "sac_gadgets"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    class Other(DeclarativeBase):  # (another service's models, say)
        pass

    @cache.register(ttl=60)
    class Gizmo(Other):  # the same table: refused
        __tablename__ = "sac_gadgets"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    assert not sa.inspect(Gadget).configured
    depths = []
    for _ in range(3):
        with pytest.raises(ValueError, match="both mapped to table") as raised:
            cache.entities  # noqa: B018
        depths.append(len(traceback.extract_tb(raised.value.__traceback__)))
    assert depths[1] == depths[2]  # a new exception each time: no growing traceback
    assert sa.inspect(Gadget) in cache._entities
    assert sa.inspect(Gizmo) not in cache._entities
    cache.close()


def test_decorated_classes_with_a_key_version_and_write_behind(
    redis_url: str, namespace: str
) -> None:
    """Registering a decorated write-behind class publishes its shape for the key
    version, which looks at ``cache.entities`` while the others wait: each registered
    once (it raised "list.remove(x): x not in list")."""
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace, version="v7")

    class Local(DeclarativeBase):
        pass

    @cache.register(write="behind")
    class Tally(Local):
        __tablename__ = "sac_dec_tallies"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        n: Mapped[int]

    class Own(DeclarativeBase):
        pass

    @cache.register(ttl=60)
    class Plain(Own):
        __tablename__ = "sac_dec_plain"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    try:
        sa.orm.configure_mappers()
        assert {m.class_ for m in cache.entities} == {Tally, Plain}
    finally:
        cache.close()


def test_a_look_at_the_entities_before_the_related_class_exists(
    redis_url: str, namespace: str
) -> None:
    """Set-up that reads the registered models (``write_behind.configure``, a key
    version's heartbeat) between a decorated class and the class its relationship names
    must not configure the mappers then (they would fail for good)."""
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)

    class Local(DeclarativeBase):
        pass

    @cache.register(ttl=60)
    class Shelf(Local):
        __tablename__ = "sac_shelves"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        items: Mapped[list[Item]] = relationship()

    cache.write_behind.configure(partitions=4)  # (a settings module imported here)

    class Item(Local):
        __tablename__ = "sac_shelf_items"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        shelf_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_shelves.id"))

    try:
        sa.orm.configure_mappers()
        assert sa.inspect(Shelf) in cache.entities
    finally:
        cache.close()


def test_the_first_look_configures_only_the_decorated_classes_registries() -> None:
    """Another registry of the process whose relationship names a class not imported
    yet must not be configured by sa_cache (SQLAlchemy would mark it failed for good);
    nor may a look from another thread miss a class being registered meanwhile."""
    cache = sa_cache.Cache.from_url("memory://")

    class Shop(DeclarativeBase):
        pass

    @cache.register(ttl=60)
    class Product(Shop):
        __tablename__ = "sac_shop_products"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    class Billing(DeclarativeBase):
        pass

    class Invoice(Billing):
        __tablename__ = "sac_invoices"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        lines: Mapped[list[Line]] = relationship()

    seen: list[bool] = []
    slow = threading.Event()
    real_enums = entity_module.register_enums

    def slow_enums(mapper: Any) -> None:  # the registration window, held open
        slow.set()
        time.sleep(0.3)
        real_enums(mapper)

    entity_module.register_enums = slow_enums  # type: ignore[assignment]
    try:
        first = threading.Thread(target=lambda: cache.entities)
        first.start()
        assert slow.wait(10)
        seen.append(sa.inspect(Product) in cache.entities)  # while the first registers
        first.join(10)
    finally:
        entity_module.register_enums = real_enums
    assert seen == [True]

    class Line(Billing):  # imported later
        __tablename__ = "sac_invoice_lines"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        invoice_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_invoices.id"))

    sa.inspect(Invoice).registry.configure()  # Billing was left alone: it configures
    assert sa.inspect(Invoice).relationships["lines"].mapper is sa.inspect(Line)
    cache.close()


def test_get_is_served_without_sql(env: Env) -> None:
    warm(env, 1, 2)
    env.log.clear()
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        assert env.log.statements == []
        assert (user.name, user.tier, user.balance) == ("user1", Tier.pro, decimal.Decimal("10.50"))
        assert user.created == datetime.datetime(2024, 1, 1, 12, 30, 15, 250000)
        assert user.prefs == {"n": 1, "tags": ["x", "y"]}
        assert sa.inspect(user).persistent
        assert not s.dirty
        assert s.get(User, 1) is user
        assert s.scalars(select(User).where(User.id == 2)).one().name == "user2"
        assert env.log.statements == []
        assert [a.id for a in user.addresses] == [11, 12]  # lazy load still works
        user.name = "edited"
        s.commit()
    assert env.cache.stats["entity.hit"] >= 2


def test_missing_row_is_none_and_not_cached_as_a_row(env: Env) -> None:
    with env.Session() as s:
        assert s.get(User, 999) is None
        assert s.get(User, 999) is None


def test_write_through_is_visible_without_select(env: Env) -> None:
    warm(env, 1)
    with env.Session() as a:
        user = a.get(User, 1)
        assert user is not None
        user.name = "from A"
        user.balance = decimal.Decimal("1.25")
        a.add(
            User(
                id=7,
                name="new",
                created=datetime.datetime(2024, 5, 5),
                balance=decimal.Decimal("3.00"),
            )
        )
        a.commit()
    env.log.clear()
    with env.Session() as b:
        seen = b.get(User, 1)
        assert seen is not None
        assert (seen.name, seen.balance) == ("from A", decimal.Decimal("1.25"))
        created = b.get(User, 7)
        assert created is not None
        assert created.name == "new"
        assert created.tier is Tier.free  # the Python-side default was part of the image
    assert env.log.statements == []
    assert env.cache.stats["entity.write_through"] == 2


def test_delete_removes_the_entry(env: Env) -> None:
    warm(env, 3)
    with env.Session() as s:
        s.execute(delete(Address).where(Address.user_id == 3))
        s.delete(s.get(User, 3))
        s.commit()
    with env.Session() as s:
        assert s.get(User, 3) is None


def test_invalidate_mode_deletes_then_refills(engine: sa.Engine, namespace: str) -> None:
    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    cache.register(User, write="invalidate")
    for env in make_env(engine, cache):
        warm(env, 1)
        with env.Session() as s:
            s.get(User, 1).name = "changed"  # type: ignore[union-attr]
            s.commit()
        env.log.clear()
        with env.Session() as s:
            assert s.get(User, 1).name == "changed"  # type: ignore[union-attr]
        assert len(env.log.selects) == 1
        env.log.clear()
        with env.Session() as s:
            assert s.get(User, 1).name == "changed"  # type: ignore[union-attr]
        assert env.log.statements == []


def test_many_to_one_lazy_load_uses_the_entity_entry(env: Env) -> None:
    with env.Session() as s:
        assert s.get(Country, "DE") is not None
    with env.Session() as s:
        user = s.scalars(select(User).where(User.name == "user1")).one()
        env.log.clear()
        assert user.country is not None
        assert user.country.name == "Germany"
        assert env.log.statements == []


def test_bypass_options(env: Env) -> None:
    warm(env, 1)
    with env.Session() as s:
        env.log.clear()
        s.get(User, 1, populate_existing=True)
        s.get(User, 1, with_for_update=True)
        assert len(env.log.selects) == 2


@pytest.mark.parametrize("kind", ["bulk_update", "bulk_delete", "bulk_insert", "core", "by_pk"])
def test_bulk_writes_invalidate_entries(env: Env, kind: str) -> None:
    warm(env, 2, 3)
    with env.Session() as s:
        if kind == "bulk_update":
            s.execute(
                update(User).where(User.id >= 2).values(name="bulk"),
                execution_options={"synchronize_session": False},
            )
        elif kind == "bulk_delete":
            s.execute(delete(Address).where(Address.user_id >= 2))
            s.execute(
                delete(User).where(User.id >= 2), execution_options={"synchronize_session": "fetch"}
            )
        elif kind == "bulk_insert":
            s.execute(delete(Address).where(Address.user_id >= 2))
            s.execute(delete(User).where(User.id >= 2))
            s.execute(
                insert(User),
                [
                    {
                        "id": i,
                        "name": "bulk",
                        "created": datetime.datetime(2024, 1, 1),
                        "balance": 1,
                    }
                    for i in (2, 3)
                ],
            )
        elif kind == "core":
            s.connection().execute(User.__table__.update().values(name="bulk"))
        else:
            s.execute(update(User), [{"id": 2, "name": "bulk"}, {"id": 3, "name": "bulk"}])
        s.commit()
    with env.Session() as s:
        for uid in (2, 3):
            user = s.get(User, uid)
            if kind == "bulk_delete":
                assert user is None
            else:
                assert user is not None
                assert user.name == "bulk"


def user_key(env: Env, pk: int) -> str:
    return env.cache.entities[sa.inspect(User)].key(env.cache, [pk])


def test_savepoints(env: Env) -> None:
    """(SQLite: with pysqlite's SAVEPOINT recipe, without which the release of a first
    SAVEPOINT does commit: `test_sqlite_savepoints`.)"""
    warm(env, 1, 2, 3)
    engine = transactional_engine(env.engine)
    recipe = sessionmaker(engine, class_=sa_cache.CachingSession, cache=env.cache)
    with recipe() as s:
        with s.begin_nested():
            s.get(User, 1).name = "released"  # type: ignore[union-attr]
        sp = s.begin_nested()
        s.get(User, 2).name = "rolled back"  # type: ignore[union-attr]
        s.flush()
        sp.rollback()
        outer = s.begin_nested()
        inner = s.begin_nested()
        s.get(User, 3).name = "inner released, outer rolled back"  # type: ignore[union-attr]
        inner.commit()
        outer.rollback()
        # nothing reaches the cache before the commit (only the flush's own tombstones)
        entries = env.cache.fetch([user_key(env, i) for i in (1, 2, 3)])
        assert all(raw is NO_VALUE or b"released" not in raw for raw in entries)
        s.commit()
    if engine is not env.engine:
        engine.dispose()
    env.log.clear()
    with env.Session() as s:
        names = [s.get(User, i).name for i in (1, 2, 3)]  # type: ignore[union-attr]
    assert names == ["released", "user2", "user3"]
    assert env.log.statements == []
    with env.Session() as s:
        s.get(User, 1).name = "never"  # type: ignore[union-attr]
        s.flush()
        s.rollback()
    with env.Session() as s:
        assert s.get(User, 1).name == "released"  # type: ignore[union-attr]


@pytest.mark.parametrize("expire_on_commit", [True, False])
def test_expire_on_commit_both_ways(env: Env, expire_on_commit: bool) -> None:
    with env.Session(expire_on_commit=expire_on_commit) as s:
        user = s.get(User, 2)
        assert user is not None
        user.name = "x"
        s.commit()
        assert user.name == "x"
    with env.Session() as s:
        assert s.get(User, 2).name == "x"  # type: ignore[union-attr]


def test_fill_race_never_stores_stale(env: Env) -> None:
    """A reader paused after its database load while a writer commits the same row."""

    def read() -> str:
        with env.Session() as s:
            return s.get(User, 1).name  # type: ignore[union-attr]

    def write() -> None:
        with env.Session() as w:
            w.get(User, 1).name = "newer"  # type: ignore[union-attr]
            w.commit()

    assert read_paused_after_load(env.engine, read, write) == "user1"
    with env.Session() as s:
        assert s.get(User, 1).name == "newer"  # type: ignore[union-attr]


def test_late_writer_never_overwrites_a_newer_image(env: Env) -> None:
    """Writer 1 commits first but reaches the cache after writer 2 (paused on purpose)."""
    warm(env, 1)
    committed, go_on = threading.Event(), threading.Event()

    def writer_one() -> None:
        with env.Session() as s:
            sa.event.listen(s, "after_commit", lambda _s: (committed.set(), go_on.wait(10)))
            s.get(User, 1).name = "older"  # type: ignore[union-attr]
            s.commit()

    t = threading.Thread(target=writer_one)
    t.start()
    assert committed.wait(10)
    with env.Session() as s:
        s.get(User, 1).name = "newest"  # type: ignore[union-attr]
        s.commit()
    go_on.set()
    t.join(10)
    with env.Session() as s:
        assert s.get(User, 1).name == "newest"  # type: ignore[union-attr]


def test_server_computed_columns_are_never_stale(engine: sa.Engine, namespace: str) -> None:
    class LocalBase(DeclarativeBase):
        pass

    class Stamped(LocalBase):
        __tablename__ = "sac_stamped"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(20))
        revision: Mapped[int] = mapped_column(server_default="1", onupdate=sa.text("revision + 1"))

    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    cache.register(Stamped)
    LocalBase.metadata.drop_all(engine)
    LocalBase.metadata.create_all(engine)
    factory = sa.orm.sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        with factory() as s:
            s.add(Stamped(id=1, name="a"))
            s.commit()
        with factory() as s:
            assert s.get(Stamped, 1).revision == 1  # type: ignore[union-attr]
        with factory() as s:
            s.get(Stamped, 1).name = "b"  # type: ignore[union-attr]
            s.commit()
        with factory() as s:
            row = s.get(Stamped, 1)
            assert row is not None
            assert (row.name, row.revision) == ("b", 2)
    finally:
        LocalBase.metadata.drop_all(engine)


def test_unreachable_store_never_breaks_reads_or_commits(engine: sa.Engine, namespace: str) -> None:
    cache = sa_cache.Cache.from_url("redis://127.0.0.1:1/0", namespace=namespace)
    cache.register(User)
    for env in make_env(engine, cache):
        with env.Session() as s:
            s.get(User, 1).name = "x"  # type: ignore[union-attr]
            s.commit()
        with env.Session() as s:
            assert s.get(User, 1).name == "x"  # type: ignore[union-attr]
        assert cache.stats["invalidate.deferred"] >= 1


def test_plain_base_metadata_untouched() -> None:
    assert "sac_stamped" not in Base.metadata.tables


def test_composite_key_and_identity_token(engine: sa.Engine, namespace: str) -> None:
    class LocalBase(DeclarativeBase):
        pass

    class Price(LocalBase):
        __tablename__ = "sac_prices"
        region: Mapped[str] = mapped_column(sa.String(5), primary_key=True)
        sku: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        amount: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(8, 2))

    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    cache.register(Price)
    LocalBase.metadata.drop_all(engine)
    LocalBase.metadata.create_all(engine)
    factory = sa.orm.sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        with factory() as s:
            one, two = decimal.Decimal("1.00"), decimal.Decimal("2.00")  # as stored
            s.add_all(
                [Price(region="eu", sku=1, amount=one), Price(region="us", sku=1, amount=two)]
            )
            s.commit()
        for _ in range(2):
            with factory() as s:
                assert s.get(Price, ("eu", 1)).amount == decimal.Decimal("1.00")  # type: ignore[union-attr]
                assert s.get(Price, {"region": "us", "sku": 1}).amount == 2  # type: ignore[union-attr]
        assert cache.stats["entity.hit"] == 4  # written through at insert
        for _ in range(2):
            with factory() as s:
                tokened = s.get(Price, ("eu", 1), identity_token="tenant-a")
                assert tokened is not None
                assert sa.inspect(tokened).identity_token == "tenant-a"
        assert cache.stats["entity.hit"] == 5  # the token is part of the key: one miss
        spec = cache.entities[sa.inspect(Price)]
        assert spec.key(cache, ("eu", 1), "tenant-a") != spec.key(cache, ("eu", 1))
    finally:
        LocalBase.metadata.drop_all(engine)


def test_get_sees_its_own_uncommitted_writes(env: Env) -> None:
    """session.get after a bulk UPDATE in the same transaction reads the database."""
    warm(env, 2)
    with env.Session() as s:
        s.execute(
            update(User).where(User.id == 2).values(name="flushed, not committed"),
            execution_options={"synchronize_session": False},
        )
        assert s.get(User, 2).name == "flushed, not committed"  # type: ignore[union-attr]
        s.rollback()
    with env.Session() as s:
        assert s.get(User, 2).name == "user2"  # type: ignore[union-attr]
    assert env.cache.stats["entity.hit"] >= 1


def test_get_fast_path_serves_without_building_a_select(env: Env) -> None:
    warm(env, 1)
    with env.Session() as s:
        env.log.clear()
        user = s.get(User, 1)
        assert user is not None
        assert s.get(User, 1) is user  # the identity map answers the second time
        assert s.get(User, (1,)) is user
        assert s.get(User, {"id": 1}) is user
    assert env.log.statements == []
    with env.Session() as s, pytest.raises(sa.exc.InvalidRequestError):
        s.get(User, (1, 2))  # the ordinary path raises the ordinary error


@pytest.mark.parametrize("flushes", [1, 2])
def test_write_through_of_an_object_loaded_before_another_commit(env: Env, flushes: int) -> None:
    """Session B loaded the row before Session A committed a change to another column;
    B's UPDATE only sets its own column, so B's object does not hold the row the
    database now has: its image must not reach the cache (not after a second flush
    either: the first one decided)."""
    warm(env, 1)
    with env.Session() as b:
        user_b = b.get(User, 1)  # the row as it was
        assert user_b is not None
        with env.Session() as a:
            a.get(User, 1).name = "from-a"  # type: ignore[union-attr]
            a.commit()
        user_b.balance = decimal.Decimal("77.00")
        if flushes == 2:
            b.flush()
            user_b.balance = decimal.Decimal("77.00") + 0
            user_b.prefs = {"second": "flush"}
        b.commit()
    with Session(env.engine) as plain:
        row = plain.get(User, 1)
        assert row is not None
        assert (row.name, row.balance) == ("from-a", decimal.Decimal("77.00"))
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        assert (user.name, user.balance) == ("from-a", decimal.Decimal("77.00"))
        assert user.prefs == ({"second": "flush"} if flushes == 2 else row.prefs)


@pytest.mark.parametrize("then", ["update", "delete"])
def test_late_insert_image_never_resurrects_or_overwrites(env: Env, then: str) -> None:
    """Writer 1 inserts a row and commits, but reaches the cache last (paused on purpose);
    meanwhile writer 2 loads the row from the database (no fill), updates or deletes it
    and commits. Writer 1's image, written over an empty entry, must not land."""
    committed, go_on = threading.Event(), threading.Event()

    def inserter() -> None:
        with env.Session() as s:
            sa.event.listen(s, "after_commit", lambda _s: (committed.set(), go_on.wait(10)))
            s.add(
                User(
                    id=99, name="inserted", created=datetime.datetime(2024, 5, 1),
                    balance=decimal.Decimal("1.00"),
                )
            )  # fmt: skip
            s.commit()

    t = threading.Thread(target=inserter)
    t.start()
    try:
        assert committed.wait(10)
        with env.Session() as s:  # a non-key select: the entity cache is not filled
            user = s.scalars(sa.select(User).where(User.name == "inserted")).one()
            if then == "update":
                user.name = "updated"
            else:
                s.delete(user)
            s.commit()
    finally:
        go_on.set()
        t.join(10)
    with env.Session() as s:
        user = s.get(User, 99)
        name = user.name if user is not None else None
        assert name == ("updated" if then == "update" else None)


def test_write_through_after_a_bulk_write_of_the_row(env: Env) -> None:
    """A bulk UPDATE changes rows behind the ORM's back and only moves the table's rows
    generation: an entry still holding the object's old values no longer vouches for it."""
    warm(env, 1)
    with env.Session() as b:
        user_b = b.get(User, 1)  # from the entry
        assert user_b is not None
        with env.Session() as other:
            other.execute(sa.update(User).where(User.id == 1).values(name="bulk"))
            other.commit()
        user_b.balance = decimal.Decimal("77.00")
        b.commit()
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        assert (user.name, user.balance) == ("bulk", decimal.Decimal("77.00"))


def test_entry_keys_are_remembered_only_where_equal_means_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row's entry key is remembered per key version for int, str and UUID keys; values
    equal across types (1, 1.0, True, Decimal(1)) keep the keys their reprs give."""
    from sa_cache import entity

    cache = sa_cache.Cache.from_url("memory://", namespace="keys-memo")
    try:
        cache.register(User, ttl=60)
        spec = cache.entities[sa.inspect(User)]
        for value in (True, 1.0, decimal.Decimal(1), 1):  # any order: the same answers
            assert spec.key(cache, [value]) == spec._make_key(cache, [value], None)
        assert len({spec.key(cache, [v]) for v in (True, 1.0, decimal.Decimal(1), 1)}) == 4
        assert spec.key(cache, [1]) is spec.key(cache, [1])  # remembered
        assert spec.key(cache, [1], "shard-a") != spec.key(cache, [1])
        first = spec.key(cache, [1])
        cache.use_version("v-next")
        assert spec.key(cache, [1]) != first  # another key version, another key
        assert spec.key(cache, [1]).startswith(cache.keys.data_prefix())
        monkeypatch.setattr(entity, "KEYS_KEPT", 3)
        for i in range(10):
            spec.key(cache, [i])
        assert len(spec._keys) <= 3  # bounded
    finally:
        cache.close()
