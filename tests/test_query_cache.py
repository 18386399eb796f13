"""Read-through query caching with with_cache(): every point of the query-cache issue."""

from __future__ import annotations

import datetime
import decimal
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env, read_paused_after_load, transactional_engine
from models import Address, Country, Tag, Tier, User
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session, joinedload, scoped_session, selectinload, sessionmaker

import sa_cache
from sa_cache import with_cache


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    yield from make_env(engine, cache)


def by_id(uid: int) -> sa.Select[tuple[User]]:
    return select(User).where(User.id == uid).options(with_cache())


def test_hit_serves_without_sql_and_objects_behave(env: Env) -> None:
    with env.Session() as s:
        assert s.scalars(by_id(1)).one().name == "user1"
    env.log.clear()
    with env.Session() as s:
        user = s.scalars(by_id(1)).one()
        assert env.log.statements == []
        assert user.name == "user1"
        assert user.created == datetime.datetime(2024, 1, 1, 12, 30, 15, 250000)
        assert user.balance == decimal.Decimal("10.50")
        assert user.tier is Tier.pro
        assert user.prefs == {"n": 1, "tags": ["x", "y"]}
        assert user in s
        assert sa.inspect(user).persistent
        assert not s.dirty
        assert [a.email for a in user.addresses] == ["u1a@example.com", "u1b@example.com"]
        user.name = "renamed"
        env.log.clear()
        s.commit()
        assert any(st.lstrip().upper().startswith("UPDATE") for st in env.log.statements)
    with env.Session() as s:
        assert s.scalars(by_id(1)).one().name == "renamed"
        assert env.cache.stats["query.hit"] >= 1


def test_keys_are_exact_for_params(env: Env) -> None:
    stmt = select(User).where(User.id == sa.bindparam("uid")).options(with_cache())
    page = select(User.id).order_by(User.id).options(with_cache())
    # one Session per query: under REPEATABLE READ only a transaction's first
    # statement may fill (see test_repeatable_read_fills_only_first_statement)
    for _ in range(2):
        for uid in (1, 2, 3):
            with env.Session() as s:
                assert s.scalars(stmt.params(uid=uid)).one().id == uid
            with env.Session() as s:
                assert s.scalars(stmt, {"uid": uid}).one().id == uid
            with env.Session() as s:
                lit = select(User).where(User.name == f"user{uid}").options(with_cache())
                assert s.scalars(lit).one().id == uid
        with env.Session() as s:
            assert s.scalars(page.limit(1).offset(1)).all() == [2]
        with env.Session() as s:
            assert s.scalars(page.limit(2)).all() == [1, 2]
    # .params(uid=n) and execute-time {"uid": n} send the same SQL and values: one key
    assert env.cache.stats["query.miss"] == 8
    assert env.cache.stats["query.hit"] == 14


def test_statement_kinds(env: Env) -> None:
    def run(s: Session) -> list[object]:
        out: list[object] = []
        cols = select(User.id, User.name).order_by(User.id).options(with_cache())
        out.append([tuple(r) for r in s.execute(cols)])
        agg = (
            select(Country.code, func.count(User.id))
            .join(User, User.country_code == Country.code)
            .group_by(Country.code)
            .order_by(Country.code)
            .options(with_cache())
        )
        out.append([tuple(r) for r in s.execute(agg)])
        out.append(s.scalar(select(func.count()).select_from(User).options(with_cache())))
        joined = select(User).options(joinedload(User.addresses), with_cache()).order_by(User.id)
        out.append([(u.id, [a.id for a in u.addresses]) for u in s.scalars(joined).unique()])
        legacy = s.query(User).filter(User.country_code == "FR").options(with_cache()).all()
        out.append([u.id for u in legacy])
        both = (
            select(User, Address)
            .join(User.addresses)
            .where(Address.email.like("u2%"))
            .order_by(Address.id)
            .options(with_cache())
        )
        out.append([(u.id, a.id) for u, a in s.execute(both)])
        return out

    with env.Session() as s:
        first = run(s)
    env.log.clear()
    with env.Session() as s:
        second = run(s)
    assert env.log.statements == []
    assert first == second
    assert first[2] == 3


def test_selectinload_secondary_select_is_cached(env: Env) -> None:
    stmt = select(User).options(selectinload(User.addresses), with_cache()).order_by(User.id)
    with env.Session() as s:
        first = [(u.id, [a.email for a in u.addresses]) for u in s.scalars(stmt)]
    env.log.clear()
    with env.Session() as s:
        second = [(u.id, [a.email for a in u.addresses]) for u in s.scalars(stmt)]
    assert env.log.statements == []
    assert first == second


def test_lazy_loads_only_when_asked(env: Env) -> None:
    for relationships, expected_sql in ((False, 1), (True, 0)):
        stmt = select(User).where(User.id == 2).options(with_cache(relationships=relationships))
        for _ in range(2):
            with env.Session() as s:
                env.log.clear()
                user = s.scalars(stmt).one()
                emails = [a.email for a in user.addresses]
        assert emails == ["u2a@example.com", "u2b@example.com"]
        assert len(env.log.statements) == expected_sql


@pytest.mark.parametrize(
    "write",
    ["insert", "update", "bulk_update", "delete", "core_dml", "secondary"],
)
def test_other_session_commit_invalidates(env: Env, write: str) -> None:
    stmt = select(User).options(selectinload(User.tags), with_cache()).order_by(User.id)

    def snapshot() -> list[tuple[int, str, list[str]]]:
        with env.Session() as s:
            return [(u.id, u.name, [t.label for t in u.tags]) for u in s.scalars(stmt)]

    before = snapshot()
    assert snapshot() == before
    with env.Session() as s:
        if write == "insert":
            s.add(User(id=9, name="new", created=datetime.datetime(2024, 2, 1), balance=1))
        elif write == "update":
            s.get(User, 2).name = "changed"  # type: ignore[union-attr]
        elif write == "bulk_update":
            s.execute(update(User).where(User.id >= 2).values(name="bulk"))
        elif write == "delete":
            s.execute(delete(Address).where(Address.user_id == 3))
            s.delete(s.get(User, 3))
        elif write == "core_dml":
            s.connection().execute(User.__table__.update().where(User.id == 1).values(name="c"))
        elif write == "secondary":
            user = s.get(User, 2)
            assert user is not None
            user.tags.append(s.get(Tag, 2))  # type: ignore[arg-type]
        s.commit()
    after = snapshot()
    with Session(env.engine) as plain:
        truth = [
            (u.id, u.name, [t.label for t in u.tags])
            for u in plain.scalars(select(User).options(selectinload(User.tags)).order_by(User.id))
        ]
    assert after == truth
    assert after != before


def test_bulk_insert_invalidates(env: Env) -> None:
    stmt = select(func.count(User.id)).options(with_cache())
    with env.Session() as s:
        assert s.scalar(stmt) == 3
    with env.Session() as s:
        s.execute(
            insert(User),
            [
                {"id": 20, "name": "b1", "created": datetime.datetime(2024, 3, 1), "balance": 1},
                {"id": 21, "name": "b2", "created": datetime.datetime(2024, 3, 1), "balance": 1},
            ],
        )
        s.commit()
    with env.Session() as s:
        assert s.scalar(stmt) == 5


def test_own_flushed_writes_read_from_database(env: Env) -> None:
    stmt = select(User.name).where(User.id == 1).options(with_cache())
    with env.Session() as s:
        assert s.scalar(stmt) == "user1"
        s.get(User, 1).name = "pending"  # type: ignore[union-attr]
        assert s.scalar(stmt) == "pending"  # autoflush, then the database
        s.flush()
        assert s.scalar(stmt) == "pending"
        s.rollback()
        assert s.scalar(stmt) == "user1"
    with env.Session(autoflush=False) as s:
        user = s.get(User, 1)
        assert user is not None
        user.name = "dirty"
        assert s.scalars(by_id(1)).one() is user
        assert user.name == "dirty"
        assert s.is_modified(user)
        s.commit()
    with env.Session() as s:
        assert s.scalar(stmt) == "dirty"


def test_identity_map_objects_not_overwritten_by_hit(env: Env) -> None:
    with env.Session() as s:
        s.scalars(by_id(1)).one()
    with env.Session(autoflush=False) as s:
        user = s.get(User, 1)
        assert user is not None
        user.balance = decimal.Decimal("99.00")
        hit = s.scalars(select(User).where(User.id == 1).options(with_cache())).one()
        assert hit is user
        assert user.balance == decimal.Decimal("99.00")
        s.commit()
    with Session(env.engine) as plain:
        assert plain.get(User, 1).balance == decimal.Decimal("99.00")  # type: ignore[union-attr]


def test_rollbacks_leave_no_trace(env: Env) -> None:
    gen_key = env.cache.keys.generation("sac_users")
    stmt = select(User.name).where(User.id == 2).options(with_cache())
    with env.Session() as s:
        assert s.scalar(stmt) == "user2"
    token = env.cache.fetch([gen_key])[0]
    with env.Session() as s:
        sp = s.begin_nested()
        s.get(User, 2).name = "in savepoint"  # type: ignore[union-attr]
        s.flush()
        sp.rollback()
        assert s.scalar(stmt) == "user2"
        s.commit()
    assert env.cache.fetch([gen_key])[0] == token  # nothing written, nothing bumped
    with env.Session() as s:
        s.get(User, 2).name = "rolled back"  # type: ignore[union-attr]
        s.flush()
        s.rollback()
    assert env.cache.fetch([gen_key])[0] == token
    env.log.clear()
    with env.Session() as s:
        assert s.scalar(stmt) == "user2"
    assert env.log.statements == []


def test_savepoint_release_is_not_a_commit(env: Env) -> None:
    """(SQLite: with pysqlite's SAVEPOINT recipe, without which the release of a first
    SAVEPOINT does commit: `test_sqlite_savepoints`.)"""
    gen_key = env.cache.keys.generation("sac_users")
    stmt = select(User.name).where(User.id == 3).options(with_cache())
    with env.Session() as s:
        assert s.scalar(stmt) == "user3"
    token = env.cache.fetch([gen_key])[0]
    engine = transactional_engine(env.engine)
    recipe = sessionmaker(engine, class_=sa_cache.CachingSession, cache=env.cache)
    with recipe() as s:
        with s.begin_nested():
            s.get(User, 3).name = "released"  # type: ignore[union-attr]
        assert env.cache.fetch([gen_key])[0] == token  # released, not committed
        with env.Session() as other:
            assert other.scalar(stmt) == "user3"
        s.commit()
    assert env.cache.fetch([gen_key])[0] != token
    with env.Session() as s:
        assert s.scalar(stmt) == "released"
    if engine is not env.engine:
        engine.dispose()


def test_bypass_populate_existing_and_for_update(env: Env) -> None:
    with env.Session() as s:
        s.scalars(by_id(1)).one()
    with env.Session() as s:
        env.log.clear()
        s.scalars(by_id(1).execution_options(populate_existing=True)).one()
        s.scalars(by_id(1).with_for_update()).one()
        assert len(env.log.selects) == 2


def test_text_bypasses_or_raises_when_strict(env: Env) -> None:
    with env.Session() as s:
        stmt = select(sa.text("1 AS one")).options(with_cache())
        assert s.execute(stmt).scalar() == 1
        assert s.execute(stmt).scalar() == 1
        assert env.cache.stats["query.fill"] == 0
        with pytest.raises(sa_cache.NotCacheable, match=r"text\(\) fragment"):
            s.execute(select(sa.text("1 AS one")).options(with_cache(strict=True)))
        with pytest.raises(sa_cache.NotCacheable, match="no tables"):
            s.execute(select(sa.literal(1)).options(with_cache(strict=True)))


def test_explicit_invalidation(env: Env) -> None:
    stmt = select(Country.name).where(Country.code == "DE").options(with_cache(tags=["geo"]))
    with env.Session() as s:
        assert s.scalar(stmt) == "Germany"
    with env.engine.begin() as conn:  # behind the cache's back
        conn.execute(update(Country).where(Country.code == "DE").values(name="Deutschland"))
    with env.Session() as s:
        assert s.scalar(stmt) == "Germany"  # stale, as expected without invalidation
    env.cache.invalidate_tags("geo")
    with env.Session() as s:
        assert s.scalar(stmt) == "Deutschland"
    with env.engine.begin() as conn:
        conn.execute(update(Country).where(Country.code == "DE").values(name="DE2"))
    env.cache.invalidate(Country)
    with env.Session() as s:
        assert s.scalar(stmt) == "DE2"
    with env.engine.begin() as conn:
        conn.execute(update(Country).where(Country.code == "DE").values(name="DE3"))
    env.cache.invalidate_query(stmt, env.engine)
    with env.Session() as s:
        assert s.scalar(stmt) == "DE3"


def test_attach_sessionmaker_and_scoped_session_only(env: Env) -> None:
    factory = sessionmaker(env.engine)
    env.cache.attach(factory)
    scoped = scoped_session(sessionmaker(env.engine))
    env.cache.attach(scoped)
    for make in (factory, scoped):
        for _ in range(2):
            with make() as s:
                s.scalars(by_id(2)).one()
    assert env.cache.stats["query.hit"] == 3
    with Session(env.engine) as plain:  # not attached: never cached
        plain.scalars(by_id(2)).one()
    assert env.cache.stats["query.hit"] == 3
    scoped.remove()
    with pytest.raises(TypeError, match=r"sqlalchemy\.orm\.Session itself"):
        env.cache.attach(Session)


def test_attaching_the_same_sessions_twice_adds_no_second_hook(env: Env) -> None:
    """A sessionmaker of an attached Session class, or a Session of an attached
    sessionmaker: its Sessions carry the cache's hooks already. A second set used to run
    each statement through the cache twice, the inner miss waiting for the outer's load
    forever."""

    class MySession(Session):
        pass

    env.cache.attach(MySession)
    factory = sessionmaker(env.engine, class_=MySession)
    env.cache.attach(factory)
    other = sessionmaker(env.engine)
    env.cache.attach(other)
    env.cache.attach(other())  # a Session of an attached sessionmaker
    for make in (factory, other):
        assert len(make().dispatch.do_orm_execute) == 1
        done: list[str] = []

        def read(make: sessionmaker[Session] = make, done: list[str] = done) -> None:
            with make() as s:
                done.append(s.scalars(by_id(2)).one().name)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        thread.join(10)
        assert done == ["user2"]
    caching = sessionmaker(env.engine, class_=sa_cache.CachingSession, cache=env.cache)
    with pytest.raises(TypeError, match="cache= argument"):
        env.cache.attach(caching)


@pytest.mark.parametrize("shape", ["first of its shape", "shape seen before"])
def test_fill_race_never_serves_stale(env: Env, shape: str) -> None:
    """A reader paused right after its database load while a writer commits and bumps.

    Generations read after the query (the naive design) would label the old rows
    with the new generation and serve them from then on.
    """
    stmt = select(User.name).where(User.id == 1).options(with_cache())
    if shape == "shape seen before":  # the stampede-protected path (get_or_load)
        with env.Session() as s:
            assert s.scalar(select(User.name).where(User.id == 2).options(with_cache()))

    def read() -> str | None:
        with env.Session() as s:
            return s.scalar(stmt)

    def write() -> None:
        with env.Session() as w:
            w.get(User, 1).name = "newer"  # type: ignore[union-attr]
            w.commit()

    assert read_paused_after_load(env.engine, read, write) == "user1"
    with env.Session() as s:
        assert s.scalar(stmt) == "newer"
    with env.Session() as s:
        assert s.scalar(stmt) == "newer"


def test_corrupt_entry_is_a_counted_miss(env: Env) -> None:
    stmt = select(User.name).where(User.id == 1).options(with_cache())
    with env.Session() as s:
        assert s.scalar(stmt) == "user1"
    key = sa_cache.query.query_key(env.cache, stmt, env.engine)
    env.cache.wait_for_fills()  # the miss's fill is stored in the background
    env.cache.backend.set_many({key: b"\xc1garbage"}, 60)
    with env.Session() as s:
        assert s.scalar(stmt) == "user1"
    assert env.cache.stats["decode_error"] == 1


def test_unreachable_store_still_answers(engine: sa.Engine, namespace: str) -> None:
    cache = sa_cache.Cache.from_url("redis://127.0.0.1:1/0", namespace=namespace)
    for env in make_env(engine, cache):
        for _ in range(3):
            with env.Session() as s:
                assert s.scalars(by_id(1)).one().name == "user1"
                s.get(User, 1).name = "x"  # type: ignore[union-attr]
                s.commit()
                s.get(User, 1).name = "user1"  # type: ignore[union-attr]
                s.commit()
        assert cache.stats["store.error"] + cache.stats["store.skipped"] > 0


def test_snapshot_isolation_reader_never_fills_stale(env: Env, dialect_name: str) -> None:
    """REPEATABLE READ: a reader whose snapshot predates a commit must not store what it read.

    Its generations are read after the writer's bump, so a naive fill would label
    rows from the old snapshot as current.
    """
    stmt = select(User.name).where(User.id == 1).options(with_cache())
    options = {"isolation_level": "REPEATABLE READ"} if dialect_name == "postgresql" else {}
    with env.Session() as reader:
        reader.connection(execution_options=options)
        assert reader.execute(select(Country.code)).first() is not None  # snapshot taken
        with env.Session() as writer:
            writer.get(User, 1).name = "after"  # type: ignore[union-attr]
            writer.commit()
        seen = reader.scalar(stmt)
        if dialect_name != "sqlite":
            assert seen == "user1"  # the old snapshot: the window is open
            assert env.cache.stats["query.fill_skipped_snapshot"] == 1
    with env.Session() as fresh:
        assert fresh.scalar(stmt) == "after"


def test_lease_is_opt_in_and_waits_for_the_holder(env: Env) -> None:
    """with_cache(lease=True): another process holding the lease makes this miss wait for
    its fill instead of querying; without lease=True no lease round trip is spent."""
    from sa_cache.stampede import Lease

    plain = select(User.name).where(User.id == 2).options(with_cache())
    leased = select(User.name).where(User.id == 3).options(with_cache(lease=True))
    with env.Session() as s:
        assert s.scalar(plain) == "user2"
    assert env.cache.stats["query.lease.busy"] == 0
    key = sa_cache.query.query_key(env.cache, leased, env.engine)
    holder = Lease(env.cache, key, ttl=5)
    assert holder.acquire() is True  # "another process" is loading it
    with env.Session() as s:
        s.scalar(select(User.name).where(User.id == 1).options(with_cache()))  # warm the shape

    # another process: its own Cache (own single-flight) on the same store and namespace
    other = sa_cache.Cache(env.cache.backend, namespace=env.cache.namespace)
    other_sessions = sessionmaker(env.engine, class_=sa_cache.CachingSession, cache=other)

    def other_process_fills() -> None:
        time.sleep(0.2)
        with other_sessions() as w:  # loads under the name of the holder, then releases
            w.scalar(select(User.name).where(User.id == 3).options(with_cache()))
        other.wait_for_fills()  # stored (in the background), as a lease holder's fill is
        holder.release()

    filler = threading.Thread(target=other_process_fills)
    filler.start()
    with env.Session() as s:
        env.log.clear()
        assert s.scalar(leased) == "user3"
    assert env.cache.stats["query.lease.busy"] == 1
    assert env.cache.stats["query.lease.wait_hit"] == 1  # served by the holder's fill
    assert len(env.log.selects) == 1  # the holder's query, not ours
    filler.join(5)
