"""Writes on an AUTOCOMMIT connection: the database commits each statement as it runs,
so what it replaced must not be served to other Sessions once the statement returned —
while the writing Session is still open (a long-lived worker Session may never commit).

Every flush of a row counts, not only its first in the Session's transaction, and so
do the ORM's bulk writes by primary key (``update(Model)`` with a list of rows,
``bulk_update_mappings``, ``bulk_save_objects``, one run by a flush event), which the
ORM runs like a flush's own statements but which name no rows. (The first flush of a
row and the other kinds of writes: test_entity_writes_flushes.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy.orm import Session
from test_entity_writes_flushes import FBase, Versioned

import sa_cache


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Versioned, ttl=300)
    yield from make_env(engine, cache, FBase.metadata)


def _served(env: Env, pk: int = 1) -> str:
    env.cache.wait_for_fills()
    with env.Session() as s:
        got = s.get(Versioned, pk)
        assert got is not None
        return got.title


def _stored(env: Env, pk: int = 1) -> str:
    with Session(env.engine) as plain:
        got = plain.get(Versioned, pk)
        assert got is not None
        return got.title


def _seeded(env: Env, *pks: int) -> None:
    with Session(env.engine) as plain:
        plain.add_all([Versioned(id=pk, title="old") for pk in pks])
        plain.commit()
    for pk in pks:
        assert _served(env, pk) == "old"
        assert _served(env, pk) == "old"  # cached


@pytest.mark.parametrize("read_between", [True, False])
def test_a_second_autocommit_flush_of_a_row_is_invalidated_as_it_runs(
    env: Env, read_between: bool
) -> None:
    """A long-lived Session on an AUTOCOMMIT connection updates one row twice (two
    flushes, never a commit). Each UPDATE is committed as it runs; the second one must
    reach other Sessions as soon as it returned, like the first — also when another
    Session filled the entry with the first one's row in between."""
    _seeded(env, 1)
    autocommit = env.engine.execution_options(isolation_level="AUTOCOMMIT")
    with env.Session(bind=autocommit) as writer:
        row = writer.get(Versioned, 1)
        assert row is not None
        row.title = "new"
        writer.flush()
        if read_between:
            assert _served(env) == "new"  # the first flush's tombstone: read and stored
            assert _served(env) == "new"  # (served from the entry now)
        row.title = "newer"
        writer.flush()  # committed by the database as it ran
        assert _stored(env) == "newer"
        assert _served(env) == "newer"  # the writer is still open


@pytest.mark.parametrize("read_between", [True, False])
def test_a_row_flushed_again_on_an_autocommit_connection_is_still_written_through(
    env: Env, read_between: bool
) -> None:
    """The later flush's entry is swapped as the first flush's is: when the entry held
    the first flush's tombstone or the row the first flush left (another Session read
    it), the image is written through at the end, not only invalidated."""
    _seeded(env, 1)
    autocommit = env.engine.execution_options(isolation_level="AUTOCOMMIT")
    with env.Session(bind=autocommit) as writer:
        row = writer.get(Versioned, 1)
        assert row is not None
        row.title = "new"
        writer.flush()
        if read_between:
            assert _served(env) == "new"
        row.title = "newer"
        writer.flush()
        writer.commit()
    env.cache.wait_for_fills()
    env.log.clear()
    with env.Session() as s:
        got = s.get(Versioned, 1)
        assert got is not None
        assert (got.title, got.touched) == ("newer", 7)
    assert env.log.statements == []  # written through


@pytest.mark.parametrize(
    "how", ["bulk_by_pk", "bulk_update_mappings", "bulk_save_objects", "flush_event"]
)
def test_an_autocommit_bulk_write_by_primary_key_is_invalidated_as_it_runs(
    env: Env, how: str
) -> None:
    """ORM bulk writes by primary key on an AUTOCOMMIT connection: committed when the
    statement returns, so other Sessions must see them while the writer is still open.
    No flush names their rows (``flush_event``: one run by a ``before_flush`` listener
    while the flush of another row runs), so the entries of the table's rows go."""
    _seeded(env, 1, 2)
    autocommit = env.engine.execution_options(isolation_level="AUTOCOMMIT")

    def ship(session: Session, *args: Any) -> None:
        if any(isinstance(o, Versioned) and o.id == 2 for o in session.dirty):
            session.execute(sa.update(Versioned), [{"id": 1, "title": "new"}])

    sa.event.listen(env.Session, "before_flush", ship)
    try:
        with env.Session(bind=autocommit) as writer:
            if how == "bulk_by_pk":
                writer.execute(sa.update(Versioned), [{"id": 1, "title": "new"}])
            elif how == "bulk_update_mappings":
                writer.bulk_update_mappings(Versioned, [{"id": 1, "title": "new"}])  # type: ignore[arg-type]
            elif how == "bulk_save_objects":
                obj = Versioned(id=1, title="new", touched=0)
                sa.orm.make_transient_to_detached(obj)  # an existing row: an UPDATE
                writer.bulk_save_objects([obj], update_changed_only=False)
            else:
                other = writer.get(Versioned, 2)
                assert other is not None
                other.title = "shipping"
                writer.flush()
                assert _served(env, 2) == "shipping"
            assert _stored(env) == "new"
            assert _served(env) == "new"  # the writer is still open
    finally:
        sa.event.remove(env.Session, "before_flush", ship)
