"""The shortcuts of the write-through path give what the plain functions give: a settled
flush's encoder (`entity_encoding.RowEncoder`) makes the bytes of `codec.encode` and the
answers of `codec_peek.holds`, the standalone Redis commit spells its compare-and-sets
as `cas` does, and the primary-key checks of `entity_types.key_checks_of`
are those of the columns' own checks. Pure: no server."""

from __future__ import annotations

import enum
import itertools
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from test_codec import SETTINGS, values

from sa_cache.backends.redis import _cas_argv, _RedisBase
from sa_cache.codec import Envelope, encode
from sa_cache.codec_peek import holds
from sa_cache.entity import EntitySpec
from sa_cache.entity_encoding import RowEncoder
from sa_cache.entity_types import NEVER, checks_of, key_checks_of

GENS = ("1:aa", "2:bb")


class Mood(enum.Enum):
    GLAD = "glad"


def nested(depth: int) -> Any:
    """A list ``depth`` lists deep: around msgpack's nesting limit (1024), where the
    depth at which a value is encoded decides whether it can be."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def same_encoding(encoder: RowEncoder, envelope: Envelope) -> None:
    """``encoder.encode`` returns what `encode` returns, or raises what it raises."""
    try:
        expected: bytes | type[BaseException] = encode(envelope)
    except Exception as exc:
        expected = type(exc)
    try:
        got: bytes | type[BaseException] = encoder.encode(envelope)
    except Exception as exc:
        got = type(exc)
    assert got == expected


@SETTINGS
@given(
    st.lists(values, min_size=1, max_size=6),
    st.lists(values, min_size=1, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.none() | st.floats(min_value=0, allow_infinity=False),
)
def test_encoder_is_encode_and_holds(
    before: list[Any], others: list[Any], changed: list[bool], ttl: float | None
) -> None:
    """An image sharing some values (the same objects) with the row it started from,
    after a check of that row: the bytes and answers of the plain functions."""
    image = [o if c else b for b, o, c in zip(before, others * 6, changed, strict=False)]
    encoder = RowEncoder()
    for raw in (encode(Envelope(before, 1.5, ttl, GENS)), encode(Envelope(image, 1.5, ttl, GENS))):
        assert encoder.holds(raw, GENS, before) is holds(raw, GENS, before)
    for row in (image, before):
        same_encoding(encoder, Envelope(row, 2.5, ttl, GENS))
        same_encoding(encoder, Envelope(row, 2.5, ttl, ("3:cc",)))


@pytest.mark.parametrize(
    "value",
    [
        Decimal("1.50"),
        datetime(2024, 5, 1, 12, 0, 0, 7),
        datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Berlin")),
        datetime(2024, 5, 1, tzinfo=timezone(timedelta(hours=2), "X")),
        (1, "a"),
        {1, 2},
        Mood.GLAD,
        2**70,
        object(),  # not encodable: TypeError
        "\udc80",  # not valid Unicode: TypeError
        *(nested(depth) for depth in range(1019, 1024)),
    ],
)
def test_encoder_examples(value: Any) -> None:
    """Each special value, alone, shared and changed; marker arrays set the version byte
    as `encode` sets it."""
    encoder = RowEncoder()
    row = [1, value, "x"]
    try:
        raw = encode(Envelope(row, 1.0, 30.0, GENS))
    except (TypeError, ValueError):  # (not encodable; nested too deep)
        raw = b""
    assert encoder.holds(raw, GENS, row) is holds(raw, GENS, row)
    same_encoding(encoder, Envelope(row, 1.0, 30.0, GENS))
    same_encoding(encoder, Envelope([2, value, "y"], 1.0, 30.0, GENS))
    same_encoding(encoder, Envelope([2, None, "y"], 1.0, 30.0, GENS))
    same_encoding(encoder, Envelope(row, 1.0, 30.0, (1,)))  # type: ignore[arg-type]


def test_encoder_leaves_meta_to_encode() -> None:
    encoder = RowEncoder()
    for envelope in (
        Envelope([1], 1.0, None, GENS, 0.25),
        Envelope([1], 1.0, None, GENS, 0.0, {"a": 1}),
    ):
        assert encoder.encode(envelope) == encode(envelope)


class Base(DeclarativeBase):
    pass


class Keyed(Base):
    __tablename__ = "perf_guard_keyed"
    code: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    at: Mapped[Decimal] = mapped_column(sa.Numeric(10, 2), primary_key=True)
    tag: Mapped[str] = mapped_column(sa.Uuid(as_uuid=False), primary_key=True)
    note: Mapped[str | None]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mariadb"])
def test_key_checks_are_the_primary_key_columns_checks(dialect: str) -> None:
    """(index in the key, check) of each key column with a check of its own."""
    spec = EntitySpec(sa.inspect(Keyed), None, "through")
    checks = checks_of(spec, dialect)
    expected = [
        (index, checks[key][1])
        for index, key in enumerate(spec.attr_keys[i] for i in spec.pk_positions)
        if checks[key][1] is not NEVER
    ]
    assert list(key_checks_of(spec, dialect)) == expected
    assert spec.pk_keys == ("code", "at", "tag")
    assert [spec.positions[k] for k in spec.pk_keys] == list(spec.pk_positions)


def test_commit_argv_is_cas_args() -> None:
    """The standalone commit spells each item's ARGV as a single CAS does."""
    items = list(
        itertools.product(
            ["k"], [None, b"", b"x"], [None, b"", b"v"], [None, 0, -1, 0.0004, 1.5, 300.0]
        )
    )
    expected = [arg for item in items for arg in _RedisBase._cas_args(*item)[2:]]
    assert _cas_argv(items) == expected
