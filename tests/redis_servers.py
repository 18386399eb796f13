"""Real redis-server processes for tests: one server or a three-node cluster, on free ports.

Every server runs in a temporary directory with persistence off (``--save ""
--appendonly no``). The pytest fixtures `redis_url` and `redis_cluster_url` find or
start the servers once per session; conftest.py imports them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest
import redis

IN_CI = os.environ.get("CI", "").lower() == "true"
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
CLUSTER_SLOTS = 16384


class RedisServerError(RuntimeError):
    """A redis-server process did not start or a cluster did not form."""


def missing_service(reason: str) -> None:
    """Skip the test, or fail it in CI, because a service is missing."""
    if IN_CI:
        pytest.fail(f"CI=true and a required service is missing: {reason}")
    pytest.skip(reason)


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A TCP port nobody listens on (and, for a cluster node, its bus port + 10000)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if not cluster_bus or (port + 10000 < 65536 and port_is_free(port + 10000)):
            return port


def answers_ping(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True when a Redis server (or Sentinel) at host:port answers PING."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed port; `restart` comes back on the same port.

    ``args`` are extra command-line options; ``config`` (text) is written to a config
    file passed first (Sentinel needs one). ``directory`` defaults to a temporary
    directory that `close` removes.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        args: Sequence[str] = (),
        config: str | None = None,
        directory: Path | None = None,
        cluster_bus: bool = False,
    ) -> None:
        self.port = port if port is not None else free_port(cluster_bus=cluster_bus)
        self.args = tuple(args)
        self.config = config
        self._own_directory = directory is None
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        assert self.directory is not None
        return self.directory / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> RedisServer:
        if self.process is not None:
            raise RedisServerError(f"redis-server on port {self.port} is already running")
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisServerError("redis-server is not on PATH")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=f"sa-cache-redis-{self.port}-"))
        command = [exe]
        if self.config is not None:
            config_path = self.directory / "redis.conf"
            config_path.write_text(self.config)
            command.append(str(config_path))
        command += ["--port", str(self.port), "--bind", HOST, "--dir", str(self.directory)]
        command += ["--save", "", "--appendonly", "no", "--daemonize", "no", *self.args]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RedisServerError(
                    f"redis-server on port {self.port} exited with code {code}; "
                    f"log tail:\n{self.log_tail()}"
                )
            if answers_ping(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RedisServerError(
            f"redis-server on port {self.port} did not answer PING within "
            f"{START_TIMEOUT:.0f} s; log tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Shut the server down (SIGTERM, then SIGKILL after 5 s)."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def restart(self) -> RedisServer:
        """Stop if running, then start again on the same port."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory."""
        self.stop()
        if self._own_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisClusterProcesses:
    """A Redis Cluster of ``nodes`` primaries (no replicas), each its own redis-server."""

    def __init__(self, nodes: int = 3) -> None:
        self.node_count = nodes
        self.directory: Path | None = None
        self.servers: list[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{s.port}" for s in self.servers)

    def start(self) -> RedisClusterProcesses:
        self.directory = Path(tempfile.mkdtemp(prefix="sa-cache-cluster-"))
        try:
            for i in range(self.node_count):
                node_dir = self.directory / f"node{i}"
                node_dir.mkdir()
                args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
                args += ["--cluster-node-timeout", "5000"]
                server = RedisServer(args=args, directory=node_dir, cluster_bus=True)
                self.servers.append(server)
                server.start()
            self._join()
        except BaseException:
            self.stop()
            raise
        return self

    def _join(self) -> None:
        """Give each node a slot range, introduce them, wait for cluster_state:ok."""
        clients = [redis.Redis(HOST, s.port, socket_timeout=5) for s in self.servers]
        try:
            share = CLUSTER_SLOTS // len(clients)
            for i, client in enumerate(clients):
                last = CLUSTER_SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)
                client.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
            for server in self.servers[1:]:
                clients[0].execute_command("CLUSTER MEET", HOST, server.port)
            deadline = time.monotonic() + 2 * START_TIMEOUT
            while time.monotonic() < deadline:
                infos = [client.execute_command("CLUSTER INFO") for client in clients]
                if all(
                    info["cluster_state"] == "ok"
                    and int(info["cluster_known_nodes"]) == len(clients)
                    for info in infos
                ):
                    return
                time.sleep(0.05)
            raise RedisServerError(f"cluster did not reach cluster_state:ok: {infos}")
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        """Kill every node and remove the temporary directory."""
        for server in self.servers:
            server.kill()
        self.servers = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> RedisClusterProcesses:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _docker_engine_present() -> bool:
    """Cheap check before importing testcontainers (which needs a Docker engine)."""
    return bool(os.environ.get("DOCKER_HOST")) or os.path.exists("/var/run/docker.sock")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A standalone Redis: $SA_CACHE_TEST_REDIS_URL, 127.0.0.1:6379, or testcontainers."""
    url = os.environ.get("SA_CACHE_TEST_REDIS_URL")
    if url:
        yield url
        return
    if answers_ping(6379):
        yield f"redis://{HOST}:6379/0"
        return
    reason = f"SA_CACHE_TEST_REDIS_URL is not set and nothing answers PING on {HOST}:6379"
    container = None
    if _docker_engine_present():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from testcontainers.redis import RedisContainer

                container = RedisContainer("redis:7").start()
                host = container.get_container_host_ip()
                port = container.get_exposed_port(6379)
        except Exception as exc:
            first_line = f"{type(exc).__name__}: {exc}".splitlines()[0]
            reason += f"; testcontainers failed ({first_line})"
            container = None
    else:
        reason += "; no Docker engine for testcontainers"
    if container is None:
        missing_service(reason)
        return
    try:
        yield f"redis://{host}:{port}/0"
    finally:
        container.stop()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A three-node Redis Cluster started for the session (needs redis-server on PATH)."""
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not on PATH: cannot start a local Redis Cluster")
    cluster = RedisClusterProcesses().start()
    try:
        yield cluster.url
    finally:
        cluster.stop()
