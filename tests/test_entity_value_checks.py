"""Values a database stores otherwise than given are never written through: numerics
whose scale only the DDL names, single-precision floats, negative zeros, JSON nested
deeper than an entry holds, and MariaDB without a strict ``sql_mode``. Each is written
with a cached Session and read back through the cache; what is served must be what a
fresh database load gives (compared by ``repr``). Neither a commit nor a read of a
deeply nested JSON value may raise where a plain Session does not."""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sa_cache
from sa_cache.codec import Envelope, encode
from sa_cache.detach import detached
from sa_cache.entity_types import exact_checks, image_is_exact, strict_mode


def exact(kind: Any, value: Any, dialect: str) -> bool:
    return image_is_exact([value], exact_checks([sa.Column("c", kind)], dialect))


def nested(depth: int) -> list[Any]:
    """``[[[...]]]``: ``depth`` lists inside the outer one."""
    out: list[Any] = []
    cur = out
    for _ in range(depth):
        inner: list[Any] = []
        cur.append(inner)
        cur = inner
    return out


def _env(
    engine: sa.Engine, cache_url: str, namespace: str, base: Any, *models: Any
) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    for model in models:
        cache.register(model)
    yield from make_env(engine, cache, base.metadata)


def _db(engine: sa.Engine, model: Any, pk: Any, attr: str) -> Any:
    """The value a fresh database load gives (no cache involved)."""
    with Session(engine) as s:
        obj = s.get(model, pk)
        return None if obj is None else getattr(obj, attr)


def _cached(env: Env, model: Any, pk: Any, attr: str) -> Any:
    with env.Session() as s:
        obj = s.get(model, pk)
        return None if obj is None else getattr(obj, attr)


# -- the checks alone ----------------------------------------------------------------


def test_a_numeric_scale_is_the_one_the_ddl_gives_the_column() -> None:
    """SQLAlchemy renders ``Numeric(10)`` as ``NUMERIC(10)`` (scale 0) and
    ``Numeric(scale=2)`` as a plain ``NUMERIC`` (``DECIMAL(10,0)`` on MariaDB, unscaled
    on PostgreSQL): the check follows the column, not the type's ``scale``."""
    assert not exact(sa.Numeric(10), Decimal("1.5"), "postgresql")  # stored as 2
    assert not exact(sa.Numeric(10), Decimal("1E+1"), "postgresql")  # given back as 10
    assert exact(sa.Numeric(10), Decimal("2"), "postgresql")
    assert not exact(sa.Numeric(10), Decimal("1.5"), "mariadb")
    assert exact(sa.Numeric(10), Decimal("2"), "mariadb")
    assert not exact(sa.Numeric(scale=2), Decimal("1.50"), "mariadb")  # stored as 2
    assert exact(sa.Numeric(scale=2), Decimal("2"), "mariadb")
    assert exact(sa.Numeric(scale=2), Decimal("1.50"), "postgresql")  # unscaled: kept
    assert exact(sa.Numeric(scale=2), Decimal("1.5"), "postgresql")
    assert not exact(sa.Numeric(scale=2), Decimal("1E+2"), "postgresql")
    assert exact(sa.Numeric(10, 2), Decimal("1.50"), "mariadb")
    assert exact(sa.Numeric(scale=2), Decimal("1.50"), "sqlite")  # given back with 2 places


def test_mariadb_float_is_exact_only_in_single_precisions_normal_range() -> None:
    assert not exact(sa.Float(), 1e-40, "mariadb")  # stored as 9.99995e-41
    assert not exact(sa.Float(), 1e-50, "mariadb")  # stored as 0
    assert not exact(sa.Float(), 3.5e38, "mariadb")  # beyond FLOAT
    assert exact(sa.Float(), 1.2e-38, "mariadb")
    assert exact(sa.Float(), 3.40282e38, "mariadb")
    assert exact(sa.Float(), 0.0, "mariadb")
    assert exact(sa.Float(), 1e-40, "postgresql")  # double precision there


@pytest.mark.parametrize("kind", [sa.Float(), sa.Double()], ids=["float", "double"])
def test_a_negative_zero_float_is_exact_only_on_postgresql(kind: Any) -> None:
    assert exact(kind, -0.0, "postgresql")
    for dialect in ("sqlite", "mariadb", "mysql"):
        assert not exact(kind, -0.0, dialect)  # given back as 0.0
        assert exact(kind, 0.0, dialect)
        assert exact(kind, -1.5, dialect)


@pytest.mark.parametrize("kind", [sa.JSON(), sa.dialects.postgresql.JSONB()], ids=["json", "jsonb"])
def test_json_nested_deeper_than_an_entry_holds_is_not_exact(kind: Any) -> None:
    """500 levels are checked, more are not exact; neither raises RecursionError."""
    assert exact(kind, nested(499), "postgresql")
    assert exact(kind, {"a": nested(498)}, "postgresql")
    assert not exact(kind, nested(500), "postgresql")
    assert not exact(kind, {"a": nested(5000)}, "postgresql")
    assert not exact(kind, [1, [2, [(3,)]]], "postgresql")  # a tuple, deep inside
    assert not exact(kind, [{"a": 1}, [{1: 2}]], "postgresql")  # an int key, deep inside
    assert exact(kind, [{"a": 1}, [{"b": [None, True, 1.5, "s"]}]], "postgresql")


def test_detached_copies_values_of_any_depth_and_cycles() -> None:
    """Deeper than the interpreter's stack, or a cycle: copied all the same."""
    deep = nested(5000)
    copy = detached(deep)
    levels = 0
    while deep:  # (== would recurse)
        assert copy is not deep
        assert len(copy) == 1
        copy, deep, levels = copy[0], deep[0], levels + 1
    assert (copy, levels) == ([], 5000)
    shared: list[Any] = [1]
    value = {"a": shared, "b": [shared, {"c": (1, [2])}]}
    out = detached(value)
    assert out == value
    assert out["a"] is not shared
    assert out["b"][1]["c"] is not value["b"][1]["c"]  # (a tuple: `copy.deepcopy`)
    cycle: list[Any] = []
    cycle.append(cycle)
    looped = detached(cycle)
    assert looped is not cycle
    assert looped[0] is looped


def test_a_value_msgpack_cannot_nest_is_a_type_error() -> None:
    """Callers treat a TypeError as "not cacheable" (a fill skipped, a row invalidated)."""
    with pytest.raises(TypeError):
        encode(Envelope(nested(2000), 0.0, None))
    with pytest.raises(TypeError):
        sa_cache.codec.pack(nested(2000))


# -- written through and read back -----------------------------------------------------


class NumBase(DeclarativeBase):
    pass


class Priced(NumBase):
    __tablename__ = "sac_vc_priced"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    whole = mapped_column(sa.Numeric(10), nullable=True)  # NUMERIC(10): scale 0
    scaled = mapped_column(sa.Numeric(scale=2), nullable=True)  # a plain NUMERIC


@pytest.fixture
def num_env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    yield from _env(engine, cache_url, namespace, NumBase, Priced)


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
@pytest.mark.parametrize(
    ("attr", "value"),
    [("whole", Decimal("1.5")), ("scaled", Decimal("1.50")), ("scaled", Decimal("1.5"))],
)
def test_numeric_without_its_own_scale_is_not_written_through_unrounded(
    num_env: Env, attr: str, value: Decimal
) -> None:
    """``Numeric(10)`` on PostgreSQL and ``Numeric(scale=2)`` on MariaDB store 2 for
    1.5 / 1.50; the entry held the given value."""
    env = num_env
    with env.Session() as s:
        s.add(Priced(id=1, **{attr: value}))
        s.commit()
    assert repr(_cached(env, Priced, 1, attr)) == repr(_db(env.engine, Priced, 1, attr))


class FloatBase(DeclarativeBase):
    pass


class Measured(FloatBase):
    __tablename__ = "sac_vc_measured"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    single = mapped_column(sa.Float(), nullable=True)  # FLOAT: single precision on MariaDB
    double = mapped_column(sa.Double(), nullable=True)


@pytest.fixture
def float_env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    yield from _env(engine, cache_url, namespace, FloatBase, Measured)


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("value", [1e-40, 1e-50], ids=["subnormal", "underflow"])
def test_mariadb_float_below_single_precision_range(float_env: Env, value: float) -> None:
    """FLOAT stores 1e-40 as 9.99995e-41 and 1e-50 as 0.0, which pass ``%.6g``."""
    env = float_env
    with env.Session() as s:
        s.add(Measured(id=1, single=value))
        s.commit()
    stored = _db(env.engine, Measured, 1, "single")
    assert stored != value
    assert repr(_cached(env, Measured, 1, "single")) == repr(stored)


@pytest.mark.parametrize("attr", ["single", "double"])
def test_negative_zero_float_is_served_as_the_database_gives_it(float_env: Env, attr: str) -> None:
    """SQLite's REAL and MariaDB's FLOAT and DOUBLE give -0.0 back as 0.0 (equal, but
    not for ``repr`` or ``math.copysign``); PostgreSQL keeps it."""
    env = float_env
    with env.Session() as s:
        s.add(Measured(id=1, **{attr: -0.0}))
        s.commit()
    stored = _db(env.engine, Measured, 1, attr)
    assert repr(_cached(env, Measured, 1, attr)) == repr(stored)
    with env.Session() as s:  # an update too
        obj = s.get(Measured, 1)
        assert obj is not None
        setattr(obj, attr, 1.5)
        s.commit()
        setattr(obj, attr, -0.0)
        s.commit()
    assert repr(_cached(env, Measured, 1, attr)) == repr(_db(env.engine, Measured, 1, attr))


class JsonBase(DeclarativeBase):
    pass


class Doc(JsonBase):
    __tablename__ = "sac_vc_doc"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body = mapped_column(sa.JSON(), nullable=True)


@pytest.fixture
def json_env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    yield from _env(engine, cache_url, namespace, JsonBase, Doc)


@pytest.fixture
def deep_stack() -> Iterator[None]:
    """A recursion limit with which Python's json reads and writes 1,100 levels (an
    application may raise it so)."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, 6000))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


# (MariaDB refuses JSON nested deeper than 32 levels by itself)
@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_deeply_nested_json_commit_does_not_raise(json_env: Env) -> None:
    """450 levels: a plain Session stores and loads the value; the cached Session's
    commit raised RecursionError (copying and checking the image), now writes it
    through."""
    env = json_env
    value = nested(450)
    with env.Session() as s:
        s.add(Doc(id=1, body=value))
        s.commit()
    assert env.cache.stats["entity.write_through"] == 1
    assert _db(env.engine, Doc, 1, "body") == value
    assert _cached(env, Doc, 1, "body") == value
    assert env.cache.stats["entity.hit"] == 1


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_deeply_nested_json_read_does_not_raise(json_env: Env) -> None:
    """500 levels: the miss copies the captured row (PostgreSQL's driver gives the
    decoded value), fills the entry, and the hit serves it."""
    env = json_env
    value = nested(500)
    with Session(env.engine) as s:
        s.add(Doc(id=1, body=value))
        s.commit()
    assert _db(env.engine, Doc, 1, "body") == value  # plain SQLAlchemy reads it
    assert _cached(env, Doc, 1, "body") == value  # a miss
    assert _cached(env, Doc, 1, "body") == value  # a hit
    assert env.cache.stats["entity.hit"] == 1


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
@pytest.mark.usefixtures("deep_stack")
def test_json_deeper_than_an_entry_holds_is_read_and_written_uncached(json_env: Env) -> None:
    """1,100 levels: more than msgpack nests. The commit invalidates the row instead of
    writing it through (it raised msgpack's ValueError), a read skips the fill (it
    raised too)."""
    env = json_env
    value = nested(1100)
    with env.Session() as s:
        s.add(Doc(id=1, body=value))
        s.commit()
    with Session(env.engine) as s:
        s.add(Doc(id=2, body=value))
        s.commit()
    for pk in (1, 2, 1, 2):
        assert _cached(env, Doc, pk, "body") == value
    stats = env.cache.stats
    assert (stats["entity.write_through"], stats["entity.hit"], stats["entity.miss"]) == (0, 0, 4)


class TzBase(DeclarativeBase):
    pass


class Event(TzBase):
    __tablename__ = "sac_vc_event"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at = mapped_column(sa.DateTime(timezone=True))


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_timestamptz_entry_is_the_instant_in_the_writers_zone(
    engine: sa.Engine, cache_url: str, namespace: str
) -> None:
    """Connections of one database whose ``TimeZone`` differs: a hit checks out no
    connection, so it serves the instant as the writer's connection gave it (its zone),
    not as the reader's would (README, Known limits)."""
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Event)
    tokyo = sa.create_engine(engine.url, connect_args={"options": "-c timezone=Asia/Tokyo"})
    try:
        for env in make_env(engine, cache, TzBase.metadata):
            writer = sessionmaker(tokyo, class_=sa_cache.CachingSession, cache=cache)
            with writer() as s:
                s.add(Event(id=1, at=dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)))
                s.commit()
            got = _cached(env, Event, 1, "at")
            assert got == _db(engine, Event, 1, "at")  # the same instant
            assert got.utcoffset() == dt.timedelta(hours=9)  # as Tokyo's connection gave it
    finally:
        tokyo.dispose()


# -- MariaDB without a strict sql_mode ----------------------------------------------------


class LaxBase(DeclarativeBase):
    pass


class Lax(LaxBase):
    __tablename__ = "sac_vc_lax"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code = mapped_column(sa.String(5), nullable=True)
    count = mapped_column(sa.Integer, nullable=True)


def _lax(engine: sa.Engine) -> sa.Engine:
    """An engine of ``engine``'s database whose connections run without strict mode."""
    return sa.create_engine(engine.url, connect_args={"init_command": "SET sql_mode=''"})


def test_strict_mode_is_read_once_per_connection(engine: sa.Engine, dialect_name: str) -> None:
    """True unless a MySQL / MariaDB connection's ``sql_mode`` has no STRICT_* (the
    server's default has); kept in the connection's ``info``."""
    with engine.connect() as conn:
        assert strict_mode(conn)
        assert strict_mode(conn)
    if dialect_name != "mariadb":
        return
    lax = _lax(engine)
    try:
        with lax.connect() as conn:
            assert not strict_mode(conn)
            assert conn.info["sa_cache.strict_mode"] is False
        with lax.connect() as conn:  # the same pooled connection: not asked again
            assert conn.info["sa_cache.strict_mode"] is False
            assert not strict_mode(conn)
    finally:
        lax.dispose()


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize(("attr", "value"), [("code", "abcdefgh"), ("count", 2**40)])
def test_mariadb_without_strict_mode_is_not_written_through(
    engine: sa.Engine, cache_url: str, namespace: str, attr: str, value: Any
) -> None:
    """With ``sql_mode=''`` MariaDB truncates a too long string and clamps an
    out-of-range integer with a warning; the entry held the given value."""
    lax = _lax(engine)
    try:
        for env in _env(lax, cache_url, namespace, LaxBase, Lax):
            with env.Session() as s:
                s.add(Lax(id=1, **{attr: value}))
                s.commit()
            stored = _db(lax, Lax, 1, attr)
            assert stored != value
            assert _cached(env, Lax, 1, attr) == stored
    finally:
        lax.dispose()


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_deeply_nested_json_in_a_cached_query_does_not_raise(json_env: Env) -> None:
    """500 levels through ``with_cache()``: the miss, and hits (on ``memory://`` the
    entry's last decoded rows are kept and each hit gets its own copy of the value)."""
    env = json_env
    value = nested(500)
    with Session(env.engine) as s:
        s.add(Doc(id=1, body=value))
        s.commit()
    stmt = sa.select(Doc).where(Doc.id >= 1).options(sa_cache.with_cache())
    for _ in range(3):
        with env.Session() as s:
            assert [d.body for d in s.scalars(stmt)] == [value]
        env.cache.wait_for_fills()
    assert env.cache.stats["query.hit"] == 2
