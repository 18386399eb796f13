"""Small helpers for the SQLAlchemy tests: statement counting, a cached session factory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

import sa_cache


@dataclass
class StatementLog:
    """Every SQL statement the engine sends, recorded by a cursor event."""

    statements: list[str] = field(default_factory=list)

    def __call__(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        self.statements.append(statement)

    @property
    def selects(self) -> list[str]:
        return [s for s in self.statements if s.lstrip().upper().startswith("SELECT")]

    def clear(self) -> None:
        self.statements.clear()


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]
    log: StatementLog


def make_env(engine: sa.Engine, cache: sa_cache.Cache) -> Iterator[Env]:
    from models import Base, seed

    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        seed(s)
    log = StatementLog()
    event.listen(engine, "before_cursor_execute", log)
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        yield Env(engine, cache, factory, log)
    finally:
        event.remove(engine, "before_cursor_execute", log)
        Base.metadata.drop_all(engine)
        cache.close()
