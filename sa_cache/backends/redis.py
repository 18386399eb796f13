"""Redis stores through redis-py: one server or a Sentinel master, and Redis Cluster.

One round trip per `Backend` call where the store allows. Every redis-py error becomes
`BackendError` (cause chained). Building a backend never connects: an unreachable
server shows when an operation runs, as `BackendError` after about one socket timeout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from itertools import islice
from typing import Any

import msgpack
import redis
from redis.crc import key_slot
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisClusterException, RedisError
from redis.sentinel import Sentinel

from . import redis_scripts as lua
from .base import NO_VALUE, BackendError, NoValue
from .redis_direct import Direct
from .redis_later import LaterReads

__all__ = ["RedisBackend", "RedisClusterBackend"]

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


_VALUE_TYPES = frozenset({bytes, type(NO_VALUE)})


def _values(op: str, raw: Any, count: int) -> list[bytes | NoValue]:
    """The ``count`` values of a reply (bulk strings or nils); a reply of another shape,
    which no Redis gives (a proxy, another server on the port), is a store failure."""
    if type(raw) is list and len(raw) == count:
        out = [NO_VALUE if v is None else v for v in raw]
        if set(map(type, out)) <= _VALUE_TYPES:  # (no Python frame per value)
            return out
    raise BackendError(f"Redis {op} failed: a reply of an unexpected shape: {raw!r:.80}")


@contextmanager
def _errors(op: str) -> Iterator[None]:
    try:
        yield
    except _ERRORS as exc:
        raise _fail(op, exc) from exc


def _out_of_memory(exc: BaseException | None) -> bool:
    """Is ``exc`` Redis refusing a write for ``maxmemory`` (also from inside a script)?"""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, RedisError) and ("OOM" in str(exc) or "maxmemory" in str(exc))
    )


def _cas_argv(
    items: Sequence[tuple[str, bytes | None, bytes | None, float | None]],
) -> list[Any]:
    """The ARGV of each item as `_RedisBase._cas_args` spells it (without its key),
    one after the other: PX of each TTL computed once."""
    out: list[Any] = []
    pxs: dict[float, bytes] = {}
    for _, expected, value, ttl in items:
        stored = value
        if ttl is None:
            px = b""
        else:
            if ttl <= 0:
                stored = None  # as in MemoryBackend: a ttl <= 0 stores nothing
            found = pxs.get(ttl)
            px = pxs[ttl] = str(_px(ttl)).encode() if found is None else found
        out += (
            b"0" if expected is None else b"1",
            expected or b"",
            b"0" if stored is None else b"1",
            stored or b"",
            px,
        )
    return out


def _slot(key: str) -> int:
    return key_slot(key.encode("utf-8", _KEY_ERRORS))


class _RedisBase:
    """What both backends share; ``_c`` is the redis-py client (untyped calls)."""

    _c: Any
    _execute: Any  # one command on a kept connection (standalone only: see RedisBackend)
    _cluster_mode = False

    def _pipeline(self) -> Any:
        """A pipeline without MULTI (on a cluster: one per node, see `redis_cluster_client`)."""
        return self._c.pipeline(transaction=False)

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
            pipe = self._pipeline()
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
        with _errors("cas"):
            pipe = self._pipeline()
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
        """As `Backend.commit`. A server out of memory (``maxmemory``, ``noeviction``)
        refuses the script's writes but still takes UNLINK: then the generations and
        entries are removed (readers cannot validate anything against them and cannot
        recreate them while the store is full) before `BackendError` is raised."""
        try:
            return self._commit(cas, deletes, clock_key, gen_keys, nonce, tomb)
        except BackendError as exc:
            if _out_of_memory(exc.__cause__):
                gone = [*gen_keys, *(item[0] for item in cas), *deletes]
                with suppress(BackendError):
                    self.delete_many(gone)
            raise

    def _commit(
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
        tomb_args = (tomb[0], str(_px(tomb[1])).encode()) if tomb is not None else (b"", b"")
        with _errors("commit"):
            if not self._cluster_mode:  # one script, one round trip
                keys = [clock_key, *gen_keys, *(item[0] for item in cas), *deletes]
                args: list[Any] = [len(gen_keys), len(cas), nonce, *tomb_args]
                args += _cas_argv(cas)
                try:
                    out = self._execute("EVALSHA", lua.COMMIT_SHA, len(keys), *keys, *args)
                except NoScriptError:
                    out = self._execute("EVAL", lua.COMMIT, len(keys), *keys, *args)
                return [bool(r) for r in out]
            # Cluster: keys live in different slots; one pipeline, one round trip per node.
            pipe = self._pipeline()
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
        direct = Direct(client)
        self._execute: Any = direct.execute  # MGET, scripts, PING: the hot path
        self._send: Any = direct.send
        self._later = LaterReads(client.connection_pool, _ERRORS)

    def get_many_soon(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """One MGET sent now on a kept connection, which stays the caller's until the
        reply is read (see `redis_direct.Direct.send`)."""
        if not keys:
            return list
        try:
            read = self._send("MGET", *keys)
        except _ERRORS as exc:
            raise _fail("MGET", exc) from exc

        def result() -> list[bytes | NoValue]:
            try:
                raw = read()
            except _ERRORS as exc:
                raise _fail("MGET", exc) from exc
            return _values("MGET", raw, len(keys))

        return result

    def get_many_later(self, keys: Sequence[str]) -> Callable[[], list[bytes | NoValue]]:
        """One MGET sent now on the deferred-read connection (see `redis_later`)."""
        if not keys:
            return list
        read = self._later.send("MGET", *keys)

        def result() -> list[bytes | NoValue]:
            return _values("MGET", read(), len(keys))

        return result

    def swap_many_later(
        self, keys: Sequence[str], value: bytes, ttl: float, read: Sequence[str] = ()
    ) -> Callable[[], list[bytes | NoValue]]:
        """One script sent now on the deferred-read connection (see `redis_later`)."""
        if not keys and not read:
            return list
        every = [*keys, *read]
        sent = self._later.send("EVAL", lua.SWAP, len(every), *every, len(keys), value, _px(ttl))

        def result() -> list[bytes | NoValue]:
            return _values("swap", sent(), len(every))

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
        return _values("MGET", raw, len(keys))

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


# (its own module; importable from here as before)
from .redis_cluster import RedisClusterBackend  # noqa: E402
