"""Session integration: `CachingSession`, `Cache.attach`, and the Session listeners.

Changes are collected per transaction frame (see `transaction`); only when the
outermost transaction commits is anything sent to the cache (DESIGN rule 1). While
frames hold writes to a table, cached reads of that table go to the database
(rule 2, enforced in `query`). Write-behind rows are taken out of the flush in
``before_flush`` and queued around the outermost commit (`write_behind_session`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import MethodType
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Result
from sqlalchemy.orm import Session, SessionTransaction, scoped_session, sessionmaker

from . import write_behind_session
from .backends.base import NO_VALUE
from .entity_batch import restore_flushes
from .entity_reads import PREFETCH, fast_get
from .entity_writes import commit_writes, record_flush
from .outer_commit import invalidate_on_commit
from .query import on_orm_execute
from .query_fast import PREFETCH as QUERY_PREFETCH
from .query_fast import fast_result
from .query_shape import translate_of
from .serializable import note_serializable
from .statements import watch_engine
from .transaction import (
    INFO_KEY,
    Collector,
    Frame,
    collector_for,
)
from .visibility import refuse_locked_write_behind

if TYPE_CHECKING:
    from .cache import Cache

ATTACHED = "_sa_cache_attached"

log = logging.getLogger("sa_cache")


def _as_is(result: Any) -> Any:
    return result


# -- session listeners ----------------------------------------------------------------


def _outermost_ended(session: Session, collector: Collector) -> None:
    """The Session's outermost transaction ended: after a commit, what it wrote goes to
    the store in one round trip (images, deletes, generations)."""
    # A statement's error rolled the transaction back on the server (a MySQL / MariaDB
    # deadlock), which went on in a new one: the COMMIT committed only what ran after
    # the error (`server_rollback`).
    lost = collector.rolled_back_by_error and collector.outcome == "commit"
    committed = collector.outcome == "commit" and not collector.doomed and not lost
    # every COMMIT it sent went to a failed transaction: the database rolled it all back
    rolled_back = collector.doomed and not collector.healthy_commit
    if collector.doomed and collector.outcome == "commit":
        log.warning(
            "sa_cache: a transaction was committed after one of its statements failed; "
            "the database rolled %s back",
            "it (and so did the cache)"
            if rolled_back
            else "that connection's work: what the transaction wrote is invalidated",
        )
    elif lost:
        log.warning(
            "sa_cache: a transaction was committed after a statement's error (a deadlock) "
            "made the database roll it back: what it wrote is invalidated, and its "
            "write-behind changes are aborted"
        )
    # A COMMIT that was sent but failed (the connection dropped, say) may have been
    # applied — or, sent on a failed transaction, rolled back while the Session's other
    # connections committed: what the transaction wrote is invalidated, never put back.
    commit_unknown = not committed and collector.commit_sent and not rolled_back
    # SQL text ended a transaction on the way (`transaction_text`), or an error did
    # (``lost``): what it wrote before may be committed or not, whatever the Session's
    # own end says
    unknown = commit_unknown or collector.text_ended or lost
    # On an AUTOCOMMIT connection every statement was committed as it ran: a rollback
    # takes nothing back, so what it wrote is invalidated too (never put back).
    kept = not committed and not unknown and collector.autocommit
    if not committed and not unknown and not kept:
        for frame in collector.frames:
            restore_flushes(frame.entities.values())
    written = collector.written() if committed or unknown or kept else set()
    entities = collector.entity_changes() if committed or unknown or kept else {}
    sent, behind = collector.behind_sent, collector.behind_changes()
    joined = collector.joined
    # write-behind changes of a transaction the database rolled back are aborted, as a
    # rollback's are: never confirmed, never left "outcome unknown"
    behind_unknown = commit_unknown and not collector.rolled_back_by_error
    collector.reset()
    if joined is not None:  # not the database's commit: invalidate at that one
        if (committed or unknown) and (entities or written):
            invalidate_on_commit(collector.cache, joined, written, list(entities))
    elif unknown or kept:
        collector.cache.bump(sorted(written), deletes=list(entities), tombstone=True)
    elif entities or written:
        writes, deletes = commit_writes(entities)
        collector.cache.bump(sorted(written), deletes=deletes, writes=writes, tombstone=True)
    if sent is not None or behind:
        write_behind_session.finish(
            collector.cache, session, sent, behind, committed, behind_unknown, joined
        )


def _bind(collector: Collector, conn: Connection) -> None:
    """``after_begin`` on ``conn``: its statements are the collector's; is it SERIALIZABLE?"""
    collector.bind_connection(conn)
    note_serializable(collector, conn)


def _queue_behind(cache: Cache, session: Session) -> None:
    """Outermost ``before_commit``: queue the transaction's write-behind changes — none
    if the database rolled it back (`server_rollback`): they are aborted at its end."""
    collector = session.info.get(INFO_KEY)
    if collector is not None and collector.cache is cache and collector.rolled_back_by_error:
        return
    write_behind_session.before_commit(cache, session)


def _listeners(resolve: Callable[[Session], Cache]) -> dict[str, Callable[..., Any]]:
    """The Session listeners, for the cache ``resolve(session)`` returns."""

    def after_begin(session: Session, transaction: SessionTransaction, conn: Connection) -> None:
        collector = collector_for(session, resolve(session))
        watch_engine(conn.engine)
        if transaction.parent is None:
            collector.began(transaction, conn)
        _bind(collector, conn)

    def after_transaction_create(session: Session, transaction: SessionTransaction) -> None:
        if transaction.nested:
            collector_for(session, resolve(session)).frames.append(Frame(transaction))

    def after_commit(session: Session) -> None:
        collector_for(session, resolve(session)).outcome = "commit"

    def after_rollback(session: Session) -> None:
        collector_for(session, resolve(session)).outcome = "rollback"

    def after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
        collector = collector_for(session, resolve(session))
        if transaction.nested:
            frames = collector.frames
            if len(frames) > 1 and frames[-1].transaction is transaction:
                frame = frames.pop()
                # (after an error that rolled the whole transaction back, the savepoint
                # is gone: what ran in it since went on in a new transaction)
                if collector.outcome == "commit" or collector.rolled_back_by_error:
                    frames[-1].merge(frame)
                else:
                    restore_flushes(frame.entities.values())
            collector.outcome = None
        elif transaction.parent is None:
            _outermost_ended(session, collector)

    def before_flush(session: Session, flush_context: Any, instances: Any) -> None:
        cache = resolve(session)
        collector_for(session, cache).flush_begins()
        write_behind_session.absorb(cache, session)

    def before_commit(session: Session) -> None:
        _queue_behind(resolve(session), session)

    def after_flush(session: Session, flush_context: Any) -> None:
        cache = resolve(session)
        collector = session.info.get(INFO_KEY)
        if collector is not None and collector.cache is cache:
            collector.flush_done()  # the flush names its rows: no row generations
        record_flush(cache, session, flush_context)

    def do_orm_execute(orm_execute_state: Any) -> Any:
        cache = resolve(orm_execute_state.session)
        if not orm_execute_state.is_select:
            collector = orm_execute_state.session.info.get(INFO_KEY)
            if collector is not None and collector.cache is cache:
                collector.orm_statement(orm_execute_state.statement)
        if cache.entities:
            refuse_locked_write_behind(cache, orm_execute_state)
            if orm_execute_state.is_column_load:
                return write_behind_session.refresh(cache, orm_execute_state)  # queued rows
        return on_orm_execute(cache, orm_execute_state)

    do_orm_execute.sa_cache_hook = True  # type: ignore[attr-defined]  # see query._runs_last
    before_commit.sa_cache_hook = True  # type: ignore[attr-defined]  # write_behind_commit too
    return {
        "after_begin": after_begin,
        "after_transaction_create": after_transaction_create,
        "after_commit": after_commit,
        "after_rollback": after_rollback,
        "after_transaction_end": after_transaction_end,
        "after_flush": after_flush,
        "before_flush": before_flush,
        "before_commit": before_commit,
        "do_orm_execute": do_orm_execute,
    }


def short_way(
    session: Session,
    cache: Cache,
    method: Callable[..., Any],
    finish: Callable[[Any], Any],
    statement: Any,
    params: Any,
    kwargs: dict[str, Any],
) -> Any:
    """``finish(result)`` of a hit answered by `query_fast.fast_result` for a call with the
    statement alone, else ``method``'s answer (given what the short way read)."""
    if params is not None or kwargs:
        return method(statement, params, **kwargs)
    found = fast_result(session, cache, statement)
    if found is not None:
        return finish(found)
    try:
        return method(statement)
    finally:
        info = session.info  # only this call may use what was read
        info.pop(QUERY_PREFETCH, None)
        info.pop(PREFETCH, None)


def get_through(
    session: Session,
    cache: Cache,
    method: Callable[..., Any],
    entity: Any,
    ident: Any,
    kwargs: dict[str, Any],
) -> Any:
    """`Session.get` (``method``); a registered model is answered from its entry when it
    can be (`entity_reads.fast_get`)."""
    bind = session.bind  # (its Connection's own map too: `translate_of`)
    translated = bind is not None and translate_of(session, bind) is not None
    if (not kwargs or set(kwargs) == {"identity_token"}) and not translated:
        found = fast_get(cache, session, entity, ident, kwargs.get("identity_token"))
        if found is not NO_VALUE:
            return found
        try:
            return method(entity, ident, **kwargs)
        finally:
            session.info.pop(PREFETCH, None)  # only this call may use what fast_get read
    return method(entity, ident, **kwargs)


_SHORT_WAY = ("execute", "scalars", "scalar", "get")


def _install_short_way(cls: type[Session], cache: Cache) -> None:
    """Give the Sessions of ``cls`` (a sessionmaker's own generated subclass, nobody
    else's class, whose methods are Session's) `CachingSession`'s ``execute`` /
    ``scalars`` / ``scalar`` / ``get``."""

    def execute(self: Session, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        parent = MethodType(Session.execute, self)
        return short_way(self, cache, parent, _as_is, statement, params, kwargs)

    def scalars(self: Session, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        parent = MethodType(Session.scalars, self)
        return short_way(self, cache, parent, Result.scalars, statement, params, kwargs)

    def scalar(self: Session, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        parent = MethodType(Session.scalar, self)
        return short_way(self, cache, parent, Result.scalar, statement, params, kwargs)

    def get(self: Session, entity: Any, ident: Any, **kwargs: Any) -> Any:
        parent = MethodType(Session.get, self)
        return get_through(self, cache, parent, entity, ident, kwargs)

    for fn in (execute, scalars, scalar, get):
        fn.__doc__ = f"`Session.{fn.__name__}` with sa_cache's short way (see `attach`)."
        setattr(cls, fn.__name__, fn)


def attach(cache: Cache, target: Any) -> Any:
    """Make every Session from ``target`` read and write through ``cache``.

    ``target`` is a `sessionmaker`, a `scoped_session`, a Session subclass or a
    Session instance; listeners go on that target only, never on `Session` itself.
    Sessions of a `sessionmaker` (or `scoped_session`) also get `CachingSession`'s
    short way to a hit: their ``execute`` / ``scalars`` / ``scalar`` / ``get`` are set
    on the class the sessionmaker generated for itself, unless its Session class has
    its own. A Session subclass or instance keeps its methods, and its hits are served
    by the ``do_orm_execute`` hook.
    """
    if isinstance(target, scoped_session):
        attach(cache, target.session_factory)
        return target
    if target is Session:
        raise TypeError(
            "attach() will not add listeners to sqlalchemy.orm.Session itself (that would "
            "affect every Session in the process); pass a sessionmaker or a subclass"
        )
    if not isinstance(target, (sessionmaker, Session)) and not (
        isinstance(target, type) and issubclass(target, Session)
    ):
        raise TypeError(
            "attach() takes a sessionmaker, scoped_session, Session subclass or Session, "
            f"got {type(target).__name__}"
        )
    registry = getattr(target, ATTACHED, None)
    if registry is not None:
        if registry is cache:
            return target
        raise ValueError(f"{target!r} is already attached to another Cache")
    # The Session class its Sessions are of: attached to this cache already (a sessionmaker
    # of an attached class, a Session of an attached sessionmaker), a second set of hooks
    # would run each statement through the cache twice (the inner one waiting on the
    # outer one's load: a hang).
    if isinstance(target, sessionmaker):
        session_class = target.class_
    else:
        session_class = target if isinstance(target, type) else type(target)
    if issubclass(session_class, CachingSession):
        raise TypeError("CachingSession is attached through its cache= argument already")
    if getattr(session_class, ATTACHED, None) is cache:
        return target
    for name, fn in _listeners(lambda _session: cache).items():
        event.listen(target, name, fn)
    if isinstance(target, sessionmaker) and not any(
        getattr(target.class_, name) is not getattr(Session, name) for name in _SHORT_WAY
    ):  # a class with its own execute, scalars, scalar or get keeps them
        _install_short_way(target.class_, cache)
    setattr(target, ATTACHED, cache)
    if isinstance(target, sessionmaker):
        setattr(target.class_, ATTACHED, cache)  # (the class it made for its Sessions)
    return target


class CachingSession(Session):
    """A Session that reads and writes through a `Cache`.

    ``sessionmaker(engine, class_=CachingSession, cache=cache)``: each Session gets the
    cache's listeners, on this Session only.
    """

    def __init__(self, *args: Any, cache: Cache | None = None, **kwargs: Any) -> None:
        from .cache import Cache  # (at module level for type checking only)

        if cache is None:
            raise TypeError(
                "CachingSession needs cache=: sessionmaker(engine, class_=CachingSession, "
                "cache=cache)"
            )
        if not isinstance(cache, Cache):  # else it fails at the first read, or after COMMIT
            hint = (
                " (for a URL: cache=sa_cache.Cache.from_url(url))" if isinstance(cache, str) else ""
            )
            raise TypeError(
                f"CachingSession's cache= must be an sa_cache.Cache, got "
                f"{type(cache).__name__} {cache!r}{hint}"
            )
        super().__init__(*args, **kwargs)
        self.cache = cache

    if not TYPE_CHECKING:  # type checkers keep seeing Session's own signatures

        def execute(self, statement, params=None, **kwargs):
            """`Session.execute`; a `with_cache` hit of a plain select takes the short
            way (`query_fast`)."""
            parent = super().execute
            return short_way(self, self.cache, parent, _as_is, statement, params, kwargs)

        def scalars(self, statement, params=None, **kwargs):
            """`Session.scalars`, with the short way of `execute`."""
            parent = super().scalars
            return short_way(self, self.cache, parent, Result.scalars, statement, params, kwargs)

        def scalar(self, statement, params=None, **kwargs):
            """`Session.scalar`, with the short way of `execute`."""
            parent = super().scalar
            return short_way(self, self.cache, parent, Result.scalar, statement, params, kwargs)

    def get(self, entity: Any, ident: Any, **kwargs: Any) -> Any:
        """`Session.get`; a registered model is answered from its entry when it can be."""
        return get_through(self, self.cache, super().get, entity, ident, kwargs)


for _name, _fn in _listeners(lambda session: session.cache).items():  # type: ignore[attr-defined]
    event.listen(CachingSession, _name, _fn)
