"""Write-behind updates of some columns: merged over the row's current queued image.

An UPDATE writes the columns it changed and leaves the others as the database holds
them, so two transactions that change different columns of one row both count. A
write-behind change keeps that: besides its row image (what reads see while it is
queued) it carries the positions of the columns its transaction changed
(``BehindChange.cols``; None for an insert or a delete: the whole row).

- **The queued image** is the row's current entry with those columns replaced: the
  other columns come from the newest image of the row, not from whatever the object
  loaded (another query reads the database, which trails the queue; another process
  may have queued a change since). The commit script (`write_behind_scripts.COMMIT`)
  checks, atomically with its writes, that the entry the image was merged over is
  still the row's entry (the same image: the worker turning a queued entry into an
  ordinary one does not count); if another commit replaced it, nothing is written,
  the image is merged over the new entry and the script runs again. The first guess
  is the entry the Session last saw of the row (`Collector.behind_seen`: a
  `session.get` hit, its own commit), else the row as its object loaded it
  (``BehindChange.base``), so the usual commit costs no extra round trip.
- **The worker** writes only the changed columns of such a record (an UPDATE of
  those; the image is inserted only for a row the database no longer has: an upsert
  would check the constraints of its whole row), coalescing several by overlaying
  them in commit order (`write_behind_coalesce`), so the database never takes a stale
  column from an image.
- **Whole or not**: an image merged over the row's entry is the whole row
  (``whole``, in the queued entry's meta with the columns); merged over nothing (no
  entry, a tombstone) or over a partial one, the other columns are only the
  object's. Coalescing overlays a partial image on the one before it. Once applied,
  the worker caches the row as it reads it back, not the image.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from .backends.base import BackendError
from .codec import CodecError, decode
from .transaction import BehindChange
from .write_behind_records import (
    Queued,
    prepare_record,
    queued_entry,
    redis_error_of,
    redis_errors,
)
from .write_behind_scripts import COMMIT, COMMIT_SHA

if TYPE_CHECKING:
    from .entity import EntitySpec
    from .write_behind import WriteBehind

ABSENT = b"\x00"
"""Expected entry: the row has none (the commit script checks that)."""

UNKNOWN = b"\x00?"
"""Expected entry: not known yet (never there: the commit script answers with it)."""

NO_CHECK = b""
"""Expected entry: not checked (a whole-row change, or no more attempts)."""

ATTEMPTS = 8
"""Commit-script runs before an update is queued over whatever entry it has."""

SEEN_LIMIT = 4096
"""Entries a Session remembers (`Collector.behind_seen`) before it forgets them all."""


def overlay(base: Sequence[Any], image: Sequence[Any], cols: Collection[int]) -> list[Any]:
    """``base`` with the columns ``cols`` taken from ``image``."""
    out = list(base)
    for i in cols:
        out[i] = image[i]
    return out


def merge(
    spec: EntitySpec, change: BehindChange, raw: bytes | None
) -> tuple[list[Any] | None, bool]:
    """The image to queue for ``change`` over the row's entry ``raw`` (None: none), and
    whether it is the whole row (merged over one)."""
    image = change.image
    if change.cols is None or image is None:
        return image, True
    if raw is None or raw == UNKNOWN:
        return image, False
    try:
        env = decode(raw)
    except CodecError:  # a tombstone, a marker, a foreign entry
        return image, False
    value = env.value
    if value is None or not spec.fits(value):
        return image, False  # a queued delete (the update brings the row back), another shape
    meta = env.meta or {}
    return overlay(value, image, change.cols), bool(meta.get("w", True))  # over a part?


def build(
    queued: Queued,
    change: BehindChange,
    now: float,
    raw: bytes | None,
    check: bool,
    fanned: Sequence[tuple[str, bool]] = (),
) -> tuple[bytes, bytes, bytes]:
    """The queued entry, prepare record and expected entry of ``change`` merged over
    ``raw``; ``check``: the commit script must find ``raw`` (else: no check).
    ``fanned``: the other key versions its commit writes to (`write_behind_versions`)."""
    image, whole = merge(change.spec, change, raw)
    if not check and change.cols is not None:
        whole = False  # merged over an entry that may be gone
    entry = queued_entry(image, now, queued.tx, change.cols, whole)
    spec = change.spec
    record = prepare_record(spec.table, change.key, change.first, entry, change.pk, fanned)
    expected = NO_CHECK
    if check and change.cols is not None and change.image is not None:
        expected = ABSENT if raw is None else raw
    return entry, record, expected


def first_guess(change: BehindChange, seen: dict[str, bytes | None] | None) -> bytes | None:
    """The entry to merge ``change`` over before the commit script has answered: the
    one this Session last saw of the row (None: none), else one holding the row as the
    object loaded it (the script compares images, not envelopes), else `UNKNOWN`."""
    if change.cols is None:
        return UNKNOWN
    if seen is not None and change.key in seen:
        return seen[change.key]
    if change.base is not None:
        try:
            return queued_entry(change.base, 0.0, "")
        except TypeError:
            return UNKNOWN
    return UNKNOWN


def remake(queued: Queued, p: int, answer: Sequence[Any]) -> None:
    """The commit script of partition ``p`` found other entries (``answer``: index,
    entry, ...): merge those changes over them (made when they were first)."""
    remade = queued.remade.setdefault(p, {})
    for at in range(0, len(answer), 2):
        i = int(answer[at]) - 1
        change, made, fanned = queued.changes[p][i], queued.made[p][i], _fanned(queued, p, i)
        raw = answer[at + 1]
        entry, remade[i], queued.expected[p][i] = build(queued, change, made, raw, True, fanned)
        queued.entries[p][i] = entry


def uncheck(queued: Queued, p: int) -> None:
    """The last attempt: queue the changes of partition ``p`` over the entries they were
    merged over without checking them (so not as whole rows)."""
    remade = queued.remade.setdefault(p, {})
    for i, change in enumerate(queued.changes[p]):
        expected = queued.expected[p][i]
        if expected == NO_CHECK:
            continue
        raw = None if expected in (ABSENT, UNKNOWN) else expected
        made, fanned = queued.made[p][i], _fanned(queued, p, i)
        entry, remade[i], queued.expected[p][i] = build(queued, change, made, raw, False, fanned)
        queued.entries[p][i] = entry


def _fanned(queued: Queued, p: int, i: int) -> tuple[tuple[str, bool], ...]:
    fanned = queued.fanned.get(p)
    return fanned[i] if fanned else ()


def records_of(queued: Queued, p: int, first: Sequence[bytes] | None) -> list[bytes]:
    """The prepare records the commit script of ``p`` appends: ``first`` (those of a
    one-step commit) with the ones made again in their place, or only those."""
    remade = queued.remade.get(p, {})
    if first is not None:
        return [remade.get(i, r) for i, r in enumerate(first)]
    return [remade[i] for i in sorted(remade)]


def note_seen(seen: dict[str, bytes | None], queued: Queued) -> None:
    """After the commit script ran: each row's entry is the one it set."""
    if len(seen) > SEEN_LIMIT:
        seen.clear()
    for p in queued.partitions:
        for change, entry in zip(queued.changes[p], queued.entries[p], strict=True):
            seen[change.key] = entry


def commit(
    wb: WriteBehind, queued: Queued, parts: Sequence[int], records: dict[int, list[bytes]] | None
) -> tuple[list[int], BaseException | None]:
    """Run the commit scripts of ``parts``; those that found a row's entry replaced
    run again with their updates merged over the new one.
    ``records``: the prepare records of a one-step commit. Returns the partitions
    committed, and the first error."""
    todo, stored = list(parts), list[int]()
    error: BaseException | None = None
    for attempt in range(ATTEMPTS + 1):
        if attempt == ATTEMPTS:
            for p in todo:
                uncheck(queued, p)
        batch = [(p, records_of(queued, p, None if records is None else records[p])) for p in todo]
        try:
            answers = _run_scripts(wb, queued, batch)
        except BackendError as exc:
            return stored, exc
        todo = []
        for (p, _), answer in zip(batch, answers, strict=True):
            if isinstance(answer, BaseException):
                error = error or answer
            elif int(answer[0]) == 1:
                stored.append(p)
            else:
                remake(queued, p, answer[1:])
                todo.append(p)
        if not todo:
            break
        wb.cache.stats.incr("write_behind.merge_retry", len(todo))
    return stored, error


def _run_scripts(
    wb: WriteBehind, queued: Queued, batch: list[tuple[int, list[bytes]]]
) -> list[Any]:
    """The commit scripts of ``batch`` (partition, its records): one round trip."""
    if len(batch) == 1:
        p, records = batch[0]
        args = wb.script_args(p, queued, records, queued.keys(p))
        with redis_errors("commit"):
            try:
                return [wb.execute("EVALSHA", COMMIT_SHA, *args)]
            except NoScriptError:
                return [wb.execute("EVAL", COMMIT, *args)]
    pipe = wb.client.pipeline(transaction=False)
    for p, records in batch:
        wb.commit_script(pipe, p, queued, records, queued.keys(p))
    with redis_errors("commit"):
        out: list[Any] = pipe.execute(raise_on_error=False)
    return [redis_error_of(r) for r in out]
