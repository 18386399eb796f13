"""How far behind the write-behind queue is: `pending` counts, `flush` waits; and
whether Redis keeps it (`check_durability`).

Read from the streams and their consumer group (XINFO, XPENDING); the worker keeps
no other state, so any process can ask. On a Cluster one read spans the nodes and a
node that does not answer fails only its partitions' part: only "no such key" /
"NOGROUP" means a partition holds nothing; any other error leaves it unknown
(`pending` raises, `flush` keeps waiting for it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from .backends.base import BackendError
from .write_behind_records import GROUP, redis_errors, stream_id

if TYPE_CHECKING:
    from .write_behind import WriteBehind

log = logging.getLogger("sa_cache")

FLUSH_REQUEST_MS = 500
"""How long a flush request outlives the last poll of its `flush` (renewed every poll;
longer when the poll interval is)."""


def stream_state(
    queue: WriteBehind, partitions: Sequence[int], request_flush: int = 0
) -> list[tuple[Any, Any, Any]]:
    """(XINFO STREAM, XINFO GROUPS, XPENDING) per partition; an exception where it failed.

    ``request_flush``: also (re)set the key that asks workers to apply at once, for
    ``request_flush`` milliseconds."""
    pipe = queue.client.pipeline(transaction=False)
    for p in partitions:
        stream = queue.stream(p)
        pipe.execute_command("XINFO", "STREAM", stream)
        pipe.execute_command("XINFO", "GROUPS", stream)
        pipe.execute_command("XPENDING", stream, GROUP)
    if request_flush:
        pipe.execute_command("SET", queue.flush_key, b"1", "PX", request_flush)
    with redis_errors("XINFO"):
        flat = pipe.execute(raise_on_error=False)
    return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, 3 * len(partitions), 3)]


def _absent(result: Any) -> bool:
    """Is ``result`` the error of a stream (or its group) that does not exist?"""
    return isinstance(result, ResponseError) and str(result).startswith(("no such key", "NOGROUP"))


def _unread(row: tuple[Any, Any, Any]) -> BaseException | None:
    """The error that left a partition's state unknown (a node that did not answer, a
    CLUSTERDOWN or LOADING reply, ...), if any."""
    for result in row:
        if isinstance(result, BaseException) and not _absent(result):
            return result
    return None


def pending(queue: WriteBehind) -> dict[int, int]:
    """Entries not yet applied per partition (delivered-but-unacked plus unread).
    `BackendError` if a partition could not be read (never an undercount)."""
    out: dict[int, int] = {}
    parts = list(range(queue.config.partitions))
    state = stream_state(queue, parts)
    unknown = {p: e for p, row in zip(parts, state, strict=True) if (e := _unread(row))}
    if unknown:
        error = next(iter(unknown.values()))
        raise BackendError(
            f"write-behind queue: could not read partition(s) {sorted(unknown)}: "
            f"{type(error).__name__}: {error}"
        ) from error
    for p, (info, groups, pend) in zip(parts, state, strict=True):
        if isinstance(info, Exception):
            continue  # no stream: nothing was ever queued there
        last = _last_id(info)
        group = _group(groups)
        unread = 0
        if group is None:
            unread = int(info[b"length"]) if last != (0, 0) else 0
        elif stream_id(group[b"last-delivered-id"]) < last:
            unread = 1 if group.get(b"lag") is None else int(group[b"lag"])
        held = 0 if isinstance(pend, Exception) else int(pend.get("pending", 0) or 0)
        if unread or held:
            out[p] = unread + held
    return out


def flush(queue: WriteBehind, timeout: float | None = 60.0, poll: float = 0.02) -> None:
    """Wait until every change queued so far is in the database (or dead-lettered).

    A worker must be running. While this waits, a short-lived key (renewed every poll)
    asks the workers to apply what they hold at once rather than let batches fill for
    ``max_delay``. TimeoutError after ``timeout`` seconds (None: forever). A partition
    that could not be read is waited for as well (its last entry as read later).
    """
    parts = list(range(queue.config.partitions))
    request = max(FLUSH_REQUEST_MS, round(poll * 2000))
    targets: dict[int, tuple[int, int] | None] = dict.fromkeys(parts)  # None: not read yet
    unknown: BaseException | None = None  # the last error that left a partition unread
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            waiting = list(targets)
            for p, row in zip(waiting, stream_state(queue, waiting, request), strict=True):
                error = _unread(row)
                if error is not None:
                    unknown = error
                    continue  # waited for until it is read
                info, groups, pend = row
                target = targets[p]
                if target is None:  # the partition's last entry when first read
                    target = targets[p] = (0, 0) if isinstance(info, Exception) else _last_id(info)
                if _applied(target, groups, pend):
                    del targets[p]
            if not targets:
                return
            if deadline is not None and time.monotonic() > deadline:
                unread = None in targets.values() and unknown is not None
                why = f" (some not read: {type(unknown).__name__}: {unknown})" if unread else ""
                raise TimeoutError(
                    f"write-behind changes are still queued in partition(s) {sorted(targets)} "
                    f"after {timeout} s{why}; is a worker running (sa-cache worker)?"
                )
            time.sleep(poll)
    finally:  # workers go back to filling batches (another flush renews the request)
        with suppress(BackendError), redis_errors("flush"):
            queue.client.delete(queue.flush_key)


def _applied(target: tuple[int, int], groups: Any, pend: Any) -> bool:
    """Has the worker finished every entry up to ``target`` (XINFO GROUPS, XPENDING)?"""
    if target == (0, 0):
        return True  # nothing was ever queued there
    group = _group(groups)
    if group is None or stream_id(group[b"last-delivered-id"]) < target:
        return False
    count = 0 if isinstance(pend, Exception) else int(pend.get("pending", 0) or 0)
    return count == 0 or stream_id(pend["min"]) > target


def _last_id(info: Any) -> tuple[int, int]:
    return stream_id(info[b"last-generated-id"])


def _group(groups: Any) -> dict[bytes, Any] | None:
    if isinstance(groups, Exception):
        return None
    for group in groups:
        if group[b"name"] == GROUP.encode():
            return dict(group)
    return None


def check_durability(wb: WriteBehind) -> bool:
    """Log a warning when a Redis server of ``wb``'s cache keeps no append-only file;
    True if all do."""
    try:
        info = wb.cache.backend.server_info("persistence")  # type: ignore[attr-defined]
    except (BackendError, AttributeError) as exc:
        log.warning("sa_cache: could not check Redis persistence for write-behind: %s", exc)
        return False
    nodes = info if "aof_enabled" not in info else {"redis": info}
    off = [name for name, node in nodes.items() if not int(node.get("aof_enabled", 0))]
    if off:
        log.warning(
            "sa_cache: Redis %s runs with appendonly no: queued write-behind changes "
            "are lost if Redis restarts; enable appendonly yes (appendfsync everysec or "
            "always) for durability",
            ", ".join(str(n) for n in off),
        )
    return not off
