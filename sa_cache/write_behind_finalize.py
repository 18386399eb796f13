"""After a write-behind batch's database COMMIT: acknowledge its records, finalize the
cache entries (`write_behind_scripts.FINALIZE`; what to do with each key of a row:
`write_behind_versions.finals_of`)."""

from __future__ import annotations

import logging
from typing import Any

from .backends.base import BackendError
from .write_behind_coalesce import Partition
from .write_behind_records import GROUP, redis_errors
from .write_behind_scripts import FINALIZE

log = logging.getLogger("sa_cache")


def finalize(client: Any, parts: list[Partition], consumer: str) -> None:
    """XACK + XDEL done records and finalize cache entries: one script per partition,
    all in one pipeline."""
    while True:
        pending = [p for p in parts if p.acks or p.finals]
        if not pending:
            return
        pipe = client.pipeline(transaction=False)
        sizes = []
        for part in pending:
            acks, finals = part.acks[:1000], part.finals[:500]
            keys = [part.stream, *(f[0] for f in finals)]
            args: list[Any] = [GROUP, len(acks), *acks]
            for _, expected, final, px in finals:
                args += [expected, final, px]
            pipe.execute_command("EVAL", FINALIZE, len(keys), *keys, *args)
            sizes.append((len(acks), len(finals)))
        try:
            with redis_errors("ack"):
                results = pipe.execute(raise_on_error=False)
        except BackendError as exc:
            log.warning("sa_cache: worker %s: ack failed (%s); retrying", consumer, exc)
            return
        for part, (n_acks, n_finals), result in zip(pending, sizes, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("sa_cache: worker %s: ack failed (%s)", consumer, result)
                parts = [p for p in parts if p is not part]
                continue
            del part.acks[:n_acks]
            del part.finals[:n_finals]
