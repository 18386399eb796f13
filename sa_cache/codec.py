"""The msgpack envelope: how cached values become bytes and back.

msgpack only, never pickle (DESIGN rule 7): decoding builds plain data and a closed set
of standard types, and never imports or calls anything the bytes name. Bytes that are
not a valid entry raise `CodecError` and nothing else; the `Cache` counts it as a miss.

An entry is one msgpack array, the value last so a reader can check the header first::

    ["sac", version, created_at, ttl, compute_time, [gen, ...], meta, value]

Other types use ext codes (part of the format). A *marker* is an empty ext ending an
array: ``[*items, marker]`` decodes to ``build(items)``. An entry whose value holds a
marker is version 1 (`MARKER_VERSION`), any other version 2 (`FORMAT_VERSION`): finding
markers means a look at the end of every array decoded, which version 2 entries (most:
rows hold no tuples or sets) skip. Bare values (`pack`) may always hold markers.

==  ==========  ======================================================================
 1  tuple       marker (2: set, 3: frozenset)
 4  Enum        marker: ``["module:qualname", value]``; registered classes only
 5  int         beyond 64 bits: big-endian two's complement
 6  datetime    naive or plain fixed offset, fold 0: ``isoformat()``
 7  datetime    marker: ``[year, month, day, hour, minute, second, us, tz, fold]``;
                tz is nil, a zoneinfo key, or ``[utcoffset in us, tzname or nil]``
 8  date        ``isoformat()``
 9  time        as 6
10  time        as 7: ``[hour, minute, second, us, tz, fold]``
11  timedelta   struct ``>iii``: days, seconds, microseconds
12  Decimal     ``str()``: exact, with exponent, sign and NaN payload
13  UUID        16 bytes
14  datetime    in a zoneinfo zone: struct ``>HBBBBBIB`` (year ... microsecond, fold)
                then the zone key (one ext, no marker array: the common aware value)
==  ==========  ======================================================================
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from enum import Enum
from functools import partial
from typing import Any, Final, NamedTuple, TypeVar
from uuid import UUID
from zoneinfo import ZoneInfo

import msgpack

FORMAT_VERSION: Final = 2
"""Version of the entry layout written for a value without markers; an entry of a version
other than 1 or 2 is a miss."""
MARKER_VERSION: Final = 1
"""Version of an entry whose value holds a marker array (a tuple, set, Enum...): the
decoder looks for markers at the end of every array only in these."""

_MAGIC: Final = "sac"
_TUPLE, _SET, _FROZENSET, _ENUM, _BIGINT, _DATETIME, _DATETIME_X = range(1, 8)
_DATE, _TIME, _TIME_X, _TIMEDELTA, _DECIMAL, _UUID, _DATETIME_Z = range(8, 15)
_TIMEDELTA_STRUCT: Final = struct.Struct(">iii")
_ZONED_STRUCT: Final = struct.Struct(">HBBBBBIB")
_US: Final = timedelta(microseconds=1)

_E = TypeVar("_E", bound=Enum)


class CodecError(Exception):
    """The bytes are not a valid entry: corrupt, truncated, foreign or of another format."""


class Envelope(NamedTuple):
    """One cache entry: the value and what freshness decisions need.

    ``created_at`` is unix time, ``ttl`` seconds or ``None`` for no expiry, ``gens``
    the table-generation tokens read before computing the value, ``compute_time`` the
    seconds computing took (for early refresh), ``meta`` room for later fields.
    (A named tuple: made on every hit, it costs a third of a frozen dataclass.)
    """

    value: Any
    created_at: float
    ttl: float | None
    gens: tuple[str, ...] = ()
    compute_time: float = 0.0
    meta: Mapping[str, Any] | None = None


# -- enums: decoded only for classes this process knows -----------------------------------

_ENUMS: dict[str, type[Enum]] = {}
_ENUM_NAMES: dict[type[Enum], str] = {}


def register_enum(cls: type[_E]) -> type[_E]:
    """Allow decoding members of ``cls``; encoding a member registers its class too."""
    if not (isinstance(cls, type) and issubclass(cls, Enum)):
        raise TypeError(f"register_enum() takes an Enum class, got {cls!r}")
    name = f"{cls.__module__}:{cls.__qualname__}"
    _ENUMS[name] = cls
    _ENUM_NAMES[cls] = name
    return cls


# -- encoding -----------------------------------------------------------------------------


def _ext(code: int) -> Any:
    return msgpack.ExtType(code, b"")


_TUPLE_EXT, _SET_EXT, _FROZENSET_EXT = _ext(_TUPLE), _ext(_SET), _ext(_FROZENSET)
_ENUM_EXT, _DATETIME_X_EXT, _TIME_X_EXT = _ext(_ENUM), _ext(_DATETIME_X), _ext(_TIME_X)


def _cannot(obj: object, why: str = "") -> TypeError:
    cls = type(obj)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return TypeError(f"sa_cache cannot encode values of type {cls.__qualname__!r} ({name}){why}")


def _is_plain(obj: datetime | time) -> bool:
    """True when ``fromisoformat(obj.isoformat())`` gives ``obj`` back exactly."""
    tz = obj.tzinfo
    if obj.fold or (tz is not None and type(tz) is not timezone):
        return False
    if tz is None:
        return True
    offset = tz.utcoffset(None)  # fromisoformat() loses a microseconds-only offset
    return not offset.microseconds and tz.tzname(None) == timezone(offset).tzname(None)


def _tz_spec(obj: datetime | time) -> Any:
    tz = obj.tzinfo
    if tz is None:
        return None
    if isinstance(tz, ZoneInfo) and tz.key is not None:
        return tz.key
    offset = obj.utcoffset()
    if offset is None:
        raise _cannot(obj, f": its tzinfo {tz!r} gives no UTC offset")
    name = tz.tzname(obj if isinstance(obj, datetime) else None)
    return [offset // _US, name if type(name) is str else None]


def _encode_datetime(d: datetime) -> Any:
    if _is_plain(d):
        return msgpack.ExtType(_DATETIME, d.isoformat().encode())
    tz = d.tzinfo
    if type(tz) is ZoneInfo and tz.key is not None:
        wall = (d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, d.fold)
        return msgpack.ExtType(_DATETIME_Z, _ZONED_STRUCT.pack(*wall) + tz.key.encode())
    fields = [d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, _tz_spec(d)]
    return [*fields, d.fold, _DATETIME_X_EXT]


def _encode_time(t: time) -> Any:
    if _is_plain(t):
        return msgpack.ExtType(_TIME, t.isoformat().encode())
    return [t.hour, t.minute, t.second, t.microsecond, _tz_spec(t), t.fold, _TIME_X_EXT]


def _encode_bigint(obj: int) -> Any:
    size = (obj.bit_length() + 8) // 8
    return msgpack.ExtType(_BIGINT, obj.to_bytes(size, "big", signed=True))


def _encode_enum(obj: Enum) -> Any:
    cls = type(obj)
    name = _ENUM_NAMES.get(cls) or _ENUM_NAMES[register_enum(cls)]
    return [name, obj.value, _ENUM_EXT]


_ENCODERS: Final[dict[type, Callable[[Any], Any]]] = {
    tuple: lambda obj: [*obj, _TUPLE_EXT],
    set: lambda obj: [*obj, _SET_EXT],
    frozenset: lambda obj: [*obj, _FROZENSET_EXT],
    int: _encode_bigint,  # msgpack asks only for ints beyond 64 bits
    datetime: _encode_datetime,
    date: lambda obj: msgpack.ExtType(_DATE, obj.isoformat().encode()),
    time: _encode_time,
    timedelta: lambda obj: msgpack.ExtType(
        _TIMEDELTA, _TIMEDELTA_STRUCT.pack(obj.days, obj.seconds, obj.microseconds)
    ),
    Decimal: lambda obj: msgpack.ExtType(_DECIMAL, str(obj).encode()),
    UUID: lambda obj: msgpack.ExtType(_UUID, obj.bytes),
    bytearray: bytes,
}


def _default(obj: Any) -> Any:
    encoder = _ENCODERS.get(type(obj))
    if encoder is not None:
        return encoder(obj)
    if isinstance(obj, Enum):
        return _encode_enum(obj)
    raise _cannot(obj)


# strict_types: subclasses (IntEnum, namedtuple, OrderedDict...) reach _default.
_packb: Final = partial(msgpack.packb, default=_default, strict_types=True, use_bin_type=True)


def pack(value: Any) -> bytes:
    """Encode a bare value; TypeError names a type that cannot be encoded."""
    try:
        return _packb(value)  # type: ignore[no-any-return]
    except UnicodeEncodeError as exc:
        raise TypeError("sa_cache cannot encode str values that are not valid Unicode") from exc
    except ValueError as exc:  # nested too deep, or too large for msgpack
        raise TypeError(f"sa_cache cannot encode this value: {exc}") from exc


_HEAD: Final = b"\x98\xa3sac"
"""The bytes every entry starts with (an 8-array, "sac"); its version byte follows."""


def encode(envelope: Envelope) -> bytes:
    """Encode an entry; TypeError names a type that cannot be encoded."""
    gens = list(envelope.gens)
    for gen in gens:
        if type(gen) is not str:
            raise TypeError(f"generation tokens must be str, got {envelope.gens!r}")
    ttl, meta = envelope.ttl, envelope.meta
    header = [_MAGIC, FORMAT_VERSION, float(envelope.created_at)]
    header += [None if ttl is None else float(ttl), float(envelope.compute_time), gens]
    markers: list[bool] = []

    def default(obj: Any) -> Any:
        out = _default(obj)
        if type(out) is list:  # a marker array
            markers.append(True)
        return out

    try:
        data: bytes = msgpack.packb(
            [*header, None if meta is None else dict(meta), envelope.value],
            default=default,
            strict_types=True,
            use_bin_type=True,
        )
    except UnicodeEncodeError as exc:
        raise TypeError("sa_cache cannot encode str values that are not valid Unicode") from exc
    except ValueError as exc:  # nested too deep, or too large for msgpack
        raise TypeError(f"sa_cache cannot encode this value: {exc}") from exc
    if markers:  # the version byte (an int below 128 is one byte): the decoder's switch
        data = data[:5] + bytes([MARKER_VERSION]) + data[6:]
    return data


# -- decoding (the cache-hit hot path) ----------------------------------------------------


class _Marker:
    """Decoded marker ext: ``build`` turns the array it ends into the value."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[list[Any]], Any]) -> None:
        self.build = build


def _decode_tz(spec: Any) -> tzinfo | None:
    if spec is None:
        return None
    if type(spec) is str:
        return ZoneInfo(spec)
    offset_us, name = spec
    offset = timedelta(microseconds=offset_us)
    return timezone(offset) if name is None else timezone(offset, name)


def _build_clock(cls: type[datetime | time], size: int, items: list[Any]) -> Any:
    if len(items) != size:
        raise CodecError(f"malformed {cls.__name__}")
    fold = items.pop()
    items[-1] = _decode_tz(items[-1])
    return cls(*items, fold=fold)


def _build_enum(items: list[Any]) -> Enum:
    name, value = items
    cls = _ENUMS.get(name)
    if cls is None:
        raise CodecError(f"unknown enum class {name!r} (see sa_cache.codec.register_enum)")
    return cls(value)


_TUPLE_MARK: Final = _Marker(tuple)
_MARKS: Final[dict[int, _Marker]] = {
    _TUPLE: _TUPLE_MARK,
    _SET: _Marker(set),
    _FROZENSET: _Marker(frozenset),
    _ENUM: _Marker(_build_enum),
    _DATETIME_X: _Marker(partial(_build_clock, datetime, 9)),
    _TIME_X: _Marker(partial(_build_clock, time, 6)),
}
_DECODERS: Final[dict[int, Callable[[bytes], Any]]] = {
    _BIGINT: lambda data: int.from_bytes(data, "big", signed=True),
    _DATE: lambda data: date.fromisoformat(data.decode()),
    _TIME: lambda data: time.fromisoformat(data.decode()),
    _TIMEDELTA: lambda data: timedelta(*_TIMEDELTA_STRUCT.unpack(data)),
    _UUID: lambda data: UUID(bytes=data),
}
_fromisoformat: Final = datetime.fromisoformat


_zoned_fields: Final = _ZONED_STRUCT.unpack_from


def _decode_zoned(data: bytes) -> datetime:
    year, month, day, hour, minute, second, us, fold = _zoned_fields(data)
    zone = ZoneInfo(data[_ZONED_STRUCT.size :].decode())
    return datetime(year, month, day, hour, minute, second, us, zone, fold=fold)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE and not data:
        return _TUPLE_MARK
    if code == _DATETIME:
        return _fromisoformat(data.decode())
    if code == _DECIMAL:
        return Decimal(data.decode())
    if code == _DATETIME_Z:
        return _decode_zoned(data)
    mark = _MARKS.get(code)
    if mark is not None and not data:
        return mark
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise CodecError(f"unknown or malformed ext type {code}")
    return decoder(data)


def _list_hook(items: list[Any]) -> Any:
    if items and type(items[-1]) is _Marker:
        return items.pop().build(items)
    return items


def _ext_hook_plain(code: int, data: bytes) -> Any:
    """`_ext_hook` for a value without markers (an entry of `FORMAT_VERSION`)."""
    if not data and code in _MARKS:
        raise CodecError(f"a marker (ext type {code}) in an entry of version {FORMAT_VERSION}")
    return _ext_hook(code, data)


_unpackb: Final = partial(
    msgpack.unpackb, ext_hook=_ext_hook, list_hook=_list_hook, raw=False, strict_map_key=False
)
_unpackb_plain: Final = partial(
    msgpack.unpackb, ext_hook=_ext_hook_plain, raw=False, strict_map_key=False
)


def unpack(data: bytes) -> Any:
    """Decode a bare value made by `pack`; CodecError for anything else."""
    try:
        value = _unpackb(data)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"corrupt value: {exc!r}") from exc
    if type(value) is _Marker:
        raise CodecError("stray marker")
    return value


def decode(data: bytes) -> Envelope:
    """Decode an entry made by `encode`; CodecError for anything else."""
    try:
        # Only an entry whose value holds markers pays for the list hook (every array).
        plain = data[5:6] == b"\x02" and data[:5] == _HEAD
        fields = _unpackb_plain(data) if plain else _unpackb(data)
        if type(fields) is not list or len(fields) != 8 or fields[0] != _MAGIC:
            raise CodecError("not an sa_cache entry")
        _, version, created_at, ttl, compute_time, gens, meta, value = fields
        if type(version) is not int or version not in (FORMAT_VERSION, MARKER_VERSION):
            raise CodecError(f"unsupported format version {version!r}")
        if type(created_at) is not float or type(compute_time) is not float:
            raise CodecError("malformed entry header")
        if (ttl is not None and type(ttl) is not float) or type(gens) is not list:
            raise CodecError("malformed entry header")
        if meta is not None and type(meta) is not dict:
            raise CodecError("malformed entry header")
        for gen in gens:
            if type(gen) is not str:
                raise CodecError("malformed generation token")
        return Envelope(value, created_at, ttl, tuple(gens), compute_time, meta)
    except CodecError:
        raise
    except Exception as exc:
        raise CodecError(f"corrupt entry: {exc!r}") from exc
