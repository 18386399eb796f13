"""A registered model with eager default relationships, and invalidations right after
a store outage (regressions from a concurrency audit).

A registered model whose mapping loads a relationship eagerly by default
(``lazy="selectin"`` / ``"joined"`` / ``"subquery"`` / ``"immediate"``) is loaded from the
database by primary-key reads, so the relationship is loaded as plain SQLAlchemy loads it
(no DetachedInstanceError after the Session closes).

After a store outage, invalidations the store could not take reach it as soon as it
answers again: a commit's bump is tried even while the circuit breaker is open (it is the
breaker's probe), and the replayer tries again at a short fixed interval.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from redis_servers import RedisServer, missing_service
from sqlalchemy import select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from sa_cache import Cache, CachingSession, with_cache

# -- E5: default eager loaders ----------------------------------------------------------


def eager_models(lazy: str) -> tuple[Any, Any, Any]:
    """(Base, Owner, Item) on tables of this test's own; Owner.items is ``lazy``."""
    suffix = uuid.uuid4().hex[:8]
    owner_table, item_table = f"ae5_owner_{suffix}", f"ae5_item_{suffix}"

    class Base(DeclarativeBase):
        pass

    class Owner(Base):
        __tablename__ = owner_table
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(20))
        items: Mapped[list[Item]] = relationship(lazy=lazy, order_by=lambda: Item.id)  # type: ignore[misc]

    class Item(Base):
        __tablename__ = item_table
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        owner_id: Mapped[int] = mapped_column(sa.ForeignKey(f"{owner_table}.id"))

    return Base, Owner, Item


@pytest.mark.parametrize("lazy", ["selectin", "joined", "subquery", "immediate"])
def test_eager_default_relationship_loaded_on_cached_reads(
    engine: sa.Engine, cache_url: str, namespace: str, lazy: str
) -> None:
    Base, Owner, Item = eager_models(lazy)
    Base.metadata.create_all(engine)
    cache = Cache.from_url(cache_url, namespace=namespace)
    try:
        with Session(engine) as s:
            s.add(Owner(id=1, name="one"))
            s.flush()
            s.add_all([Item(id=1, owner_id=1), Item(id=2, owner_id=1)])
            s.commit()
        cache.register(Owner, ttl=300)
        factory = sessionmaker(engine, class_=CachingSession, cache=cache)
        seen = []
        for _ in range(2):  # the second round would be served from entries
            for how in ("get", "pk select"):
                with factory() as s:
                    if how == "get":
                        owner = s.get(Owner, 1)
                    else:
                        owner = s.scalars(select(Owner).where(Owner.id == 1)).unique().one()
                cache.wait_for_fills()
                seen.append([i.id for i in owner.items])  # after close: loaded already
        assert seen == [[1, 2]] * 4
        # writes still reach the cache: a committed change is read back
        with factory() as s:
            owner = s.get(Owner, 1)
            owner.name = "uno"
            s.commit()
        with factory() as s:
            assert s.get(Owner, 1).name == "uno"
    finally:
        cache.close()
        Base.metadata.drop_all(engine)


# -- E7: prompt delivery after an outage ------------------------------------------------


@pytest.fixture
def paused_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not on PATH: cannot start a private Redis")
    srv = RedisServer().start()
    yield srv
    if srv.process is not None:
        os.kill(srv.process.pid, signal.SIGCONT)
    srv.close()


def acct_model() -> tuple[Any, Any]:
    table_name = f"ae7_acct_{uuid.uuid4().hex[:8]}"

    class Base(DeclarativeBase):
        pass

    class Acct(Base):
        __tablename__ = table_name
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(20))

    return Base, Acct


class Pair:
    """Two caches on one store and namespace, as two processes would have: A writes, B
    reads (entity entry and a ``with_cache`` query)."""

    def __init__(self, engine: sa.Engine, url: str, namespace: str, model: Any) -> None:
        self.model = model
        self.a = Cache.from_url(
            url,
            namespace=namespace,
            socket_timeout=0.2,
            connect_timeout=0.2,
            breaker_threshold=1,
            breaker_cooldown=60.0,  # only a probe can close it during the test
        )
        self.b = Cache.from_url(url, namespace=namespace)
        for cache in (self.a, self.b):
            cache.register(model, ttl=300)
        self.sa = sessionmaker(engine, class_=CachingSession, cache=self.a)
        self.sb = sessionmaker(engine, class_=CachingSession, cache=self.b)

    def write(self, value: str) -> None:
        with self.sa() as s:
            s.get(self.model, 1).name = value
            s.commit()

    def read_b(self) -> tuple[str, str]:
        model = self.model
        with self.sb() as s:
            got = s.get(model, 1).name
            query = select(model.name).where(model.id == 1).options(with_cache())
            queried = s.scalars(query).one()
        self.b.wait_for_fills()
        return got, queried

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture
def pair(engine: sa.Engine, paused_server: RedisServer, namespace: str) -> Iterator[Pair]:
    Base, Acct = acct_model()
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Acct(id=1, name="v0"))
        s.commit()
    p = Pair(engine, paused_server.url, namespace, Acct)
    try:
        assert p.read_b() == ("v0", "v0")
        assert p.read_b() == ("v0", "v0")  # now from B's entries
        assert p.b.stats["entity.hit"] >= 1
        yield p
    finally:
        p.close()
        Base.metadata.drop_all(engine)


def pause(server: RedisServer) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)


def resume(server: RedisServer) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGCONT)


def test_commit_right_after_outage_reaches_other_caches(
    pair: Pair, paused_server: RedisServer
) -> None:
    pause(paused_server)
    pair.write("v1")  # the store does not answer: remembered, the breaker opens
    assert pair.a._breaker.state == "open"
    time.sleep(2.5)  # an outage of some length (replay attempts fail meanwhile)
    resume(paused_server)
    pair.write("v2")  # the store answers: this commit's bump is the breaker's probe
    assert pair.a._breaker.state == "closed"
    assert not pair.a._pending_bumps
    assert not pair.a._pending_deletes
    assert pair.read_b() == ("v2", "v2")


def test_idle_writer_delivers_on_replayers_next_attempt(
    pair: Pair, paused_server: RedisServer
) -> None:
    cache = pair.a
    attempts: list[tuple[float, bool]] = []  # (started, delivered)
    attempted = threading.Event()
    replayed = cache._replayed

    def watched() -> bool:
        started = time.monotonic()
        ok = False
        try:
            ok = replayed()
            return ok
        finally:
            attempts.append((started, ok))
            attempted.set()

    cache._replayed = watched  # type: ignore[method-assign]
    pause(paused_server)
    pair.write("v1")  # remembered; the writer makes no further store call
    time.sleep(2.5)
    resumed = time.monotonic()
    resume(paused_server)

    def settled() -> bool:  # delivered, or an attempt begun after the store answered ended
        pending = cache._pending_bumps or cache._pending_deletes
        return not pending or any(started > resumed for started, _ in attempts)

    deadline = time.monotonic() + 30  # a generous bound for a loaded machine, not a speed test
    while not settled() and time.monotonic() < deadline:
        attempted.wait(0.5)
        attempted.clear()
    assert not cache._pending_bumps
    assert not cache._pending_deletes
    assert pair.read_b() == ("v1", "v1")
