"""Small helpers for the SQLAlchemy tests: statement counting, a cached session factory."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

import sa_cache

T = TypeVar("T")


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


def make_env(
    engine: sa.Engine,
    cache: sa_cache.Cache,
    metadata: sa.MetaData | None = None,
    seed: Callable[[Session], None] | None = None,
) -> Iterator[Env]:
    """Tables of ``metadata`` (default: the shared models', seeded) made anew, a cached
    Session factory, and a log of the statements sent; all dropped after."""
    if metadata is None:
        from models import Base
        from models import seed as seed_models

        metadata, seed = Base.metadata, seed_models
    metadata.drop_all(engine)
    metadata.create_all(engine)
    if seed is not None:
        with Session(engine) as s:
            seed(s)
    log = StatementLog()
    event.listen(engine, "before_cursor_execute", log)
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        yield Env(engine, cache, factory, log)
    finally:
        event.remove(engine, "before_cursor_execute", log)
        metadata.drop_all(engine)
        cache.close()


def read_paused_after_load(
    engine: sa.Engine, read: Callable[[], T], write: Callable[[], None]
) -> T:
    """Run ``read`` in a thread, hold it right after its first statement (the database
    load, before anything reaches the cache), run ``write`` meanwhile, then let the
    reader finish. Returns what it read: the fill-race window, opened on purpose."""
    loaded, go_on = threading.Event(), threading.Event()
    reader_ident: list[int] = []
    seen: list[T] = []

    def pause(*args: object) -> None:
        if reader_ident and threading.get_ident() == reader_ident[0]:
            reader_ident[0] = -1  # only the first statement pauses
            loaded.set()
            assert go_on.wait(10)

    def reader() -> None:
        reader_ident.append(threading.get_ident())
        seen.append(read())

    event.listen(engine, "after_execute", pause)
    try:
        thread = threading.Thread(target=reader)
        thread.start()
        assert loaded.wait(10), "the reader never reached the database"
        write()
        go_on.set()
        thread.join(10)
    finally:
        go_on.set()
        event.remove(engine, "after_execute", pause)
    assert len(seen) == 1, "the reader did not finish"
    return seen[0]


def schemas(engine: sa.Engine, names: list[str], tmp_path: Path) -> sa.Engine:
    """``engine`` where each of ``names`` is a schema (SQLite: an attached database)."""
    if engine.dialect.name == "sqlite":
        files = {name: tmp_path / f"{name}.db" for name in names}
        out = sa.create_engine(engine.url)

        @event.listens_for(out, "connect")
        def attach(dbapi_conn: Any, record: Any) -> None:
            for name, path in files.items():
                dbapi_conn.execute(f"ATTACH DATABASE '{path}' AS {name}")

        return out
    with engine.begin() as conn:
        for name in names:
            word = "SCHEMA" if engine.dialect.name == "postgresql" else "DATABASE"
            conn.exec_driver_sql(f"CREATE {word} IF NOT EXISTS {name}")
    return engine


class StalledLoad:
    """A loader that reads ``source["v"]`` and then waits until `release` is set: the
    window between a load's read of its source and its fill, opened on purpose
    (`began` is set once the value is read)."""

    def __init__(self, source: dict[str, str]) -> None:
        self.source = source
        self.began, self.release = threading.Event(), threading.Event()

    def __call__(self) -> str:
        value = self.source["v"]
        self.began.set()
        self.release.wait(10)
        return value


def transactional_engine(engine: sa.Engine) -> sa.Engine:
    """``engine``, or for SQLite one on its file with pysqlite's documented recipe (an
    explicit BEGIN), without which pysqlite ignores an outer transaction's SAVEPOINTs."""
    if engine.dialect.name != "sqlite":
        return engine
    out = sa.create_engine(engine.url)

    @event.listens_for(out, "connect")
    def no_implicit(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(out, "begin")
    def begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    return out
