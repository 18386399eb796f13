"""The store can disappear at any moment (DESIGN rule 5): requests keep succeeding.

A private redis-server (append-only file, fsync always) is killed mid-load and
restarted: it comes back *with* the entries it held, so an invalidation made during
the outage must be replayed before any of them is served again.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from redis_servers import RedisServer, free_port, missing_service
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sa_cache import Cache, CachingSession
from sa_cache.freshness import Freshness
from sa_cache.stampede import StampedeGuard, get_or_load

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql"])

FRESH = Freshness(30)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not on PATH: cannot start a private Redis")
    # Later options win: keep the data across a SIGKILL, like a persistent or failed-over store.
    srv = RedisServer(args=["--appendonly", "yes", "--appendfsync", "always"])
    srv.start()
    yield srv
    srv.close()


class Table:
    """A one-row table of the test's own on the engine, read by a counting loader."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.name = f"sac_res_{uuid.uuid4().hex[:10]}"
        meta = sa.MetaData()
        self.table = sa.Table(
            self.name,
            meta,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("value", sa.String(20)),
        )
        meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(self.table.insert().values(id=1, value="v1"))
        self.loads = 0
        self._lock = threading.Lock()

    def load(self) -> str:
        with self._lock:
            self.loads += 1
        with self.engine.connect() as conn:
            query = sa.select(self.table.c.value).where(self.table.c.id == 1)
            return str(conn.execute(query).scalar_one())

    def write(self, value: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.table.update().values(value=value))

    def drop(self) -> None:
        self.table.drop(self.engine)


@pytest.fixture
def table(engine: sa.Engine) -> Iterator[Table]:
    t = Table(engine)
    yield t
    t.drop()


def make_cache(url: str, namespace: str) -> Cache:
    return Cache.from_url(
        url,
        namespace=namespace,
        socket_timeout=0.2,
        connect_timeout=0.2,
        breaker_cooldown=0.2,
    )


class Load:
    """Worker threads calling ``request`` in a loop; pausable; every outcome recorded."""

    def __init__(self, request: Any, threads: int = 4) -> None:
        self.request = request
        self.outcomes: list[tuple[float, float, Any]] = []  # (started, ended, value or error)
        self._go, self._stop = threading.Event(), threading.Event()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work) for _ in range(threads)]

    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._go.is_set():
                self._idle.release()
                self._go.wait()
                continue
            started = time.monotonic()
            try:
                outcome: Any = self.request()
            except Exception as exc:  # recorded: the test asserts there are none
                outcome = exc
            with self._lock:
                self.outcomes.append((started, time.monotonic(), outcome))
            time.sleep(0.002)

    def start(self) -> None:
        self._go.set()
        for t in self._threads:
            t.start()

    def pause(self) -> None:
        """Return once no request is in flight."""
        self._go.clear()
        for _ in self._threads:
            assert self._idle.acquire(timeout=10)

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()
        for t in self._threads:
            t.join(10)


def test_outage_mid_load_every_request_succeeds_and_nothing_stale_after(
    server: RedisServer, table: Table, namespace: str
) -> None:
    cache = make_cache(server.url, namespace)
    guard = StampedeGuard()
    key = cache.keys.user("row:1")
    load = Load(lambda: get_or_load(cache, key, table.load, FRESH, guard=guard))
    try:
        load.start()
        time.sleep(0.5)
        assert cache.stats["hit"] > 10  # caching works before the outage
        server.kill()
        time.sleep(0.4)
        table.write("v2")
        committed = time.monotonic()
        assert cache.delete("row:1") is False  # not delivered: remembered for later
        assert cache.stats["invalidate.deferred"] == 1
        time.sleep(0.4)
        load.pause()
        server.start()  # same port, same append-only file
        client = redis.Redis(port=server.port)
        try:  # the store came back holding the pre-outage entry: the test means something
            assert client.exists(key) == 1
        finally:
            client.close()
        hits_before = cache.stats["hit"]
        load.resume()
        deadline = time.monotonic() + 5
        while cache.stats["hit"] < hits_before + 20 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        load.stop()
        guard.close()
        cache.close()
    errors = [o for _, _, o in load.outcomes if isinstance(o, Exception)]
    assert errors == []
    after_commit = [value for started, _, value in load.outcomes if started > committed]
    assert after_commit
    assert set(after_commit) == {"v2"}  # never the value cached before the outage
    assert cache.stats["hit"] >= hits_before + 20  # caching resumed by itself
    assert cache.stats["invalidate.replayed"] >= 1
    assert max(ended - started for started, ended, _ in load.outcomes) < 1.0  # bounded delay


def _read_gens(cache: Cache, tables: list[str]) -> tuple[str, ...] | None:
    """What the query hook does: generations (and the clock) in one round trip."""
    gen_keys = cache.generation_keys(tables)
    raws = cache.fetch([cache.clock_key, *gen_keys])
    return cache.ensure_generations(gen_keys, raws[1:], raws[0])


def test_table_invalidation_during_outage_is_replayed_before_generations_are_read(
    server: RedisServer, table: Table, namespace: str
) -> None:
    cache = make_cache(server.url, namespace)
    guard = StampedeGuard()
    key = cache.keys.user("row:1:gens")

    def request() -> str:
        gens = _read_gens(cache, [table.name])
        if gens is None:  # the store cannot say: straight to the database
            return table.load()
        return get_or_load(cache, key, table.load, FRESH, gens=gens, guard=guard)

    try:
        assert request() == "v1"
        assert request() == "v1"
        assert cache.stats["hit"] == 1
        server.kill()
        table.write("v2")
        cache.invalidate(table.name)  # not delivered: remembered
        assert cache.stats["invalidate.deferred"] == 1
        server.start()
        assert request() == "v2"
    finally:
        guard.close()
        cache.close()


def test_no_server_at_all_every_request_goes_to_the_database(table: Table, namespace: str) -> None:
    cache = make_cache(f"redis://127.0.0.1:{free_port()}/0", namespace)
    guard = StampedeGuard()
    key = cache.keys.user("row:1")
    try:
        started = time.monotonic()
        for _ in range(50):
            assert get_or_load(cache, key, table.load, FRESH, guard=guard) == "v1"
        elapsed = time.monotonic() - started
    finally:
        guard.close()
        cache.close()
    assert table.loads == 50
    assert cache.stats["load.store_down"] == 50
    assert cache.stats["store.skipped"] > 0  # the breaker opened
    assert elapsed < 2.0


class _Base(sa.orm.DeclarativeBase):
    pass


class _Item(_Base):
    __tablename__ = "sac_res_items"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    label: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.String(20))


def test_outage_during_reads_that_overlap_their_round_trip(
    server: RedisServer, engine: sa.Engine, namespace: str
) -> None:
    """A hit of 8+ rows makes its objects while its read travels, on a connection it
    holds until the reply is read: through a store outage every query still answers
    (from the database), no connection is lost, and hits resume when the store is back."""
    from sa_cache import CachingSession, query_fast, with_cache

    _Base.metadata.drop_all(engine)
    _Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(_Item.__table__.insert(), [{"id": i, "label": f"i{i}"} for i in range(10)])
    cache = make_cache(server.url, namespace)
    factory = sa.orm.sessionmaker(engine, class_=CachingSession, cache=cache)
    stmt = sa.select(_Item).order_by(_Item.id).options(with_cache())
    pool = cache.backend.client.connection_pool  # type: ignore[attr-defined]

    def labels() -> list[str]:
        with factory() as s:
            return [item.label for item in s.scalars(stmt)]

    expected = [f"i{i}" for i in range(10)]
    try:
        for _ in range(3):  # a miss, then hits: the row count is known
            assert labels() == expected
            cache.wait_for_fills()
        assert query_fast._memos[stmt].rows == 10
        hits = cache.stats["query.hit"]
        assert hits >= 2
        in_use = len(pool._in_use_connections)
        server.kill()
        for _ in range(20):
            assert labels() == expected  # from the database
        assert cache.stats["query.hit"] == hits
        server.start()
        time.sleep(0.3)  # the breaker's cooldown
        deadline = time.monotonic() + 5
        while cache.stats["query.hit"] < hits + 5 and time.monotonic() < deadline:
            assert labels() == expected
            cache.wait_for_fills()
        assert cache.stats["query.hit"] >= hits + 5  # caching resumed by itself
        assert len(pool._in_use_connections) <= in_use  # no connection kept by a lost read
    finally:
        cache.close()
        _Base.metadata.drop_all(engine)


def test_an_invalidation_the_store_missed_reaches_it_without_another_call(
    server: RedisServer, engine: sa.Engine, namespace: str
) -> None:
    """A write-through commit during an outage: its invalidation is remembered, and
    delivered by the cache in the background once the store is back — other processes
    (here: a second Cache) must not keep reading the old row until the committing one
    happens to use the store again, or forever if it exits."""

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = f"sac_res_items_{uuid.uuid4().hex[:8]}"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(20))

    Base.metadata.create_all(engine)
    writer, reader = make_cache(server.url, namespace), make_cache(server.url, namespace)
    for cache in (writer, reader):
        cache.register(Item, ttl=300)
    writes = sessionmaker(engine, class_=CachingSession, cache=writer)
    reads = sessionmaker(engine, class_=CachingSession, cache=reader)

    def read() -> str:
        with reads() as s:
            item = s.get(Item, 1)
            assert item is not None
            return item.name

    try:
        with writes() as s:
            s.add(Item(id=1, name="old"))
            s.commit()
        assert read() == read() == "old"  # the entry holds it (appendonly: kept)
        with writes() as s:
            item = s.get(Item, 1)
            assert item is not None
            item.name = "new"
            s.flush()
            server.kill()
            s.commit()  # the database commits; the store cannot take the invalidation
        assert writer.stats["invalidate.deferred"] == 1
        server.start()
        deadline = time.monotonic() + 10  # the writer never touches the store again
        while not writer.stats["invalidate.replayed"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.stats["invalidate.replayed"] == 1
        read()  # (the reader's pooled connection died with the server: reconnects)
        hits = reader.stats["entity.hit"]
        assert read() == read() == "new"
        assert reader.stats["entity.hit"] > hits  # served by the store, and not stale
    finally:
        writer.close()
        reader.close()
        Base.metadata.drop_all(engine)
