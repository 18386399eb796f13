"""Event-driven warming: run ``fn(instance)`` after the outermost commit that wrote it.

Instances of the watched models that a flush inserted or updated (and, when asked,
deleted) are kept per transaction frame, exactly like the cache's own changes: a
SAVEPOINT gets its own frame, merged into its parent when released and dropped when
rolled back; a rolled-back or closed transaction drops everything. Only when the
outermost transaction commits are the rules run — after the cache's write-through
listeners, which were attached to the same Session class first.

``fn`` gets a fresh copy of the committed row, loaded in a Session of the warmer's
own (through the cache), so it can read attributes and relationships freely; deleted
instances are passed as the committing Session last had them. Whatever ``fn`` returns
is warmed (see `Warmer.warm`). A failure is logged and counted
(``warm.on_commit_error``), never raised into the application's commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction, scoped_session, sessionmaker
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql import ClauseElement

from .warming_targets import Target

if TYPE_CHECKING:
    from .warming import Warmer

log = logging.getLogger("sa_cache")


@dataclass(frozen=True)
class Rule:
    """``fn`` runs for committed instances of ``model``."""

    model: type[Any]
    fn: Callable[[Any], Any]
    deleted: bool


class _Frame:
    __slots__ = ("items", "transaction")

    def __init__(self, transaction: SessionTransaction | None) -> None:
        self.transaction = transaction
        # (rule index, id(instance)) -> (rule, instance, deleted)
        self.items: dict[tuple[int, Any], tuple[Rule, Any, bool]] = {}


class _State:
    """Per-Session state, kept in ``session.info``."""

    __slots__ = ("frames", "outcome")

    def __init__(self) -> None:
        self.frames: list[_Frame] = [_Frame(None)]
        self.outcome: str | None = None


def session_class_of(factory: Any) -> Any:
    """The object to listen on for ``factory``'s Sessions (never `Session` itself)."""
    if isinstance(factory, scoped_session):
        factory = factory.session_factory
    if isinstance(factory, sessionmaker):
        return factory
    if isinstance(factory, type) and issubclass(factory, Session) and factory is not Session:
        return factory
    raise TypeError(
        "on_commit() needs the warmer's session_factory to be a sessionmaker, "
        f"scoped_session or Session subclass, got {factory!r}"
    )


def _is_cached(target: Any) -> bool:
    from .session import ATTACHED, CachingSession

    cls = target.class_ if isinstance(target, sessionmaker) else target
    return bool(
        getattr(target, ATTACHED, None) is not None
        or (isinstance(cls, type) and issubclass(cls, CachingSession))
    )


class CommitWatch:
    """The Session listeners of one warmer's ``on_commit`` rules."""

    def __init__(self, warmer: Warmer, factory: Any) -> None:
        self.warmer = warmer
        self.rules: list[Rule] = []
        target = session_class_of(factory)
        if not _is_cached(target):
            raise ValueError(
                "on_commit() warming must run after the cache's write-through: give the "
                "Warmer a CachingSession factory, or cache.attach() the factory first"
            )
        self.info_key = f"sa_cache_warm_{id(self)}"
        for name in (
            "after_flush",
            "after_transaction_create",
            "after_commit",
            "after_rollback",
            "after_transaction_end",
        ):
            event.listen(target, name, getattr(self, "_" + name))

    def add(self, rule: Rule) -> None:
        self.rules.append(rule)

    def _state(self, session: Session) -> _State:
        state: _State | None = session.info.get(self.info_key)
        if state is None:
            state = session.info[self.info_key] = _State()
        return state

    # -- listeners ----------------------------------------------------------------------

    def _after_flush(self, session: Session, flush_context: Any) -> None:
        written = [(o, False) for o in session.new]
        written += [(o, False) for o in session.dirty if session.is_modified(o)]
        written += [(o, True) for o in session.deleted]
        frame: _Frame | None = None
        for index, rule in enumerate(self.rules):
            for obj, deleted in written:
                if isinstance(obj, rule.model) and (rule.deleted or not deleted):
                    if frame is None:
                        frame = self._state(session).frames[-1]
                    frame.items[(index, id(obj))] = (rule, obj, deleted)

    def _after_transaction_create(self, session: Session, transaction: Any) -> None:
        if transaction.nested:
            self._state(session).frames.append(_Frame(transaction))

    def _after_commit(self, session: Session) -> None:
        self._state(session).outcome = "commit"

    def _after_rollback(self, session: Session) -> None:
        self._state(session).outcome = "rollback"

    def _after_transaction_end(self, session: Session, transaction: Any) -> None:
        state = self._state(session)
        if transaction.nested:
            frames = state.frames
            if len(frames) > 1 and frames[-1].transaction is transaction:
                frame = frames.pop()
                if state.outcome == "commit":
                    frames[-1].items.update(frame.items)
            state.outcome = None
        elif transaction.parent is None:
            committed = state.outcome == "commit"
            items = state.frames[0].items
            session.info.pop(self.info_key, None)
            bind = session.bind
            if isinstance(bind, Connection) and bind.in_transaction():
                # A Session joined to an outer transaction: its commit is not the
                # database's, and no event comes after that one's COMMIT (Connection's
                # "commit" comes before it: a warm then would read the old rows).
                # Warming is only ever an optimization: its rules do not run.
                if committed and items:
                    self.warmer.cache.stats.incr("warm.on_commit_joined")
                return
            if committed and items:
                self._run(list(items.values()))

    # -- after the commit -----------------------------------------------------------------

    def _run(self, items: list[tuple[Rule, Any, bool]]) -> None:
        warmer = self.warmer
        stats = warmer.cache.stats
        try:
            with warmer.session_factory() as session:
                produced: list[Any] = []
                for rule, obj, deleted in items:
                    try:
                        instance = obj if deleted else _fresh(session, obj)
                        out = None if instance is None else rule.fn(instance)
                    except Exception as exc:  # one rule failing does not stop the others
                        stats.incr("warm.on_commit_error")
                        log.error("sa_cache: on_commit warming failed: %s", exc, exc_info=exc)
                        continue
                    produced.extend(_as_items(out))
                if produced:
                    warmer.warm(*produced, session=session)
            stats.incr("warm.on_commit")
        except Exception as exc:
            stats.incr("warm.on_commit_error")
            log.error("sa_cache: on_commit warming failed: %s", exc, exc_info=exc)


def _as_items(out: Any) -> list[Any]:
    """What a rule returned, as a list: None, one item, or an iterable of items."""
    if out is None:
        return []
    if isinstance(out, (ClauseElement, Target)) or hasattr(out, "_sa_instance_state"):
        return [out]
    if isinstance(out, Iterable) and not isinstance(out, (str, bytes)):
        return list(out)
    return [out]  # Warmer.warm names what it cannot warm


def _fresh(session: Session, obj: Any) -> Any:
    """``obj``'s row as committed, loaded in ``session`` (None when it is gone)."""
    key = instance_state(obj).key
    if key is None:
        return None
    cls, pk, token = key
    return session.get(cls, pk, identity_token=token)
