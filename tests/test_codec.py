"""The msgpack codec: exact round trips, and corrupt bytes are only ever a CodecError."""

from __future__ import annotations

import contextlib
import enum
import math
import struct
import sys
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sa_cache import codec_peek
from sa_cache.backends.base import NO_VALUE
from sa_cache.codec import (
    FORMAT_VERSION,
    MARKER_VERSION,
    CodecError,
    Envelope,
    decode,
    encode,
    pack,
    register_enum,
    unpack,
)
from sa_cache.codec_peek import holds, other_generations

SETTINGS = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Ext codes and the header are part of the wire format: a change here is a format change.
TUPLE, SET, ENUM, BIGINT, DATETIME, DATETIME_X = 1, 2, 4, 5, 6, 7
DATE, TIME, TIMEDELTA, DECIMAL, UUID = 8, 9, 11, 12, 13
BERLIN = ZoneInfo("Europe/Berlin")


class Color(enum.Enum):
    RED = 1
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Shade(str, enum.Enum):
    DARK = "dark"


class Perm(enum.Flag):
    R = 1
    W = 2


class Planet(enum.Enum):
    EARTH = (5.97e24, 6.37e6)


MEMBERS = [*Color, *Level, *Shade, Perm.R, Perm.R | Perm.W, Planet.EARTH]


def same(a: Any, b: Any) -> bool:
    """Equal in value and in type, all the way down (nan equals nan, 1.10 is not 1.1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Decimal):
        return a.compare_total(b) == 0
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if isinstance(a, (datetime, time)):
        return (
            a.replace(tzinfo=None) == b.replace(tzinfo=None)
            and a.fold == b.fold
            and a.tzinfo == b.tzinfo
            and a.utcoffset() == b.utcoffset()
            and a.tzname() == b.tzname()
        )
    if isinstance(a, enum.Enum):
        return a is b
    return bool(a == b)


def roundtrip(value: Any) -> Any:
    out = unpack(pack(value))
    assert same(value, out), (value, out)
    return out


# -- strategies ---------------------------------------------------------------------------

zones = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
offsets = st.timedeltas(min_value=timedelta(hours=-23, minutes=59), max_value=timedelta(hours=23))
fixed = st.builds(timezone, offsets) | st.builds(timezone, offsets, st.text(max_size=4))
tzs: st.SearchStrategy[tzinfo | None] = st.none() | zones.map(ZoneInfo) | fixed
datetimes = st.builds(
    lambda d, fold: d.replace(fold=fold), st.datetimes(timezones=tzs), st.integers(0, 1)
)
times = st.builds(lambda t, fold: t.replace(fold=fold), st.times(timezones=tzs), st.integers(0, 1))
ints = st.integers() | st.integers(min_value=-(2**200), max_value=2**200)


def leaves(nan: bool) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        ints,
        st.floats(allow_nan=nan),
        st.text(),
        st.binary(),
        datetimes,
        st.dates(),
        times,
        st.timedeltas(),
        st.decimals(allow_nan=nan),
        st.uuids(),
        st.sampled_from(MEMBERS),
    )


hashables = st.recursive(
    leaves(nan=False),
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    leaves(nan=True),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashables, inner, max_size=4),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
    ),
    max_leaves=12,
)
envelopes = st.builds(
    Envelope,
    values,
    st.floats(allow_nan=False),
    st.none() | st.floats(min_value=0, allow_infinity=False),
    st.lists(st.text(max_size=8), max_size=3).map(tuple),
    st.floats(min_value=0, allow_infinity=False),
    st.none() | st.dictionaries(st.text(max_size=5), values, max_size=3),
)


# -- round trips --------------------------------------------------------------------------


@SETTINGS
@given(values)
def test_values_round_trip(value: Any) -> None:
    roundtrip(value)


@SETTINGS
@given(envelopes)
def test_envelopes_round_trip(env: Envelope) -> None:
    out = decode(encode(env))
    assert type(out) is Envelope
    assert same(env.value, out.value)
    assert (out.created_at, out.ttl, out.gens, out.compute_time) == (
        env.created_at,
        env.ttl,
        env.gens,
        env.compute_time,
    )
    assert same(env.meta, out.meta)


@SETTINGS
@given(envelopes, values, st.lists(st.text(max_size=8), max_size=3).map(tuple))
def test_holds_compares_value_and_generations_without_decoding(
    env: Envelope, other: Any, gens: tuple[str, ...]
) -> None:
    data = encode(env)
    # An entry without meta holds its own value under its own generations.
    assert holds(data, env.gens, env.value) is (env.meta is None)
    # Whatever holds() accepts is what the entry decodes to.
    for value, tokens in ((other, gens), (other, env.gens), (env.value, gens)):
        if holds(data, tokens, value):
            out = decode(data)
            assert out.meta is None
            assert out.gens == tokens
            assert same(out.value, value)


@pytest.mark.parametrize("ttl", [None, 30.0])
def test_holds_examples(ttl: float | None) -> None:
    row = [1, "a", Decimal("1.50"), datetime(2024, 1, 1, 12, 0)]
    data = encode(Envelope(row, 1_700_000_000.0, ttl, ("g1", "g2")))
    assert holds(data, ("g1", "g2"), row)
    assert holds(data, ("g1", "g2"), list(row))
    assert not holds(data, ("g1", "g3"), row)  # other generations
    assert not holds(data, ("g1",), row)
    assert not holds(data, ("g1", "g2"), [2, *row[1:]])  # another value
    assert not holds(data, ("g1", "g2"), row[:3])
    assert not holds(data, ("g1", "g2"), [1, "a", Decimal("1.5"), row[3]])  # not known
    assert not holds(data, ("g1", "g2"), [1, "a", object(), row[3]])  # not encodable
    with_meta = encode(Envelope(row, 1_700_000_000.0, ttl, ("g1", "g2"), meta={"wb": 1}))
    assert not holds(with_meta, ("g1", "g2"), row)
    assert not holds(b"sac-lease:x", ("g1", "g2"), row)
    assert not holds(data[:-1], ("g1", "g2"), row)


@SETTINGS
@given(envelopes, st.lists(st.text(max_size=8), max_size=3).map(tuple))
def test_other_generations_is_what_decoding_says(env: Envelope, gens: tuple[str, ...]) -> None:
    """An entry is said to have other generations exactly when it decodes to others."""
    data = encode(env)
    with peek_every_entry():
        assert not other_generations(data, env.gens)
        assert other_generations(data, gens) is (decode(data).gens != gens)


@contextlib.contextmanager
def peek_every_entry() -> Iterator[None]:
    """`other_generations` on short entries too (it leaves those to decoding)."""
    saved, codec_peek.PEEK_MIN = codec_peek.PEEK_MIN, 0
    try:
        yield
    finally:
        codec_peek.PEEK_MIN = saved


@pytest.mark.parametrize("ttl", [None, 30.0])
def test_other_generations_examples(ttl: float | None) -> None:
    data = encode(Envelope([[1, "a"]], 1_700_000_000.0, ttl, ("g1", "g2")))
    assert not other_generations(data, ("g1", "g3"))  # short: left to decoding
    data = encode(Envelope([[i, "a" * 20] for i in range(50)], 1_700_000_000.0, ttl, ("g1", "g2")))
    assert len(data) >= codec_peek.PEEK_MIN
    assert not other_generations(data, ("g1", "g2"))
    assert other_generations(data, ("g1", "g3"))
    assert other_generations(data, ("g1",))  # a prefix of them
    assert other_generations(data, ("g1", "g2", "g3"))
    assert other_generations(data, ())
    # not an entry: unsure, so the caller decodes (and finds out)
    assert not other_generations(b"sac-tomb:1", ("g1",))
    assert not other_generations(b"\x98\xa3sac\x07", ("g1",))  # another format version
    assert not other_generations(NO_VALUE, ("g1",))


def test_envelope_fields() -> None:
    env = Envelope([(1, "a")], 1_700_000_000.25, 60.0, ("users:7", "orders:3"), 0.125, {"hits": 3})
    data = encode(env)
    assert msgpack.unpackb(data, ext_hook=lambda c, d: (c, d))[:2] == ["sac", MARKER_VERSION]
    assert decode(data) == env
    assert decode(encode(Envelope(None, 5, None))) == Envelope(None, 5.0, None, (), 0.0, None)


@pytest.mark.parametrize(
    ("value", "version"),
    [
        ([[1, "a", Decimal("1.5"), datetime(2024, 1, 1, tzinfo=BERLIN), {"k": [1, 2]}]], 2),
        ([[1, "a"], [2, (3, 4)]], 1),
        ({"s": {1, 2}}, 1),
        ([Color.RED], 1),
        ([time(1, tzinfo=BERLIN)], 1),
        ([[], {}, b"", None, -(2**70), uuid.UUID(int=1)], 2),
    ],
    ids=["rows", "tuple", "set", "enum", "zoned-time", "plain"],
)
def test_version_says_whether_the_value_holds_markers(value: Any, version: int) -> None:
    """Version 2 entries are decoded without looking for markers at the end of every
    array; an entry with a tuple, set, Enum or extended clock stays version 1."""
    data = encode(Envelope(value, 1.0, None))
    assert msgpack.unpackb(data, ext_hook=lambda c, d: (c, d))[1] == version
    assert same(decode(data).value, value)


def test_a_marker_in_a_version_2_entry_is_foreign() -> None:
    data = header([1, 2, msgpack.ExtType(TUPLE, b"")], version=FORMAT_VERSION)
    with pytest.raises(CodecError, match="marker"):
        decode(data)
    assert decode(header([1, 2, msgpack.ExtType(TUPLE, b"")], version=1)).value == (1, 2)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -1,
        2**63 - 1,
        2**64 - 1,
        -(2**63),
        2**64,
        -(2**63) - 1,
        2**100,
        -(2**100),
        0.0,
        -0.0,
        math.inf,
        -math.inf,
        math.nan,
        "",
        "žluťoučký 🐍",
        b"\x00\xff",
        (),
        (1,),
        [1, (2, [3, (4,)])],
        ([],),
        {1: "int key", (1, "t"): "tuple key", frozenset({2}): 0, None: [], b"k": 1.5},
        set(),
        {1, "a", (2, 3)},
        frozenset({frozenset({1}), (1, 2)}),
        date(1, 1, 1),
        date(9999, 12, 31),
        time(0),
        time(23, 59, 59, 999999),
        time(1, 2, 3, 4, tzinfo=timezone(timedelta(hours=-3, seconds=7, microseconds=9))),
        time(1, 2, fold=1),
        time(1, 2, tzinfo=timezone(timedelta(microseconds=1))),
        time(1, 2, tzinfo=BERLIN),
        timedelta(0),
        timedelta(days=-1, microseconds=1),
        timedelta.max,
        timedelta.min,
        Decimal("1.10"),
        Decimal("-0"),
        Decimal("1E+3"),
        Decimal("-1.23E-400"),
        Decimal("NaN"),
        Decimal("-sNaN123"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        uuid.UUID(int=0),
        uuid.uuid4(),
        Color.RED,
        Color.GREEN,
        Level.HIGH,
        Shade.DARK,
        Perm.R | Perm.W,
        Planet.EARTH,
        [Level.LOW, (Color.RED, {Shade.DARK: Perm.W})],
    ],
    ids=repr,
)
def test_explicit_values(value: Any) -> None:
    roundtrip(value)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 3, 31, 2, 30),
        datetime(1, 1, 1),
        datetime(9999, 12, 31, 23, 59, 59, 999999),
        datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc),
        datetime(2024, 5, 6, 7, 8, 9, 1, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2024, 5, 6, tzinfo=timezone(timedelta(hours=-2, seconds=1, microseconds=7))),
        datetime(2024, 5, 6, tzinfo=timezone(timedelta(hours=1), "CET")),
        datetime(2000, 1, 1, tzinfo=timezone(timedelta(microseconds=1))),
        datetime(2000, 1, 1, tzinfo=timezone(timedelta(microseconds=-1))),
        datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=BERLIN),
        datetime(2024, 10, 27, 2, 30, tzinfo=BERLIN),  # ambiguous, first (CEST)
        datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=BERLIN),  # ambiguous, second (CET)
        datetime(2024, 3, 31, 2, 30, tzinfo=BERLIN),  # imaginary
        datetime(2024, 5, 6, fold=1),
        datetime(2024, 5, 6, fold=1, tzinfo=timezone.utc),
    ],
    ids=repr,
)
def test_datetimes(value: datetime) -> None:
    out = roundtrip(value)
    if value.tzinfo is BERLIN:
        assert out.tzinfo is BERLIN
    assert out.utcoffset() == value.utcoffset()


def test_fold_selects_the_offset() -> None:
    first = roundtrip(datetime(2024, 10, 27, 2, 30, tzinfo=BERLIN))
    second = roundtrip(datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=BERLIN))
    assert (first.utcoffset(), second.utcoffset()) == (timedelta(hours=2), timedelta(hours=1))


def test_bytearray_becomes_bytes() -> None:
    assert unpack(pack(bytearray(b"ab"))) == b"ab"
    assert type(unpack(pack(bytearray(b"ab")))) is bytes


def test_lists_and_tuples_stay_apart() -> None:
    out = unpack(pack([(1, [2]), [(3,)], ((),)]))
    assert out == [(1, [2]), [(3,)], ((),)]
    assert [type(x) for x in out] == [tuple, list, tuple]
    assert type(out[0][1]) is list
    assert type(out[1][0]) is tuple


def test_enum_registry() -> None:
    class Ghost(enum.Enum):
        BOO = "boo"

    name = f"{Ghost.__module__}:{Ghost.__qualname__}"
    data = msgpack.packb([name, "boo", msgpack.ExtType(ENUM, b"")])
    with pytest.raises(CodecError, match="unknown enum class"):
        unpack(data)
    assert register_enum(Ghost) is Ghost
    assert unpack(data) is Ghost.BOO
    with pytest.raises(TypeError):
        register_enum(int)  # type: ignore[type-var]


def test_enum_registered_when_encoded() -> None:
    class Mood(enum.Enum):
        CALM = 1

    assert unpack(pack(Mood.CALM)) is Mood.CALM


def test_unknown_enum_module_is_never_imported() -> None:
    for name in ["os:system", "json.decoder:JSONDecoder", "this:Zen"]:
        data = msgpack.packb([name, "true", msgpack.ExtType(ENUM, b"")])
        with pytest.raises(CodecError, match="unknown enum class"):
            unpack(data)
    assert "this" not in sys.modules


class Foo:
    pass


class Offsetless(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (Foo(), "Foo"),
        ([1, {"k": (Foo(),)}], "Foo"),
        (object(), "object"),
        (len, "builtin_function_or_method"),
        (OrderedDict(a=1), "OrderedDict"),
        (datetime(2024, 1, 1, fold=1, tzinfo=Offsetless()), "datetime"),
    ],
)
def test_type_error_names_the_type(value: Any, name: str) -> None:
    with pytest.raises(TypeError, match=rf"sa_cache cannot encode values of type '{name}'"):
        pack(value)
    with pytest.raises(TypeError, match=name):
        encode(Envelope(value, 0.0, None))


def test_type_error_for_foo_names_module() -> None:
    with pytest.raises(TypeError, match=r"\(tests\.test_codec\.Foo\)|\(test_codec\.Foo\)"):
        pack(Foo())


def test_invalid_unicode_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="Unicode"):
        pack("\ud800")


# -- decoding never raises anything but CodecError ----------------------------------------

RICH = Envelope(
    [
        (1, "x", 2**70, datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=BERLIN), Decimal("1.10")),
        {(1, 2): {3, 4}, "f": frozenset({Color.RED}), "t": time(1, tzinfo=timezone.utc)},
        [date(2024, 1, 1), timedelta(1, 2, 3), uuid.UUID(int=7), -(2**65), b"b", None],
        datetime(2024, 10, 27, 2, 30, fold=1),
    ],
    1.5,
    30.0,
    ("g1", "g2"),
    0.25,
    {"m": [1]},
)
VALID = encode(RICH)


def header(value: Any, *, magic: Any = "sac", version: Any = MARKER_VERSION) -> bytes:
    return msgpack.packb([magic, version, 0.0, None, 0.0, [], None, value])


def zoned(fields: list[Any], tz: Any, fold: Any = 0) -> list[Any]:
    return [*fields, tz, fold, msgpack.ExtType(DATETIME_X, b"")]


NOON = [2024, 1, 1, 12, 0, 0, 0]


def test_valid_sample_decodes() -> None:
    out = decode(VALID)
    assert same(RICH.value, out.value)
    assert out == RICH


def test_empty() -> None:
    with pytest.raises(CodecError):
        decode(b"")
    with pytest.raises(CodecError):
        unpack(b"")


def test_every_truncation() -> None:
    for end in range(len(VALID)):
        with pytest.raises(CodecError):
            decode(VALID[:end])


@pytest.mark.parametrize("trailer", [b"\x00", b"\xc0", VALID])
def test_trailing_bytes(trailer: bytes) -> None:
    with pytest.raises(CodecError):
        decode(VALID + trailer)
    with pytest.raises(CodecError):
        unpack(pack(1) + trailer)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"a": 1}),
        msgpack.packb("sac"),
        msgpack.packb(None),
        msgpack.packb(["sac", 1]),
        msgpack.packb(["sac", 1, 0.0, None, 0.0, [], None, 1, "extra"]),
        header(1, magic="cas"),
        header(1, magic=b"sac"),
        header(1, version=99),
        header(1, version=0),
        header(1, version="1"),
        header(1, version=True),
        header(1, version=msgpack.ExtType(DECIMAL, b"sNaN")),
        msgpack.packb(["sac", 1, "now", None, 0.0, [], None, 1]),
        msgpack.packb(["sac", 1, 0.0, 5, 0.0, [], None, 1]),
        msgpack.packb(["sac", 1, 0.0, None, 0, [], None, 1]),
        msgpack.packb(["sac", 1, 0.0, None, 0.0, ["g", 1], None, 1]),
        msgpack.packb(["sac", 1, 0.0, None, 0.0, "g", None, 1]),
        msgpack.packb(["sac", 1, 0.0, None, 0.0, [], [], 1]),
        msgpack.packb(["sac", 1, 0.0, None, 0.0, [], None, msgpack.ExtType(TUPLE, b"")]),
        b"\x91" * 100_000 + b"\xc0",
        b"\xdd\xff\xff\xff\xff",
        b"\xc1",
        header(None)[:-1] + b"\xd4\xfb\x00",  # ext type -5
        header(None)[:-1] + b"\xd5\xff\x00",  # a malformed msgpack timestamp
    ],
)
def test_foreign_bytes(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


def test_future_version_message() -> None:
    with pytest.raises(CodecError, match="version 99"):
        decode(header(1, version=99))


@pytest.mark.parametrize(
    "value",
    [
        msgpack.ExtType(DATETIME, b"garbage"),
        msgpack.ExtType(DATETIME, b"\xff\xfe"),
        msgpack.ExtType(DATE, b"2024-13-01"),
        msgpack.ExtType(TIME, b"25:00"),
        msgpack.ExtType(DECIMAL, b"1.2.3"),
        msgpack.ExtType(DECIMAL, b""),
        msgpack.ExtType(UUID, b"short"),
        msgpack.ExtType(TIMEDELTA, b"123"),
        msgpack.ExtType(TIMEDELTA, struct.pack(">iii", 2**31 - 1, 0, 0)),
        msgpack.ExtType(TUPLE, b"x"),
        msgpack.ExtType(99, b""),
        msgpack.ExtType(0, b""),
        [msgpack.ExtType(BIGINT, b"\x01"), msgpack.ExtType(UUID, b"")],
        zoned(NOON, None, 5),
        zoned(NOON, None, "0"),
        zoned(NOON, "No/Such_Zone"),
        zoned(NOON, "../../etc/passwd"),
        zoned(NOON, "/etc/passwd"),
        zoned(NOON, [2**63 - 1, None]),
        zoned(NOON, [86_400_000_000, None]),
        zoned(NOON, [0, 7]),
        zoned(NOON, [0]),
        zoned(NOON, 7),
        zoned([2024, 13, 1, 0, 0, 0, 0], None),
        zoned([2024, 1, 1, 0, 0, 0, "0"], None),
        zoned([2024, 1, 1, 0, 0, 0], None),
        zoned([*NOON, 0], None),
        [1, 2, msgpack.ExtType(DATETIME_X, b"")],
        [25, 0, 0, 0, None, 0, msgpack.ExtType(10, b"")],
        [1, 0, 0, 0, "Mars/Olympus", 0, msgpack.ExtType(10, b"")],
        ["x", 1, 2, msgpack.ExtType(10, b"")],
        ["x", msgpack.ExtType(ENUM, b"")],
        [[1], 1, msgpack.ExtType(ENUM, b"")],
        [f"{Color.__module__}:{Color.__qualname__}", 99, msgpack.ExtType(ENUM, b"")],
        [[1, 2], msgpack.ExtType(SET, b"")],
    ],
    ids=repr,
)
@pytest.mark.parametrize("version", [MARKER_VERSION, FORMAT_VERSION])
def test_malformed_ext(value: Any, version: int) -> None:
    register_enum(Color)
    data = header(value, version=version)
    with pytest.raises(CodecError):
        decode(data)


def test_unhashable_map_key() -> None:
    with pytest.raises(CodecError):
        unpack(b"\x81\x91\x01\x02")  # {[1]: 2}
    with pytest.raises(CodecError):
        unpack(msgpack.packb(msgpack.ExtType(TUPLE, b"")))  # a stray marker


@SETTINGS
@given(st.binary())
def test_random_bytes(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


@SETTINGS
@given(st.binary())
def test_random_bytes_bare(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        unpack(data)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1))
def test_corrupted_entry(edits: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for index, byte in edits:
        data[index] = byte
    with contextlib.suppress(CodecError):
        assert type(decode(bytes(data))) is Envelope
