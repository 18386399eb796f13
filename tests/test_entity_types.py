"""Which values a database gives back as written: pure checks, and on PostgreSQL the
values the checks are about, written through and read back."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

import sa_cache
from sa_cache.entity_types import exact_checks, image_is_exact


class Color(enum.Enum):
    red = "red"


class Lower(sa.TypeDecorator[str]):
    impl = sa.String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else str(value).lower()


def exact(kind: Any, value: Any, dialect: str) -> bool:
    checks = exact_checks([sa.Column("c", kind)], dialect)
    return image_is_exact([value], checks)


ALL = ["sqlite", "postgresql", "mariadb"]


@pytest.mark.parametrize("dialect", ALL)
@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (sa.Integer(), 7),
        (sa.String(20), "x"),
        (sa.Boolean(), True),
        (sa.Numeric(10, 2), Decimal("1.50")),
        (sa.Date(), dt.date(2024, 1, 2)),
        (sa.DateTime(), dt.datetime(2024, 1, 2, 3, 4, 5)),
        (sa.Double(), 0.1),
        (sa.Enum(Color), Color.red),
        (sa.Enum("a", "b"), "a"),
        (sa.JSON(), {"k": [1, 2.5, "s", None, True, {"n": {}}]}),
        (sa.LargeBinary(), b"\x00"),
        (sa.Uuid(), uuid.UUID(int=1)),
        (sa.Integer(), None),
        (Lower(), None),
    ],
)
def test_values_that_come_back_as_written(dialect: str, kind: Any, value: Any) -> None:
    assert exact(kind, value, dialect)


@pytest.mark.parametrize("dialect", ALL)
@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (sa.Integer(), "7"),  # stored as 7
        (sa.Integer(), True),
        (sa.String(20), 5),
        (sa.Numeric(10, 2), Decimal("1.005")),  # rounded
        (sa.Numeric(10, 2), Decimal("1.5")),  # given back as 1.50
        (sa.Numeric(10, 2), 1.5),
        (sa.DateTime(), dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)),
        (sa.JSON(), {"t": (1, 2)}),  # a list when read
        (sa.JSON(), {1: "one"}),  # a str key when read
        (sa.JSON(), float("nan")),
        (sa.Enum(Color), "red"),
        (Lower(), "MiXed"),  # a TypeDecorator may change anything
        (sa.ARRAY(sa.Integer), [1]),
    ],
)
def test_values_that_may_not(dialect: str, kind: Any, value: Any) -> None:
    assert not exact(kind, value, dialect)


def test_dialect_specific_precision() -> None:
    micro = dt.datetime(2024, 1, 1, 12, 0, 0, 999999)
    assert exact(sa.DateTime(), micro, "postgresql")
    assert exact(sa.DateTime(), micro, "sqlite")
    assert not exact(sa.DateTime(), micro, "mariadb")  # DATETIME keeps whole seconds
    assert exact(sa.DateTime(), micro.replace(microsecond=0), "mariadb")
    assert exact(sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mariadb"), micro, "mariadb")
    assert not exact(sa.Float(), 0.123456789, "mariadb")  # FLOAT: given back as %.6g
    assert exact(sa.Float(), 0.1, "mariadb")
    assert exact(sa.Float(), 0.1, "postgresql")  # double precision
    assert not exact(sa.REAL(), 0.1, "postgresql")
    assert exact(sa.Float(precision=53), 0.1, "mariadb")
    aware = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    assert exact(sa.DateTime(timezone=True), aware, "postgresql")
    assert not exact(sa.DateTime(timezone=True), aware.replace(tzinfo=None), "postgresql")
    assert not exact(sa.DateTime(timezone=True), aware, "mariadb")
    assert exact(sa.Numeric(), Decimal("1.25"), "postgresql")
    assert not exact(sa.Numeric(), Decimal("1.25"), "mariadb")  # DECIMAL(10,0)
    assert exact(sa.Interval(), dt.timedelta(days=1), "postgresql")
    assert not exact(sa.Interval(), dt.timedelta(days=1), "mariadb")


def test_postgresql_fractional_second_precision() -> None:
    """TIMESTAMP(p), TIME(p) and INTERVAL(p) round to p digits there."""
    micro = dt.datetime(2020, 1, 1, 0, 0, 0, 123456)
    assert not exact(postgresql.TIMESTAMP(precision=3), micro, "postgresql")
    assert exact(postgresql.TIMESTAMP(precision=3), micro.replace(microsecond=123000), "postgresql")
    aware = micro.replace(microsecond=700000, tzinfo=dt.timezone.utc)
    assert not exact(postgresql.TIMESTAMP(timezone=True, precision=0), aware, "postgresql")
    assert exact(postgresql.TIMESTAMP(timezone=True, precision=0), aware.replace(microsecond=0),
                 "postgresql")  # fmt: skip
    assert not exact(postgresql.TIME(precision=0), dt.time(1, 2, 3, 600000), "postgresql")
    assert exact(postgresql.TIME(precision=0), dt.time(1, 2, 3), "postgresql")
    assert exact(postgresql.TIME(), dt.time(1, 2, 3, 600000), "postgresql")
    assert not exact(sa.Interval(second_precision=0), dt.timedelta(microseconds=5), "postgresql")
    assert exact(sa.Interval(second_precision=0), dt.timedelta(seconds=5), "postgresql")


def test_jsonb_orders_keys_and_prints_numbers_without_an_exponent() -> None:
    assert exact(postgresql.JSONB(), {"a": 2, "zz": 1}, "postgresql")
    assert not exact(postgresql.JSONB(), {"zz": 1, "a": 2}, "postgresql")  # reordered
    assert not exact(postgresql.JSONB(), {"k": [{"bb": 1, "a": 2}]}, "postgresql")
    assert exact(postgresql.JSONB(), {"b": 1, "aa": 2}, "postgresql")  # shorter first
    assert not exact(postgresql.JSONB(), {"price": 1e16}, "postgresql")  # an int when read
    assert exact(postgresql.JSONB(), {"price": 1.5e15}, "postgresql")
    assert not exact(postgresql.JSONB(), -0.0, "postgresql")
    assert exact(sa.JSON(), {"zz": 1, "a": 2}, "postgresql")  # json keeps its text


@pytest.mark.parametrize("dialect", ALL)
def test_a_negative_zero_decimal_is_not_exact(dialect: str) -> None:
    assert not exact(sa.Numeric(10, 2), Decimal("-0.00"), dialect)
    assert exact(sa.Numeric(10, 2), Decimal("0.00"), dialect)
    assert exact(sa.Numeric(10, 2), Decimal("-1.00"), dialect)


def test_an_unscaled_numeric_gives_a_positive_exponent_back_without_it() -> None:
    assert not exact(sa.Numeric(), Decimal("1E+2"), "postgresql")  # given back as 100
    assert exact(sa.Numeric(), Decimal("100"), "postgresql")
    assert exact(sa.Numeric(), Decimal("1.50"), "postgresql")


def test_char_values_given_back_as_they_are() -> None:
    for dialect in ALL:
        assert exact(sa.CHAR(2), "DE", dialect)
    assert not exact(sa.CHAR(3), "DE", "postgresql")  # padded to its length
    assert exact(sa.CHAR(3), "DE", "mariadb")
    assert exact(sa.CHAR(3), "DE", "sqlite")
    assert not exact(sa.CHAR(3), "DE ", "mariadb")  # stripped of trailing blanks
    assert exact(sa.CHAR(3), "DE ", "postgresql")
    assert not exact(sa.CHAR(), "D", "postgresql")


def test_every_column_is_checked() -> None:
    columns = [sa.Column("a", sa.Integer), sa.Column("b", sa.Uuid), sa.Column("c", sa.JSON)]
    assert [p for p, _ in exact_checks(columns, "postgresql")] == [0, 1, 2]
    assert exact_checks([sa.Column("d", sa.String(3))], "sqlite")[0][1]("abc")


PG_CASES = [
    ("ts3", postgresql.TIMESTAMP(precision=3), dt.datetime(2020, 1, 1, 0, 0, 0, 123456)),
    (
        "tstz0",
        postgresql.TIMESTAMP(timezone=True, precision=0),
        dt.datetime(2020, 1, 1, 0, 0, 0, 700000, tzinfo=dt.timezone.utc),
    ),
    ("time0", postgresql.TIME(precision=0), dt.time(1, 2, 3, 600000)),
    ("jfloat", postgresql.JSONB(), {"price": 1e16}),
    ("jorder", postgresql.JSONB(), {"zz": 1, "a": 2}),
    ("negzero", sa.Numeric(10, 2), Decimal("-0.00")),
    ("unscaled", sa.Numeric(), Decimal("1E+2")),
]


@pytest.mark.parametrize("dialect_name", ["postgresql"])
@pytest.mark.parametrize(("name", "kind", "value"), PG_CASES, ids=[c[0] for c in PG_CASES])
def test_what_postgresql_stores_otherwise_is_never_served(
    engine: sa.Engine, redis_url: str, namespace: str, name: str, kind: Any, value: Any
) -> None:
    """Each value is written through a registered model; another Session's read
    returns what the database holds (the entry was invalidated, not written)."""
    metadata = sa.MetaData()
    table = sa.Table(
        f"sac_types_{name}",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("v", kind, nullable=True),
    )

    class Row:
        id: int
        v: Any

    registry = sa.orm.registry()
    registry.map_imperatively(Row, table)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    cache.register(Row)
    factory = sa.orm.sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    metadata.create_all(engine)
    try:
        with factory() as s:
            row = Row()
            row.id, row.v = 1, value
            s.add(row)
            s.commit()
        with factory() as s:
            served = s.get(Row, 1).v  # type: ignore[union-attr]
        with engine.connect() as conn:
            stored = conn.execute(sa.select(table.c.v)).scalar_one()
        assert repr(served) == repr(stored)
        if isinstance(stored, dict):
            assert list(served) == list(stored)
    finally:
        metadata.drop_all(engine)
        cache.close()
        registry.dispose()
