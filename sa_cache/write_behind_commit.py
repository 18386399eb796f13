"""Write-behind at commit: queue a transaction's changes, confirm or abort them after.

The design is described in `write_behind` ("Where the queue write happens"); the
Session hooks of `write_behind_session` call `before_commit`, `send_late` (changes
flushed after the queue write, e.g. by a later ``before_commit`` listener) and
`finish` (after the outermost transaction ended). When Redis cannot take the changes
they are written to the database synchronously (``on_queue_error="sync"``) with a sync
marker per row (`write_behind_fence.mark_synced`), so that no older image still queued
for those rows is applied after them. When the confirmation after the COMMIT fails, the
changes are written late by `write_behind_late`, which leaves newer changes alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from .backends.base import BackendError
from .entity import EntitySpec
from .outer_commit import invalidate_on_commit
from .transaction import BehindChange, collector_for, joined_transaction
from .write_behind import (
    PrepareFailed,
    Queued,
    WriteBehind,
    WriteBehindUnavailable,
    partition_of_key,
    queue_of,
    write_behind_for,
)
from .write_behind_late import renewed, rows_now, rows_of, write_late
from .write_behind_merge import note_seen
from .write_behind_order import delete_acts
from .write_behind_versions import row_of

if TYPE_CHECKING:
    from .cache import Cache

log = logging.getLogger("sa_cache")


class _Synced:
    """The changes of a transaction that went to the database synchronously."""

    __slots__ = ("keys", "queued")

    def __init__(self, queued: Queued | None, keys: list[str]) -> None:
        self.queued = queued  # prepare records that may exist anyway: abort them
        self.keys = keys


def _live(changes: dict[str, BehindChange]) -> list[BehindChange]:
    """Changes to send: an insert deleted again in the same transaction cancels out."""
    return [c for c in changes.values() if not (c.first == "i" and c.image is None)]


def before_commit(cache: Cache, session: Session) -> None:
    """Outermost ``before_commit``: flush, then prepare the changes in the queue."""
    wb = queue_of(cache)
    if wb is None or not wb.models or session.in_nested_transaction():
        return
    collector = collector_for(session, cache)
    if collector.behind_sent is not None:
        return
    if not session._flushing:
        for _ in range(100):
            if session._is_clean():
                break
            session.flush()
    changes = _live(collector.behind_changes())
    if not changes:
        return
    if joined_transaction(session):
        # Its commit is not the database's: the changes go to the database in the
        # transaction it joined, which may still roll back (`finish` invalidates their
        # entries when that one commits); a queue write could not be taken back then.
        write_now(cache, session, changes)
        collector.behind_sent = _Synced(None, [c.key for c in changes])
        return
    if _renews_with_actions(changes) and _written_in_commit(cache, session, changes):
        collector.behind_sent = _Synced(None, [c.key for c in changes])
        return
    # No database work in this transaction: its COMMIT cannot fail, so the queue write
    # is the commit (one round trip). Not with "raise": a queue write that timed out may
    # still run, and only a prepare can be undone (by an abort record). Nor when another
    # before_commit listener runs after this one: it may still fail the commit.
    one_step = (
        not collector.connections and wb.config.on_queue_error == "sync" and _runs_last(session)
    )
    try:
        collector.behind_sent = wb.prepare(changes, commit=one_step, seen=collector.behind_seen)
        if one_step:
            note_seen(collector.behind_seen, collector.behind_sent)
        return
    except (BackendError, TypeError) as exc:
        error: BaseException = exc
        partial = exc.queued if isinstance(exc, PrepareFailed) else None
    cache.stats.incr("write_behind.queue_error")
    if wb.config.on_queue_error == "raise":
        if partial is not None:
            wb.abort(partial)
        raise WriteBehindUnavailable(
            f"write-behind changes could not be queued ({error}); nothing was committed"
        ) from error
    log.warning("sa_cache: write-behind queue unavailable (%s); writing to the database", error)
    if one_step and partial is not None:  # those partitions are committed in the queue
        done = set(partial.partitions)
        changes = [c for c in changes if partition_of_key(c.key) not in done]
        partial = None
    write_now(cache, session, changes)
    collector.behind_sent = _Synced(partial, [c.key for c in changes])


def _renews_with_actions(changes: Sequence[BehindChange]) -> bool:
    """Does a change renew a row (deleted and added again) whose delete sets off
    foreign-key actions? The worker would delete it early to run them
    (`write_behind_order`), later than this COMMIT: the worker of another partition may
    by then have written a row that delete reaches — one this transaction or a later
    one added under the new row — and the cascade would take it. (Rare: written at
    once, the actions run in this COMMIT, in the application's order.)"""
    return any(renewed(c) and delete_acts(c.spec) for c in changes)


def _written_in_commit(cache: Cache, session: Session, changes: Sequence[BehindChange]) -> bool:
    """Write ``changes`` in the committing transaction, under a SAVEPOINT. False, with
    nothing written, where the database refuses them in the order a batch gives them: a
    row still in the way of the renewed row's delete (moved or deleted by a change still
    queued, or by this transaction in an order a batch does not keep). Queued, they go
    to the worker, which retries and bisects."""
    from .write_behind_order import savepoint

    conns = {session.connection(bind_arguments={"mapper": c.spec.mapper}) for c in changes}
    if len(conns) != 1:
        return False  # (several databases: no one SAVEPOINT covers them)
    try:
        with savepoint(conns.pop()):
            write_now(cache, session, changes)
    except sa.exc.IntegrityError as exc:
        log.info("sa_cache: a write-behind renewal was queued, not written at its commit: %s", exc)
        cache.stats.incr("write_behind.renewal_queued")
        return False
    return True


def _runs_last(session: Session) -> bool:
    """Is sa_cache's ``before_commit`` listener the last one ``session`` runs (those of
    its class and sessionmaker, then its own, as SQLAlchemy calls them)? Nothing after
    it can then fail a commit that has no connection to COMMIT."""
    listeners = list(session.dispatch.before_commit)
    return bool(listeners) and getattr(listeners[-1], "sa_cache_hook", False) is True


def send_late(cache: Cache, session: Session, late: list[BehindChange]) -> None:
    """Changes flushed after the queue write of ``before_commit`` (a later listener
    changed write-behind objects): queued with the transaction's, or written with them."""
    collector = collector_for(session, cache)
    sent, wb = collector.behind_sent, write_behind_for(cache)
    if isinstance(sent, _Synced):
        write_now(cache, session, late)
        sent.keys += [c.key for c in late]
        return
    assert isinstance(sent, Queued)
    try:
        if sent.committed:  # queued in one step already: so are these
            note_seen(collector.behind_seen, wb.prepare(late, True, seen=collector.behind_seen))
        else:  # more prepare records of the same transaction
            wb.prepare(late, into=sent, seen=collector.behind_seen)
        return
    except (BackendError, TypeError) as exc:
        error: BaseException = exc
        partial = exc.queued if isinstance(exc, PrepareFailed) else None
    cache.stats.incr("write_behind.queue_error")
    if wb.config.on_queue_error == "raise":  # finish() aborts the transaction's records
        raise WriteBehindUnavailable(
            f"write-behind changes could not be queued ({error}); nothing was committed"
        ) from error
    log.warning("sa_cache: write-behind queue unavailable (%s); writing to the database", error)
    if sent.committed:  # the earlier changes are committed in the queue: these are not
        done = set(partial.partitions) if partial is not None else set()
        rest = [c for c in late if partition_of_key(c.key) not in done]
        write_now(cache, session, rest)
        collector.behind_sent = _Synced(None, [c.key for c in rest])
    else:  # all of the transaction's changes go to the database; its records are aborted
        changes = _live(collector.behind_changes())
        write_now(cache, session, changes)
        collector.behind_sent = _Synced(sent, [c.key for c in changes])


def write_now(cache: Cache, session: Session, changes: Sequence[BehindChange]) -> None:
    """Write ``changes`` in the Session's open transaction (the queue is unavailable),
    with their sync markers: the tables of one connection at once, in foreign-key order."""
    wb = write_behind_for(cache)
    by_conn: dict[Connection, dict[EntitySpec, list[Any]]] = {}
    for spec, rows in _by_spec(changes).items():
        conn = session.connection(bind_arguments={"mapper": spec.mapper})
        by_conn.setdefault(conn, {})[spec] = rows
    for conn, by_spec in by_conn.items():
        _write(conn, wb, by_spec)
    cache.stats.incr("write_behind.sync", len(changes))


def _write(conn: Connection, wb: WriteBehind, by_spec: dict[EntitySpec, list[Any]]) -> None:
    """Write rows of several tables in one transaction of ``conn`` (parents first, as
    `write_behind_apply.apply_in_order` does), and mark them written synchronously (now:
    just before the COMMIT that makes them the last change)."""
    from .write_behind_apply import apply_in_order
    from .write_behind_fence import mark_names, mark_synced

    apply_in_order(
        conn,
        {
            sp: [(pk, image, cols, again) for _, pk, image, cols, again in rows]
            for sp, rows in by_spec.items()
        },
    )
    names = []
    for rows in by_spec.values():
        for key, _, image, cols, _ in rows:
            stream = wb.stream(partition_of_key(key))
            names += mark_names(stream, row_of(key), key, image, cols)
    mark_synced(conn, names)


def _by_spec(changes: Sequence[BehindChange]) -> dict[EntitySpec, list[Any]]:
    """(key, pk, image, changed columns, renewed) per spec, the last change of each key."""
    out: dict[EntitySpec, dict[str, Any]] = {}
    for change in changes:
        row = (change.key, change.pk, change.image, change.cols, renewed(change))
        out.setdefault(change.spec, {})[change.key] = row
    return {spec: list(rows.values()) for spec, rows in out.items()}


def finish(
    cache: Cache,
    session: Session,
    sent: Any,
    changes: dict[str, BehindChange],
    committed: bool,
    unknown: bool = False,
    joined: Connection | None = None,
) -> None:
    """After the outermost transaction ended: confirm, abort, or write late.
    ``unknown``: its COMMIT was sent but failed, so the database may have it.
    ``joined``: the Connection whose transaction the Session joined (its commit is the
    database's)."""
    wb = write_behind_for(cache)
    if unknown and isinstance(sent, Queued) and not sent.committed:
        log.error(
            "sa_cache: the database COMMIT failed after it was sent: its outcome is unknown, "
            "so the transaction's write-behind changes stay prepared (the worker moves "
            "them to the dead letters as outcome unknown after prepare_timeout)"
        )
        return
    if unknown and isinstance(sent, _Synced):
        if sent.queued is not None:
            wb.abort(sent.queued)
        cache.bump(deletes=sent.keys, tombstone=True)  # written with the COMMIT: maybe
        return
    if isinstance(sent, Queued):
        if sent.committed:  # queued in one step at before_commit
            if not committed:
                log.error(
                    "sa_cache: a transaction whose write-behind changes were already queued "
                    "(it did no database work) failed after before_commit; they stay queued"
                )
            cache.stats.incr("write_behind.queued", sum(len(v) for v in sent.changes.values()))
            return
        if not committed:
            wb.abort(sent)
            return
        try:
            wb.confirm(sent)
            note_seen(collector_for(session, cache).behind_seen, sent)
        except BackendError as exc:
            log.warning("sa_cache: write-behind confirm failed (%s); writing to the database", exc)
            if write_late(cache, session, rows_of(sent, sent.partitions)):
                wb.abort(sent)
            return
        cache.stats.incr("write_behind.queued", sum(len(v) for v in sent.changes.values()))
    elif isinstance(sent, _Synced):
        if sent.queued is not None:
            wb.abort(sent.queued)
        if committed and joined is not None:
            invalidate_on_commit(cache, joined, set(), sent.keys)
        elif committed:  # (a tombstone: a reader's load begun before cannot fill over it)
            cache.bump(deletes=sent.keys, tombstone=True)
    elif committed and changes:  # the root commit skipped before_commit (see session.py)
        if joined is not None and joined.in_transaction():
            _write_joined(cache, joined, _live(changes))
        else:
            _queue_after_commit(cache, session, wb, _live(changes))


def _write_joined(cache: Cache, conn: Connection, live: list[BehindChange]) -> None:
    """The changes of a Session that joined ``conn``'s transaction, known only after
    its commit: written in that transaction, invalidated when it commits."""
    _write(conn, write_behind_for(cache), _by_spec(live))
    cache.stats.incr("write_behind.sync", len(live))
    tables = {c.spec.table for c in live}
    invalidate_on_commit(cache, conn, tables, [c.key for c in live])


def _queue_after_commit(
    cache: Cache, session: Session, wb: WriteBehind, live: list[BehindChange]
) -> None:
    if not live:
        return
    queued: Queued | None = None
    seen = collector_for(session, cache).behind_seen
    made = time.time()
    try:
        queued = wb.prepare(live, seen=seen)
        wb.confirm(queued)
        note_seen(seen, queued)
    except (BackendError, TypeError) as exc:
        log.warning("sa_cache: write-behind queue unavailable (%s); writing now", exc)
        if isinstance(exc, PrepareFailed):
            queued = exc.queued
        if queued is not None and all(c.key in _keys(queued) for c in live):
            rows = rows_of(queued, sorted(queued.changes))
        else:  # (never prepared: a value msgpack cannot encode)
            rows = rows_now(live, made)
        if write_late(cache, session, rows) and queued is not None:
            wb.abort(queued)


def _keys(queued: Queued) -> set[str]:
    return {c.key for changes in queued.changes.values() for c in changes}
