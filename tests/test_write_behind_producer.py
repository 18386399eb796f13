"""The write-behind producer's cost: what one commit sends to Redis, and what it skips."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_servers import RedisServer
from test_write_behind import WB, Counter, wb_env

import sa_cache
from sa_cache.backends import redis_direct as write_behind_redis
from sa_cache.backends.redis import RedisBackend
from sa_cache.write_behind import WriteBehind, write_behind_for


@contextmanager
def round_trips() -> Iterator[list[bytes]]:
    """Every command buffer sent to any Redis connection meanwhile (one per round trip)."""
    sent: list[bytes] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join([command] if isinstance(command, bytes) else command))
        original(self, command, check_health)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        yield sent


def test_a_commit_is_one_round_trip(wb_sqlite: WB) -> None:
    wb = wb_sqlite
    with wb.Session() as s:
        s.add_all([Counter(id=1), Counter(id=2)])
        s.commit()  # the first commit also checks Redis persistence, once
    for _ in range(3):
        with wb.Session() as s:
            row = s.get(Counter, 1)
            assert row is not None
            row.n += 1
            with round_trips() as sent:
                s.commit()
            assert len(sent) == 1  # the commit script: records and cache entries
            assert b"CONFIG" not in sent[0]
            assert b"INFO" not in sent[0]
    queue = write_behind_for(wb.cache)
    assert queue._direct is not None
    assert len(queue._direct.kept) == 1  # one connection serves every commit of a thread
    assert queue.client.connection_pool._created_connections <= 2
    with wb.Session() as s:
        assert s.get(Counter, 1).n == 3  # type: ignore[union-attr]


def test_setting_the_same_value_queues_nothing(wb_sqlite: WB) -> None:
    wb = wb_sqlite
    with wb.Session() as s:
        s.add(Counter(id=1, n=4))
        s.commit()
    with wb.Session(expire_on_commit=False) as s:
        row = s.get(Counter, 1)
        assert row is not None
        row.n = 4  # a set event, but no net change: like Session.is_modified
        assert row in s.dirty
        with round_trips() as sent:
            s.commit()
        assert sent == []
        row.n = 5
        row.n = 4  # back again before the flush: no change either
        with round_trips() as sent:
            s.commit()
        assert sent == []
        row.label = "other"
        s.commit()
    wb.drain()
    assert wb.db() == {1: (4, "other")}


def test_commit_without_the_script_cached(engine: sa.Engine, namespace: str) -> None:
    """A server that lost its scripts (restart, SCRIPT FLUSH): EVALSHA falls back to EVAL."""
    with RedisServer() as server, wb_env(engine, server.url, namespace) as wb:
        with wb.Session() as s:
            s.add(Counter(id=1, n=1))
            s.commit()
        redis.Redis.from_url(server.url).script_flush()
        with wb.Session() as s:
            s.get(Counter, 1).n += 1  # type: ignore[union-attr]
            s.commit()
        wb.drain()
        assert wb.db() == {1: (2, "new")}


def test_a_client_with_retries_goes_through_redis_py(
    wb_sqlite: WB, redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries configured on the client are redis-py's to run: no shortcut then."""
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 2))
    cache = sa_cache.Cache(RedisBackend(client), namespace=namespace)
    cache.register(Counter, ttl=60, write="behind")
    called: list[str] = []
    original = redis.Redis.execute_command

    def spy(self: redis.Redis, *args: Any, **options: Any) -> Any:
        called.append(str(args[0]))
        return original(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", spy)
    try:
        factory = sa.orm.sessionmaker(wb_sqlite.engine, class_=sa_cache.CachingSession, cache=cache)
        with factory() as s:
            s.add(Counter(id=9, n=1))
            s.commit()
        assert "EVALSHA" in called
        queue: WriteBehind = write_behind_for(cache)
        assert queue._direct is not None
        assert queue._direct.pool is None
    finally:
        cache.close()


def test_a_kept_connection_closed_by_the_server_is_replaced(
    engine: sa.Engine, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarted while the producer's connection sat idle: the next commit is still
    queued (not written synchronously for want of a connection)."""
    monkeypatch.setattr(write_behind_redis, "IDLE_CHECK", 0.0)
    with RedisServer() as server, wb_env(engine, server.url, namespace) as wb:
        with wb.Session() as s:
            s.add(Counter(id=1, n=1))
            s.commit()
        wb.drain()
        server.kill()
        server.start()
        with wb.Session() as s:
            s.add(Counter(id=2, n=1))
            s.commit()
        assert wb.db() == {1: (1, "new")}  # queued, not written synchronously
        wb.drain()
        assert wb.db() == {1: (1, "new"), 2: (1, "new")}


def test_direct_sends(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 0))
    try:
        direct = write_behind_redis.Direct(client)
        assert direct.execute("PING") == b"PONG"
        ((kept, _),) = direct.kept
        with pytest.raises(redis.ResponseError):
            direct.execute("NO-SUCH-COMMAND")
        assert direct.kept == []  # an error gives the connection back to the pool
        assert kept in client.connection_pool._available_connections
        assert direct.execute("ECHO", b"x") == b"x"
        direct.pid = -1  # as in a forked child: the parent's connections are left alone
        before = direct.kept[0][0]
        client.connection_pool.pid = -1  # ... and redis-py resets its pool
        assert direct.execute("PING") == b"PONG"
        assert direct.kept[0][0] is not before
        for _ in range(write_behind_redis.KEEP + 2):
            direct.execute("PING")
        assert len(direct.kept) == 1
    finally:
        client.close()
