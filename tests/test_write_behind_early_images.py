"""Write-behind renewals (a row deleted and added again whose delete sets off ON DELETE
actions) written in their COMMIT, or queued when the database refuses that order; the
images written before such a row's early delete (`write_behind_order.early_images`):
never in a table with another unique key (a value another row of the batch frees
later), and keys compared as the collation may find them equal (regression audit rg);
reads, sync marks and cascaded children around them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker
from test_write_behind import cleanup
from test_write_behind_apply_order import Env, _foreign_keys_on

import sa_cache
from sa_cache.write_behind import write_behind_for


class UBase(sa.orm.DeclarativeBase):
    pass


class UBox(UBase):  # write-behind; its delete sets off an action (USlip: CASCADE)
    __tablename__ = "sac_rg_boxes"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    name: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.String(20), default="")


class USlip(UBase):  # write-through, goes with its box
    __tablename__ = "sac_rg_slips"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    box_id: sa.orm.Mapped[int] = sa.orm.mapped_column(
        sa.ForeignKey("sac_rg_boxes.id", ondelete="CASCADE")
    )


class UCrate(UBase):  # write-behind; refers to a box (NO ACTION): in the way; unique name
    __tablename__ = "sac_rg_crates"
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    box_id: sa.orm.Mapped[int | None] = sa.orm.mapped_column(sa.ForeignKey("sac_rg_boxes.id"))
    name: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.String(20), unique=True)


@pytest.fixture
def uenv(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _foreign_keys_on)
        engine.dispose()
    UBase.metadata.drop_all(engine)
    UBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=1)
    cache.register(UBox, ttl=60, write="behind")
    cache.register(UCrate, ttl=60, write="behind")
    cache.register(USlip, ttl=60)
    factory = sessionmaker(
        engine, class_=sa_cache.CachingSession, cache=cache, expire_on_commit=False
    )
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        UBase.metadata.drop_all(engine)


def _setup(uenv: Env, crates: list[dict]) -> None:
    with uenv.engine.begin() as conn:
        conn.execute(sa.insert(UBox), [{"id": 1, "name": "old"}, {"id": 5, "name": "five"}])
        if crates:
            conn.execute(sa.insert(UCrate), crates)


def _renew_box(s: Session) -> None:
    s.delete(s.get(UBox, 1))
    s.flush()
    s.add(UBox(id=1, name="new"))


def test_early_image_takes_a_name_another_crate_gives_up_in_the_batch(uenv: Env) -> None:
    """Crate 2 ("x", box 5) moves to box 9 (added) and is renamed "y"; crate 3 is added
    with "x" and no box; box 1 is renewed. Valid (plain SQLAlchemy commits it). Crate 3's
    image refers to no row the batch writes: `early_images` writes it before the other
    images — while crate 2 still holds "x"."""
    _setup(uenv, [{"id": 2, "box_id": 5, "name": "x"}])
    with uenv.Session() as s:
        s.connection()
        s.add(UBox(id=9, name="nine"))
        s.flush()
        c2 = s.get(UCrate, 2)
        c2.box_id, c2.name = 9, "y"
        s.flush()
        s.add(UCrate(id=3, box_id=None, name="x"))
        s.flush()
        _renew_box(s)
        s.commit()
    assert uenv.drain(max_attempts=5).dead == 0, "a valid transaction's change was dead-lettered"
    assert uenv.rows(sa.select(UBox.id, UBox.name).order_by(UBox.id)) == [
        (1, "new"),
        (5, "five"),
        (9, "nine"),
    ]
    assert uenv.rows(sa.select(UCrate.id, UCrate.box_id, UCrate.name).order_by(UCrate.id)) == [
        (2, 9, "y"),
        (3, None, "x"),
    ]


def test_early_image_takes_a_name_a_deleted_crate_frees(uenv: Env) -> None:
    """Crate 2 ("x", box 5) deleted; crate 3 added with "x" and no box; crate 4 deleted
    and added again; box 1 renewed. Valid. Crate 3's early image is written at the
    crates' turn (a crate renewed) — before crate 2's early delete, which frees "x"."""
    _setup(uenv, [{"id": 2, "box_id": 5, "name": "x"}, {"id": 4, "box_id": 5, "name": "four"}])
    with uenv.Session() as s:
        s.connection()
        s.delete(s.get(UCrate, 2))
        s.delete(s.get(UCrate, 4))
        s.flush()
        s.add(UCrate(id=3, box_id=None, name="x"))
        s.add(UCrate(id=4, box_id=5, name="four2"))
        s.flush()
        _renew_box(s)
        s.commit()
    assert uenv.drain(max_attempts=5).dead == 0, "a valid transaction's change was dead-lettered"
    assert uenv.rows(sa.select(UBox.id, UBox.name).order_by(UBox.id)) == [(1, "new"), (5, "five")]
    assert uenv.rows(sa.select(UCrate.id, UCrate.box_id, UCrate.name).order_by(UCrate.id)) == [
        (3, None, "x"),
        (4, 5, "four2"),
    ]


def _down(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    from sa_cache.backends.base import BackendError
    from sa_cache.write_behind import WriteBehind

    def down(self: object, *args: object, **kwargs: object) -> None:
        raise BackendError("Redis went away")

    monkeypatch.setattr(WriteBehind, name, down)


@pytest.mark.parametrize("path", ["prepare", "confirm", "queued"])
def test_deleted_crates_name_taken_with_redis_down(
    uenv: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """As above, written by its producer with Redis down at the commit (``prepare``:
    rows written in the committing transaction; ``confirm``: the late write) or by the
    worker (``queued``: `_renews_with_actions` off). Crate 3's early image is written
    before crate 2's delete frees "x": the valid commit raises (prepare)."""
    _setup(uenv, [{"id": 2, "box_id": 5, "name": "x"}, {"id": 4, "box_id": 5, "name": "four"}])
    monkeypatch.setattr("sa_cache.write_behind_commit._renews_with_actions", lambda c: False)
    if path != "queued":
        _down(monkeypatch, path)
    with uenv.Session() as s:
        s.connection()
        s.delete(s.get(UCrate, 2))
        s.delete(s.get(UCrate, 4))
        s.flush()
        s.add(UCrate(id=3, box_id=None, name="x"))
        s.add(UCrate(id=4, box_id=5, name="four2"))
        s.flush()
        _renew_box(s)
        s.commit()
    monkeypatch.undo()
    assert uenv.drain(max_attempts=5).dead == 0, "a valid transaction's change was dead-lettered"
    assert uenv.rows(sa.select(UBox.id, UBox.name).order_by(UBox.id)) == [(1, "new"), (5, "five")]
    assert uenv.rows(sa.select(UCrate.id, UCrate.box_id, UCrate.name).order_by(UCrate.id)) == [
        (3, None, "x"),
        (4, 5, "four2"),
    ]


@pytest.mark.parametrize("path", ["prepare", "confirm", "queued"])
def test_renamed_crates_name_taken_with_redis_down(
    uenv: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    _setup(uenv, [{"id": 2, "box_id": 5, "name": "x"}])
    monkeypatch.setattr("sa_cache.write_behind_commit._renews_with_actions", lambda c: False)
    if path != "queued":
        _down(monkeypatch, path)
    with uenv.Session() as s:
        s.connection()
        s.add(UBox(id=9, name="nine"))
        s.flush()
        c2 = s.get(UCrate, 2)
        c2.box_id, c2.name = 9, "y"
        s.flush()
        s.add(UCrate(id=3, box_id=None, name="x"))
        s.flush()
        _renew_box(s)
        s.commit()
    monkeypatch.undo()
    assert uenv.drain(max_attempts=5).dead == 0, "a valid transaction's change was dead-lettered"
    assert uenv.rows(sa.select(UCrate.id, UCrate.box_id, UCrate.name).order_by(UCrate.id)) == [
        (2, 9, "y"),
        (3, None, "x"),
    ]


from test_write_behind_apply_order import Box, Crate  # noqa: E402
from test_write_behind_renewal_fallback import env  # noqa: E402,F401 (a fixture)


@pytest.mark.parametrize("begun", [True, False])
@pytest.mark.parametrize("how", ["deleted", "moved", "sync"])
def test_reads_after_a_renewal_falls_back_to_the_queue(env: Env, how: str, begun: bool) -> None:  # noqa: F811 (the fixture imported above)
    """The renewal's SAVEPOINT is refused (crate 2's change still queued) and the
    transaction is queued instead; another Session reads box 1 and crate 2 right after
    the commit and after the worker drained (``sync``: nothing queued before, written
    in the COMMIT)."""
    with env.Session() as s:
        s.add(Box(id=1, name="b"))
        s.commit()
    with env.Session() as s:
        s.add(Crate(id=2, box_id=1 if how != "sync" else None, name="c2"))
        s.commit()
    assert env.drain().dead == 0
    if how != "sync":
        with env.Session() as s:
            crate = s.get(Crate, 2)
            if how == "deleted":
                s.delete(crate)
            else:
                crate.box_id = None
            s.commit()  # queued
    with env.Session() as s:
        if begun:
            s.connection()
        s.delete(s.get(Box, 1))
        s.flush()
        s.add(Box(id=1, name="new", n=7))
        s.commit()

    def check(when: str) -> None:
        with env.Session() as r:
            box = r.get(Box, 1)
            assert (box.name, box.n) == ("new", 7), when
            crate = r.get(Crate, 2)
            if how == "deleted":
                assert crate is None, when
            else:
                assert (crate.box_id, crate.name) == (None, "c2"), when

    check("after commit")
    assert env.drain().dead == 0
    check("after drain")
    check("again")
    assert env.rows(sa.select(Box.id, Box.name, Box.n)) == [(1, "new", 7)]


_CI = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_general_ci"}


class KBase(sa.orm.DeclarativeBase):
    pass


class KBox(KBase):  # write-behind; its delete sets off an action (KSlip: CASCADE)
    __tablename__ = "sac_rg_kboxes"
    __table_args__ = _CI
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    name: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.String(20), default="")


class KSlip(KBase):  # write-through, goes with its box
    __tablename__ = "sac_rg_kslips"
    __table_args__ = _CI
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    box_id: sa.orm.Mapped[int] = sa.orm.mapped_column(
        sa.ForeignKey("sac_rg_kboxes.id", ondelete="CASCADE")
    )


class KKind(KBase):  # write-behind parent with a string key
    __tablename__ = "sac_rg_kinds"
    __table_args__ = _CI
    code: sa.orm.Mapped[str] = sa.orm.mapped_column(sa.String(20), primary_key=True)


class KCrate(KBase):  # write-behind; in the way of a box's delete; refers to a kind
    __tablename__ = "sac_rg_kcrates"
    __table_args__ = _CI
    id: sa.orm.Mapped[int] = sa.orm.mapped_column(primary_key=True, autoincrement=False)
    box_id: sa.orm.Mapped[int | None] = sa.orm.mapped_column(sa.ForeignKey("sac_rg_kboxes.id"))
    kind: sa.orm.Mapped[str | None] = sa.orm.mapped_column(
        sa.String(20), sa.ForeignKey("sac_rg_kinds.code")
    )


@pytest.fixture
def kenv(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    KBase.metadata.drop_all(engine)
    KBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=1)
    for model in (KBox, KKind, KCrate):
        cache.register(model, ttl=60, write="behind")
    cache.register(KSlip, ttl=60)
    factory = sessionmaker(
        engine, class_=sa_cache.CachingSession, cache=cache, expire_on_commit=False
    )
    try:
        yield Env(engine, cache, factory)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        KBase.metadata.drop_all(engine)


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("path", ["prepare", "confirm", "renewal"])
def test_early_image_under_a_parent_added_in_another_spelling(
    kenv: Env, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Kind 'e' is added; crate 3 is added (no box) of kind 'é' — the same row to an
    accent-insensitive collation (utf8mb4_general_ci), so valid; box 1 is renewed.
    `early_images` compares keys by casefold only ('é' != 'e'), finds crate 3 refers to
    no row the batch writes and writes it before kind 'e': a foreign-key error."""
    with kenv.engine.begin() as conn:
        conn.execute(sa.insert(KBox), {"id": 1, "name": "old"})
    if path != "renewal":
        monkeypatch.setattr("sa_cache.write_behind_commit._renews_with_actions", lambda c: False)
        _down(monkeypatch, path)
    with kenv.Session() as s:
        s.connection()
        s.add(KKind(code="e"))
        s.flush()
        s.add(KCrate(id=3, box_id=None, kind="é"))
        s.flush()
        s.delete(s.get(KBox, 1))
        s.flush()
        s.add(KBox(id=1, name="new"))
        s.commit()
    monkeypatch.undo()
    assert kenv.drain(max_attempts=5).dead == 0, "a valid transaction's change was dead-lettered"
    assert kenv.rows(sa.select(KBox.id, KBox.name)) == [(1, "new")]
    assert kenv.rows(sa.select(KCrate.id, KCrate.kind)) == [(3, "é")]


@pytest.mark.parametrize("begun", [True, False])
def test_renewal_written_at_commit_after_an_older_queued_update(env: Env, begun: bool) -> None:  # noqa: F811 (the fixture imported above)
    """Box 1's update (n=5) is queued; a later transaction renews box 1 (written in its
    COMMIT, sync marks). Reads right after, and after the worker drained, show the
    renewal; the older queued update is not applied over it."""
    with env.Session() as s:
        s.add(Box(id=1, name="b"))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.get(Box, 1).n = 5
        s.commit()  # queued
    with env.Session() as s:
        if begun:
            s.connection()
        s.delete(s.get(Box, 1))
        s.flush()
        s.add(Box(id=1, name="new", n=7))
        s.commit()
    for when in ("after commit", "after drain"):
        with env.Session() as r:
            box = r.get(Box, 1)
            assert (box.name, box.n) == ("new", 7), when
        if when == "after commit":
            assert env.drain().dead == 0
    assert env.rows(sa.select(Box.id, Box.name, Box.n)) == [(1, "new", 7)]


from test_write_behind_apply_order import Slip  # noqa: E402


@pytest.mark.parametrize("how", ["sync", "fallback", "queued"])
def test_cascaded_child_entry_after_a_renewal(
    env: Env,  # noqa: F811 (the fixture imported above)
    how: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slip 10 (write-through, ON DELETE CASCADE) of box 1 is cached; box 1 is renewed:
    its delete cascades slip 10 away. Another Session must not be served slip 10."""
    with env.Session() as s:
        s.add(Box(id=1, name="b"))
        s.commit()
    with env.Session() as s:
        s.add(Crate(id=2, box_id=1 if how == "fallback" else None, name="c2"))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.add(Slip(id=10, box_id=1))
        s.commit()
    with env.Session() as r:
        assert r.get(Slip, 10) is not None
    with env.Session() as r:
        assert r.get(Slip, 10) is not None  # cached
    if how == "fallback":
        with env.Session() as s:
            s.delete(s.get(Crate, 2))
            s.commit()  # queued: box 1's sync delete is refused, the renewal queued
    if how == "queued":
        monkeypatch.setattr("sa_cache.write_behind_commit._renews_with_actions", lambda c: False)
    with env.Session() as s:
        s.connection()
        s.delete(s.get(Box, 1))
        s.flush()
        s.add(Box(id=1, name="new"))
        s.commit()
    if how == "sync":
        with env.Session() as r:
            assert r.get(Slip, 10) is None, "after commit"
    assert env.drain().dead == 0
    assert env.rows(sa.select(Slip.id)) == []
    with env.Session() as r:
        assert r.get(Slip, 10) is None, "after drain"
