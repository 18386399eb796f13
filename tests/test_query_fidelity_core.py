"""A cached statement behaves as it does without the cache (audit h1): errors, pickled
columns, and what a Core select's result says (``rowcount``, rows looked up by the
executed statement's own column objects)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import bindparam, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_cache
from sa_cache import NotCacheable, with_cache
from sa_cache.result_types import unpickles


class Base(DeclarativeBase):
    pass


class Plain(Base):
    __tablename__ = "sac_fidc_plain"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))


class LoadsPickle(sa.TypeDecorator[Any]):
    """Bytes in general; a ``PickleType`` on each dialect (``load_dialect_impl``)."""

    impl = sa.LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> Any:
        return dialect.type_descriptor(sa.PickleType())


DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb")
VARIANT = sa.LargeBinary().with_variant(sa.PickleType(), *DIALECTS)


class Blob(Base):
    __tablename__ = "sac_fidc_blobs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    variant: Mapped[Any] = mapped_column(VARIANT)
    loaded: Mapped[Any] = mapped_column(LoadsPickle())


def seed(session: Session) -> None:
    session.add_all([Plain(id=i, name=f"n{i}") for i in range(1, 8)])
    session.add(Blob(id=1, variant={"a": 1}, loaded={"b": 2}))
    session.commit()


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache, Base.metadata, seed)


def reads(env: Env, read: Callable[[Session], Any], times: int = 3) -> tuple[Any, list[Any]]:
    """What ``read`` returns in a plain Session, and in ``times`` caching ones (a miss,
    then hits)."""
    with Session(env.engine) as s:
        uncached = read(s)
    cached = []
    for _ in range(times):
        with env.Session() as s:
            cached.append(read(s))
        env.cache.wait_for_fills()
    return uncached, cached


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("entity", [True, False], ids=["entity", "columns"])
def test_missing_bind_value_raises_sqlalchemys_own_error(env: Env, entity: bool) -> None:
    """SQLAlchemy wraps "a value is required for bind parameter" in a StatementError
    naming the SQL; the cache steps aside so that it does so."""
    columns = (Plain,) if entity else (Plain.id, Plain.name)
    stmt = select(*columns).where(Plain.id == bindparam("x")).options(with_cache(strict=True))

    def read(s: Session) -> Any:
        with pytest.raises(sa.exc.StatementError) as raised:
            s.execute(stmt).all()
        return type(raised.value), type(raised.value.orig), raised.value.statement

    uncached, cached = reads(env, read)
    assert uncached[0] is sa.exc.StatementError
    assert cached == [uncached] * 3


# -- PickleType however reached ------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "dialect"),
    [
        (VARIANT, sqlite.dialect()),
        (VARIANT, postgresql.dialect()),
        (VARIANT, mysql.dialect()),
        (LoadsPickle(), sqlite.dialect()),
        (postgresql.ARRAY(sa.PickleType()), postgresql.dialect()),
    ],
    ids=["variant-sqlite", "variant-postgresql", "variant-mysql", "load_dialect_impl", "array"],
)
def test_pickle_type_reached_otherwise_is_found(type_: Any, dialect: sa.Dialect) -> None:
    column = sa.Column("value", type_)
    table = sa.Table("sac_fidc_unit", sa.MetaData(), sa.Column("id", sa.Integer), column)
    compiled = select(table.c.id, column).compile(dialect=dialect)
    assert unpickles(compiled) is not None
    assert unpickles(select(table.c.id).compile(dialect=dialect)) is None


@pytest.mark.parametrize("attr", ["variant", "loaded"])
def test_pickled_column_is_never_cached(env: Env, attr: str) -> None:
    """A hit would run ``pickle.loads`` on bytes read from the store (DESIGN rule 7):
    ``strict=True`` raises NotCacheable, otherwise every read goes to the database."""
    column = getattr(Blob, attr)
    for stmt in (select(Blob.id, column), select(Blob)):
        with env.Session() as s, pytest.raises(NotCacheable, match="PickleType"):
            s.execute(stmt.options(with_cache(strict=True))).all()
        for _ in range(2):
            with env.Session() as s:
                s.execute(stmt.options(with_cache())).all()
            env.cache.wait_for_fills()
        env.log.clear()
        with env.Session() as s:
            row = s.execute(stmt.options(with_cache())).one()
            values = (row[1],) if len(row) == 2 else (row[0].variant, row[0].loaded)
        assert len(env.log.selects) == 1, "served from the cache"
        assert values in [({"a": 1},), ({"b": 2},), ({"a": 1}, {"b": 2})]


# -- Core results ----------------------------------------------------------------------------


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])  # (sqlite3: always -1)
def test_rowcount_of_a_core_select_is_its_own(env: Env) -> None:
    """``rowcount`` of a Core SELECT is the number of rows this execution returned, as
    PostgreSQL's and MariaDB's drivers report it; never another execution's."""
    table = Plain.__table__

    def read(s: Session) -> Any:
        out = []
        for below in (3, 7, 3):
            result = s.execute(select(table.c.id).where(table.c.id < below).options(with_cache()))
            out.append((result.rowcount, len(result.all())))
        return out

    uncached, cached = reads(env, read)
    assert uncached == [(2, 2), (6, 6), (2, 2)]
    assert cached == [uncached] * 3


def test_rows_by_the_executed_statements_own_columns(env: Env) -> None:
    """A statement built anew per request shares its SQLAlchemy cache key (and entry)
    with the last one; its rows are looked up by its own column objects, as SQLAlchemy
    adapts a reused compiled statement's result to the statement executed."""
    table = Plain.__table__

    def read(s: Session) -> Any:
        sq = select(table.c.id, table.c.name).where(table.c.id < 4).subquery()
        stmt = select(sq.c.id, sq.c.name).order_by(sq.c.id).options(with_cache())
        return [(row._mapping[sq.c.id], row._mapping[sq.c.name]) for row in s.execute(stmt)]

    uncached, cached = reads(env, read)
    assert uncached == [(1, "n1"), (2, "n2"), (3, "n3")]
    assert cached == [uncached] * 3
