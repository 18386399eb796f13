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

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import NEVER_SET
from sqlalchemy.orm.base import NO_VALUE as NO_VALUE_ATTR

from .backends.base import NO_VALUE, NoValue
from .entity import MARKER_PREFIX, EntitySpec, column_image
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
    if not cache.entities:
        return
    # (key, spec, image, values before an update; None for inserts, deletes, invalidation)
    changes: list[tuple[str, EntitySpec, list[Any] | None, list[Any] | bool | None]] = []
    for obj, kind in (
        *((o, "insert") for o in session.new),
        *((o, "update") for o in session.dirty),
        *((o, "delete") for o in session.deleted),
    ):
        state = instance_state(obj)
        spec: EntitySpec | None = cache.entities.get(state.mapper)
        if spec is None:
            continue
        image = (
            None
            if kind == "delete" or spec.write == "invalidate"
            else column_image(spec, obj, inserted=kind == "insert")
        )
        pk: Sequence[Any] = (
            state.mapper.primary_key_from_instance(obj)
            if image is None
            else [image[i] for i in spec.pk_positions]
        )
        if any(v is None for v in pk):
            continue
        pre: list[Any] | bool | None = None
        if kind == "update" and image is not None:
            pre = _pre_image(spec, state) or False  # False: an update of unknown values
        changes.append((spec.key(cache, pk, state.identity_token), spec, image, pre))
    if not changes:
        return
    collector = collector_for(session, cache)
    # Only images need the store's view (what to compare against, which generations to
    # stamp): a flush that only deletes or invalidates costs no round trip.
    unknown = [
        key
        for key, _, image, _ in changes
        if image is not None and not collector.expected_for(key)[0]
    ]
    specs = {spec.table: spec for _, spec, image, _ in changes if image is not None}
    view = _FlushView(cache, unknown, {t: spec.gen_keys(cache) for t, spec in specs.items()})
    frame = collector.frames[-1]
    for key, spec, image, pre in changes:
        known, expected = collector.expected_for(key)
        ttl = cache._ttl(spec.ttl)
        if image is None:
            frame.entities[key] = EntityChange(key, None, expected, ttl)
            continue
        resolve = _resolver(cache, view, key, spec.table, image, pre, ttl, known, expected)
        frame.entities[key] = EntityChange(key, None, None, ttl, resolve)


class _FlushView:
    """What the store held at a flush: the entries of rows written for the first time in
    the transaction and the generations of their tables. The read is sent at the flush
    (the rows are locked by then) and collected at first use, so its round trip
    overlaps the database commit."""

    def __init__(
        self, cache: Cache, unknown: list[str], gen_keys: dict[str, tuple[str, ...]]
    ) -> None:
        self._cache, self._gen_keys = cache, gen_keys
        self._wanted = [*unknown, *(k for keys in gen_keys.values() for k in keys)]
        self._read = cache.fetch_later(self._wanted) if gen_keys else list
        self._raws: dict[str, bytes | NoValue] | None = None
        self._gens: dict[str, tuple[str, ...] | None] = {}

    def raws(self) -> dict[str, bytes | NoValue]:
        if self._raws is None:
            self._raws = dict(zip(self._wanted, self._read(), strict=True))
            for table, keys in self._gen_keys.items():
                found = [self._raws[k] for k in keys]
                self._gens[table] = self._cache.ensure_generations(keys, found)
        return self._raws

    def gens(self, table: str) -> tuple[str, ...] | None:
        self.raws()
        return self._gens.get(table)


def _resolver(
    cache: Cache,
    view: _FlushView,
    key: str,
    table: str,
    image: list[Any],
    pre: list[Any] | bool | None,
    ttl: float | None,
    known: bool,
    expected: bytes | None,
) -> Callable[[], tuple[bytes | None, bytes | None]]:
    """(image to write, expected entry) of one row, from the flush's store view."""

    def resolve() -> tuple[bytes | None, bytes | None]:
        gens = view.gens(table)
        want = expected
        if not known:
            seen = view.raws()[key]
            want = None if seen is NO_VALUE else seen
            if pre is not None and not _holds(cache, seen, pre, gens):
                want = NEVER  # the object may be older than the row: invalidate
        if gens is None or want == NEVER:
            return None, want
        try:
            return cache.pack(image, ttl, gens), want
        except TypeError:
            return None, want  # not encodable: invalidate instead

    return resolve


def _holds(
    cache: Cache, raw: bytes | NoValue, values: list[Any] | bool, gens: tuple[str, ...] | None
) -> bool:
    """Does the entry ``raw`` hold exactly the row ``values``, and is it valid under the
    current generations ``gens``? (After a bulk write moved them, an entry holding the
    object's values says nothing about the row: the bulk write may have changed it.)"""
    if not isinstance(values, list) or raw is NO_VALUE or raw.startswith(MARKER_PREFIX):
        return False
    env = cache.unpack(raw)
    return env is not NO_VALUE and env.gens == gens and env.value == values


def commit_writes(
    changes: dict[str, EntityChange],
) -> tuple[list[tuple[str, bytes | None, bytes | None, float | None]], list[str]]:
    """What the outermost commit sends for these rows: images to compare-and-set over
    what was expected (a failed compare deletes), and keys to delete."""
    writes: list[tuple[str, bytes | None, bytes | None, float | None]] = [
        (c.key, c.expected, c.image, c.ttl) for c in changes.values() if c.image is not None
    ]
    deletes = [c.key for c in changes.values() if c.image is None]
    return writes, deletes
