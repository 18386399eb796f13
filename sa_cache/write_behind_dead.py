"""Write-behind dead letters: the stream of changes the worker gave up on, and replay.

The worker moves a change here after ``max_attempts`` failures, a prepared change whose
producer never confirmed it ("outcome unknown"), and a record it cannot read. An
operator lists them (``sa-cache worker --dead-letters``, `WriteBehind.dead_letters`) and
queues them again (``--replay``, `WriteBehind.replay`).
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .codec import CodecError, decode, pack, unpack
from .write_behind_records import Queued, prepare_record, queued_entry, redis_errors

if TYPE_CHECKING:
    from .write_behind import WriteBehind
    from .write_behind_coalesce import Slot


class DeadLetter(NamedTuple):
    """One change the worker gave up on, as ``sa-cache worker --dead-letters`` lists it."""

    id: str
    partition: int
    table: str
    key: str
    op: str
    image: list[Any] | None
    error: str
    attempts: int
    cols: list[int] | None = None
    """The positions of the columns an update changed (None: the whole row); a replay
    writes only those."""


def dead_letter_fields(partition: int, slot: Slot | None, error: str) -> dict[str, Any]:
    """The fields of the dead-letter record of ``slot`` (None: a corrupt record)."""
    fields: dict[str, Any] = {"partition": partition, "error": error, "op": "?"}
    fields.update(table="", key="", entry=b"", pk=pack([]), attempts=0)
    if slot is not None:
        fields.update(table=slot.table, key=slot.key, op=slot.first, entry=slot.entry)
        fields.update(pk=pack(slot.pk), attempts=slot.attempts)
        if slot.cols is not None:
            fields.update(cols=pack(sorted(slot.cols)))
    return fields


def dead_letters(queue: WriteBehind, count: int = 100) -> list[DeadLetter]:
    """The oldest ``count`` dead letters."""
    with redis_errors("XRANGE"):
        rows = queue.client.xrange(queue.dead_key, "-", "+", count=count)
    return [_dead_letter(entry_id, fields) for entry_id, fields in rows]


_ID = re.compile(r"\d+(-\d+)?")
"""A stream entry id: milliseconds, and a sequence number (any, when left out)."""


def replay(queue: WriteBehind, ids: Sequence[str] | None = None) -> int:
    """Queue dead letters again (all, or those ``ids``) as new committed changes.

    A replayed image is queued *after* everything already queued for its row, so it
    wins over them: check that it is still wanted. Returns how many were replayed.
    ValueError naming the ``ids`` that are not dead letters (then nothing is replayed);
    an id given twice is replayed once.
    """
    if isinstance(ids, (str, bytes)):
        raise TypeError(
            f"replay(ids): ids must be a list of dead-letter ids, not one str; pass [{ids!r}]"
        )
    client = queue.client
    with redis_errors("XRANGE"):
        if ids is None:
            rows = client.xrange(queue.dead_key, "-", "+")
        else:
            ids = list(dict.fromkeys(ids))
            bad = [i for i in ids if not _ID.fullmatch(str(i))]
            if bad:
                raise ValueError(f"not a dead-letter id (ms-seq): {', '.join(map(str, bad))}")
            found = {i: client.xrange(queue.dead_key, i, i) for i in ids}
            missing = [i for i, got in found.items() if not got]
            if missing:
                raise ValueError(f"no dead letter with id {', '.join(missing)}")
            rows = list({row[0]: row for got in found.values() for row in got}.values())
    by_partition: dict[int, list[tuple[bytes, dict[bytes, bytes]]]] = {}
    for entry_id, fields in rows:
        by_partition.setdefault(int(fields[b"partition"]), []).append((entry_id, fields))
    count = 0
    for partition, entries in sorted(by_partition.items()):
        pipe = client.pipeline(transaction=False)
        # One transaction per letter of a key: within a transaction a key's last record
        # replaces its earlier ones (write_behind_coalesce), and these are each a change.
        groups: list[list[dict[bytes, bytes]]] = [[]]
        for _, fields in entries:
            if not fields[b"key"]:
                continue  # a corrupt record: nothing to replay
            if any(f[b"key"] == fields[b"key"] for f in groups[-1]):
                groups.append([])
            groups[-1].append(fields)
        for group in groups:
            if group:
                count += _replay_group(queue, pipe, partition, group)
        pipe.execute_command("XDEL", queue.dead_key, *(i for i, _ in entries))
        with redis_errors("replay"):
            pipe.execute()
    return count


def _replay_group(
    queue: WriteBehind, pipe: Any, partition: int, group: list[dict[bytes, bytes]]
) -> int:
    """Queue on ``pipe`` one transaction of dead letters (of different keys)."""
    queued = Queued(secrets.token_hex(8), True)
    records, keys = [], []
    for fields in group:
        image = decode(fields[b"entry"]).value
        cols = _cols(fields)  # an update of some columns stays one
        entry = queued_entry(image, time.time(), queued.tx, cols, cols is None)
        key, table = fields[b"key"].decode(), fields[b"table"].decode()
        op, pk = fields[b"op"].decode(), unpack(fields[b"pk"])
        if op == "i":  # it may be in the database already: a later delete must run
            op = "u"
        records.append(prepare_record(table, key, op, entry, pk))
        keys.append(key)
        queued.entries.setdefault(partition, []).append(entry)
    queue.commit_script(pipe, partition, queued, records, keys)
    return len(records)


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    try:
        image = decode(fields[b"entry"]).value
    except CodecError:
        image = None
    return DeadLetter(
        entry_id.decode(),
        int(fields[b"partition"]),
        fields[b"table"].decode(),
        fields[b"key"].decode(),
        fields[b"op"].decode(),
        image,
        fields[b"error"].decode(errors="replace"),
        int(fields[b"attempts"]),
        _cols(fields),
    )


def _cols(fields: dict[bytes, bytes]) -> list[int] | None:
    raw = fields.get(b"cols")
    return None if raw is None else [int(i) for i in unpack(raw)]
