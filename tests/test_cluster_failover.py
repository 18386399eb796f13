"""Redis Cluster failover: a primary killed (SIGKILL), its replica promoted.

Every test kills the primary the process's client uses as its *default node* (redis-py
makes the first primary of CLUSTER SLOTS that node) and picks a namespace (and rows)
whose keys the commit touches live on other nodes: redis-py's own cluster pipeline
asked the default node for the keys of every EVAL, so once it died every commit
script, replay and write-behind pipeline failed forever while the cluster was healthy
again (regression audit C1-01). (A command sent to the dead node made redis-py pick
another default node, which hid the bug.)
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import sqlalchemy as sa
from helpers import make_env
from models import User
from redis.crc import key_slot
from redis_servers import HOST, RedisServer, missing_service
from sqlalchemy.orm import Session, sessionmaker
from test_write_behind import PARTITIONS, Counter, wb_env

import sa_cache
from sa_cache.backends.base import BackendError
from sa_cache.write_behind import partition_of_key

T = TypeVar("T")

NODE_TIMEOUT_MS = 1000
"""--cluster-node-timeout: a dead primary is replaced within a few seconds."""


class ReplicaCluster:
    """Three primaries with a replica each (``redis-cli --cluster create
    --cluster-replicas 1``), node timeout `NODE_TIMEOUT_MS`."""

    def __init__(self) -> None:
        self.servers: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{s.port}" for s in self.servers)

    def start(self) -> ReplicaCluster:
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        args += ["--repl-diskless-sync-delay", "0"]
        for _ in range(6):
            server = RedisServer(args=args, cluster_bus=True)
            self.servers.append(server)
            server.start()
        addresses = [f"{HOST}:{s.port}" for s in self.servers]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "1",
             "--cluster-yes"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.wait_healthy()
        return self

    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.process is not None]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """cluster_state:ok on every live node, no slot served by a dead one, and every
        replica in sync."""
        dead = {s.port for s in self.servers if s.process is None}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._healthy(dead):
                return
            time.sleep(0.1)
        raise AssertionError("the cluster did not become healthy")

    def _healthy(self, dead: set[int]) -> bool:
        for server in self.live():
            client = redis.Redis(HOST, server.port, socket_timeout=1)
            try:
                if client.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                    return False
                for _, _, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                    if int(primary[1]) in dead:
                        return False
                info = client.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def owner(self, slot: int) -> int:
        """The port of the primary serving ``slot``."""
        client = redis.Redis(HOST, self.live()[0].port, socket_timeout=5)
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            client.close()
        raise AssertionError(f"slot {slot} is not served")

    def kill(self, port: int) -> None:
        next(s for s in self.servers if s.port == port).kill()

    def stop(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []


@pytest.fixture
def replica_cluster() -> Iterator[ReplicaCluster]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing_service("redis-server / redis-cli not on PATH: cannot start a Redis Cluster")
    cluster = ReplicaCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def namespace_off(
    cluster: ReplicaCluster, port: int, base: str, keys: Callable[[str], list[str]]
) -> str:
    """A namespace (``base`` and a number) none of whose ``keys(namespace)`` lives on
    the primary at ``port``: so only the default node's death is in the way."""
    for i in range(1000):
        ns = f"{base}{i}"
        if all(cluster.owner(slot(k)) != port for k in keys(ns)):
            return ns
    raise AssertionError("no such namespace")


def names(session: Session) -> list[str]:
    stmt = sa.select(User).order_by(User.id).options(sa_cache.with_cache())
    return [u.name for u in session.scalars(stmt)]


def test_a_commit_after_a_failover_reaches_other_processes(
    engine: sa.Engine, replica_cluster: ReplicaCluster, namespace: str
) -> None:
    """A primary dies, its replica takes over, the cluster is healthy again; then a
    commit returns. Another process must be served the new rows, not the ones from
    before it, and the writer must hold no undelivered invalidation."""
    first = replica_cluster.owner(0)  # redis-py's default node
    namespace = namespace_off(
        replica_cluster, first, namespace, lambda ns: [f"{{{ns}}}", f"{ns}:v1:e:sac_users:(1,)"]
    )
    writer = sa_cache.Cache.from_url(replica_cluster.url, namespace=namespace)
    writer.register(User, ttl=300)
    made = make_env(engine, writer)
    env = next(made)
    reader = sa_cache.Cache.from_url(replica_cluster.url, namespace=namespace)
    reader.register(User, ttl=300)
    ReaderSession = sessionmaker(engine, class_=sa_cache.CachingSession, cache=reader)
    try:
        with env.Session() as s:
            assert names(s) == ["user1", "user2", "user3"]  # cached
            assert s.get(User, 1) is not None  # entity entry cached
        with ReaderSession() as s:
            env.log.clear()
            assert names(s) == ["user1", "user2", "user3"]
            assert env.log.statements == []  # a hit

        default = writer.backend.client.get_default_node()  # type: ignore[attr-defined]
        assert default.port == first
        replica_cluster.kill(first)
        replica_cluster.wait_healthy()

        with env.Session() as s:
            user = s.get(User, 1)
            assert user is not None
            user.name = "renamed"
            s.commit()
        pending = len(writer._pending_bumps) + len(writer._pending_deletes)
        assert pending == 0, f"undelivered invalidations; stats {writer.stats.snapshot()}"

        with ReaderSession() as s:
            seen = names(s)
            entity = s.get(User, 1)
            assert entity is not None
            assert (seen[0], entity.name) == ("renamed", "renamed")
    finally:
        reader.close()
        made.close()


def test_write_behind_after_a_failover_queues_and_applies(
    tmp_path: Path, replica_cluster: ReplicaCluster, namespace: str
) -> None:
    """After the failover a write-behind transaction over several partitions is still
    queued (its commit scripts go in one pipeline), not written synchronously as after
    a queue failure; a worker (lease-checked reads, acknowledgements) applies it, and
    `pending` / `flush` see it through. The rows are in partitions of live primaries;
    the other partitions moved with the failover (the first call that reaches one
    fails, and has the slot map refreshed). One dialect: the store calls are the same."""
    first = replica_cluster.owner(0)
    namespace = namespace_off(
        replica_cluster,
        first,
        namespace,
        lambda ns: [f"{{{ns}}}", *(f"{ns}:wb:{what}" for what in ("workers", "flush", "dead"))],
    )
    engine = sa.create_engine(f"sqlite:///{tmp_path}/wb.db")
    try:
        with wb_env(engine, replica_cluster.url, namespace) as wb:
            default = wb.cache.backend.client.get_default_node()  # type: ignore[attr-defined]
            assert default.port == first
            spec = wb.cache.entities[sa.inspect(Counter)]
            live = [
                p
                for p in range(PARTITIONS)
                if replica_cluster.owner(slot(wb.queue.stream(p))) != first
            ]
            ids = [i for i in range(1, 200) if partition_of_key(spec.key(wb.cache, (i,))) in live]
            ids = ids[:9]
            assert len({partition_of_key(spec.key(wb.cache, (i,))) for i in ids[1:]}) > 1
            with wb.Session() as s:  # the queue in use before (its first use checks INFO)
                s.add(Counter(id=ids[0], n=ids[0]))
                s.commit()
            replica_cluster.kill(first)
            replica_cluster.wait_healthy()

            with wb.Session() as s:
                s.add_all([Counter(id=i, n=i) for i in ids[1:]])
                s.commit()
            stats = wb.cache.stats.snapshot()
            assert stats.get("write_behind.queued") == len(ids), stats
            assert eventually(lambda: sum(wb.queue.pending().values())) >= len(ids)
            with wb.running():
                wb.queue.flush(timeout=20)
            assert wb.db() == {i: (i, "new") for i in ids}
            assert wb.queue.pending() == {}
    finally:
        engine.dispose()


def slot(key: str) -> int:
    return key_slot(key.encode())


def eventually(read: Callable[[], T], timeout: float = 5.0) -> T:
    """``read()`` once it does not raise `BackendError` (a node that moved in a
    failover fails the first call that reaches it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read()
        except BackendError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
