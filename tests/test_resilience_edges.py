"""Store failures at the edges: garbage under clock and generation keys, a full or
restarted Redis, invalidations remembered while a replay runs, the key-value API's
namespace generation and failed writes, single flight (a leader's error, bounded waits,
what each caller read) and the circuit breaker's probe. Each test failed before its fix
(an audit's repro, made a regression test)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from helpers import Env, make_env
from redis_servers import RedisServer, missing_service
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_cache
from sa_cache import NO_VALUE, Cache
from sa_cache.backends.memory import MemoryBackend
from sa_cache.freshness import Freshness
from sa_cache.stampede import StampedeGuard, get_or_load
from sa_cache.stampede_primitives import SingleFlight
from sa_cache.tokens import older_than


class ABase(DeclarativeBase):
    pass


class Item(ABase):
    __tablename__ = "sac_audit_a_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(20))


ITEMS = select(Item).where(Item.name != "x").order_by(Item.id).options(sa_cache.with_cache())
ITEM_1 = select(Item).where(Item.id == 1).options(sa_cache.with_cache())


def seed(session: Session) -> None:
    session.add_all([Item(id=1, name="old"), Item(id=2, name="two")])
    session.commit()


def env_on(engine: sa.Engine, url: str, namespace: str, **settings: Any) -> Iterator[Env]:
    cache = Cache.from_url(url, namespace=namespace, **settings)
    cache.register(Item, ttl=300)
    yield from make_env(engine, cache, ABase.metadata, seed)


def own_server(*args: str) -> RedisServer:
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not on PATH: cannot start a private Redis")
    return RedisServer(args=args).start()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server that takes DEBUG (to make it slow)."""
    srv = own_server("--enable-debug-command", "yes")
    yield srv
    srv.close()


def stall(srv: RedisServer, cache: Cache, seconds: float) -> subprocess.Popen[bytes]:
    """Make ``srv`` unresponsive for ``seconds`` (DEBUG SLEEP) and let ``cache`` notice:
    its reads time out until the circuit breaker opens."""
    sleeper = subprocess.Popen(
        ["redis-cli", "-p", str(srv.port), "DEBUG", "SLEEP", str(seconds)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.05)
    for i in range(cache.config.breaker_threshold):
        cache.get(f"probe{i}")
    assert cache._breaker.state == "open"
    return sleeper


def fill_up(client: redis.Redis) -> None:
    """Write junk until the server (``maxmemory``, ``noeviction``) refuses writes."""
    for n in range(1000):
        try:
            client.set(f"junk:{n}", b"x" * 100_000)
        except redis.exceptions.OutOfMemoryError:
            return
    raise AssertionError("the server never filled up")


def drop_keys(url: str, namespace: str) -> None:
    """Delete the keys of ``namespace`` on the (shared) server at ``url``."""
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


def drop_namespace(cache: Cache) -> None:
    """Delete this test's keys (only them: the server is shared), then close ``cache``."""
    scan = getattr(cache.backend, "scan_keys", None)
    if scan is not None:
        keys = list(scan(f"{cache.namespace}:*"))
        if keys:
            cache.backend.delete_many(keys)
    cache.close()


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


def names(session: Session) -> str:
    return ",".join(i.name for i in session.scalars(ITEMS))


# -- A3: garbage under the clock or a generation key is "the store cannot say" ---------------


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_garbage_clock_and_generations_are_counted_misses_not_errors(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    env_iter = env_on(engine, redis_url, namespace)
    env = next(env_iter)
    cache, raw = env.cache, redis.Redis.from_url(redis_url)
    rr = engine.execution_options(isolation_level="REPEATABLE READ")
    try:
        with env.Session() as s:
            assert names(s) == "old,two"
        raw.set(cache.clock_key, b"\xff\xfe")  # the clock is read as a transaction binds
        with env.Session(bind=rr) as s:
            assert s.execute(select(Item.name).where(Item.id == 1)).scalar() == "old"
            assert names(s) == "old,two"
        assert cache.stats["decode_error"] >= 1
        for table in (Item.__tablename__, f"{Item.__tablename__}!rows"):
            raw.set(cache.keys.generation(table), b"\xff\xfe")
        with env.Session() as s:
            assert s.get(Item, 2) is not None
            assert names(s) == "old,two"
        # Repaired (a fresh token, stamped by a clock that is a number again): caching resumes.
        assert cache.read_clock() is not None
        raw.set(cache.clock_key, b"9" * 38)  # a number no clock can be: garbage too
        assert cache.read_clock() is None
        assert cache.read_clock() is not None  # replaced by the store's time
        cache.wait_for_fills()
        with env.Session() as s:
            env.log.clear()
            assert names(s) == "old,two"
            assert names(s) == "old,two"
        assert len(env.log.selects) <= 1
    finally:
        raw.close()
        next(env_iter, None)
        drop_keys(redis_url, namespace)


# -- A4: Redis restarts empty under an open REPEATABLE READ transaction ------------------


def test_a_generation_recreated_without_a_clock_is_newer_than_any_snapshot(
    cache_url: str, namespace: str
) -> None:
    cache = Cache.from_url(cache_url, namespace=namespace)
    try:
        keys = cache.generation_keys(["t"])
        cache.bump(["t"])
        snapshot = cache.read_clock()
        assert snapshot is not None
        cache.backend.delete_many([cache.clock_key, *keys])  # the store lost everything
        gens = cache.ensure_generations(keys, cache.fetch(keys))
        assert gens is not None
        assert not older_than(gens, snapshot)
    finally:
        drop_namespace(cache)


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_restart_empty_during_a_repeatable_read_transaction_serves_nothing_stale(
    engine: sa.Engine, namespace: str
) -> None:
    srv = own_server()
    env_iter = env_on(engine, srv.url, namespace)
    env = next(env_iter)
    try:
        with env.Session() as s:  # the shape's result metadata, as a warm process has it
            s.scalars(ITEM_1).all()
        env.cache.wait_for_fills()
        rr = engine.execution_options(isolation_level="REPEATABLE READ")
        with env.Session(bind=rr) as t:
            t.execute(select(Item.id).where(Item.id == 2)).all()  # the snapshot is taken
            with env.Session() as x:
                x.execute(sa.update(Item).where(Item.id == 1).values(name="new"))
                x.commit()
            srv.kill()
            srv.restart()  # empty: generations and the clock are gone
            time.sleep(1.2)  # kept connections are checked after 1 s idle
            assert t.scalars(ITEM_1).one().name == "old"  # its snapshot
        env.cache.wait_for_fills()
        with env.Session() as n:
            assert n.scalars(ITEM_1).one().name == "new"
    finally:
        next(env_iter, None)
        srv.close()


# -- A6: Redis full (noeviction): the commit's script is refused ---------------------------


@pytest.mark.parametrize("dialect_name", ["sqlite"])
def test_a_commit_refused_by_a_full_redis_still_reaches_other_processes(
    engine: sa.Engine, namespace: str
) -> None:
    srv = own_server("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    env_iter = env_on(engine, srv.url, namespace)
    a = next(env_iter)
    b = Cache.from_url(srv.url, namespace=namespace)  # another process, same store
    b.register(Item, ttl=300)
    SB = sa.orm.sessionmaker(engine, class_=sa_cache.CachingSession, cache=b)
    raw = redis.Redis.from_url(srv.url)

    def b_reads() -> tuple[str, str]:
        with SB() as s:
            q = names(s)
        with SB() as s:
            item = s.get(Item, 1)
            assert item is not None
            e = item.name
        b.wait_for_fills()
        return q, e

    try:
        assert b_reads() == b_reads() == ("old,two", "old")
        assert b.stats["entity.hit"] >= 1
        assert b.stats["query.hit"] >= 1
        fill_up(raw)
        with a.Session() as s:
            item = s.get(Item, 1)
            assert item is not None
            item.name = "new"
            s.commit()
        assert a.cache._pending_bumps  # refused: remembered for replay as well
        assert b_reads() == ("new,two", "new")
    finally:
        for key in raw.scan_iter(match="junk:*", count=1000):
            raw.unlink(key)
        raw.close()
        b.close()
        next(env_iter, None)
        srv.close()


# -- A5: a replay must not drop what was remembered again while it ran -------------------


def test_a_replay_keeps_an_invalidation_remembered_while_it_ran(
    redis_url: str, namespace: str
) -> None:
    cache = Cache.from_url(redis_url, namespace=namespace)
    cache._replay_stop = threading.Event()  # type: ignore[attr-defined]  # no replayer thread
    gen = cache.keys.generation("t")
    cache._remember(bumps=[gen])  # an older commit the store missed
    deliver = cache._write_invalidation

    def delivered_then_newer_commit_fails(gen_keys: Any, deletes: Any) -> None:
        deliver(gen_keys, deletes)
        cache._remember(bumps=[gen])  # a newer commit fails meanwhile, same table

    cache._write_invalidation = delivered_then_newer_commit_fails  # type: ignore[method-assign]
    try:
        cache._replay_pending()
        assert gen in cache._pending_bumps  # the newer one is still to deliver
        cache._write_invalidation = deliver  # type: ignore[method-assign]
        cache._replay_pending()
        assert not cache._pending_bumps
        assert not cache._pending_seq
    finally:
        drop_namespace(cache)


def test_a_replay_failing_while_the_store_answers_is_logged_as_an_error(
    namespace: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalidation the store refuses while it answers everything else (here a server
    whose EVAL / EVALSHA are renamed, as an ACL or a proxy may forbid scripts; on a
    Cluster it was a dead default node, regression audit C1-01) is replayed in vain:
    other processes read what it drops. After `REPLAY_STUCK` failed replays in a row
    while the store answers PING, that is an error in the log, not only the warning."""
    monkeypatch.setattr("sa_cache.cache_replay.REPLAY_STUCK", 5)  # (~0.5 s, not 5)
    srv = own_server("--rename-command", "EVAL", "evalx", "--rename-command", "EVALSHA", "ev2")
    cache = Cache.from_url(srv.url, namespace=namespace)
    try:
        with caplog.at_level(logging.WARNING, logger="sa_cache"):
            cache.invalidate("t")
            assert cache._pending_bumps  # refused: remembered
            assert wait_until(
                lambda: any(r.levelno == logging.ERROR for r in caplog.records), timeout=5
            )
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "although the store answers PING" in errors[0]
        assert cache.backend.ping()
    finally:
        cache.close()
        srv.close()


# -- A7 / A8: key-value entries and lost writes ------------------------------------------


def test_invalidate_all_drops_key_value_entries(cache_url: str, namespace: str) -> None:
    cache = Cache.from_url(cache_url, namespace=namespace)
    try:
        cache.set("color", "red", ttl=600)
        assert cache.get("color") == "red"
        assert cache.get_or_set("color", lambda: "blue", ttl=600) == "red"
        cache.invalidate_all()
        assert cache.get("color") is NO_VALUE
        assert cache.get_many(["color"]) == {}
        assert cache.get_or_set("color", lambda: "blue", ttl=600) == "blue"
        cache.wait_for_fills()
        assert cache.get("color") == "blue"
    finally:
        drop_namespace(cache)


def test_a_delete_lost_in_a_collapsed_backlog_still_drops_the_entry(
    server: RedisServer, namespace: str
) -> None:
    cache = Cache.from_url(server.url, namespace=namespace, breaker_cooldown=0.3)
    try:
        cache.set("price", "old", ttl=600)
        assert cache.get("price") == "old"
        sleeper = stall(server, cache, 3.0)
        cache.delete("price")  # undeliverable: remembered
        cache.delete_many([f"other{i}" for i in range(10_001)])  # the backlog collapses
        assert cache._pending_bumps == {cache._all_gen_key}
        assert not cache._pending_deletes
        sleeper.wait()
        assert wait_until(lambda: not cache._pending_bumps)  # the store answers again
        assert cache.get("price") is NO_VALUE
    finally:
        cache.close()


def test_a_failed_set_never_brings_the_old_value_back(server: RedisServer, namespace: str) -> None:
    cache = Cache.from_url(server.url, namespace=namespace, breaker_cooldown=0.3)
    try:
        cache.set("config", "off", ttl=600)
        cache.set_many({"a": 1, "b": 2}, ttl=600)
        sleeper = stall(server, cache, 3.0)
        cache.set("config", "on", ttl=600)  # the store cannot take it
        cache.set_many({"a": 10}, ttl=600)
        sleeper.wait()
        assert wait_until(lambda: cache.get("b") == 2)  # the store answers again
        assert not cache._pending_deletes
        assert cache.get("config") is NO_VALUE
        assert cache.get_many(["a", "b"]) == {"b": 2}
        cache.set("config", "on", ttl=600)
        assert cache.get("config") == "on"
    finally:
        cache.close()


def test_bad_key_is_a_clear_error(cache_url: str, namespace: str) -> None:
    cache = Cache.from_url(cache_url, namespace=namespace)
    try:
        for call in (
            lambda: cache.get("bad\ud800key"),
            lambda: cache.set("bad\ud800key", 1),
            lambda: cache.delete("bad\ud800key"),
            lambda: cache.get_or_set("bad\ud800key", lambda: 1),
        ):
            with pytest.raises(ValueError, match="UTF-8"):
                call()
        assert cache._breaker.state == "closed"
        assert cache.get("kéy") is NO_VALUE
    finally:
        drop_namespace(cache)


# -- A9 / A10 / A11: single flight --------------------------------------------------------


def test_a_follower_loads_itself_when_the_leader_fails() -> None:
    cache = Cache(MemoryBackend())
    guard = StampedeGuard()
    key, fresh = cache.keys.user("k"), Freshness(60)
    started, go = threading.Event(), threading.Event()
    out: dict[str, Any] = {}

    def leader_loader() -> str:
        started.set()
        go.wait(10)
        raise LookupError("the leader's statement timeout")

    def run(name: str, loader: Callable[[], str]) -> None:
        try:
            out[name] = get_or_load(cache, key, loader, fresh, guard=guard)
        except Exception as exc:
            out[name] = exc

    leader = threading.Thread(target=run, args=("L", leader_loader))
    leader.start()
    assert started.wait(5)
    follower = threading.Thread(target=run, args=("F", lambda: "mine"))
    follower.start()
    time.sleep(0.3)  # F waits on L's flight
    go.set()
    leader.join(10)
    follower.join(10)
    guard.close()
    assert isinstance(out["L"], LookupError)
    assert out["F"] == "mine"
    assert cache.stats["flight.leader_failed"] == 1


def test_single_flight_follower_wait_is_bounded() -> None:
    flight = SingleFlight()
    release = threading.Event()
    leader = threading.Thread(target=flight.do, args=("k", lambda: release.wait(10)))
    leader.start()
    time.sleep(0.05)
    started = time.monotonic()
    assert flight.do("k", lambda: "x", 0.2, lambda why: why) == "flight.wait_timeout"
    assert time.monotonic() - started < 1.0
    release.set()
    leader.join(10)


@pytest.mark.parametrize("dialect_name", ["postgresql"])
def test_a_follower_holding_a_lock_its_leader_waits_for_does_not_deadlock(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    env_iter = env_on(engine, redis_url, namespace)
    env = next(env_iter)
    env.cache._guard = StampedeGuard(lease_ttl=0.5, lease_wait=0.3)
    env.cache._on_close.append(env.cache._guard.close)
    out: dict[str, str] = {}
    try:
        with env.Session() as s:  # the shape's result metadata
            s.scalars(select(Item).where(Item.name != "y").options(sa_cache.with_cache())).all()
        f = env.Session()

        def leader() -> None:
            try:
                with env.Session() as s:
                    s.execute(sa.text("SET LOCAL lock_timeout = '4s'"))  # ends the old hang
                    out["L"] = names(s)
            except Exception as exc:
                out["L"] = repr(exc)

        tl = threading.Thread(target=leader)
        try:
            f.execute(sa.text(f"LOCK TABLE {Item.__tablename__} IN ACCESS EXCLUSIVE MODE"))
            tl.start()
            time.sleep(0.5)  # L waits for F's lock, inside the flight
            started = time.monotonic()
            out["F"] = names(f)
            waited = time.monotonic() - started
            f.commit()
        finally:
            f.close()
            if tl.ident is not None:
                tl.join(10)
        assert out == {"F": "old,two", "L": "old,two"}
        assert waited < 3.0
        assert env.cache.stats["query.flight.wait_timeout"] == 1
    finally:
        next(env_iter, None)
        drop_keys(redis_url, namespace)


def test_a_caller_that_started_after_a_delete_does_not_join_an_older_load(
    cache_url: str, namespace: str
) -> None:
    cache = Cache.from_url(cache_url, namespace=namespace)
    source = {"price": 10}
    a_read, a_go = threading.Event(), threading.Event()
    out: dict[str, int] = {}

    def loader() -> int:
        value = source["price"]
        if threading.current_thread().name == "A":
            a_read.set()
            a_go.wait(10)
        return value

    def run(name: str) -> None:
        out[name] = cache.get_or_set("price", loader, ttl=60)

    try:
        ta = threading.Thread(target=run, args=("A",), name="A")
        ta.start()
        assert a_read.wait(10)
        source["price"] = 20
        cache.delete("price")
        tc = threading.Thread(target=run, args=("C",), name="C")
        tc.start()
        time.sleep(0.3)
        a_go.set()
        ta.join(10)
        tc.join(10)
        assert out == {"A": 10, "C": 20}
        cache.wait_for_fills()
        assert cache.get("price") == 20
    finally:
        drop_namespace(cache)


# -- A12 / A13: the breaker and bounded delays --------------------------------------------


def test_a_probe_that_raises_does_not_leave_the_breaker_half_open() -> None:
    cache = Cache(MemoryBackend(), breaker_cooldown=0.05)
    cache.set("a", 1)
    for _ in range(cache.config.breaker_threshold):
        cache._breaker.failure()
    assert cache._breaker.state == "open"
    time.sleep(0.06)

    def boom() -> None:
        raise RuntimeError("not the store's fault")

    with pytest.raises(RuntimeError):
        cache._call(boom, None, "probe")  # the half-open probe
    assert cache._breaker.state == "open"  # the probe's verdict: failed
    assert wait_until(lambda: cache.get("a") == 1, timeout=2.0)
    assert cache._breaker.state == "closed"


def test_a_failed_store_costs_one_timeout_per_clock_or_generation_read(namespace: str) -> None:
    cache = Cache.from_url("redis://127.0.0.1:1/0", namespace=namespace, connect_timeout=0.1)
    try:
        assert cache.read_clock() is None
        assert cache.stats["store.error"] == 1
        keys = cache.generation_keys(["t"])
        assert cache.ensure_generations(keys, cache.fetch(keys)) is None
        assert cache.stats["store.error"] == 2
    finally:
        cache.close()


# -- a fork with a fill pending --------------------------------------------------------------


def test_a_forked_child_does_not_wait_for_the_parents_pending_fill(redis_url: str) -> None:
    """A fill queued by this thread before the fork is the parent's: the child's store
    operations used to wait for it (it never completes there) on every call."""
    import os

    from sa_cache import filler

    cache = sa_cache.Cache.from_url(redis_url, namespace=f"sac_fork_{os.getpid()}")
    release = threading.Event()
    try:
        assert cache.fill_later(lambda: release.wait(10))  # held on the fill thread
        pid = os.fork()
        if pid == 0:  # the child: a wait that long would outlive the parent's patience
            filler.WAIT_LIMIT = 600.0
            try:
                cache.set("k", 1)
                os._exit(0 if cache.get("k") == 1 else 1)
            finally:
                os._exit(2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child waited for the parent's pending fill")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        cache.delete("k")
        cache.close()
