"""What a Session may be served from the cache while it holds a transaction: not
what its own uncommitted (or unflushed) writes change (DESIGN rule 2), nor, under
REPEATABLE READ, rows newer than the snapshot its database reads see."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from .invalidation import ALL, table_name
from .tokens import older_than
from .transaction import INFO_KEY, Collector, joined_transaction

if TYPE_CHECKING:
    from .cache import Cache


def pending_tables(session: Session, cache: Cache) -> set[str]:
    """Tables of the Session's new, dirty and deleted objects (not flushed yet), but
    not those of write-behind models: their changes never reach the database before
    the commit, so a database read would not see them either (and would miss what
    the queue holds)."""
    out: set[str] = set()
    entities = cache.entities
    for obj in (*session.new, *session.dirty, *session.deleted):
        mapper = getattr(obj, "__mapper__", None)
        if mapper is not None:
            spec = entities.get(mapper)
            if spec is None or spec.write != "behind":
                out.update(table_name(t) for t in mapper.tables)
    return out


def sees_own_writes(session: Session, cache: Cache, tables: Collection[str]) -> bool:
    """True when this Session has changes to ``tables`` the cache must not hide (rule 2),
    or may have them (`joined_transaction`)."""
    if session.bind is not None and joined_transaction(session):
        return True
    collector: Collector | None = session.info.get(INFO_KEY)
    if collector is not None and collector.cache is cache:  # else it wrote nothing yet
        written = collector.written()
        if written and (ALL in written or not written.isdisjoint(tables)):
            return True
    return not session._is_clean() and not pending_tables(session, cache).isdisjoint(tables)


def snapshot_of(session: Session) -> int | None:
    """`Collector.snapshot_taken` of ``session``'s transaction (None: no older snapshot
    to honour — e.g. READ COMMITTED, or no statement yet)."""
    collector: Collector | None = session.info.get(INFO_KEY)
    if collector is None or not collector.snapshot_clocks:
        return None
    return collector.snapshot_taken()


def in_snapshot(session: Session, gens: Sequence[str]) -> bool:
    """May rows valid under the generation tokens ``gens`` be served to ``session``?
    Not to a transaction reading an older snapshot if a commit wrote one of their
    tables after it: its database reads would not see those changes."""
    snapshot = snapshot_of(session)  # (None under READ COMMITTED)
    return snapshot is None or older_than(gens, snapshot)
