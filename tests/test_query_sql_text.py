"""SQL text inside a statement can read any table: such a statement is not cached, as
one with a ``text()`` fragment is not (logged; ``NotCacheable`` with ``strict=True``).

``literal_column()`` / ``column(..., is_literal=True)`` (in the columns, WHERE, ORDER
BY, a ``column_property`` or ``with_expression``) and prefixes, suffixes and hints
are raw SQL as ``text()`` is. The forms that read no table stay cached: a
``literal_column()`` that is ``*``, a number, a quoted string or a column name (what
``func.count()``, ``exists()`` and ``Query.count()`` use), MySQL's optimizer words and
index hints. The tests of text that reads another table failed before the fix (audit
d1-01: the entry was kept under the generations of the FROM tables only, and a commit
to the table the text read left it stale).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import column, literal_column, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    mapped_column,
    query_expression,
    undefer,
    with_expression,
)

import sa_cache
from sa_cache import NotCacheable, with_cache
from sa_cache.invalidation import opaque_source

ORDERS = "(SELECT count(*) FROM sac_st_orders)"


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "sac_st_products"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(sa.String(20))
    # "count of children" columns, written as SQL text
    orders: Mapped[int] = column_property(literal_column(ORDERS), deferred=True)
    computed: Mapped[int | None] = query_expression()


class Order(Base):
    __tablename__ = "sac_st_orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_st_products.id"))


def seed(s: Session) -> None:
    s.add_all([Product(id=1, code="abc"), Product(id=2, code="xyz")])
    s.flush()
    s.add(Order(id=1, product_id=1))
    s.commit()


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache, Base.metadata, seed)


def _orders_read(s: Session, strict: bool) -> Any:
    opt = with_cache(strict=strict)
    counted = literal_column(ORDERS).label("n")
    return s.execute(select(Product.id, counted).where(Product.id == 1).options(opt)).all()


def _literal_in_where(s: Session, strict: bool) -> Any:
    more = column(f"{ORDERS} > 1", is_literal=True)
    return s.scalars(select(Product.id).where(more).options(with_cache(strict=strict))).all()


def _column_property(s: Session, strict: bool) -> Any:
    stmt = select(Product).where(Product.id == 1).options(undefer(Product.orders))
    return [p.orders for p in s.scalars(stmt.options(with_cache(strict=strict)))]


def _with_expression(s: Session, strict: bool) -> Any:
    computed = with_expression(Product.computed, literal_column(ORDERS))
    stmt = select(Product).where(Product.id == 1).options(computed, with_cache(strict=strict))
    return [p.computed for p in s.scalars(stmt)]


def _suffix(s: Session, strict: bool) -> Any:
    stmt = select(Product.id).suffix_with("UNION SELECT id + 100 FROM sac_st_orders")
    return sorted(s.scalars(stmt.options(with_cache(strict=strict))))


READS: dict[str, Callable[[Session, bool], Any]] = {
    "literal_column": _orders_read,
    "literal_in_where": _literal_in_where,
    "column_property": _column_property,
    "with_expression": _with_expression,
    "suffix_union": _suffix,
}


@pytest.mark.parametrize("name", list(READS))
def test_sql_text_reading_another_table_is_not_cached(env: Env, name: str) -> None:
    """A statement whose SQL text reads ``sac_st_orders`` (not among its FROM tables):
    not cached, so a committed write to that table shows at once; with ``strict=True``
    it raises `NotCacheable`, as a ``text()`` fragment does."""
    read = READS[name]
    with env.Session() as s:
        before = read(s, False)
    env.cache.wait_for_fills()
    with env.Session() as s:
        assert read(s, False) == before
    with env.Session() as s:  # a committed write through the caching Session
        s.add(Order(id=2, product_id=1))
        s.commit()
    with Session(env.engine) as s:
        expected = read(s, False)
    assert expected != before
    with env.Session() as s:
        after = read(s, False)
    assert after == expected, f"cached {after} after the commit, database {expected}"
    assert env.cache.stats["query.fill"] == 0
    with env.Session() as s, pytest.raises(NotCacheable, match="it contains SQL text"):
        read(s, True)


def _harmless() -> list[Any]:
    """Statements with SQL text that reads no table: each is cached."""
    p = Product
    return [
        select(sa.func.count()).select_from(p),  # count(*): literal_column("*")
        select(sa.exists().where(p.id == 1)),  # EXISTS (SELECT *)
        select(p.id, literal_column("1"), literal_column("-2.5e3"), literal_column("'it''s'")),
        select(p.id.label("pid")).order_by(literal_column("pid").desc()),
        select(p.id).order_by(literal_column("sac_st_products.code")),
        select(p.id).where(p.code.contains("b")),  # LIKE '%' || ... || '%'
        select(p.id).prefix_with("SQL_NO_CACHE", dialect="mysql"),
        select(p.id).with_hint(p, "USE INDEX (PRIMARY)", "mysql"),
    ]


def test_sql_text_reading_no_table_is_cached(env: Env) -> None:
    """``*``, numbers, quoted strings, column names, MySQL's optimizer words and index
    hints read no table: these statements are cached (the third round sends no SQL),
    ``Query.count()`` and ``Query.exists()`` too."""

    def reads(s: Session) -> list[Any]:
        rows = [s.execute(stmt.options(with_cache(strict=True))).all() for stmt in _harmless()]
        legacy = s.query(Product).filter(Product.id > 0)
        exists = s.query(legacy.exists()).options(with_cache(strict=True)).scalar()
        return [*rows, legacy.options(with_cache(strict=True)).count(), exists]

    with Session(env.engine) as s:
        expected = reads(s)
    for _ in range(2):  # a miss, then (the ORM path's result metadata known) a fill
        with env.Session() as s:
            assert reads(s) == expected
        env.cache.wait_for_fills()
    env.log.clear()
    with env.Session() as s:
        assert reads(s) == expected
    assert env.log.selects == []


TEXTS = {
    # harmless: optimizer words, index hints, /*+ optimizer hints */, CTE materialization
    "SQL_NO_CACHE STRAIGHT_JOIN": None,
    "HIGH_PRIORITY SQL_BUFFER_RESULT": None,
    "/*+ MAX_EXECUTION_TIME(1000) */": None,
    # SQL: another table, a side effect, a lock
    "UNION SELECT id FROM sac_st_orders": "a prefix, suffix or hint",
    "SQL_CALC_FOUND_ROWS": "a prefix, suffix or hint",
    "/*+ x */ , (SELECT 1) /*+ y */": "a prefix, suffix or hint",
    "LOCK IN SHARE MODE": "a prefix, suffix or hint",
}


@pytest.mark.parametrize("where", ["prefix", "suffix", "statement_hint", "table_hint", "cte"])
@pytest.mark.parametrize("text", list(TEXTS))
def test_prefixes_suffixes_and_hints_are_sql_text(where: str, text: str) -> None:
    """Prefixes, suffixes and hints are raw SQL: a statement with one is not cached
    unless it is made of MySQL's optimizer words, index hints and ``/*+ */`` comments
    (pure: `invalidation.opaque_source`, which `query_shape.shape_of` asks)."""
    stmt = select(Product.id)
    if where == "prefix":
        stmt = stmt.prefix_with(text)
    elif where == "suffix":
        stmt = stmt.suffix_with(text)
    elif where == "statement_hint":
        stmt = stmt.with_statement_hint(text)
    elif where == "table_hint":
        stmt = stmt.with_hint(Product, text, "mysql")
    else:
        stmt = select(stmt.cte().prefix_with(text))
    reason = opaque_source(stmt)
    expected = TEXTS[text]
    assert (reason is None) if expected is None else (expected in str(reason)), reason


@pytest.mark.parametrize(
    ("text", "harmless"),
    [
        ("*", True),
        ("1", True),
        ("-2.5e3", True),
        ("'it''s'", True),
        ("sac_st_products.code", True),
        (ORDERS, False),
        ("a || b", False),
        ("null::int", False),
        ("'a\\' , (SELECT 1) , '", False),  # MySQL's backslash escape ends no string
        ("CURRENT_USER()", False),
    ],
)
def test_which_literal_columns_are_sql_text(text: str, harmless: bool) -> None:
    """A ``literal_column()`` reads no table when it is ``*``, a number, a quoted string
    without backslashes or a (dotted) name, a column of the statement's own FROM."""
    reason = opaque_source(select(Product.id, literal_column(text)))
    assert (reason is None) is harmless, reason
