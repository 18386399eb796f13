"""A process forked while the Cluster client's background slot-map refresh runs
(`redis_cluster_client.Refresher`): ``NodesManager.initialize`` holds the manager's
locks for the whole discovery, and the child inherits them held by a thread it does
not have. The child must be able to refresh its slot map again (else, after a
failover, its commands to a moved slot fail for good and its invalidations are never
delivered). Regression audit rf3-02."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from redis_servers import RedisClusterProcesses

import sa_cache
from sa_cache.backends.base import BackendError


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcesses]:
    processes = RedisClusterProcesses().start()
    try:
        yield processes
    finally:
        processes.stop()


def _in_child(check, limit: float = 15.0) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            code = 0 if check() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.02)


def test_a_child_forked_during_a_background_refresh_can_refresh_again(
    cluster: RedisClusterProcesses, namespace: str
) -> None:
    cache = sa_cache.Cache.from_url(cluster.url, namespace=namespace)
    try:
        cache.backend.get_many(["a", "b"])  # the client is built, the slots discovered
        client = cache.backend.client  # type: ignore[attr-defined]
        refresher = client.refresher
        # Every node stalls: the refresh a failure starts takes a socket timeout per node.
        for server in cluster.servers:
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(BackendError):  # a read fails: a refresh starts
                cache.backend.get_many([f"{namespace}:{i}" for i in range(20)])
            assert refresher._running
            lock = client.nodes_manager._initialization_lock
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:  # until the refresh thread holds it
                if not lock.acquire(blocking=False):
                    break
                lock.release()
                time.sleep(0.002)
            else:
                pytest.fail("the background refresh never took the initialization lock")

            def child() -> bool:
                time.sleep(1.5)  # the parent's nodes answer again by now
                # The refresh sa_cache asks for after a failure (background thread):
                refresher._started = float("-inf")
                refresher.soon()
                deadline = time.monotonic() + 3
                while refresher._running and time.monotonic() < deadline:
                    time.sleep(0.02)
                background_done = not refresher._running
                # What a MOVED reply does every reinitialize_steps-th time (synchronous):
                done = threading.Event()

                def moved_refresh() -> None:
                    port = cluster.servers[0].port
                    client.nodes_manager.initialize(
                        additional_startup_nodes_info=[("127.0.0.1", port)]
                    )
                    done.set()

                threading.Thread(target=moved_refresh, daemon=True).start()
                moved_done = done.wait(3)
                print(
                    f"child: background refresh finished={background_done}, "
                    f"MOVED refresh finished={moved_done}",
                    flush=True,
                )
                return background_done and moved_done

            pid_code = []
            resume = threading.Timer(
                0.5,
                lambda: [
                    s.process.send_signal(signal.SIGCONT) for s in cluster.servers if s.process
                ],
            )
            resume.start()
            pid_code.append(_in_child(child))
            resume.join()
        finally:
            for server in cluster.servers:
                if server.process is not None:
                    server.process.send_signal(signal.SIGCONT)
        assert pid_code == [0], (
            "in the forked child the slot-map refresh never finished "
            f"(exit code {pid_code[0]}: 1 = hung, -9 = killed)"
        )
    finally:
        cache.close()


def test_control_a_child_forked_with_no_refresh_running_refreshes(
    cluster: RedisClusterProcesses, namespace: str
) -> None:
    """The same child check, forked while no refresh runs: passes."""
    cache = sa_cache.Cache.from_url(cluster.url, namespace=namespace)
    try:
        cache.backend.get_many(["a", "b"])
        client = cache.backend.client  # type: ignore[attr-defined]

        def child() -> bool:
            done = threading.Event()

            def moved_refresh() -> None:
                port = cluster.servers[0].port
                client.nodes_manager.initialize(additional_startup_nodes_info=[("127.0.0.1", port)])
                done.set()

            threading.Thread(target=moved_refresh, daemon=True).start()
            return done.wait(5)

        assert _in_child(child) == 0
    finally:
        cache.close()
