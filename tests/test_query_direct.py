"""Hits of plain single-entity selects build their objects directly (sa_cache.direct).

Which statements take that path is decided per statement shape (unit tests below,
no database); the behaviour of the objects it builds is tested on every database and
store, next to the ORM's own loading path that serves everything else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from hypothesis import given, settings
from hypothesis import strategies as st
from models import Address, Country, Tier, User
from sqlalchemy import event, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, joinedload, mapped_column

import sa_cache
from sa_cache import query_shape, with_cache
from sa_cache.direct import direct_plan


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache)


def by_country(code: str) -> sa.Select[tuple[User]]:
    return select(User).where(User.country_code == code).order_by(User.id).options(with_cache())


# -- which shapes are direct (pure) ----------------------------------------------------------


class _Own(DeclarativeBase):  # not in the test schema: only compiled here
    pass


class Lazy(_Own):
    __tablename__ = "sac_direct_lazy"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(sa.Text, deferred=True)


def plan(stmt: sa.Select[object]) -> object:
    return direct_plan(stmt.compile(dialect=postgresql.dialect()))


def test_plain_entity_selects_are_direct() -> None:
    assert plan(select(User).options(with_cache())) is not None
    assert plan(by_country("DE").limit(2).offset(1)) is not None
    joined = select(User).join(User.addresses).where(Address.email.like("u%"))
    found = plan(joined.options(with_cache()))
    assert found is not None
    assert sorted(found.attr_keys) == sorted(p.key for p in sa.inspect(User).column_attrs)


@pytest.mark.parametrize(
    "stmt",
    [
        select(User.id, User.name),
        select(User, Address).join(User.addresses),
        select(aliased(User)),
        select(User).options(joinedload(User.addresses)),
        select(Lazy),
        select(sa.func.count()).select_from(User),
    ],
    ids=["columns", "two-entities", "aliased", "eager", "deferred", "aggregate"],
)
def test_other_selects_take_the_orm_path(stmt: sa.Select[object]) -> None:
    assert plan(stmt.options(with_cache())) is None


# -- behaviour (every database and store) ----------------------------------------------------


def test_hit_needs_no_earlier_execution_in_this_process(env: Env) -> None:
    """A direct entry holds processed values: a process that never ran the statement is
    served from it (the ORM path needs one execution per shape for result metadata)."""
    with env.Session() as s:
        first = [
            (u.id, u.name, u.balance, u.created, u.tier, u.prefs)
            for u in s.scalars(by_country("DE"))
        ]
    query_shape._shapes.clear()  # as in a new process
    env.log.clear()
    hits = env.cache.stats["query.hit"]
    with env.Session() as s:
        second = [
            (u.id, u.name, u.balance, u.created, u.tier, u.prefs)
            for u in s.scalars(by_country("DE"))
        ]
    assert env.log.statements == []
    assert env.cache.stats["query.hit"] == hits + 1
    assert first == second
    assert len(first) >= 1


def test_expired_object_is_refreshed_from_the_hit(env: Env) -> None:
    with env.Session() as s:
        s.scalars(by_country("DE")).all()
    with env.Session() as s:
        user = s.get(User, 1)  # a database load: in the identity map
        assert user is not None
        s.expire(user)
        env.log.clear()
        users = s.scalars(by_country("DE")).all()
        assert user in users
        assert user.name == "user1"  # filled from the hit: no refresh SELECT
        assert env.log.statements == []
        assert not s.dirty


def test_pending_change_survives_a_hit(env: Env) -> None:
    with env.Session() as s:
        s.scalars(by_country("DE")).all()
    with env.Session(autoflush=False) as s:
        user = s.get(User, 1)
        assert user is not None
        user.name = "pending"
        assert s.scalars(by_country("DE")).first() is user
        assert user.name == "pending"
        assert list(s.dirty) == [user]


def test_load_events_take_the_orm_path(env: Env) -> None:
    seen: list[int] = []

    def on_load(target: User, context: object) -> None:
        seen.append(target.id)

    with env.Session() as s:
        expected = [u.id for u in s.scalars(by_country("DE"))]
    event.listen(User, "load", on_load)
    try:
        for _ in range(2):  # a miss of the ORM-path key, then its hit
            with env.Session() as s:
                assert [u.id for u in s.scalars(by_country("DE"))] == expected
    finally:
        event.remove(User, "load", on_load)
    assert seen == expected * 2
    assert env.cache.stats["query.hit"] >= 1


def test_lazy_loads_from_direct_objects(env: Env) -> None:
    stmt = select(User).where(User.id == 1).options(with_cache(relationships=True))
    for _ in range(2):
        with env.Session() as s:
            env.log.clear()
            user = s.scalars(stmt).one()
            country = user.country
    assert isinstance(country, Country)
    assert env.log.statements == []  # both the user and its lazy load were hits


def test_invalidate_query_drops_both_formats(env: Env) -> None:
    stmt = by_country("DE")
    with env.Session() as s:
        s.scalars(stmt).all()
    env.cache.invalidate_query(stmt, env.engine)
    env.log.clear()
    with env.Session() as s:
        s.scalars(stmt).all()
    assert len(env.log.selects) == 1


def test_result_shapes_match_a_database_load(env: Env) -> None:
    stmt = by_country("DE")

    def shapes(s: sa.orm.Session) -> tuple[object, ...]:
        rows = s.execute(stmt).all()
        legacy = s.query(User).filter(User.country_code == "DE").options(with_cache())
        return (
            [tuple(r._mapping.keys()) for r in rows],
            [r.User.id for r in rows],
            [u.id for u in s.scalars(stmt)],
            s.execute(stmt).scalars().first().id,  # type: ignore[union-attr]
            [u.id for u in legacy.order_by(User.id).all()],
            legacy.order_by(User.id).first().id,  # type: ignore[union-attr]
        )

    with env.Session() as s:
        first = shapes(s)  # misses: the ORM built these
    env.log.clear()
    with env.Session() as s:
        second = shapes(s)  # hits: built directly
    assert env.log.statements == []
    assert first == second


def test_option_given_before_with_only_columns_still_caches(env: Env) -> None:
    stmt = select(User).options(with_cache()).with_only_columns(User.name).where(User.id == 3)
    with env.Session() as s:
        assert s.scalar(stmt) == "user3"
    env.log.clear()
    with env.Session() as s:
        assert s.scalar(stmt) == "user3"
    assert env.log.statements == []


# -- the stored form of direct rows (pure) ----------------------------------------------------


def test_column_typed_rows_round_trip_exactly() -> None:
    from datetime import datetime, timedelta, timezone
    from decimal import Decimal
    from zoneinfo import ZoneInfo

    from sa_cache.codec import Envelope as Env_
    from sa_cache.codec import decode, encode
    from sa_cache.direct_rows import pack_columns, unpack_columns

    berlin, utc = ZoneInfo("Europe/Berlin"), ZoneInfo("Etc/UTC")
    rows = [
        [1, Decimal("10.50"), datetime(2024, 1, 2, 3, 4, 5, 6), datetime(2024, 1, 1, fold=1),
         datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2))), "x",
         datetime(2024, 3, 31, 1, 59, 59, 999999, tzinfo=berlin),
         datetime(2024, 1, 1, tzinfo=berlin), datetime(2024, 10, 27, 2, 30, tzinfo=berlin)],
        [2, Decimal("-0"), None, datetime(2024, 1, 1), None, 7,
         datetime(2024, 3, 31, 3, 0, tzinfo=berlin), datetime(2024, 1, 1, tzinfo=utc),
         datetime(2024, 10, 27, 2, 30, tzinfo=berlin, fold=1)],
        [3, Decimal("1E+3"), datetime(1, 1, 1), None, None, None,
         None, None, None],
        [4, Decimal("NaN"), datetime(9999, 12, 31, 23, 59, 59, 999999), None, None, "y",
         datetime(2024, 7, 1, 12, tzinfo=berlin), None, None],
    ] * 2  # fmt: skip
    packed = pack_columns(rows)
    # fixed-offset, mixed and two-zone columns stay as they are
    assert packed[:2] == ["colm", "-DTT--Z-Z"]
    assert packed[2][0] == [1, 2, 3, 4] * 2  # by column
    assert packed[3] == ["Europe/Berlin", "Europe/Berlin"]
    assert packed[4][2] == [2, 3, 6, 7]  # where column 3's NULLs were
    assert rows[0][1] == Decimal("10.50")  # the caller's rows are not changed
    back = unpack_columns(decode(encode(Env_(packed, 0.0, 1.0))).value)
    assert [[str(v) if isinstance(v, Decimal) else v for v in r] for r in back] == [
        [str(v) if isinstance(v, Decimal) else v for v in r] for r in rows
    ]
    assert [[type(v) for v in r] for r in back] == [[type(v) for v in r] for r in rows]
    assert back[0][3].fold == 1
    assert back[1][8].fold == 1
    for got, want in zip(back, rows, strict=True):  # the zone itself, not just the instant
        if want[6] is not None:
            assert got[6].tzinfo is berlin
            assert got[6].utcoffset() == want[6].utcoffset()
            assert got[6].isoformat() == want[6].isoformat()
    plain = pack_columns([[1, "a"]] * 8)
    assert plain == ["colm", "--", [[1] * 8, ["a"] * 8], [], []]  # nothing typed: by column
    assert unpack_columns(decode(encode(Env_(plain, 0.0, 1.0))).value) == [(1, "a")] * 8
    assert pack_columns(rows[:7]) == rows[:7]  # few rows: as they are
    assert unpack_columns([]) == []
    legacy = ["cols", "-DT", [[1, "2.5", "2024-01-02T03:04:05"] for _ in range(8)]]  # by row
    assert unpack_columns(legacy) == [[1, Decimal("2.5"), datetime(2024, 1, 2, 3, 4, 5)]] * 8


_ZONES = [ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York"), ZoneInfo("Etc/UTC")]
_naive_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), allow_imaginary=True
)
_typed_cells = [  # what a column-typed column holds: one kind a column
    st.decimals(allow_nan=True, allow_infinity=True, places=None),
    _naive_datetimes,
    _naive_datetimes.map(lambda d: d.replace(tzinfo=_ZONES[0])),
    st.builds(
        lambda d, z, fold: d.replace(tzinfo=z, fold=fold),
        _naive_datetimes,
        st.sampled_from(_ZONES),
        st.integers(0, 1),
    ),
]
_cells = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    *_typed_cells,
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.integers(1, 4), st.integers(1, 20), st.data())
def test_stored_rows_round_trip_exactly(width: int, count: int, data: st.DataObject) -> None:
    """Any rows, by row or by column, typed or not, with NULLs anywhere, come back equal,
    of the same types, zones and folds, through the codec."""
    from sa_cache.codec import Envelope as Env_
    from sa_cache.codec import decode, encode
    from sa_cache.direct_rows import pack_columns, unpack_columns

    kinds = [
        data.draw(st.sampled_from([_cells, *(st.none() | k for k in _typed_cells)]))
        for _ in range(width)
    ]
    rows = [[data.draw(kind) for kind in kinds] for _ in range(count)]
    back = unpack_columns(decode(encode(Env_(pack_columns(rows), 0.0, 1.0))).value)

    def alike(v: object) -> object:
        if isinstance(v, Decimal):
            return ("D", str(v))
        if isinstance(v, datetime):
            return ("T", v.isoformat(), v.fold, v.tzinfo)
        return (type(v).__name__, v)

    assert [[alike(v) for v in r] for r in back] == [[alike(v) for v in r] for r in rows]


def test_concurrent_misses_run_one_query_and_share_its_rows(env: Env) -> None:
    """Threads missing one key together: one loads (held in the database a moment), the
    others wait for it and build their own objects from its rows."""
    stmt = select(User).where(User.id == 2).options(with_cache())
    with env.Session() as s:  # one execution of the shape in this process, then no entry
        s.scalars(stmt).all()
    env.cache.invalidate(User)
    loads: list[str] = []

    def hold(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "sac_users" in statement and statement.lstrip().upper().startswith("SELECT"):
            loads.append(statement)
            time.sleep(0.3)

    event.listen(env.engine, "before_cursor_execute", hold)
    barrier = threading.Barrier(8)
    out: list[tuple[str, int]] = []

    def reader() -> None:
        with env.Session() as s:
            barrier.wait()
            user = s.scalars(stmt).one()
            assert user in s
            out.append((user.name, id(s)))

    try:
        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        event.remove(env.engine, "before_cursor_execute", hold)
    assert sorted(name for name, _ in out) == ["user2"] * 8
    assert len({session for _, session in out}) == 8
    assert len(loads) == 1


def test_inlined_building_matches_the_class_manager_path(env: Env) -> None:
    """Objects built with ``new_instance`` / ``_add_unpresent`` inlined (the ordinary
    instrumentation) are the same as those built through them (any other)."""
    stmt = by_country("DE")
    with env.Session() as s:
        s.scalars(stmt).all()
    env.cache.wait_for_fills()
    plan = query_shape.shape_of(stmt, stmt._generate_cache_key(), env.engine).direct
    assert plan is not None
    assert plan.plain_manager

    def built() -> list[tuple[object, ...]]:
        with env.Session() as s:
            users = s.scalars(stmt).all()
            out = []
            for u in users:
                state = sa.inspect(u)
                assert s.identity_map.get(state.key) is u
                out.append(
                    (state.key, state.persistent, state.load_path, state.load_options,
                     {k: v for k, v in u.__dict__.items() if k != "_sa_instance_state"})
                )  # fmt: skip
            u = users[0]
            u.name = "changed"
            assert list(s.dirty) == [u]
            return out

    hits = env.cache.stats["query.hit"]
    inlined = built()
    plan.plain_manager = False
    try:
        through = built()
    finally:
        plan.plain_manager = True
    assert env.cache.stats["query.hit"] == hits + 2
    assert inlined == through
    assert len(inlined) >= 2


class _Pairs(DeclarativeBase):
    pass


class Pair(_Pairs):
    """A composite primary key, in a table of this test's own."""

    __tablename__ = "sac_direct_pairs"
    a: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    b: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    v: Mapped[int]


def test_composite_keys_many_rows(env: Env) -> None:
    """Objects of a composite primary key, 12 rows (stored by column; on Redis made while
    the read travels once a hit is known), are those a database load gives."""
    _Pairs.metadata.create_all(env.engine)
    try:
        with sa.orm.Session(env.engine) as s:
            s.add_all(Pair(a=i // 3, b=f"k{i % 3}", v=i) for i in range(12))
            s.commit()
        stmt = select(Pair).order_by(Pair.a, Pair.b).options(with_cache())
        with sa.orm.Session(env.engine) as s:
            expected = [
                (sa.inspect(p).key, p.v) for p in s.scalars(select(Pair).order_by(Pair.a, Pair.b))
            ]
        for _ in range(3):  # a miss, a hit, a hit with objects made ahead on Redis
            with env.Session() as s:
                pairs = s.scalars(stmt).all()
                assert [(sa.inspect(p).key, p.v) for p in pairs] == expected
                assert all(s.identity_map.get(sa.inspect(p).key) is p for p in pairs)
                assert s.get(Pair, (1, "k2")) is pairs[5]
            env.cache.wait_for_fills()
        assert env.cache.stats["query.hit"] == 2
    finally:
        _Pairs.metadata.drop_all(env.engine)


@pytest.mark.parametrize("model", [User, Country])
def test_stored_rows_are_the_processed_rows(env: Env, model: type) -> None:
    """A fill stores the driver's rows as they are when no column has a result
    processor (``Country`` on PostgreSQL), else replays them through the processors
    (``User``'s Enum everywhere, DateTime on SQLite): either way what it stores is what
    the result gives."""
    from sa_cache.query import _rows_to_store
    from sa_cache.query_replay import Capture, replay
    from sa_cache.statements import CAPTURE_OPTION, watch_engine

    watch_engine(env.engine)
    stmt = select(model).options(with_cache())
    box = Capture()
    with sa.orm.Session(env.engine) as s:
        loaded = s.execute(stmt, execution_options={CAPTURE_OPTION: box}).all()
    assert box.rows is not None
    assert box.template is not None
    stored = _rows_to_store(box, direct_plan(stmt.compile(dialect=env.engine.dialect)))
    assert stored == [list(r) for r in replay(box.template, list(box.rows))]
    assert len(stored or ()) == len(loaded) > 0
    processors = box.template._metadata._processors  # type: ignore[attr-defined]
    if model is Country and env.engine.dialect.name == "postgresql":
        assert not any(processors)  # the rows were taken as they are
    if model is User:
        assert any(processors)
        assert {type(row[-2]) for row in stored or ()} <= {Tier}
