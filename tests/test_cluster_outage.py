"""Redis Cluster nodes that stop answering (SIGSTOP: a frozen host, a long fork, a
network stall): each failed store operation costs about one socket timeout, as on one
server, and the write-behind backlog never takes a node that did not answer for an
empty one (regression audit C1-02, C1-03)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import sqlalchemy as sa
from helpers import make_env
from models import User
from redis.crc import key_slot
from redis_servers import HOST, RedisClusterProcesses, RedisServer
from test_write_behind import WB, Counter, wb_env

import sa_cache
from sa_cache.backends.base import BackendError
from sa_cache.backends.redis_url import backend_from_url
from sa_cache.write_behind import partition_of_key

T = TypeVar("T")

TIMEOUT = 0.25
"""The socket timeout sa_cache configures by default (`CacheConfig.socket_timeout`)."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcesses]:
    processes = RedisClusterProcesses().start()
    try:
        yield processes
    finally:
        processes.stop()


@contextmanager
def frozen(servers: list[RedisServer]) -> Iterator[None]:
    """The servers stopped (SIGSTOP: connections are accepted, nothing answers), then
    continued. Shorter than the cluster's node timeout: they stay members."""
    for server in servers:
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for server in servers:
            assert server.process is not None
            server.process.send_signal(signal.SIGCONT)


def server_of(cluster: RedisClusterProcesses, key: str) -> RedisServer:
    """The primary serving ``key``'s slot."""
    slot = key_slot(key.encode())
    client = redis.Redis(HOST, cluster.servers[0].port, socket_timeout=5)
    try:
        for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return next(s for s in cluster.servers if s.port == int(primary[1]))
    finally:
        client.close()
    raise AssertionError(f"no node serves slot {slot}")


# -- C1-03: a failed operation costs about one timeout ------------------------------------


def test_a_pipeline_over_frozen_nodes_costs_about_one_timeout(
    cluster: RedisClusterProcesses, namespace: str
) -> None:
    """A pipeline spanning every node (a commit, a read of keys in several slots) fails
    after about one socket timeout when no node answers, not one per node or per
    command; so does one command. Then the nodes answer again and so does the backend."""
    store = backend_from_url(cluster.url)
    keys = [f"{namespace}:{i}" for i in range(12)]  # (over every node)
    assert len({server_of(cluster, k).port for k in keys}) == len(cluster.servers)
    cas = [(k, None, b"v", 60.0) for k in keys]
    clock, gens = f"{{{namespace}}}:clock", [f"{{{namespace}}}:g"]
    ops: dict[str, Callable[[], object]] = {
        "commit": lambda: store.commit(cas, [], clock, gens, "n"),
        "get_many": lambda: store.get_many(keys),
        "swap": lambda: store.swap_many_later(keys, b"x", 60.0)(),  # noqa: PLW0108
        "add": lambda: store.add(keys[0], b"v", 60.0),
        "apply": lambda: store.apply([(k, b"v", 60.0) for k in keys]),
        "commit again": lambda: store.commit(cas, keys, clock, gens, "n"),
    }
    try:
        assert store.commit(cas, [], clock, gens, "n") == [True] * len(keys)
        assert store.get_many(keys) == [b"v"] * len(keys)
        took: dict[str, float] = {}
        with frozen(cluster.servers):
            for name, op in ops.items():
                started = time.monotonic()
                with pytest.raises(BackendError):
                    op()
                took[name] = round(time.monotonic() - started, 2)
        assert max(took.values()) <= 2 * TIMEOUT, took
        # (what was sent before the timeouts may still have run: only an answer counts)
        assert len(eventually(lambda: store.get_many(keys))) == len(keys)
    finally:
        store.unlink_many(keys)
        store.close()


def test_requests_during_a_cluster_outage_cost_about_one_timeout(
    engine: sa.Engine, cluster: RedisClusterProcesses, namespace: str
) -> None:
    """Every node stalls. README: commands time out after 0.25 s, the breaker opens
    after 5 failures and a commit's invalidation is then tried as one probe: a request
    that reads, gets and commits costs about that much, as on one server (there about
    [1.3, 0.26, 0.26, 0.26] s), not several timeouts per failed command. Once the
    nodes answer, the invalidations made meanwhile are delivered: nothing stale."""
    cache = sa_cache.Cache.from_url(cluster.url, namespace=namespace)
    cache.register(User, ttl=300)
    made = make_env(engine, cache)
    env = next(made)
    stmt = sa.select(User).order_by(User.id).options(sa_cache.with_cache())
    try:
        with env.Session() as s:
            s.scalars(stmt).all()
            s.get(User, 1)
        took = []
        with frozen(cluster.servers):
            for i in range(4):
                started = time.monotonic()
                with env.Session() as s:  # a request: a cached query, a get, an update
                    assert len(s.scalars(stmt).all()) == 3
                    user = s.get(User, 1)
                    assert user is not None
                    user.name = f"outage {i}"
                    s.commit()
                took.append(round(time.monotonic() - started, 2))
        message = f"requests during the outage took {took} s (socket timeout {TIMEOUT} s)"
        assert took[0] <= 8 * TIMEOUT, message
        assert max(took[1:]) <= 3 * TIMEOUT, message
        wait_until(lambda: not (cache._pending_bumps or cache._pending_deletes))
        with env.Session() as s:
            assert s.scalars(stmt).all()[0].name == "outage 3"
            user = s.get(User, 1)
            assert user is not None
            assert user.name == "outage 3"
    finally:
        made.close()


# -- C1-02: the write-behind backlog while a node stalls ----------------------------------


@pytest.fixture
def wb(tmp_path: Path, cluster: RedisClusterProcesses, namespace: str) -> Iterator[WB]:
    """Write-behind on the cluster, SQLite (the backlog is read from Redis only)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/wb.db")
    try:
        with wb_env(engine, cluster.url, namespace) as env:
            yield env
    finally:
        engine.dispose()


def rows_on_one_node(wb: WB, cluster: RedisClusterProcesses) -> tuple[RedisServer, list[int]]:
    """The node holding partition 0's stream, and ids of Counter rows queued only in
    partitions it holds."""
    queue = wb.queue
    spec = wb.cache.entities[sa.inspect(Counter)]
    holder = {p: server_of(cluster, queue.stream(p)) for p in range(queue.config.partitions)}
    server = holder[0]
    ids = [i for i in range(1, 200) if holder[partition_of_key(spec.key(wb.cache, (i,)))] is server]
    assert ids, "no row falls in that node's partitions"
    return server, ids[:8]


def queue_rows(wb: WB, ids: list[int]) -> int:
    with wb.Session() as s:
        s.add_all([Counter(id=i, n=i) for i in ids])
        s.commit()
    queued = sum(wb.queue.pending().values())
    assert queued >= len(ids)
    return queued


def test_flush_waits_for_a_node_that_stalls(wb: WB, cluster: RedisClusterProcesses) -> None:
    """`flush()` returns once every change queued so far is in the database (README:
    call it before bulk DML). The node holding the queued partitions stalls as it
    starts: it must wait for that node, not take its partitions for empty; with no
    worker it ends in TimeoutError."""
    server, ids = rows_on_one_node(wb, cluster)
    queue_rows(wb, ids)
    with frozen([server]):
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="not read"):
            wb.queue.flush(timeout=1.0)  # no worker runs: nothing can be applied
        assert time.monotonic() - started < 3
    with wb.running():
        with frozen([server]):
            threading.Timer(1.0, server.process.send_signal, (signal.SIGCONT,)).start()  # type: ignore[union-attr]
            wb.queue.flush(timeout=20)
        assert all(i in wb.db() for i in ids), f"flush() returned before {ids} were applied"


def test_pending_never_undercounts_a_stalled_node(wb: WB, cluster: RedisClusterProcesses) -> None:
    """`pending()` (and `sa-cache stats`' backlog) does not report a queued partition as
    empty because its node did not answer in time: it raises `BackendError`."""
    server, ids = rows_on_one_node(wb, cluster)
    before = queue_rows(wb, ids)
    with frozen([server]), pytest.raises(BackendError, match="could not read partition"):
        wb.queue.pending()
    assert eventually(lambda: sum(wb.queue.pending().values())) == before


def wait_until(done: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "not within {timeout} s"
        time.sleep(0.05)


def eventually(read: Callable[[], T], timeout: float = 5.0) -> T:
    """``read()`` once it does not raise `BackendError` (the first call to a node that
    stalled may still fail)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read()
        except BackendError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
