"""Write-through: what a flush records of each registered row, and what the outermost
commit sends for it.

Every flush records the full column image of each inserted or updated registered row
(or a delete) in the transaction's frame, together with the entry as the store held
it at that moment. After the outermost commit the image is written with a
compare-and-set against that earlier value; if anything else changed the entry
meanwhile (a concurrent writer, a fill), the entry gets a tombstone instead. So a late
writer can never put an older image over a newer one, without clocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.base import NEVER_SET
from sqlalchemy.orm.base import NO_VALUE as NO_VALUE_ATTR

from .backends.base import NO_VALUE, NoValue
from .codec import Envelope, encode, holds
from .entity import EntitySpec, column_image
from .transaction import EntityChange, collector_for

if TYPE_CHECKING:
    from .cache import Cache


def _pre_image(spec: EntitySpec, state: Any) -> list[Any] | None:
    """The column values ``state`` held before this flush changed it (in ``after_flush``
    the attribute history is still there); None when one of them was never loaded."""
    dict_, committed = state.dict, state.committed_state
    out: list[Any] = []
    for key in spec.attr_keys:
        if key in committed:
            value = committed[key]
            if value is NO_VALUE_ATTR or value is NEVER_SET:
                return None
        elif key in dict_:
            value = dict_[key]
        else:
            return None
        out.append(value)
    return out


NEVER = b"sac-never:"
"""An ``expected`` no entry can hold: the commit's compare-and-set fails, the entry is
deleted. Recorded for a row whose image cannot be trusted (see `record_flush`)."""


def record_flush(cache: Cache, session: Session) -> None:
    """``after_flush``: note the image (or delete) of each registered row written.

    An update's image is the flushed object's column values, but its UPDATE sets only
    the changed columns: if the object was loaded before another transaction changed
    other columns, the database row is not the image. So an update is written through
    only when the entry, read now (the row is locked), holds exactly the values the
    object had before this transaction changed it; otherwise the entry is invalidated
    (a tombstone, see `Cache.bump`).
    """
    entities = cache.entities
    if not entities:
        return
    # (key, spec, image, values before an update; None for inserts, deletes, invalidation)
    changes: list[tuple[str, EntitySpec, list[Any] | None, list[Any] | bool | None]] = []
    removed = session._deleted  # states, as session.new / dirty / deleted hold them
    for state, kind in (
        *((s, _INSERT) for s in session._new),
        *((s, _UPDATE) for s in session._dirty_states if s not in removed),
        *((s, _DELETE) for s in removed),
    ):
        spec: EntitySpec | None = entities.get(state.mapper)
        if spec is None:
            continue
        image = (
            None
            if kind is _DELETE or spec.write == "invalidate"
            else column_image(spec, state.obj(), inserted=kind is _INSERT)
        )
        if image is None:
            pk: Sequence[Any] = state.mapper.primary_key_from_instance(state.obj())
        else:
            pk = [image[i] for i in spec.pk_positions]
        if any(v is None for v in pk):  # identity: a key value may define ==
            continue
        pre: list[Any] | bool | None = None
        if kind is _UPDATE and image is not None:
            pre = _pre_image(spec, state) or False  # False: an update of unknown values
        changes.append((spec.key(cache, pk, state.identity_token), spec, image, pre))
    if not changes:
        return
    collector = collector_for(session, cache)
    frame = collector.frames[-1]
    ttls: dict[EntitySpec, float | None] = {}
    batch: FlushBatch | None = None
    for key, spec, image, pre in changes:
        ttl = ttls.get(spec, _UNSET)
        if ttl is _UNSET:
            ttl = ttls[spec] = cache._ttl(spec.ttl)
        earlier = collector.first_change(key)
        if image is None:
            expected = None if earlier is None else earlier.expected
            frame.entities[key] = EntityChange(key, None, expected, ttl)
            continue
        if batch is None:
            batch = FlushBatch(cache)
        change = EntityChange(key, None, None, ttl, batch)
        batch.add(change, spec, image, pre, earlier)
        frame.entities[key] = change
    if batch is not None:
        batch.send()


_INSERT, _UPDATE, _DELETE = object(), object(), object()
_UNSET: Any = object()


class FlushBatch:
    """The images one flush recorded, waiting for the store's view of their rows: the
    entries of rows written for the first time in the transaction, and the generations
    of their tables. The read is sent at the flush (the rows are locked by then) and
    collected when the first of the images is needed, which settles them all."""

    __slots__ = ("_cache", "_gen_keys", "_read", "_rows", "_wanted")

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._rows: list[tuple[EntityChange, str, list[Any], Any, EntityChange | None]] = []
        self._gen_keys: dict[str, tuple[str, ...]] = {}
        self._wanted: list[str] = []
        self._read: Callable[[], list[bytes | NoValue]] = list

    def add(
        self,
        change: EntityChange,
        spec: EntitySpec,
        image: list[Any],
        pre: list[Any] | bool | None,
        earlier: EntityChange | None,
    ) -> None:
        table = spec.table
        if table not in self._gen_keys:
            self._gen_keys[table] = spec.gen_keys(self._cache)
        if earlier is None:
            self._wanted.append(change.key)
        self._rows.append((change, table, image, pre, earlier))

    def send(self) -> None:
        for keys in self._gen_keys.values():
            self._wanted.extend(keys)
        self._read = self._cache.fetch_later(self._wanted)

    def settle(self) -> None:
        """Compute (image to write, expected entry) of every row of the flush."""
        rows, self._rows = self._rows, []
        if not rows:
            return
        cache = self._cache
        raws = dict(zip(self._wanted, self._read(), strict=True))
        gens_of = {
            table: cache.ensure_generations(keys, [raws[k] for k in keys])
            for table, keys in self._gen_keys.items()
        }
        now = time.time()
        for change, table, image, pre, earlier in rows:
            gens = gens_of[table]
            if earlier is not None:
                want = earlier.expected
            else:
                seen = raws[change.key]
                want = None if seen is NO_VALUE else seen
                if pre is not None and not _holds(seen, pre, gens):
                    want = NEVER  # the object may be older than the row: invalidate
            packed = None
            if gens is not None and want != NEVER:
                with suppress(TypeError):  # not encodable: invalidate instead
                    packed = encode(Envelope(image, now, change.ttl, gens))
            change.settle(packed, want)


def _holds(raw: bytes | NoValue, values: list[Any] | bool, gens: tuple[str, ...] | None) -> bool:
    """Does the entry ``raw`` hold exactly the row ``values``, and is it valid under the
    current generations ``gens``? (After a bulk write moved them, an entry holding the
    object's values says nothing about the row: the bulk write may have changed it.)"""
    if not isinstance(values, list) or raw is NO_VALUE or gens is None:
        return False
    return holds(raw, gens, values)


def commit_writes(
    changes: dict[str, EntityChange],
) -> tuple[list[tuple[str, bytes | None, bytes | None, float | None]], list[str]]:
    """What the outermost commit sends for these rows: images to compare-and-set over
    what was expected (a failed compare deletes), and keys to delete."""
    writes: list[tuple[str, bytes | None, bytes | None, float | None]] = []
    deletes: list[str] = []
    for change in changes.values():
        image, expected = change.parts()
        if image is None:
            deletes.append(change.key)
        else:
            writes.append((change.key, expected, image, change.ttl))
    return writes, deletes
