"""A "Redis" that answers with well-formed replies of shapes no Redis gives (a proxy, or
another server on the port): the application works from the database (DESIGN rule 5).

The server here answers every command with one fixed reply. sa_cache's own reply
parsing, and redis-py's, met such replies with TypeError / AttributeError, which
reached ``commit()`` (before the database COMMIT: the write was lost), ``session.get``
and cached queries.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from models import User
from sqlalchemy import select

import sa_cache
from sa_cache import with_cache

REPLIES = {
    "simple string": b"+OK\r\n",
    "integer": b":1\r\n",
    "nil": b"$-1\r\n",
    "two strings": b"*2\r\n$1\r\na\r\n$1\r\nb\r\n",
}


def _commands_in(buffer: bytes) -> tuple[int, bytes]:
    """How many complete RESP commands ``buffer`` holds, and what is left after them."""
    count = 0
    while buffer.startswith(b"*"):
        try:
            end = buffer.index(b"\r\n")
            pos = end + 2
            for _ in range(int(buffer[1:end])):
                size_end = buffer.index(b"\r\n", pos)
                pos = size_end + 2 + int(buffer[pos + 1 : size_end]) + 2
        except ValueError:
            break
        if pos > len(buffer):
            break
        buffer, count = buffer[pos:], count + 1
    return count, buffer


@pytest.fixture
def odd_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a server answering every command with ``REPLIES[request.param]``."""
    reply = REPLIES[request.param]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(32)
    clients: list[socket.socket] = []

    def answer(conn: socket.socket) -> None:
        buffer = b""
        try:
            while data := conn.recv(65536):
                count, buffer = _commands_in(buffer + data)
                conn.sendall(reply * count)
        except OSError:
            pass  # (closed at teardown)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            clients.append(conn)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()
        for conn in clients:
            conn.close()


@pytest.fixture
def env(engine: sa.Engine, odd_server: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(odd_server, namespace=namespace, socket_timeout=1.0)
    cache.register(User, ttl=300)
    yield from make_env(engine, cache)


@pytest.mark.parametrize("odd_server", sorted(REPLIES), indirect=True)
def test_replies_of_unexpected_shapes_are_a_failed_store(env: Env) -> None:
    with env.Session() as s:
        s.add(User(id=10, name="new", created=sa.func.now(), balance=1))
        s.get(User, 1).name = "renamed"  # type: ignore[union-attr]
        s.commit()
    with env.engine.connect() as conn:  # the writes reached the database
        rows = conn.execute(sa.text("SELECT id, name FROM sac_users WHERE id IN (1, 10)"))
        assert sorted(rows) == [(1, "renamed"), (10, "new")]
    by_id = select(User.name).where(User.id == 1).options(with_cache())
    for _ in range(2):
        with env.Session() as s:
            assert s.get(User, 10).name == "new"  # type: ignore[union-attr]
            assert s.scalar(by_id) == "renamed"
    assert env.cache.get("k") is sa_cache.NO_VALUE
    env.cache.set("k", 1)
    assert env.cache.get_or_set("k", lambda: 2) == 2
    env.cache.invalidate(User)
    assert env.cache.stats["store.error"] > 0
