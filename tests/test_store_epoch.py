"""A Redis server that comes back with older contents (restarted from its RDB file,
as after a crash with persistence on): entries that later commits invalidated must
not be served (`sa_cache.store_epoch`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
from redis_servers import RedisServer
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sa_cache
from sa_cache.store_epoch import epoch_key


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "sac_epoch_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(sa.String(20))


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
def notes(engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Note(id=1, text="old"))
        s.commit()
    yield engine
    Base.metadata.drop_all(engine)


NOTES = select(Note.text).options(sa_cache.with_cache(ttl=600))


def test_a_server_restored_from_an_older_file_serves_nothing_invalidated_since(
    server: RedisServer, notes: sa.Engine, namespace: str
) -> None:
    cache = sa_cache.Cache.from_url(server.url, namespace=namespace)
    cache.register(Note, ttl=600)
    Cached = sessionmaker(notes, class_=sa_cache.CachingSession, cache=cache)
    try:
        with Cached() as s:  # entries of the query, the row and a value
            assert s.scalars(NOTES).all() == ["old"]
            assert s.get(Note, 1).text == "old"  # type: ignore[union-attr]
        assert cache.get_or_set("k", lambda: "old") == "old"
        cache.wait_for_fills()
        redis.Redis(port=server.port).save()  # the file the server will come back from
        with Cached() as s:  # committed after the save: invalidates all three
            s.get(Note, 1).text = "new"  # type: ignore[union-attr]
            s.commit()
        cache.delete("k")
        server.kill()  # a crash: what came after the save is lost
        server.start()
        for c in (cache, sa_cache.Cache.from_url(server.url, namespace=namespace)):
            if c is not cache:
                c.register(Note, ttl=600)
            Again = sessionmaker(notes, class_=sa_cache.CachingSession, cache=c)
            for _ in range(3):  # (the first call after the crash may find the store down)
                with Again() as s:
                    assert s.scalars(NOTES).all() == ["new"]
                    assert s.get(Note, 1).text == "new"  # type: ignore[union-attr]
                assert c.get_or_set("k", lambda: "new") == "new"
            if c is not cache:
                c.close()
        assert cache.stats["store.epoch_changed"] >= 1
        assert redis.Redis(port=server.port).get(epoch_key(cache)) is not None
    finally:
        cache.close()


def test_an_ordinary_reconnect_invalidates_nothing(server: RedisServer, namespace: str) -> None:
    """Only a new server run counts: connections closed and opened again to the same
    run keep the entries."""
    cache = sa_cache.Cache.from_url(server.url, namespace=namespace)
    try:
        assert cache.get_or_set("k", lambda: "v1") == "v1"
        # a namespace new to the server holds nothing to invalidate: the run is noted
        assert cache.stats["store.epoch_changed"] == 0
        assert redis.Redis(port=server.port).get(epoch_key(cache)) is not None
        cache.backend.client.connection_pool.disconnect()  # type: ignore[attr-defined]
        redis.Redis(port=server.port).client_kill_filter(_type="normal", skipme=True)
        assert cache.get_or_set("k", lambda: "v2") == "v1"
        assert cache.stats["store.epoch_changed"] == 0
    finally:
        cache.close()


def test_a_user_the_server_does_not_allow_info_still_gets_a_cache(
    server: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user without INFO: the check is skipped with a warning, never blocks the
    connection (every store call used to fail)."""
    admin = redis.Redis(port=server.port)
    admin.acl_setuser(
        "app", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-info"]
    )
    cache = sa_cache.Cache.from_url(
        f"redis://app:pw@127.0.0.1:{server.port}/0", namespace=namespace
    )
    try:
        cache.set("k", 1)
        assert cache.get("k") == 1
        assert cache.stats["store.error"] == 0
        assert cache.stats["store.epoch_unchecked"] >= 1  # (each new connection)
        assert "refused the store epoch check" in caplog.text
    finally:
        cache.close()


def test_the_clients_own_connect_function_still_runs(server: RedisServer, namespace: str) -> None:
    """A client passed in with a ``redis_connect_func`` of its own: it still runs (the
    check comes after it), for every namespace on the pool; a closed cache is checked
    no more."""
    from sa_cache.backends.redis import RedisBackend

    calls: list[object] = []

    def mine(conn: object) -> None:
        calls.append(conn)
        conn.on_connect()  # type: ignore[attr-defined]

    client = redis.Redis(port=server.port, redis_connect_func=mine)
    first = sa_cache.Cache(RedisBackend(client), namespace=namespace)
    second = sa_cache.Cache(RedisBackend(client), namespace=namespace + "b")
    try:
        first.set("k", 1)
        second.set("k", 1)
        assert calls
        admin = redis.Redis(port=server.port)
        assert admin.get(epoch_key(first)) == admin.get(epoch_key(second)) is not None
        second.close()
        for cache in (first, second):  # as a file of another run would hold them
            admin.set(epoch_key(cache), b"another-run")
        client.connection_pool.disconnect()
        assert first.get("k", "gone") == "gone"  # invalidated on the new connection
        assert first.stats["store.epoch_changed"] == 1
        assert admin.get(epoch_key(second)) == b"another-run"  # closed: not checked
    finally:
        first.close()


def test_a_namespace_another_one_cannot_check_is_still_checked(
    server: RedisServer, namespace: str
) -> None:
    """Two namespaces on one client, the user allowed only the first's keys: the
    second's check is refused, the first's still runs (a refusal used to turn the
    check off for the whole pool, and the restored entry was served)."""
    from sa_cache.backends.redis import RedisBackend

    def app_user() -> None:  # (ACLs are not in the RDB file)
        redis.Redis(port=server.port).acl_setuser(
            "app", enabled=True, passwords=["+pw"], keys=[f"{namespace}:*"], commands=["+@all"]
        )

    app_user()
    admin = redis.Redis(port=server.port)
    client = redis.Redis(port=server.port, username="app", password="pw")
    mine = sa_cache.Cache(RedisBackend(client), namespace=namespace)
    other = sa_cache.Cache(RedisBackend(client), namespace="elsewhere")
    try:
        mine.set("k", "old")
        admin.save()  # the file the server comes back from
        mine.delete("k")
        server.kill()
        server.start()
        app_user()
        client.connection_pool.disconnect()
        assert mine.get("k", "gone") == "gone"
        assert mine.stats["store.epoch_changed"] == 1
        assert other.stats["store.epoch_unchecked"] >= 1
    finally:
        other.close()
        mine.close()
