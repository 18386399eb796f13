"""Guarded batch warming of entity entries: whole tables, or rows named by primary key.

A batch is written exactly like a read-through fill, only many keys at a time:

1. one MGET reads the batch's entries, the commit clock and the model's generations;
2. absent entries get a lease marker (compare-and-set from absent, one pipeline);
   present entries are remembered as they were; entries another reader leased are
   left to that reader, and so are present entries of ``write="behind"`` models
   (their queued writes may be newer than the database);
3. the rows are loaded in a database transaction that starts *after* step 1, so its
   snapshot holds at least every commit the observed entries reflect;
4. one pipeline of compare-and-sets swaps each lease (or observed value) for the new
   image, stamped with the generations read in step 1.

A commit that lands between 1 and 4 writes its image through over the value it
expected (or deletes the entry), so the entry no longer holds what step 4 expects and
the stale image is refused: a commit during a run is never overwritten (DESIGN rule 3).
A lease is a random token, so an entry deleted and emptied again meanwhile cannot be
mistaken for the absent entry observed in step 1.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .backends.base import NO_VALUE
from .entity import LEASE_PREFIX, LEASE_TTL, EntitySpec

if TYPE_CHECKING:
    from .cache import Cache

Rows = Iterable[Sequence[Any]]


class WarmError(Exception):
    """A warming target could not complete (the message says why)."""


@dataclass
class Tally:
    """What a target did: database rows read, entries written, their bytes, entries left
    alone because a commit or another reader got there first."""

    rows: int = 0
    entries: int = 0
    bytes: int = 0
    skipped: int = 0


def _key_expr(spec: EntitySpec) -> Any:
    columns = list(spec.mapper.primary_key)
    return columns[0] if len(columns) == 1 else sa.tuple_(*columns)


def _bound(spec: EntitySpec, pk: tuple[Any, ...]) -> Any:
    return pk[0] if len(spec.mapper.primary_key) == 1 else pk


def _connection(session: Session, spec: EntitySpec) -> sa.Connection:
    return session.connection(bind_arguments={"mapper": spec.mapper})


def count_rows(session: Session, spec: EntitySpec) -> int:
    """How many rows the model's table holds (for progress)."""
    try:
        total = _connection(session, spec).execute(
            sa.select(sa.func.count()).select_from(spec.mapper.local_table)
        )
        return int(total.scalar_one())
    finally:
        session.rollback()


def warm_table(
    cache: Cache,
    session: Session,
    spec: EntitySpec,
    batch_size: int,
    tally: Tally | None = None,
    progress: Callable[[Tally], None] | None = None,
) -> Tally:
    """Warm every row of ``spec``'s table, ``batch_size`` rows per batch (keyset order)."""
    tally = tally if tally is not None else Tally()
    pk_columns = list(spec.mapper.primary_key)
    key = _key_expr(spec)
    last: tuple[Any, ...] | None = None
    while True:
        scan = sa.select(*pk_columns).order_by(*pk_columns).limit(batch_size)
        if last is not None:
            scan = scan.where(key > _bound(spec, last))
        try:
            pks = [tuple(row) for row in _connection(session, spec).execute(scan)]
        finally:
            session.rollback()  # the load of this batch must see a newer snapshot
        if not pks:
            break
        low, high = _bound(spec, pks[0]), _bound(spec, pks[-1])
        load = sa.select(*spec.columns).where(key >= low, key <= high)
        warm_batch(cache, session, spec, pks, load, tally)
        if progress is not None:
            progress(tally)
        if len(pks) < batch_size:
            break
        last = pks[-1]
    return tally


def warm_keys(
    cache: Cache,
    session: Session,
    spec: EntitySpec,
    pks: Sequence[tuple[Any, ...]],
    batch_size: int,
    tally: Tally | None = None,
) -> Tally:
    """Warm the rows of ``spec`` with these primary keys (missing rows are skipped)."""
    tally = tally if tally is not None else Tally()
    key = _key_expr(spec)
    unique = list(dict.fromkeys(pks))
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        load = sa.select(*spec.columns).where(key.in_([_bound(spec, pk) for pk in chunk]))
        warm_batch(cache, session, spec, chunk, load, tally)
    return tally


def warm_batch(
    cache: Cache,
    session: Session,
    spec: EntitySpec,
    pks: Sequence[tuple[Any, ...]],
    load: sa.Select[Any],
    tally: Tally,
) -> None:
    """Observe, lease, load and swap the entries of ``pks`` (see the module docstring)."""
    session.rollback()  # whatever ran before, the load starts a transaction after step 1
    keys = [spec.key(cache, pk) for pk in pks]
    gen_keys = spec.gen_keys(cache)
    n = len(keys)
    raws = cache.fetch([*keys, cache.clock_key, *gen_keys])
    gens = cache.ensure_generations(gen_keys, raws[n + 1 :], raws[n])
    if gens is None:
        raise WarmError("the cache store did not answer")
    token = LEASE_PREFIX + secrets.token_hex(8).encode()
    # write-behind entries may be newer than the database: only fill absent ones
    fill_only = spec.write == "behind"
    expected: dict[str, bytes] = {}
    leases: list[tuple[str, bytes | None, bytes | None, float | None]] = []
    for key, raw in zip(keys, raws[:n], strict=True):
        if raw is NO_VALUE:
            leases.append((key, None, token, LEASE_TTL))
        elif raw.startswith(LEASE_PREFIX) or fill_only:
            tally.skipped += 1  # a reader is filling it right now, or it may be newer
        else:
            expected[key] = raw
    if leases:
        taken = cache._call(lambda: cache.backend.cas_many(leases), None, "warm lease")
        if taken is None:
            raise WarmError("the cache store did not answer")
        for (key, *_), ok in zip(leases, taken, strict=True):
            if ok:
                expected[key] = token
            else:
                tally.skipped += 1
    leased = [k for k, v in expected.items() if v == token]
    try:
        items = _images(cache, session, spec, load, expected, gens, tally)
    except BaseException:
        releases = [(k, token, None, None) for k in leased]
        cache._call(lambda: cache.backend.cas_many(releases), None, "warm lease")
        raise
    # rows gone since the scan: give their leases back
    items += [(k, v, None, None) for k, v in expected.items() if v == token]
    written = cache._call(lambda: cache.backend.cas_many(items), None, "warm write")
    if written is None:
        raise WarmError("the cache store did not answer")
    entries = 0
    for (_, _, packed, _), ok in zip(items, written, strict=True):
        if packed is None:
            continue
        if ok:
            entries += 1
            tally.bytes += len(packed)
        else:
            tally.skipped += 1  # a commit (or an eviction) got there first
    tally.entries += entries
    cache.stats.incr("warm.entity", entries)


def _images(
    cache: Cache,
    session: Session,
    spec: EntitySpec,
    load: sa.Select[Any],
    expected: dict[str, bytes],
    gens: tuple[str, ...],
    tally: Tally,
) -> list[tuple[str, bytes | None, bytes | None, float | None]]:
    """Load the rows and pack each observed one; ``expected`` keeps the rest."""
    ttl = cache._ttl(spec.ttl)
    items: list[tuple[str, bytes | None, bytes | None, float | None]] = []
    try:
        for row in _connection(session, spec).execute(load):
            values = list(row)
            tally.rows += 1
            key = spec.key(cache, [values[i] for i in spec.pk_positions])
            before = expected.pop(key, None)
            if before is None:
                continue  # not observed first (inserted since the scan) or left alone
            try:
                packed = cache.pack(values, ttl, gens)
            except TypeError as exc:
                name = spec.mapper.class_.__name__
                raise WarmError(f"{name} rows cannot be cached: {exc}") from exc
            items.append((key, before, packed, ttl))
    finally:
        session.rollback()
    return items
