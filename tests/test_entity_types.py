"""Which values a database gives back as written: pure checks, no database."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql

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
        (sa.CHAR(3), "ab"),
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


def test_every_column_is_checked() -> None:
    columns = [sa.Column("a", sa.Integer), sa.Column("b", sa.Uuid), sa.Column("c", sa.JSON)]
    assert [p for p, _ in exact_checks(columns, "postgresql")] == [0, 1, 2]
    assert exact_checks([sa.Column("d", sa.String(3))], "sqlite")[0][1]("abc")
