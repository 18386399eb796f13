"""Keys are exact for the values the database gets: the types of the bind parameters
count, not only their values before processing (DESIGN rule 4).

Two statements can compile to the same SQL with the same parameter names and the same
values *before* bind processing, and still send different values: a ``TypeDecorator``
turns 5 into 500. Each test here failed before its fix (audit d1-03: both statements
shared one entry, whichever filled last answered both), but for two mappings of one
table selecting whole objects, whose direct entries were already keyed by mapped class.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import bindparam, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_cache
from sa_cache import with_cache
from sa_cache.query import query_key
from sa_cache.query_shape import _shapes


class Base(DeclarativeBase):
    pass


class Cents(sa.TypeDecorator[int]):
    """Whole currency units in Python, cents in the database (a classic TypeDecorator)."""

    impl = sa.Integer
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value * 100

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value // 100


class Reversed(sa.TypeDecorator[str]):
    """A string stored backwards: the value sent is reversed."""

    impl = sa.String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value[::-1]


class Product(Base):
    """The application's mapping: ``price`` in whole units."""

    __tablename__ = "sac_bt_products"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    price: Mapped[int] = mapped_column(Cents)
    code: Mapped[str] = mapped_column(sa.String(20))


class _Reporting(DeclarativeBase):  # another module's mapping of the same table
    pass


class ProductRow(_Reporting):
    """A reporting mapping of the same table: ``price`` as stored (cents)."""

    __tablename__ = "sac_bt_products"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    price: Mapped[int] = mapped_column(sa.Integer)
    code: Mapped[str] = mapped_column(sa.String(20))


def seed(s: Session) -> None:
    s.add_all([Product(id=1, price=5, code="abc"), Product(id=2, price=500, code="cba")])
    s.commit()  # prices stored: 500 and 50000 cents


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache, Base.metadata, seed)


def _same_sql_other_binds() -> dict[str, tuple[Any, Any]]:
    """Pairs of statements with one SQL string and one set of values before bind
    processing, which select different rows: columns (the ORM path, raw rows) and
    whole objects (the direct path, processed values)."""
    backwards = bindparam("c", "cba", type_=Reversed)
    plain = bindparam("c", "cba", type_=sa.String(20))
    return {
        # two mappings of one table: Cents sends 500, Integer sends 5
        "column_types": (
            select(Product.id).where(Product.price == 5),
            select(ProductRow.id).where(ProductRow.price == 5),
        ),
        "column_types_entities": (
            select(Product).where(Product.price == 5),
            select(ProductRow).where(ProductRow.price == 5),
        ),
        # one mapping: a bindparam of a TypeDecorator (sends "abc") and a plain one ("cba")
        "bindparam_types": (
            select(Product.id).where(Product.code == backwards),
            select(Product.id).where(Product.code == plain),
        ),
        "bindparam_types_entities": (
            select(Product).where(Product.code == backwards),
            select(Product).where(Product.code == plain),
        ),
    }


@pytest.mark.parametrize("case", list(_same_sql_other_binds()))
def test_bind_processing_of_the_type_is_part_of_the_key(env: Env, case: str) -> None:
    """``Product.price == 5`` and ``ProductRow.price == 5`` (or a ``bindparam`` with and
    without a ``TypeDecorator``) compile to the same SQL with the same parameter name and
    value before bind processing, but send different values and select different rows:
    each gets an entry of its own, on the ORM path and on the direct one."""
    first, second = (stmt.options(with_cache()) for stmt in _same_sql_other_binds()[case])

    def ids(s: Session, stmt: Any) -> list[int]:
        return sorted(getattr(x, "id", x) for x in s.scalars(stmt))

    with Session(env.engine) as s:
        expected = (ids(s, first), ids(s, second))
    assert expected[0] != expected[1]
    with env.Session() as s:  # each shape read once in this process: each a miss
        ids(s, second)
        env.cache.wait_for_fills()
        ids(s, first)
    env.cache.wait_for_fills()
    for _ in range(2):  # (the second time: the short way, with what it kept)
        with env.Session() as s:
            got = (ids(s, first), ids(s, second))
        assert got == expected, f"cached {got}, database {expected}"


def test_keys_name_bind_types_the_same_way_in_every_process(env: Env) -> None:
    """The key of a statement is made again alike where no shape is known yet (another
    process): the types are named by class and arguments, never by an address."""
    for first, second in _same_sql_other_binds().values():
        stmts = (first.options(with_cache()), second.options(with_cache()))
        before = [query_key(env.cache, stmt, env.engine) for stmt in stmts]
        assert before[0] != before[1]
        _shapes.clear()  # as in a new process
        assert [query_key(env.cache, stmt, env.engine) for stmt in stmts] == before


def test_bind_types_are_the_same_under_any_hash_seed() -> None:
    """The key part naming the bind types is the same in every process: SQLAlchemy
    lists a type's arguments in an order str hashing decides (``Numeric(10, 2)``'s
    precision, scale, asdecimal), so another process would never hit what one stored
    (regression audit rf1-02) — at every depth: ``ARRAY(Numeric(10, 2))``'s item type
    lists its arguments so too (regression audit rb-04)."""
    import subprocess
    import sys

    program = (
        "import decimal, uuid\n"
        "import sqlalchemy as sa\n"
        "from sqlalchemy.dialects import postgresql\n"
        "from sa_cache.query_shape import bind_types\n"
        "t = sa.table('t', sa.column('n', sa.Numeric(10, 2)), sa.column('u', sa.Uuid()),\n"
        "             sa.column('a', postgresql.ARRAY(sa.Numeric(10, 2))))\n"
        "stmt = sa.select(t).where(t.c.n == decimal.Decimal('1.5'), t.c.u == uuid.UUID(int=1),\n"
        "                          t.c.a.contains([decimal.Decimal('1.50')]))\n"
        "print(bind_types(stmt.compile(dialect=postgresql.dialect())))\n"
    )
    found = {
        subprocess.run(
            [sys.executable, "-c", program],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(1, 7)
    }
    assert len(found) == 1, found
