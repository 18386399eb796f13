"""A write-behind row whose other unique column collides with another row's.

PostgreSQL and SQLite upsert by primary key (``ON CONFLICT (pk)``): the collision
raises, and the worker dead-letters the change. MySQL / MariaDB's ``ON DUPLICATE KEY
UPDATE`` would instead update the row holding the unique value — another row —
and report the write done; on tables with another unique key the worker (and the
synchronous write) locks the rows there, upserts only those, with a guard on the
primary key, and INSERTs the others, so that the collision raises too — in a few
statements per batch, not one per row. Which rows are there is the database's word:
a key its collation finds equal to a row's (``'ABC'``, ``'abc '`` for ``'abc'``) is
that row, one it finds different (``'ABC'`` under ``utf8mb4_bin``) a new row."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from test_write_behind import FAST, cleanup

import sa_cache
from sa_cache.write_behind import write_behind_for
from sa_cache.write_behind_apply import apply_rows
from sa_cache.write_behind_worker import WriteBehindWorker


class UniqueBase(DeclarativeBase):
    pass


class Member(UniqueBase):  # a unique column in the model
    __tablename__ = "sac_wbu_members"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(50), unique=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class Account(UniqueBase):  # a unique index the database has, the model does not declare
    __tablename__ = "sac_wbu_accounts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(50))
    name: Mapped[str] = mapped_column(sa.String(50))


class Note(UniqueBase):  # no unique key but the primary key
    __tablename__ = "sac_wbu_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(sa.String(50))


@dataclass
class Env:
    engine: sa.Engine
    cache: sa_cache.Cache
    Session: sessionmaker[Session]

    def drain(self) -> WriteBehindWorker:
        runner = WriteBehindWorker(self.cache, self.engine, **{**FAST, "max_attempts": 2})
        runner.run(drain=True)
        return runner

    def rows(self, model: type[Member] | type[Account]) -> list[tuple[int, str, str]]:
        with self.engine.connect() as conn:
            query = sa.select(model.id, model.email, model.name).order_by(model.id)
            return [(r.id, r.email, r.name) for r in conn.execute(query)]


@pytest.fixture
def env(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    UniqueBase.metadata.drop_all(engine)
    UniqueBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE UNIQUE INDEX sac_wbu_accounts_email ON sac_wbu_accounts (email)"
        )
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=2)
    for model in (Member, Account, Note):
        cache.register(model, ttl=60, write="behind")
    factory = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        UniqueBase.metadata.drop_all(engine)


@pytest.mark.parametrize("model", [Member, Account], ids=["in_the_model", "in_the_database"])
def test_an_insert_colliding_on_another_unique_key_is_dead_lettered(
    env: Env, model: type[Member] | type[Account]
) -> None:
    """Row 1 holds a@x; a queued insert of row 2 with a@x fails and is dead-lettered:
    row 1 keeps its values (MariaDB's upsert gave it row 2's name, reported applied),
    and row 2 is not served from the cache."""
    with env.Session() as s:
        s.add(model(id=1, email="a@x", name="alice"))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.add(model(id=2, email="a@x", name="mallory"))
        s.commit()
    runner = env.drain()
    assert (runner.applied, runner.dead) == (0, 1)
    assert env.rows(model) == [(1, "a@x", "alice")]
    (letter,) = write_behind_for(env.cache).dead_letters()
    assert letter.error.startswith("IntegrityError")
    with env.Session() as s:
        first = s.get(model, 1)
        assert first is not None
        assert first.name == "alice"
        assert s.get(model, 2) is None


def test_a_synchronous_write_colliding_on_another_unique_key_raises(env: Env) -> None:
    """A Session joined to an outer transaction writes its write-behind rows in it, with
    the same function as the worker: the collision raises at its commit, and row 1 is
    left alone."""
    with env.Session() as s:
        s.add(Member(id=1, email="a@x", name="alice"))
        s.commit()
    env.drain()
    with env.engine.connect() as conn:
        outer = conn.begin()
        s = sa_cache.CachingSession(
            bind=conn, cache=env.cache, join_transaction_mode="rollback_only"
        )
        s.add(Member(id=2, email="a@x", name="mallory"))
        with pytest.raises(sa.exc.IntegrityError):
            s.commit()
        s.close()
        outer.rollback()
    assert env.rows(Member) == [(1, "a@x", "alice")]


def test_rows_of_other_tables_and_updates_are_written_as_before(env: Env) -> None:
    """A table with no other unique key keeps the plain upsert (one statement per batch
    on MySQL / MariaDB); a table with one gets the upsert only for its rows there, with
    the guard on the primary key, and writes new and existing rows alike."""
    with env.Session() as s:
        s.add_all([Note(id=1, text="one"), Member(id=1, email="a@x", name="alice")])
        s.commit()
    env.drain()
    sent: list[str] = []

    def log(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement)

    with env.Session() as s:
        s.add_all([Note(id=2, text="two"), Member(id=2, email="b@x", name="bob")])
        member = s.get(Member, 1)
        assert member is not None
        member.email = "c@x"
        s.commit()
    event.listen(env.engine, "before_cursor_execute", log)
    try:
        assert env.drain().dead == 0
    finally:
        event.remove(env.engine, "before_cursor_execute", log)
    assert env.rows(Member) == [(1, "c@x", "alice"), (2, "b@x", "bob")]
    notes = [q for q in sent if "sac_wbu_notes" in q and q.lstrip().upper().startswith("INSERT")]
    members = [q for q in sent if "sac_wbu_members" in q and "ON DUPLICATE KEY UPDATE" in q]
    if env.engine.dialect.name in ("mysql", "mariadb"):
        assert notes
        assert all("ON DUPLICATE KEY UPDATE" in q for q in notes)
        assert members
        assert all("id = IF(" in q for q in members)


@pytest.mark.parametrize("model", [Member, Account], ids=["in_the_model", "in_the_database"])
def test_an_update_colliding_on_another_unique_key_is_dead_lettered(
    env: Env, model: type[Member] | type[Account]
) -> None:
    """Rows 1 (a@x) and 2 (b@x); a queued update giving row 2 a@x fails and is dead-
    lettered, both rows left as they were: the upsert of a row that is there raises on
    the collision as an UPDATE does."""
    with env.Session() as s:
        s.add_all([model(id=1, email="a@x", name="alice"), model(id=2, email="b@x", name="bob")])
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        second = s.get(model, 2)
        assert second is not None
        second.email = "a@x"
        second.name = "mallory"
        s.commit()
    runner = env.drain()
    assert (runner.applied, runner.dead) == (0, 1)
    assert env.rows(model) == [(1, "a@x", "alice"), (2, "b@x", "bob")]
    (letter,) = write_behind_for(env.cache).dead_letters()
    assert letter.error.startswith("IntegrityError")


def test_a_whole_row_over_a_row_the_database_has_is_written_or_fails(env: Env) -> None:
    """Whole-row images (adds) of rows the database already holds (inserted outside the
    queue) are written over them; one whose email is another row's fails and is dead-
    lettered, and no row changes."""
    with env.engine.begin() as conn:
        conn.execute(
            sa.insert(Member),
            [{"id": i, "email": f"{i}@x", "name": "db"} for i in (1, 2, 3)],
        )
    with env.Session() as s:
        s.add_all([Member(id=2, email="two@x", name="queued"), Member(id=4, email="4@x", name="q")])
        s.commit()
    assert env.drain().dead == 0
    expected = [(1, "1@x", "db"), (2, "two@x", "queued"), (3, "3@x", "db"), (4, "4@x", "q")]
    assert env.rows(Member) == expected
    with env.Session() as s:
        s.add(Member(id=3, email="1@x", name="mallory"))
        s.commit()
    runner = env.drain()
    assert (runner.applied, runner.dead) == (0, 1)
    assert env.rows(Member) == expected


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_row_twice_in_one_call_is_written_in_order(env: Env) -> None:
    """`apply_rows` given two images of one new row (and of one row there) writes both
    in order: the last one wins, no duplicate-key error for the row's own INSERT."""
    with env.engine.begin() as conn:
        conn.execute(sa.insert(Member), {"id": 1, "email": "1@x", "name": "db"})
    spec = env.cache.entities[sa.inspect(Member)]
    rows = [
        ((1,), [1, "one@x", "first"], None, False),
        ((2,), [2, "2@x", "first"], None, False),
        ((1,), [1, "uno@x", "second"], None, False),
        ((2,), [2, "zwei@x", "second"], frozenset({1, 2}), False),
    ]
    with env.engine.begin() as conn:
        apply_rows(conn, spec, rows)
    assert env.rows(Member) == [(1, "uno@x", "second"), (2, "zwei@x", "second")]


ROWS = 200


def _statements(env: Env, write: Callable[[Session], None]) -> int:
    """Data statements (SELECT, INSERT, UPDATE, DELETE) a worker on a connection of its
    own (StaticPool: one connection, its MariaDB session status) ran to apply what
    ``write`` queued in one commit."""
    with env.Session() as s:
        write(s)
        s.commit()
    engine = sa.create_engine(env.engine.url, poolclass=sa.pool.StaticPool)
    try:
        WriteBehindWorker(env.cache, engine, **{**FAST, "batch_size": 1000}).run(drain=True)
        with engine.connect() as conn:
            status = dict(conn.exec_driver_sql("SHOW SESSION STATUS LIKE 'Com_%%'").all())
    finally:
        engine.dispose()
    names = ("select", "insert", "update", "delete", "insert_select", "replace")
    return sum(int(status.get(f"Com_{n}", 0)) for n in names)


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_batch_of_a_table_with_another_unique_key_costs_a_few_statements(env: Env) -> None:
    """The worker writes a batch of a table with another unique key in a few statements
    whatever its size: a locking SELECT of the rows there, the upsert of those, one
    multi-row INSERT of the others — against one multi-row upsert for a table without
    one. (pymysql runs an UPDATE or ``INSERT ... SELECT`` executemany one statement per
    row: that way cost two round trips a row.) Inserts, updates and both in one batch."""

    def add(model: type[Member] | type[Note], ids: range) -> Callable[[Session], None]:
        def write(s: Session) -> None:
            for i in ids:
                s.add(
                    Member(id=i, email=f"{i}@x", name="n")
                    if model is Member
                    else Note(id=i, text="t")
                )
            s.flush()

        return write

    plain = _statements(env, add(Note, range(1, ROWS + 1)))
    unique = _statements(env, add(Member, range(1, ROWS + 1)))
    assert env.rows(Member)[-1] == (ROWS, f"{ROWS}@x", "n")
    assert plain <= 20, plain
    assert unique <= plain + 4, (plain, unique)

    def update_and_add(s: Session) -> None:
        for member in s.scalars(sa.select(Member)):
            member.name = f"m{member.id}"
        add(Member, range(ROWS + 1, 2 * ROWS + 1))(s)

    mixed = _statements(env, update_and_add)
    assert mixed <= plain + 8, (plain, mixed)
    rows = env.rows(Member)
    assert len(rows) == 2 * ROWS
    assert rows[0] == (1, "1@x", "m1")
    assert rows[-1] == (2 * ROWS, f"{2 * ROWS}@x", "n")


class KeyBase(DeclarativeBase):
    pass


class Tag(KeyBase):  # a string key under a case-insensitive, PAD SPACE collation
    __tablename__ = "sac_wbu_tags"
    code: Mapped[str] = mapped_column(
        sa.String(20, collation="utf8mb4_general_ci"), primary_key=True
    )
    slug: Mapped[str] = mapped_column(sa.String(20), unique=True)
    n: Mapped[int] = mapped_column(default=0)


class BinTag(KeyBase):  # binary, still PAD SPACE: 'ABC' is another row, 'abc ' is 'abc'
    __tablename__ = "sac_wbu_bin_tags"
    code: Mapped[str] = mapped_column(sa.String(20, collation="utf8mb4_bin"), primary_key=True)
    slug: Mapped[str] = mapped_column(sa.String(20), unique=True)
    n: Mapped[int] = mapped_column(default=0)


AnyTag = type[Tag] | type[BinTag]


@pytest.fixture
def tags(env: Env) -> Iterator[Env]:
    """`env` with the tables of `Tag` and `BinTag` (MariaDB collations)."""
    KeyBase.metadata.drop_all(env.engine)
    KeyBase.metadata.create_all(env.engine)
    for model in (Tag, BinTag):
        env.cache.register(model, ttl=60, write="behind")
    try:
        yield env
    finally:
        KeyBase.metadata.drop_all(env.engine)


def _tag_rows(env: Env, model: AnyTag) -> list[tuple[str, str, int]]:
    with env.engine.connect() as conn:
        query = sa.select(model.code, model.slug, model.n).order_by(sa.func.binary(model.code))
        return [(r.code, r.slug, r.n) for r in conn.execute(query)]


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize(
    ("model", "spelling"),
    [(Tag, "ABC"), (Tag, "abc "), (BinTag, "abc ")],
    ids=["case-insensitive-case", "case-insensitive-trailing-space", "binary-trailing-space"],
)
def test_a_row_added_by_a_key_the_database_finds_equal_replaces_it(
    tags: Env, model: AnyTag, spelling: str
) -> None:
    """Last write wins: adding an object whose key the column's collation finds equal to
    row 'abc' replaces that row (keeping its spelling), as the plain upsert does; it was
    INSERTed as a new row and dead-lettered on the duplicate primary key."""
    with tags.Session() as s:
        s.add(model(code="abc", slug="first", n=1))
        s.commit()
    assert tags.drain().dead == 0
    with tags.Session() as s:
        s.add(model(code=spelling, slug="second", n=2))
        s.commit()
    runner = tags.drain()
    assert runner.dead == 0, "the replacement was dead-lettered (duplicate primary key)"
    assert _tag_rows(tags, model) == [("abc", "second", 2)]


@pytest.mark.parametrize("dialect_name", ["mariadb"])
def test_a_key_a_binary_collation_finds_different_is_a_new_row(tags: Env) -> None:
    """Under ``utf8mb4_bin`` 'ABC' is not the row 'abc': it is inserted as a new row, and
    one whose other unique value is row 'abc''s fails and is dead-lettered — row 'abc'
    is never taken for it (the guarded upsert would give it the key 'ABC')."""
    with tags.Session() as s:
        s.add(BinTag(code="abc", slug="first", n=1))
        s.commit()
    assert tags.drain().dead == 0
    with tags.Session() as s:
        s.add(BinTag(code="ABC", slug="first", n=2))
        s.commit()
    runner = tags.drain()
    assert (runner.applied, runner.dead) == (0, 1)
    assert _tag_rows(tags, BinTag) == [("abc", "first", 1)]
    with tags.Session() as s:
        s.add(BinTag(code="ABC", slug="second", n=3))
        s.commit()
    assert tags.drain().dead == 0
    assert _tag_rows(tags, BinTag) == [("ABC", "second", 3), ("abc", "first", 1)]


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("model", [Tag, BinTag], ids=["case-insensitive", "binary"])
def test_images_of_one_call_whose_keys_the_database_finds_equal(tags: Env, model: AnyTag) -> None:
    """`apply_rows` given images whose keys the collation finds equal — of a row there
    ('ABC', 'abc ') and of a new one ('xyz', 'XYZ', 'xyz ') — writes them in order
    over one row each; under ``utf8mb4_bin`` the upper-case keys are rows of
    their own. (The new ones all went into one INSERT, which failed.)"""
    with tags.engine.begin() as conn:
        conn.execute(sa.insert(model), {"code": "abc", "slug": "db", "n": 0})
    spec = tags.cache.entities[sa.inspect(model)]
    rows = [
        (("ABC",), ["ABC", "a1", 1], None, False),
        (("xyz",), ["xyz", "x1", 1], None, False),
        (("XYZ",), ["XYZ", "x2", 2], None, False),
        (("abc ",), ["abc ", "a3", 3], frozenset({1, 2}), False),
        (("xyz ",), ["xyz ", "x3", 3], frozenset({1, 2}), False),
    ]
    with tags.engine.begin() as conn:
        apply_rows(conn, spec, rows)
    if model is Tag:
        assert _tag_rows(tags, model) == [("abc", "a3", 3), ("xyz", "x3", 3)]
    else:
        expected = [("ABC", "a1", 1), ("XYZ", "x2", 2), ("abc", "a3", 3), ("xyz", "x3", 3)]
        assert _tag_rows(tags, model) == expected
