"""Redis URLs: `backend_from_url` builds a `RedisBackend` (one server, a Unix socket or a
Sentinel master) or a `RedisClusterBackend` from one URL, without connecting."""

from __future__ import annotations

from contextlib import suppress
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from .redis import _KEY_ERRORS, RedisBackend, RedisClusterBackend

__all__ = ["backend_from_url"]


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
