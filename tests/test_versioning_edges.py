"""Versioned keys at the edges: commits reach the entity entries of every live key
version (rolling deploys, a newly published revision, a switch mid-transaction, manual
versions), a restart after a failed publish, column order, fork, reserved names. Each
test failed before its fix (an audit's repro, made a regression test)."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sa_cache
from sa_cache import Cache
from sa_cache.keys import KeyBuilder, check_version
from sa_cache.version_names import compute_version, revision_part, schema_hash
from sa_cache.versioning import VersionRegistry, track


class OldBase(DeclarativeBase):
    pass


class OldPerson(OldBase):
    __tablename__ = "vfix_person"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    first: Mapped[str] = mapped_column(sa.String(40))
    last: Mapped[str] = mapped_column(sa.String(40))


class NewBase(DeclarativeBase):
    """The next release: the same table, columns declared in another order, one more table."""


class NewPerson(NewBase):
    __tablename__ = "vfix_person"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    last: Mapped[str] = mapped_column(sa.String(40))
    first: Mapped[str] = mapped_column(sa.String(40))


class Extra(NewBase):
    __tablename__ = "vfix_extra"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


VERSIONS = sa.Table("alembic_version", sa.MetaData(), sa.Column("version_num", sa.String(32)))


@pytest.fixture(autouse=True)
def quick_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-read the live versions every 0.05 s (joins then wait 0.6 s, not 2.5 s)."""
    try:
        module = importlib.import_module("sa_cache.version_registry")
    except ImportError:  # the code before the fix: nothing to speed up
        return
    monkeypatch.setattr(module, "LIVE_REFRESH", 0.05)


@pytest.fixture
def db(engine: sa.Engine) -> Iterator[sa.Engine]:
    """``vfix_person`` (Ada Lovelace) and ``vfix_extra``; dropped after."""
    NewBase.metadata.drop_all(engine)
    VERSIONS.drop(engine, checkfirst=True)
    NewBase.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(NewPerson(id=1, first="Ada", last="Lovelace"))
        s.commit()
    yield engine
    NewBase.metadata.drop_all(engine)
    VERSIONS.drop(engine, checkfirst=True)


@pytest.fixture
def caches(redis_url: str, namespace: str) -> Iterator[Callable[..., Cache]]:
    """Caches of the test's namespace on Redis; their keys are deleted afterwards."""
    made: list[Cache] = []

    def make(model: Any = None, **settings: Any) -> Cache:
        cache = Cache.from_url(redis_url, namespace=namespace, **settings)
        if model is not None:
            cache.register(model, ttl=300)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        backend: Any = cache.backend
        backend.unlink_many(list(backend.scan_keys(f"{namespace}:*", 500)))
        cache.close()


def sessions(engine: sa.Engine, cache: Cache) -> sessionmaker[Session]:
    return sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)


def read(engine: sa.Engine, cache: Cache, model: Any) -> tuple[str, str]:
    """(first, last) of row 1 through ``cache``; the fill is stored before returning."""
    with sessions(engine, cache)() as s:
        row = s.get(model, 1)
        got = (row.first, row.last)
    cache.wait_for_fills()
    return got


def rename(engine: sa.Engine, cache: Cache, model: Any, first: str) -> None:
    with sessions(engine, cache)() as s:
        s.get(model, 1).first = first
        s.commit()


# -- D2: commits reach every live version ----------------------------------------------


def test_commit_reaches_a_version_that_went_live_after_the_last_sync(
    db: sa.Engine, caches: Callable[..., Cache]
) -> None:
    """Rolling deploy: the old instance's commit reaches the new instance's entries."""
    old = caches(OldPerson)
    old_registry = track(old, db, OldBase.metadata)
    rename(db, old, OldPerson, "Ada")  # the old instance has read the live versions already
    new = caches(NewPerson)
    track(new, db, NewBase.metadata)
    assert old.version != new.version
    assert new.version not in old_registry.live  # not in the old instance's last sync

    assert read(db, new, NewPerson) == ("Ada", "Lovelace")
    rename(db, old, OldPerson, "Grace")
    assert read(db, new, NewPerson) == ("Grace", "Lovelace")
    assert read(db, old, OldPerson) == ("Grace", "Lovelace")


@pytest.mark.parametrize("switch_mid_transaction", [False, True])
def test_commit_reaches_the_version_of_a_newly_published_revision(
    db: sa.Engine, caches: Callable[..., Cache], switch_mid_transaction: bool
) -> None:
    """Same code on two instances, a migration published: instance 1 follows first;
    instance 2's commit (before it follows, or while following between its flush and
    its commit) reaches the entries instance 1 fills under the new version."""
    one, two = caches(NewPerson), caches(NewPerson)
    r1, r2 = track(one, db, NewBase.metadata), track(two, db, NewBase.metadata)
    rename(db, two, NewPerson, "Ada")
    before = one.version
    VersionRegistry(one).publish("r0123456789")
    r1.sync()
    assert one.version != before == two.version
    assert read(db, one, NewPerson) == ("Ada", "Lovelace")
    with sessions(db, two)() as s:
        s.get(NewPerson, 1).first = "Grace"
        if switch_mid_transaction:
            s.flush()  # its entry keys carry the old version
            r2.sync()
            assert two.version == one.version
        s.commit()
    assert read(db, one, NewPerson) == ("Grace", "Lovelace")
    r2.sync()
    assert read(db, one, NewPerson) == ("Grace", "Lovelace")


def test_manual_versions_fan_out(db: sa.Engine, caches: Callable[..., Cache]) -> None:
    """``version=`` without track(): old code on v1, new code on v2, one namespace."""
    from sa_cache.versioning import attach_registry

    old, new = caches(NewPerson, version="v1"), caches(NewPerson, version="v2")
    for cache in (old, new):  # what Cache.register does for a manual version
        assert attach_registry(cache) is attach_registry(cache)
        assert cache.registry is not None
    assert read(db, new, NewPerson) == ("Ada", "Lovelace")
    rename(db, old, NewPerson, "Grace")
    assert read(db, new, NewPerson) == ("Grace", "Lovelace")


def test_a_writer_of_another_version_finds_the_flush_tombstone(
    db: sa.Engine, caches: Callable[..., Cache]
) -> None:
    """Two live versions: A's commit reaches the database, its post-commit script is
    late; B, which loaded the row before, flushes a change of another column. Its
    entry must not take B's image without A's change: A's flush tombstone is under
    B's key too (it was under A's only, so B's check passed)."""
    a, b = caches(NewPerson, version="v1"), caches(NewPerson, version="v2")
    assert read(db, a, NewPerson) == ("Ada", "Lovelace")
    assert read(db, b, NewPerson) == ("Ada", "Lovelace")
    for cache in (a, b):
        assert cache.registry is not None
        cache.registry.sync()  # each knows the other is live
    keep = sessions(db, b)(expire_on_commit=False)
    mine = keep.get(NewPerson, 1)  # B's writer loads the row
    late: list[Any] = []
    real = a.bump
    a.bump = lambda *args, **kw: late.append((args, kw))  # type: ignore[method-assign]
    try:
        rename(db, a, NewPerson, "Grace")  # committed; the script waits
    finally:
        a.bump = real  # type: ignore[method-assign]
    mine.last = "Hopper"  # type: ignore[union-attr]
    keep.commit()
    keep.close()
    assert read(db, b, NewPerson) == ("Grace", "Hopper")
    for args, kw in late:
        real(*args, **kw)
    assert read(db, b, NewPerson) == ("Grace", "Hopper")
    assert read(db, a, NewPerson) == ("Grace", "Hopper")


@pytest.mark.parametrize("how", ["rollback", "savepoint"])
def test_a_rolled_back_flush_puts_every_versions_entry_back_with_its_ttl(
    db: sa.Engine, caches: Callable[..., Cache], how: str
) -> None:
    """The flush tombstoned the row's entry under both live versions; the rollback
    puts both back, each with the model's TTL (the other version's was put back with
    none: never expiring)."""
    a, b = caches(NewPerson, version="v1"), caches(NewPerson, version="v2")
    for cache in (a, b):
        assert read(db, cache, NewPerson) == ("Ada", "Lovelace")
    for cache in (a, b):
        assert cache.registry is not None
        cache.registry.sync()
    keys = [cache.keys.entity("vfix_person", "(1,)") for cache in (a, b)]
    backend: Any = a.backend
    with sessions(db, a)() as s:
        scope = s.begin_nested() if how == "savepoint" else None
        s.get(NewPerson, 1).first = "Grace"  # type: ignore[union-attr]
        s.flush()
        assert all(v is not None and v.startswith(b"sac-tomb:") for v in backend.get_many(keys))
        (scope or s).rollback()
    raw = backend.client
    assert all(0 < raw.ttl(k) <= 300 for k in keys)  # (-1: no expiry)
    assert read(db, b, NewPerson) == ("Ada", "Lovelace")


def test_gc_between_a_heartbeats_read_and_write_leaves_the_version_in_the_index(
    caches: Callable[..., Cache],
) -> None:
    """A retired version comes back (a rollback to old code); gc runs while its first
    heartbeat is between reading the index and writing its live key. The version
    must end in the index (it was left out: no commit fanned out to it until its next
    heartbeat, 150 s later)."""
    old = caches(version="vold")
    VersionRegistry(old, grace=600).heartbeat()
    old.backend.delete_many([VersionRegistry(old).live_key("vold")])  # retired
    collector = caches()
    back = caches(version="vold")
    real = back.backend.set_many
    ran: list[dict[str, int]] = []

    def set_many(values: Any, ttl: Any = None) -> None:
        if not ran and any(k.endswith(":live:vold") for k in values):
            ran.append(VersionRegistry(collector, grace=600).gc())
        real(values, ttl)

    back.backend.set_many = set_many  # type: ignore[method-assign]
    VersionRegistry(back, grace=600).heartbeat()
    assert ran == [{"vold": 0}]  # gc forgot it in between
    assert "vold" in VersionRegistry(collector).known_versions()
    assert "vold" in VersionRegistry(collector).live_versions()


def test_fan_out_takes_the_version_of_each_key(redis_url: str, namespace: str) -> None:
    cache = Cache.from_url(redis_url, namespace=namespace, version="v2")
    try:
        registry = VersionRegistry(cache)
        registry.heartbeat("v1")
        registry.heartbeat("v2")
        old = KeyBuilder(namespace, "v1").entity("t", "(1,)")
        gen = cache.keys.generation("t")
        assert registry.fan_out([old, gen, "other:v1:e:t:1"]) == [
            old,
            cache.keys.entity("t", "(1,)"),
            gen,
            "other:v1:e:t:1",
        ]
        assert registry.fan_out([]) == []
    finally:
        backend: Any = cache.backend
        backend.unlink_many(list(backend.scan_keys(f"{namespace}:*", 500)))
        cache.close()


def test_concurrent_heartbeats_lose_no_version(redis_url: str, namespace: str) -> None:
    """The version index is updated with compare-and-set: no version is dropped."""
    cache = Cache.from_url(redis_url, namespace=namespace)
    try:
        names = [f"v{i}" for i in range(12)]
        barrier = threading.Barrier(len(names))

        def beat(version: str) -> None:
            registry = VersionRegistry(cache)
            barrier.wait()
            registry.heartbeat(version)

        threads = [threading.Thread(target=beat, args=(v,)) for v in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert VersionRegistry(cache).known_versions() == sorted(names)
    finally:
        backend: Any = cache.backend
        backend.unlink_many(list(backend.scan_keys(f"{namespace}:*", 500)))
        cache.close()


# -- D3: a restart after a migration whose publish failed --------------------------------


def set_revision(engine: sa.Engine, revision: str) -> None:
    with engine.begin() as conn:
        VERSIONS.create(conn, checkfirst=True)
        conn.execute(VERSIONS.delete())
        conn.execute(VERSIONS.insert().values(version_num=revision))


def test_restart_after_a_failed_publish_uses_the_database_revision(
    db: sa.Engine, caches: Callable[..., Cache]
) -> None:
    set_revision(db, "a1")
    VersionRegistry(caches()).publish(revision_part(["a1"]))  # the hook, for a1
    old = caches(NewPerson)
    old_registry = track(old, db, NewBase.metadata)
    assert read(db, old, NewPerson) == ("Ada", "Lovelace")

    # A data migration to b2; its publish never reached the store.
    with Session(db) as s:
        s.get(NewPerson, 1).first = "Migrated"
        s.commit()
    set_revision(db, "b2")

    new = caches(NewPerson)
    registry = track(new, db, NewBase.metadata)
    expected = compute_version(["b2"], schema_hash(NewBase.metadata))
    assert new.version == expected
    assert registry.current_published() == revision_part(["b2"])
    registry.sync()
    assert new.version == expected  # the stale published part is not adopted
    assert read(db, new, NewPerson) == ("Migrated", "Lovelace")
    old_registry.sync()  # the running instance follows, and its entries were invalidated
    assert old.version == expected
    assert read(db, old, NewPerson) == ("Migrated", "Lovelace")


# -- D4: column order ---------------------------------------------------------------------


def test_schema_hash_follows_the_declared_column_order() -> None:
    assert schema_hash(OldBase.metadata) != schema_hash([NewPerson.__table__])  # type: ignore[list-item]
    md1, md2 = sa.MetaData(), sa.MetaData()
    sa.Table("b", md1, sa.Column("x", sa.Integer), sa.Column("y", sa.Text))
    sa.Table("a", md1, sa.Column("id", sa.Integer))
    sa.Table("a", md2, sa.Column("id", sa.Integer))
    sa.Table("b", md2, sa.Column("x", sa.Integer), sa.Column("y", sa.Text))
    assert schema_hash(md1) == schema_hash(md2)  # table order still does not count


def test_codebases_with_another_column_order_never_share_entries(
    db: sa.Engine, caches: Callable[..., Cache]
) -> None:
    old, new = caches(OldPerson), caches(NewPerson)
    track(old, db, OldBase.metadata)
    track(new, db, _person_only())
    assert old.version != new.version
    assert read(db, old, OldPerson) == ("Ada", "Lovelace")
    assert read(db, new, NewPerson) == ("Ada", "Lovelace")


def _person_only() -> sa.MetaData:
    """The new code's person table alone (so the only difference is the column order)."""
    md = sa.MetaData()
    NewPerson.__table__.to_metadata(md)  # type: ignore[attr-defined]
    return md


# -- D6a: fork ----------------------------------------------------------------------------


def _child(cache: Cache, out: Any) -> None:
    alive = any(t.name == "sa-cache-version" and t.is_alive() for t in threading.enumerate())
    VersionRegistry(cache).publish("r0123456789")
    deadline = time.monotonic() + 10
    while not cache.version.startswith("r0123456789") and time.monotonic() < deadline:
        time.sleep(0.05)
    out.put((alive, cache.version))


@pytest.mark.parametrize("dialect_name", ["sqlite"])
def test_tracker_runs_again_in_a_forked_child(db: sa.Engine, caches: Callable[..., Cache]) -> None:
    cache = caches()
    track(cache, db, NewBase.metadata, interval=0.05)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child, args=(cache, out))
    child.start()
    alive, version = out.get(timeout=30)
    child.join(10)
    assert alive
    assert version.startswith("r0123456789-")


# -- D7: names that are not versions ------------------------------------------------------


@pytest.mark.parametrize("name", ["wb", "stats", "meta", "gen", "tag"])
def test_reserved_segments_are_no_versions(name: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        check_version(name)
    with pytest.raises(ValueError, match="reserved"):
        Cache.from_url("memory://", version=name)


def test_gc_never_collects_reserved_segments(cache_url: str, namespace: str) -> None:
    """An index naming ``wb`` or ``stats`` (written by an older release) is left alone."""
    cache = Cache.from_url(cache_url, namespace=namespace)
    try:
        backend: Any = cache.backend
        queue = {f"{namespace}:wb:dead": b"1", f"{namespace}:stats:{{x}}:a": b"1"}
        old = {f"{namespace}:vold:k:a": b"1"}
        backend.set_many({**queue, **old}, None)
        registry = VersionRegistry(cache)
        index = {"wb": 1.0, "stats": 1.0, "vold": 1.0, "bad*name": 1.0}
        backend.set_many({registry.index_key: json.dumps(index).encode()}, None)
        assert registry.retired_versions() == ["vold"]
        assert registry.gc() == {"vold": 1}
        assert backend.get_many(list(queue)) == list(queue.values())
        assert registry.known_versions() == ["bad*name", "stats", "wb"]
    finally:
        scan = getattr(cache.backend, "scan_keys", None)
        if scan is not None:
            cache.backend.unlink_many(list(scan(f"{namespace}:*", 500)))  # type: ignore[attr-defined]
        cache.close()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_garbage_under_the_published_revision_is_not_an_error(
    store: str, namespace: str, request: pytest.FixtureRequest
) -> None:
    """Not valid UTF-8, or not a revision part: nothing (readable) was published."""
    url = "memory://" if store == "memory" else request.getfixturevalue("redis_url")
    cache = Cache.from_url(url, namespace=namespace)
    try:
        registry = VersionRegistry(cache)
        for garbage in (b"\xff\xfe\x00", b"not a revision"):
            cache.backend.set_many({registry.revision_key: garbage}, None)
            assert registry.current_published() is None
        assert cache.stats["version.unreadable"] == 2
        registry.publish("r0123456789")
        assert registry.current_published() == "r0123456789"
    finally:
        if store == "redis":
            cache.backend.unlink_many(cache.backend.scan_keys(f"{namespace}:*"))  # type: ignore[attr-defined]
        cache.close()
