"""Redis stores through redis-py: one server or a Sentinel master, and Redis Cluster.

One round trip per `Backend` call where the store allows. Every redis-py error becomes
`BackendError` (cause chained). Building a backend never connects: an unreachable
server shows when an operation runs, as `BackendError` after about one socket timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from itertools import islice
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry
from redis.sentinel import Sentinel

from . import redis_scripts as lua
from .base import NO_VALUE, BackendError, NoValue
from .redis_direct import Direct
from .redis_later import LaterReads

__all__ = ["RedisBackend", "RedisClusterBackend", "backend_from_url"]

_ERRORS = (RedisError, RedisClusterException, OSError)
# A key from SCAN that is not UTF-8 survives the round trip scan_keys -> unlink_many.
_KEY_ERRORS = "surrogateescape"
SetItem = tuple[str, bytes, float | None]
CAS_BATCH_SIZE = 1000
"""Keys per script run: bounds how long one run keeps the server busy."""


def _px(ttl: float) -> int:
    """A positive TTL in seconds as PX milliseconds, at least 1 ms."""
    return max(1, round(ttl * 1000))


def _fail(op: str, exc: BaseException) -> BackendError:
    return BackendError(f"Redis {op} failed: {type(exc).__name__}: {exc}")


@contextmanager
def _errors(op: str) -> Iterator[None]:
    try:
        yield
    except _ERRORS as exc:
        raise _fail(op, exc) from exc


def _slot(key: str) -> int:
    return key_slot(key.encode("utf-8", _KEY_ERRORS))


class _RedisBase:
    """What both backends share; ``_c`` is the redis-py client (untyped calls)."""

    _c: Any
    _cluster_mode = False

    def set_many(self, items: Mapping[str, bytes], ttl: float | None = None) -> None:
        if ttl is not None and ttl <= 0:  # as in MemoryBackend: nothing is stored
            self.delete_many(list(items))
        elif items:
            self.apply([(k, v, ttl) for k, v in items.items()])

    def delete_many(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        with _errors("UNLINK"):
            return int(self._c.unlink(*keys))  # a cluster client splits by slot

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        c = self._c
        with _errors("SET NX"):
            if ttl is None:
                return bool(c.execute_command("SET", key, value, "NX"))
            if ttl <= 0:  # as in MemoryBackend: stores nothing, True when absent
                return not c.execute_command("EXISTS", key)
            return bool(c.execute_command("SET", key, value, "NX", "PX", _px(ttl)))

    def apply(self, sets: Sequence[SetItem] = (), deletes: Sequence[str] = ()) -> None:
        if not sets and not deletes:
            return
        c = self._c
        with _errors("apply"):
            if len(sets) == 1 and not deletes:  # the common single write: no pipeline
                self._queue_sets(c, sets)
                return
            # A cluster pipeline sends each node its commands in order, one round trip
            # per node; so here too a key both set and deleted ends up deleted.
            pipe = c.pipeline(transaction=False)
            self._queue_sets(pipe, sets)
            if self._cluster_mode:  # keys may be in different slots
                for key in deletes:
                    pipe.execute_command("UNLINK", key)
            elif deletes:
                pipe.execute_command("UNLINK", *deletes)
            pipe.execute()

    @staticmethod
    def _queue_sets(pipe: Any, sets: Iterable[SetItem]) -> None:
        for key, value, ttl in sets:
            if ttl is None:
                pipe.execute_command("SET", key, value)
            elif ttl <= 0:
                pipe.execute_command("UNLINK", key)
            else:
                pipe.execute_command("SET", key, value, "PX", _px(ttl))

    def advance(self, clock_key: str, keys: Sequence[str], nonce: str) -> int:
        c, args = self._c, (1 + len(keys), clock_key, *keys, nonce)
        with _errors("advance"):
            try:  # one round trip once the server has the script cached
                return int(c.execute_command("EVALSHA", lua.ADVANCE_SHA, *args))
            except NoScriptError:
                return int(c.execute_command("EVAL", lua.ADVANCE, *args))

    @staticmethod
    def _cas_args(
        key: str, expected: bytes | None, value: bytes | None, ttl: float | None
    ) -> tuple[Any, ...]:
        if value is not None and ttl is not None and ttl <= 0:
            value = None  # as in MemoryBackend: a ttl <= 0 stores nothing
        return (
            1,
            key,
            b"0" if expected is None else b"1",
            expected or b"",
            b"0" if value is None else b"1",
            value or b"",
            b"" if ttl is None else str(_px(ttl)).encode(),
        )

    def cas(
        self, key: str, expected: bytes | None, value: bytes | None, ttl: float | None = None
    ) -> bool:
        args = self._cas_args(key, expected, value, ttl)
        c = self._c
        with _errors("cas"):
            try:
                return bool(c.execute_command("EVALSHA", lua.CAS_SHA, *args))
            except NoScriptError:
                return bool(c.execute_command("EVAL", lua.CAS, *args))

    def cas_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, float | None]]
    ) -> list[bool]:
        if not items:
            return []
        if len(items) == 1:
            return [self.cas(*items[0])]
        c = self._c
        with _errors("cas"):
            pipe = c.pipeline(transaction=False)
            for item in items:  # EVAL, not EVALSHA: a pipeline cannot retry a NOSCRIPT
                pipe.execute_command("EVAL", lua.CAS, *self._cas_args(*item))
            return [bool(r) for r in pipe.execute()]

    def commit(
        self,
        cas: Sequence[tuple[str, bytes | None, bytes | None, float | None]],
        deletes: Sequence[str],
        clock_key: str,
        gen_keys: Sequence[str],
        nonce: str,
        tomb: tuple[bytes, float] | None = None,
    ) -> list[bool]:
        if not cas and not deletes and not gen_keys:
            return []
        c = self._c
        tomb_args = (tomb[0], str(_px(tomb[1])).encode()) if tomb is not None else (b"", b"")
        with _errors("commit"):
            if not self._cluster_mode:  # one script, one round trip
                keys = [clock_key, *gen_keys, *(item[0] for item in cas), *deletes]
                args: list[Any] = [len(gen_keys), len(cas), nonce, *tomb_args]
                for item in cas:
                    args.extend(self._cas_args(*item)[2:])
                try:
                    out = c.execute_command("EVALSHA", lua.COMMIT_SHA, len(keys), *keys, *args)
                except NoScriptError:
                    out = c.execute_command("EVAL", lua.COMMIT, len(keys), *keys, *args)
                return [bool(r) for r in out]
            # Cluster: keys live in different slots; one pipeline, one round trip per node.
            pipe = c.pipeline(transaction=False)
            for item in cas:
                args = [*self._cas_args(*item), *tomb_args]
                pipe.execute_command("EVAL", lua.CAS_OR_DELETE, *args)
            for key in deletes:
                if tomb is None:
                    pipe.execute_command("UNLINK", key)
                else:
                    pipe.execute_command("SET", key, tomb_args[0], "PX", tomb_args[1])
            if gen_keys:
                pipe.execute_command(
                    "EVAL", lua.ADVANCE, 1 + len(gen_keys), clock_key, *gen_keys, nonce
                )
            results = pipe.execute()
            return [bool(r) for r in results[: len(cas)]]

    def scan_keys(self, match: str, count: int = 1000) -> Iterator[str]:
        """Keys matching the glob ``match``: SCAN (on a cluster, on every primary)."""
        with _errors("SCAN"):
            for raw in self._c.scan_iter(match=match, count=count):
                yield raw.decode("utf-8", _KEY_ERRORS)

    def unlink_many(self, keys: Iterable[str], batch_size: int = 1000) -> int:
        """UNLINK ``keys`` (any iterable, e.g. `scan_keys`) in batches; the count."""
        it = iter(keys)
        batches = iter(lambda: list(islice(it, batch_size)), [])
        return sum(self.delete_many(batch) for batch in batches)


class RedisBackend(_RedisBase):
    """A `Backend` on one Redis server through ``client`` (which must not decode responses).

    With a Sentinel master client (``master_for``) pass ``sentinel`` so `close` closes it.
    """

    def __init__(self, client: redis.Redis, *, sentinel: Sentinel | None = None) -> None:
        self.client = client
        self.sentinel = sentinel
        self._c = client
        self._execute: Any = Direct(client).execute  # MGET, scripts, PING: the hot path
        self._later = LaterReads(client.connection_pool, _ERRORS)

    def get_many_later(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """One MGET sent now on the deferred-read connection (see `redis_later`)."""
        if not keys:
            return list
        read = self._later.send("MGET", *keys)

        def result() -> list[bytes | NoValue]:
            return [NO_VALUE if v is None else v for v in read()]

        return result

    def cas_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, float | None]]
    ) -> list[bool]:
        """One script run per `CAS_BATCH_SIZE` items (one server holds every key)."""
        if len(items) <= 1:
            return [self.cas(*items[0])] if items else []
        out: list[bool] = []
        for start in range(0, len(items), CAS_BATCH_SIZE):
            chunk = items[start : start + CAS_BATCH_SIZE]
            spec: list[Any] = []
            for _, expected, value, ttl in chunk:
                stored = None if ttl is not None and ttl <= 0 else value  # as MemoryBackend
                px = 0 if ttl is None or stored is None else _px(ttl)
                mode = 0 if expected is None else 1
                spec += [mode, expected or b"", False if stored is None else stored, px]
            # raw msgpack strings: the server's cmsgpack does not read the bin types
            blob = msgpack.packb(spec, use_bin_type=False)
            args = (len(chunk), *(key for key, *_ in chunk), blob)
            with _errors("cas"):
                try:
                    done = self._execute("EVALSHA", lua.CAS_BATCH_SHA, *args)
                except NoScriptError:
                    done = self._execute("EVAL", lua.CAS_BATCH, *args)
            out += [bool(r) for r in done]
        return out

    def get_many(self, keys: Sequence[str]) -> list[bytes | NoValue]:
        if not keys:
            return []
        try:
            raw = self._execute("MGET", *keys)
        except _ERRORS as exc:
            raise _fail("MGET", exc) from exc
        return [NO_VALUE if v is None else v for v in raw]

    def ping(self) -> bool:
        try:
            return bool(self._execute("PING"))
        except Exception:
            return False

    def close(self) -> None:
        self._later.close()
        self.client.close()
        if self.sentinel is not None:
            for sentinel_client in self.sentinel.sentinels:
                sentinel_client.close()

    def server_info(self, section: str | None = None) -> dict[str, Any]:
        """INFO of the server, parsed (``section`` e.g. ``"persistence"``)."""
        with _errors("INFO"):
            return dict(self.client.info(section))


class RedisClusterBackend(_RedisBase):
    """A `Backend` on Redis Cluster; batches may span slots (one pipeline per node).

    The ``RedisCluster`` client is built on first use, since building it discovers the
    slots (connects). A failed discovery raises `BackendError` from that operation and
    is tried again by the next one. Pass ``client`` to wrap a ready client instead.
    """

    _cluster_mode = True

    def __init__(
        self,
        startup_nodes: Sequence[tuple[str, int]] = (),
        *,
        client: RedisCluster | None = None,
        retry: Retry | None = None,
        **client_kwargs: Any,
    ) -> None:
        if client is None and not startup_nodes:
            raise ValueError("RedisClusterBackend needs startup_nodes or a client")
        self.startup_nodes = tuple(startup_nodes)  # (host, port) to discover from
        self.client_kwargs = client_kwargs  # for RedisCluster and its node connections
        # One retry: a failover or a moved slot refreshes the slot map once, then fails.
        self.retry = retry if retry is not None else Retry(NoBackoff(), 1)
        self._cluster = client
        self._lock = threading.Lock()
        self._closed = False

    @property
    def client(self) -> RedisCluster:
        """The ``RedisCluster`` client; discovers the cluster on first use."""
        cluster = self._cluster
        if cluster is not None:
            return cluster
        with self._lock:
            if self._closed:
                raise BackendError("RedisClusterBackend is closed")
            if self._cluster is None:
                nodes = [ClusterNode(h, p) for h, p in self.startup_nodes]  # type: ignore[no-untyped-call]
                try:
                    self._cluster = RedisCluster(
                        startup_nodes=nodes, retry=self.retry, **self.client_kwargs
                    )
                except _ERRORS as exc:
                    for node in nodes:  # a failed discovery may leave a connection open
                        if node.redis_connection is not None:
                            node.redis_connection.close()
                    raise _fail("cluster discovery", exc) from exc
            return self._cluster

    _c: Any = client  # the same property

    def get_many_later(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """Answered at once: keys in several slots are several round trips anyway."""
        values = self.get_many(keys)
        return lambda: values

    def get_many(self, keys: Sequence[str]) -> list[bytes | NoValue]:
        if not keys:
            return []
        c = self._c
        try:
            one_slot = len({_slot(k) for k in keys}) == 1  # e.g. keys with one hash tag
            raw = c.execute_command("MGET", *keys) if one_slot else c.mget_nonatomic(keys)
        except _ERRORS as exc:
            raise _fail("MGET", exc) from exc
        return [NO_VALUE if v is None else v for v in raw]

    def ping(self) -> bool:
        """True when every primary answers PING."""
        try:
            return bool(self._c.ping(target_nodes=RedisCluster.PRIMARIES))
        except Exception:
            return False

    def close(self) -> None:
        with self._lock:
            cluster, self._cluster, self._closed = self._cluster, None, True
        if cluster is not None:
            cluster.close()

    def server_info(self, section: str | None = None) -> dict[str, Any]:
        """INFO of every primary, by node name (``"host:port"``)."""
        c = self._c
        with _errors("INFO"):
            return {n.name: dict(c.info(section, target_nodes=n)) for n in c.get_primaries()}


# --- URLs ------------------------------------------------------------------------

_BASES = ("redis", "rediss")
_SCHEMES = (*_BASES, "unix", *(f"{b}+{v}" for v in ("sentinel", "cluster") for b in _BASES))
_FLOATS = ("socket_timeout", "connect_timeout", "socket_connect_timeout", "health_check_interval")
_STRS = ("client_name", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_OPTIONS: dict[str, type] = {  # query option -> the type of its value
    **dict.fromkeys(_FLOATS, float),
    **dict.fromkeys(("db", "max_connections"), int),
    **dict.fromkeys((*_STRS, "sentinel_username", "sentinel_password"), str),
}


def _option(name: str, raw: str) -> Any:
    kind = _OPTIONS.get(name)
    if kind is None:
        known = ", ".join(_OPTIONS)
        raise ValueError(f"unknown option {name!r} in Redis URL query (known: {known})")
    with suppress(ValueError):
        value = kind(raw)
        if kind is str or (kind is int and value >= 0) or 0 < value < float("inf"):
            return value
    raise ValueError(f"{name}={raw!r} in Redis URL is not a valid {kind.__name__}")


def _hosts(hostlist: str, default_port: int) -> list[tuple[str, int]]:
    """``host``, ``host:port``, ``[v6]:port``, comma-separated -> [(host, port)]."""
    hosts = []
    for part in hostlist.split(","):
        if part.startswith("["):
            host, bracket, rest = part[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"bad IPv6 host {part!r} in Redis URL")
            colon, port_text = rest[:1], rest[1:]
        else:
            host, colon, port_text = part.partition(":")
        if not host:
            raise ValueError(f"missing host in Redis URL (got {part!r})")
        port = default_port
        if colon:
            if not (port_text.isascii() and port_text.isdecimal() and 0 < int(port_text) < 65536):
                raise ValueError(f"bad port {port_text!r} in Redis URL host {part!r}")
            port = int(port_text)
        hosts.append((unquote(host), port))
    return hosts


def backend_from_url(
    url: str, *, socket_timeout: float = 0.25, connect_timeout: float = 0.25, **client_kwargs: Any
) -> RedisBackend | RedisClusterBackend:
    """A backend for a Redis URL; never connects. A malformed URL raises ValueError.

    Forms: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS),
    ``unix:///path/to/sock[?db=N]``,
    ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]``,
    ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+`` for
    TLS). Query options (``?socket_timeout=0.5&connect_timeout=1``, see ``_OPTIONS``)
    win over the keyword arguments; ``client_kwargs`` go to the redis-py client.
    """
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"malformed Redis URL: {exc}") from exc
    if parts.scheme not in _SCHEMES:
        expected = ", ".join(s + "://" for s in _SCHEMES)
        raise ValueError(f"unknown Redis URL scheme {parts.scheme!r} (expected {expected})")
    if parts.fragment:
        raise ValueError(f"unexpected fragment #{parts.fragment} in Redis URL")
    base, _, variant = parts.scheme.partition("+")
    options = {name: _option(name, raw) for name, raw in query}
    if "connect_timeout" in options:
        options["socket_connect_timeout"] = options.pop("connect_timeout")
    sentinel_auth = {k[9:]: options.pop(k) for k in list(options) if k.startswith("sentinel_")}
    if sentinel_auth and variant != "sentinel":
        raise ValueError(
            "sentinel_username / sentinel_password in a Redis URL need redis+sentinel://"
        )
    db = options.pop("db", None)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "encoding_errors": _KEY_ERRORS,
        "ssl": base == "rediss",
        **client_kwargs,
        **options,
        "decode_responses": False,  # values are bytes in and out
    }
    if user:
        kwargs["username"] = unquote(user)
    if colon and password:
        kwargs["password"] = unquote(password)
    path = parts.path
    if variant == "cluster":
        if path.strip("/") not in ("", "0") or db not in (None, 0):
            raise ValueError(f"Redis Cluster has only db 0, got {path or db!r} in Redis URL")
        return RedisClusterBackend(_hosts(hostlist, 6379), **kwargs)
    kwargs.setdefault("retry", Retry(NoBackoff(), 0))
    if variant == "sentinel":
        return _sentinel(_hosts(hostlist, 26379), path, db, kwargs, sentinel_auth)
    if base == "unix":
        if hostlist:
            raise ValueError(f"unix:// Redis URL takes no host, got {hostlist!r} (unix:///path)")
        if not path.strip("/"):
            raise ValueError("missing socket path in unix:// Redis URL")
        return RedisBackend(redis.Redis(unix_socket_path=unquote(path), db=db or 0, **kwargs))
    hosts = _hosts(hostlist, 6379)
    if len(hosts) != 1:
        msg = f"Redis URL {parts.scheme}:// takes one host, got {len(hosts)} (see redis+cluster://)"
        raise ValueError(msg)
    db = db if db is not None else _option("db", path[1:]) if path[1:] else 0
    return RedisBackend(redis.Redis(host=hosts[0][0], port=hosts[0][1], db=db, **kwargs))


def _sentinel(hosts: Any, path: str, db: Any, kwargs: Any, auth: Any) -> RedisBackend:
    """A backend on the master of ``/service_name[/db]``, found through Sentinel."""
    segments = path.strip("/").split("/")
    service = unquote(segments[0])
    if not service:
        raise ValueError("missing sentinel service name in Redis URL (/service_name[/db])")
    if len(segments) > 2:
        raise ValueError(f"unexpected path {path!r} in Redis URL (/service_name[/db])")
    db = db if db is not None else _option("db", segments[1]) if len(segments) == 2 else 0
    sentinel_kwargs = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout", "ssl")}
    sentinel_kwargs.update(auth, retry=Retry(NoBackoff(), 0))
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(service, db=db, **kwargs)  # type: ignore[no-untyped-call]
    return RedisBackend(client, sentinel=sentinel)
