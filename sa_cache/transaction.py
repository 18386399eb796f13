"""Per-Session transaction state: which tables a transaction wrote, frame by frame.

Writes are noticed where they happen — every INSERT/UPDATE/DELETE that runs on a
connection the Session holds, whether from a flush, a bulk ORM statement or Core
DML — and kept in a frame of the Session's transaction. A SAVEPOINT gets its own
frame: released, it merges into its parent; rolled back, it is dropped.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, NestedTransaction
from sqlalchemy.orm import Session, SessionTransaction

from .invalidation import (
    ALL,
    rows_generation,
    tables_written,
)
from .statements import _collectors, autocommits, snapshot_is_fresh

if TYPE_CHECKING:
    from .cache import Cache
    from .entity_batch import FlushBatch

log = logging.getLogger("sa_cache")

INFO_KEY = "sa_cache"

NEVER = b"sac-never:"
"""An ``expected`` no entry can hold: the commit's compare-and-set fails, the entry is
deleted. Recorded for a row whose image cannot be trusted (`entity_writes.record_flush`)."""


class EntityChange:
    """The last state of one registered row written in a frame.

    ``image`` is the encoded column image to write through (None: invalidate the entry);
    ``expected`` is the entry as the store held it at the first flush that touched
    the row (None: absent): the commit writes only over that, else it deletes.
    With a ``batch`` (`entity_batch.FlushBatch`) both are computed on first use, for
    every row of that flush at once: the flush's store read is collected then, so its
    round trip overlaps the database commit.
    """

    __slots__ = ("_expected", "_image", "batch", "key", "ttl")

    def __init__(
        self,
        key: str,
        image: bytes | None,
        expected: bytes | None,
        ttl: float | None,
        batch: FlushBatch | None = None,
    ):
        self.key = key
        self._image = image
        self._expected = expected
        self.ttl = ttl
        self.batch = batch

    def settle(self, image: bytes | None, expected: bytes | None) -> None:
        """Set what the batch computed."""
        self._image, self._expected, self.batch = image, expected, None

    def parts(self) -> tuple[bytes | None, bytes | None]:
        """(image, expected)."""
        if self.batch is not None:
            self.batch.settle()
        return self._image, self._expected

    @property
    def expected(self) -> bytes | None:
        return self.parts()[1]

    @expected.setter
    def expected(self, value: bytes | None) -> None:
        self.parts()
        self._expected = value


class BehindChange:
    """The last state of one write-behind row changed in a frame (see `write_behind`).

    ``image`` is the full column image (None: deleted); ``first`` is the first
    operation on the row in the transaction (``"i"``, ``"u"`` or ``"d"``), so an
    insert later deleted in the same transaction cancels out; ``cols``: the positions
    of the columns an update changed (None: the whole row; see `write_behind_merge`),
    ``base`` the row as the object loaded it, before the transaction (None: unknown).
    """

    __slots__ = ("base", "cols", "first", "image", "key", "pk", "spec")

    def __init__(
        self,
        key: str,
        spec: Any,
        first: str,
        pk: list[Any],
        image: list[Any] | None,
        cols: frozenset[int] | None = None,
        base: list[Any] | None = None,
    ) -> None:
        self.key = key
        self.spec = spec
        self.first = first
        self.pk = pk
        self.image = image
        self.cols = cols
        self.base = base


class Frame:
    """Changes made inside one transaction or SAVEPOINT."""

    __slots__ = ("behind", "entities", "tables", "transaction")

    def __init__(self, transaction: SessionTransaction | None) -> None:
        self.transaction = transaction
        self.tables: set[str] = set()
        self.entities: dict[str, EntityChange] = {}
        self.behind: dict[str, BehindChange] = {}

    def merge(self, other: Frame) -> None:
        """Fold a released SAVEPOINT into this frame: its images are later, its
        expectations are not (the earliest read of a row is kept)."""
        self.tables |= other.tables
        for key, change in other.entities.items():
            mine = self.entities.get(key)
            if mine is not None and change.expected != NEVER:  # (untrustworthy stays so)
                change.expected = mine.expected
            self.entities[key] = change
        for key, later in other.behind.items():
            earlier = self.behind.get(key)
            if earlier is not None:
                later.first = earlier.first
            self.behind[key] = later


class Collector:
    """Per-Session transaction state, kept in ``session.info``."""

    __slots__ = (
        "__weakref__",
        "autocommit",
        "behind_seen",
        "behind_sent",
        "cache",
        "commit_sent",
        "connections",
        "doomed",
        "flush_foreign",
        "flush_rows",
        "frames",
        "healthy_commit",
        "in_flush",
        "joined",
        "outcome",
        "rolled_back_by_error",
        "serializable",
        "session",
        "snapshot_clocks",
        "statements",
        "text_ended",
    )

    def __init__(self, cache: Cache, session: Session) -> None:
        self.cache = cache
        self.session = weakref.ref(session)
        self.frames: list[Frame] = [Frame(None)]
        self.outcome: str | None = None
        self.connections: list[Connection] = []
        # statements run on each connection in its current database transaction
        self.statements: dict[int, int] = {}
        # commit clock read before the first statement, on snapshot-isolated connections
        self.snapshot_clocks: dict[int, int | None] = {}
        # write-behind changes queued before the commit (`write_behind.Queued`)
        self.behind_sent: Any = None
        # the entry last seen of each write-behind row (None: none), to merge updates
        # over (`write_behind_merge`)
        self.behind_seen: dict[str, bytes | None] = {}
        # row generations noted by a flush's own statements, until it says which rows
        # it wrote (`flush_done`); ``in_flush``: between ``before_flush`` and then
        self.flush_rows: set[str] = set()
        self.in_flush = False
        # ... and those of ORM statements run during the flush by its events (a bulk
        # UPDATE by primary key from a ``before_flush`` listener): the ORM runs them as
        # it runs the flush's own, but the flush names none of their rows
        self.flush_foreign: set[str] = set()
        # the Connection whose transaction this Session joined (`joined_transaction`)
        self.joined: Connection | None = None
        # a COMMIT was sent on one of its connections (`_commit_sent`)
        self.commit_sent = False
        # ... by a connection whose transaction had failed: the database rolls it back
        self.doomed = False
        # ... by a connection whose transaction had not failed
        self.healthy_commit = False
        # one of its connections commits each statement as it runs (AUTOCOMMIT)
        self.autocommit = False
        # SQL text ended a database transaction of it (`transaction_text`)
        self.text_ended = False
        # a statement's error made the database roll back the transaction of one of its
        # connections, which went on in a new one (`server_rollback`)
        self.rolled_back_by_error = False
        # one of its connections is SERIALIZABLE: no hits (`serializable`)
        self.serializable = False

    def entity_changes(self) -> dict[str, EntityChange]:
        """Every registered row written in the open transaction, merged over frames."""
        if len(self.frames) == 1:
            return self.frames[0].entities
        merged = Frame(None)
        for frame in self.frames:
            merged.merge(frame)
        return merged.entities

    def behind_changes(self) -> dict[str, BehindChange]:
        """Every write-behind row changed in the open transaction, merged over frames."""
        if len(self.frames) == 1:
            return self.frames[0].behind
        merged = Frame(None)
        for frame in self.frames:
            merged.merge(frame)
        return merged.behind

    def behind_for(self, key: str) -> BehindChange | None:
        """The latest write-behind change of ``key`` in the open transaction."""
        for frame in reversed(self.frames):
            change = frame.behind.get(key)
            if change is not None:
                return change
        return None

    def latest_change(self, key: str) -> EntityChange | None:
        """The latest change of ``key`` in this transaction: its ``expected`` is the
        store's value before the transaction touched the row, or `entity_writes.NEVER`
        once a flush found the row's image untrustworthy (then it stays so)."""
        for frame in reversed(self.frames):
            change = frame.entities.get(key)
            if change is not None:
                return change
        return None

    def written(self) -> set[str]:
        """Tables this Session wrote in its open transaction (all frames)."""
        if len(self.frames) == 1:
            return self.frames[0].tables
        out: set[str] = set()
        for frame in self.frames:
            out |= frame.tables
        return out

    def record_write(self, tables: frozenset[str], persisting: bool = False) -> None:
        """Note DML on ``tables``. Its rows are unknown, so entity entries of those
        tables must go too: their row generation is bumped as well — unless it is a
        flush's own statement for the rows of its objects (``persisting``: the ORM
        runs those with its mappers' compiled cache) and the flush then names those
        rows (`flush_done`). Anything else a flush runs names no rows: statements of
        flush events, a many-to-many's secondary rows (which a registered model may
        map), and ``bulk_update_mappings`` / ``bulk_save_objects``, which run with
        ``session._flushing`` set but are no flush (no ``before_flush``)."""
        frame_tables = self.frames[-1].tables
        frame_tables.update(tables)
        rows = {rows_generation(t) for t in tables if t != ALL}
        if not persisting:
            self.flush_rows -= rows  # rows nothing names: bumped, even if a flush's were
        rows -= frame_tables
        if rows:
            frame_tables |= rows
            if persisting and self.in_flush:
                # only rows of models registered here: the flush names no others (another
                # process may have registered a model this one writes without)
                named = {rows_generation(spec.table) for spec in self.cache.entities.values()}
                self.flush_rows |= rows & named

    def flush_begins(self) -> None:
        """``before_flush``: row generations noted from now on by the flush's own
        statements may be named by it; those noted before stay."""
        self.flush_rows.clear()
        self.flush_foreign.clear()
        self.in_flush = True

    def flush_done(self) -> None:
        """``after_flush``: the flush recorded each registered row it wrote, so the row
        generations its own statements noted are not needed."""
        if self.flush_rows:
            self.frames[-1].tables -= self.flush_rows - self.flush_foreign
            self.flush_rows.clear()
        self.flush_foreign.clear()
        self.in_flush = False

    def orm_statement(self, statement: Any) -> None:
        """An ORM statement run through the Session (``do_orm_execute``): DML run while
        a flush is under way (by one of its events) names no rows (`flush_foreign`)."""
        if self.in_flush:
            written = tables_written(statement)
            if written:
                self.flush_foreign |= {rows_generation(t) for t in written if t != ALL}

    def began(self, transaction: SessionTransaction, conn: Connection) -> None:
        """``after_begin`` of the Session's outermost transaction on ``conn``: note a
        transaction that was there before the Session's (see `joined_transaction`)."""
        entry = transaction._connections.get(conn)
        if entry is not None and (not entry[2] or isinstance(entry[1], NestedTransaction)):
            self.joined = conn

    def bind_connection(self, conn: Connection) -> None:
        """Route statements run on ``conn`` to this collector. Again for a SAVEPOINT on
        a connection it holds (``after_begin`` of a nested transaction): its statement
        count and snapshot clock are the outer transaction's, kept as they are."""
        _collectors[conn] = self
        if id(conn) in self.statements and conn in self.connections:
            return
        self.connections.append(conn)
        if autocommits(conn):
            self.autocommit = True
        self.statements[id(conn)] = 0
        if not snapshot_is_fresh(conn):
            self.snapshot_clocks[id(conn)] = self.cache.read_clock()

    def snapshot_taken(self) -> int | None:
        """The commit clock of the oldest snapshot this transaction reads from: taken by
        the first statement on a REPEATABLE READ / SERIALIZABLE connection (see
        `snapshot_is_fresh`), read before it. Cached rows stamped later are newer than
        what its database reads return, so they must not be served to it. None: no
        such snapshot yet; -1: one whose clock the store could not tell."""
        if not self.snapshot_clocks:
            return None
        oldest: int | None = None
        for conn_id, clock in self.snapshot_clocks.items():
            if self.statements.get(conn_id, 0) == 0:
                continue  # begun, no statement yet: the snapshot is still to come
            if clock is None:
                return -1
            oldest = clock if oldest is None else min(oldest, clock)
        return oldest

    def reset(self) -> None:
        for conn in self.connections:
            if _collectors.get(conn) is self:
                del _collectors[conn]
        self.connections.clear()
        self.statements.clear()
        self.snapshot_clocks.clear()
        self.frames = [Frame(None)]
        self.outcome = None
        self.behind_sent = None
        self.flush_rows.clear()
        self.flush_foreign.clear()
        self.in_flush = False
        self.commit_sent = False
        self.doomed = False
        self.healthy_commit = False
        self.autocommit = False
        self.text_ended = False
        self.rolled_back_by_error = False
        self.serializable = False
        self.joined = None


def joined_transaction(session: Session) -> bool:
    """Is ``session`` inside a transaction it did not begin (bound to a Connection in a
    transaction: ``join_transaction_mode``, the test-fixture recipe)? Its commit is not
    the database's, and that transaction may hold writes no Session here recorded: it
    neither reads nor fills the cache, and what it wrote is invalidated when the
    Connection's own transaction commits (`invalidate_on_commit`)."""
    bind = session.bind
    if not isinstance(bind, Connection):
        return False
    collector: Collector | None = session.info.get(INFO_KEY)
    if collector is not None and collector.connections:  # begun: `Collector.began` knows
        return collector.joined is not None
    return bind.in_transaction()


def collector_for(session: Session, cache: Cache) -> Collector:
    found: Collector | None = session.info.get(INFO_KEY)
    if found is None or found.cache is not cache:
        found = Collector(cache, session)
        session.info[INFO_KEY] = found
    return found
