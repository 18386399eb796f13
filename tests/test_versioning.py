"""Key versions, the alembic hook, rolling deploys and gc (PostgreSQL + Redis, real alembic)."""

from __future__ import annotations

import io
import logging
import time
import uuid
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.script import ScriptDirectory
from conftest import database_url

from sa_cache import NO_VALUE, Cache
from sa_cache.alembic import configure_kwargs, publish_after_migrations
from sa_cache.keys import KeyBuilder
from sa_cache.version_names import compute_version, revision_part, schema_hash, split_version
from sa_cache.versioning import (
    VersionRegistry,
    read_db_revisions,
    refresh_version,
    version_report,
)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
REV1, REV2 = "4f2a6c1d9b10", "8c3e5b7a2d41"


def example_table(md: sa.MetaData, *, price: bool, schema: str | None = None) -> sa.Table:
    """The example table as the code of revision 1 (no price) or 2 maps it."""
    cols: list[sa.Column[Any]] = [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50)),
    ]
    if price:
        cols.append(sa.Column("price", sa.Numeric(10, 2)))
    return sa.Table("example_item", md, *cols, schema=schema)


def shape(price: bool) -> str:
    return schema_hash([example_table(sa.MetaData(), price=price)])


@pytest.fixture
def quick_joins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-read the live versions every 0.05 s: a version joining others is then used
    after 0.6 s, not 2.5 s (`join_wait`; these tests do not depend on its length)."""
    from sa_cache import version_registry

    monkeypatch.setattr(version_registry, "LIVE_REFRESH", 0.05)


# -- pure --------------------------------------------------------------------------------


def test_schema_hash_is_stable_and_table_order_independent() -> None:
    md1, md2 = sa.MetaData(), sa.MetaData()
    sa.Table("b", md1, sa.Column("x", sa.Integer, primary_key=True), sa.Column("y", sa.Text))
    sa.Table("a", md1, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table("a", md2, sa.Column("id", sa.Integer, primary_key=True))
    # (column order counts: entity entries are positional, see test_versioning_edges)
    sa.Table("b", md2, sa.Column("x", sa.Integer, primary_key=True), sa.Column("y", sa.Text))
    assert schema_hash(md1) == schema_hash(md2) == schema_hash(list(md2.tables.values()))
    assert len(schema_hash(md1)) == 10


def test_schema_hash_changes_with_columns_types_and_keys() -> None:
    base = shape(price=False)
    assert shape(price=True) != base
    md = sa.MetaData()
    wider = sa.Table(
        "example_item",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(80)),
    )
    assert schema_hash([wider]) != base
    md = sa.MetaData()
    other_pk = sa.Table(
        "example_item",
        md,
        sa.Column("id", sa.Integer),
        sa.Column("name", sa.String(50), primary_key=True),
    )
    assert schema_hash([other_pk]) != base


def test_compute_version_is_a_key_segment() -> None:
    version = compute_version([REV2, REV1], shape(price=True))
    assert version == compute_version([REV1, REV2], shape(price=True))
    assert KeyBuilder("ns", version).version == version
    assert len(version) <= 64
    assert split_version(version) == (revision_part([REV1, REV2]), "s" + shape(price=True))
    assert compute_version([], shape(price=True)).startswith("r")
    assert compute_version([REV1], "x", manual="release-7") == "release-7"
    assert split_version("release-7") is None
    with pytest.raises(ValueError, match="version must be"):
        compute_version([REV1], "x", manual="bad:version")


def test_read_db_revisions(engine: sa.Engine) -> None:
    """No table, one head, several heads; a unique table name keeps parallel runs apart."""
    name = f"av_{uuid.uuid4().hex[:10]}"
    assert read_db_revisions(engine, version_table=name) == ()
    md = sa.MetaData()
    table = sa.Table(name, md, sa.Column("version_num", sa.String(32), primary_key=True))
    md.create_all(engine)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"version_num": REV2}])
        with engine.connect() as conn:
            assert read_db_revisions(conn, version_table=name) == (REV2,)
            assert not conn.in_transaction()
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"version_num": REV1}])
        assert read_db_revisions(engine, version_table=name) == (REV1, REV2)
    finally:
        md.drop_all(engine)


# -- gc and liveness, on both stores -----------------------------------------------------


@pytest.fixture
def cleanup(namespace: str) -> Iterator[list[Cache]]:
    """Caches a test made; their namespaces' keys are deleted afterwards (never FLUSHDB)."""
    made: list[Cache] = []
    yield made
    for cache in made:
        backend = cache.backend
        scan = getattr(backend, "scan_keys", None)
        if scan is not None:
            backend.unlink_many(list(scan(f"{cache.namespace}:*", 500)))  # type: ignore[attr-defined]
        cache.close()


def sibling(cache: Cache, version: str, namespace: str | None = None) -> Cache:
    """Another instance on the same store, with its own version."""
    return Cache(cache.backend, namespace=namespace or cache.namespace, version=version)


def test_gc_removes_exactly_the_retired_keys(
    cache_url: str, namespace: str, cleanup: list[Cache]
) -> None:
    base = Cache.from_url(cache_url, namespace=namespace)
    other_ns = Cache.from_url(cache_url, namespace=namespace + "x")
    cleanup += [base, other_ns]
    old, live, cur = (sibling(base, v) for v in ("vold", "vlive", "vcur"))
    for cache in (old, live, cur):
        cache.set_many({f"k{i}": i for i in range(5)}, ttl=60)
    stranger = sibling(other_ns, "vold")
    stranger.set("k0", "other namespace", ttl=60)
    cur.bump(["example_item"])

    VersionRegistry(old, grace=0.05).heartbeat()
    VersionRegistry(live, grace=60).heartbeat()
    registry = VersionRegistry(cur, grace=60)
    registry.heartbeat()
    time.sleep(0.2)
    assert registry.live_versions() == ["vcur", "vlive"]
    assert registry.retired_versions() == ["vold"]

    assert registry.gc(dry_run=True) == {"vold": 5}
    assert old.get("k0") == 0

    steps: list[tuple[str, int]] = []
    assert registry.gc(batch=2, progress=lambda v, n: steps.append((v, n))) == {"vold": 5}
    assert steps == [("vold", 2), ("vold", 2), ("vold", 1)]
    assert old.get_many([f"k{i}" for i in range(5)]) == {}
    assert live.get_many([f"k{i}" for i in range(5)]) == {f"k{i}": i for i in range(5)}
    assert cur.get("k4") == 4
    assert stranger.get("k0") == "other namespace"
    assert cur.backend.get_many(cur.generation_keys(["example_item"]))[1] is not NO_VALUE
    assert registry.known_versions() == ["vcur", "vlive"]
    assert registry.gc() == {}
    report = version_report(cur, grace=60)
    assert report["version"] == "vcur"
    assert sorted(report["live"]) == ["vcur", "vlive"]  # type: ignore[call-overload]
    assert report["retired"] == []


def test_gc_never_collects_the_own_version(
    cache_url: str, namespace: str, cleanup: list[Cache]
) -> None:
    cache = Cache.from_url(cache_url, namespace=namespace, version="vcur")
    cleanup.append(cache)
    cache.set("k", 1, ttl=60)
    VersionRegistry(cache, grace=0.05).heartbeat()
    time.sleep(0.2)
    registry = VersionRegistry(cache)
    assert registry.live_versions() == []
    assert registry.retired_versions() == []
    assert registry.gc() == {}
    assert cache.get("k") == 1


class SwitchingCache(Cache):
    """Stand-in for `Cache.use_version` until it lands in cache.py."""

    def use_version(self, version: str) -> None:
        self.keys = KeyBuilder(self.namespace, version)


@pytest.mark.usefixtures("quick_joins")
def test_sync_follows_the_published_revision_and_fans_out(
    cache_url: str, namespace: str, cleanup: list[Cache]
) -> None:
    base = Cache.from_url(cache_url, namespace=namespace)
    cleanup.append(base)
    old_code = SwitchingCache(base.backend, namespace=namespace)
    old_code.use_version(compute_version([REV1], shape(price=False)))
    new_code = sibling(base, compute_version([REV2], shape(price=True)))
    VersionRegistry(new_code).heartbeat()

    registry = VersionRegistry(old_code)
    registry.publish(revision_part([REV2]))
    assert registry.current_published() == revision_part([REV2])
    moved = registry.sync()
    assert moved == compute_version([REV2], shape(price=False)) == old_code.version
    assert registry.live == tuple(sorted([moved, new_code.version]))
    key = old_code.keys.entity("example_item", "1")
    assert registry.fan_out([key, "gen-key"]) == [
        key,
        new_code.keys.entity("example_item", "1"),
        "gen-key",
    ]
    manual = SwitchingCache(base.backend, namespace=namespace, version="pinned")
    assert VersionRegistry(manual).sync() == "pinned"


# -- the alembic hook (PostgreSQL + Redis) -----------------------------------------------


@pytest.fixture
def pg_url() -> str:
    return database_url("postgresql")


@pytest.fixture
def schema(pg_url: str) -> Iterator[str]:
    """A schema of the test's own for the example table and alembic_version."""
    name = f"sv_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    yield name
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
    engine.dispose()


@pytest.fixture
def store(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch, cleanup: list[Cache]
) -> str:
    """Point env.py's cache at Redis under the test's namespace."""
    monkeypatch.setenv("SA_CACHE_URL", redis_url)
    monkeypatch.setenv("SA_CACHE_NAMESPACE", namespace)
    cleanup.append(Cache.from_url(redis_url, namespace=namespace))
    return redis_url


def alembic_config(url: str, schema: str, *x: str, output: io.StringIO | None = None) -> Config:
    cfg = Config(str(MIGRATIONS / "alembic.ini"), output_buffer=output, stdout=io.StringIO())
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    cfg.cmd_opts = Namespace(x=[f"schema={schema}", *x])
    return cfg


@pytest.fixture
def db(pg_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pg_url)
    yield engine
    engine.dispose()


def test_upgrade_moves_every_instance_to_the_new_revision(
    pg_url: str, schema: str, store: str, namespace: str, db: sa.Engine
) -> None:
    cfg = alembic_config(pg_url, schema)
    registry = VersionRegistry(Cache.from_url(store, namespace=namespace))
    assert read_db_revisions(db, schema=schema) == ()

    command.upgrade(cfg, REV1)
    assert read_db_revisions(db, schema=schema) == (REV1,)
    assert registry.current_published() == revision_part([REV1])

    # An instance of the old code, started before the upgrade.
    v_old = compute_version(read_db_revisions(db, schema=schema), shape(price=False))
    old = Cache.from_url(store, namespace=namespace, version=v_old)
    old.set("item:1", {"id": 1, "name": "pen"}, ttl=60)
    gens = old.generation_keys(["example_item"])
    tokens = old.backend.get_many(gens)
    assert tokens[0] is not NO_VALUE  # the hook invalidated everything after REV1

    command.upgrade(cfg, "head")
    assert registry.current_published() == revision_part([REV2])
    revs = read_db_revisions(db, schema=schema)
    md = sa.MetaData()
    example_table(md, price=True, schema=schema)
    assert version_report(old, db, md, schema=schema)["computed"] == compute_version(
        revs, schema_hash(md)
    )
    probe = Cache.from_url(store, namespace=namespace)  # refresh_version moves the cache it gets
    assert refresh_version(probe, db, md, schema=schema) == compute_version(revs, schema_hash(md))
    assert probe.version == compute_version(revs, schema_hash(md))
    new = Cache.from_url(store, namespace=namespace, version=compute_version(revs, shape(True)))
    old_code_now = Cache.from_url(
        store, namespace=namespace, version=compute_version(revs, shape(False))
    )
    assert len({old.version, new.version, old_code_now.version}) == 3
    assert new.get("item:1") is NO_VALUE
    assert old_code_now.get("item:1") is NO_VALUE

    # The migration invalidated everything: a data migration makes old entries suspect.
    assert old.backend.get_many(gens)[0] not in (NO_VALUE, tokens[0])

    # ... key-value entries too (they carry the namespace-wide generation) ...
    assert old.get("item:1") is NO_VALUE
    # ... and the old instance keeps working on its own version,
    old.set("item:2", "still fine", ttl=60)
    assert old.get("item:2") == "still fine"
    # ... and an invalidation from either instance reaches both (shared generations).
    assert new.generation_keys(["example_item"]) == gens
    before = new.backend.get_many(gens)
    new.bump(["example_item"])
    bumped = old.backend.get_many(gens)
    assert bumped[1] not in (NO_VALUE, before[1])
    assert bumped == new.backend.get_many(gens)


def test_downgrade_publishes_too(
    pg_url: str, schema: str, store: str, namespace: str, db: sa.Engine
) -> None:
    cfg = alembic_config(pg_url, schema)
    registry = VersionRegistry(Cache.from_url(store, namespace=namespace))
    command.upgrade(cfg, "head")
    assert registry.current_published() == revision_part([REV2])
    new = Cache.from_url(
        store, namespace=namespace, version=compute_version([REV2], shape(price=True))
    )
    new.set("item:1", {"id": 1, "price": "9.50"}, ttl=60)
    all_gen = new.generation_keys([])
    token = new.backend.get_many(all_gen)[0]

    command.downgrade(cfg, "-1")
    assert read_db_revisions(db, schema=schema) == (REV1,)
    assert registry.current_published() == revision_part([REV1])
    back = Cache.from_url(
        store,
        namespace=namespace,
        version=compute_version(read_db_revisions(db, schema=schema), shape(price=False)),
    )
    assert back.get("item:1") is NO_VALUE
    assert new.backend.get_many(all_gen)[0] not in (NO_VALUE, token)

    command.downgrade(cfg, "base")
    assert registry.current_published() == revision_part([])


def test_offline_mode_publishes_nothing(
    pg_url: str, schema: str, store: str, namespace: str, db: sa.Engine
) -> None:
    out = io.StringIO()
    command.upgrade(alembic_config(pg_url, schema, output=out), "head", sql=True)
    assert "CREATE TABLE" in out.getvalue()
    assert "price" in out.getvalue()
    assert read_db_revisions(db, schema=schema) == ()
    assert VersionRegistry(Cache.from_url(store, namespace=namespace)).current_published() is None


def test_stamp_publishes_only_when_asked(
    pg_url: str, schema: str, store: str, namespace: str, db: sa.Engine
) -> None:
    registry = VersionRegistry(Cache.from_url(store, namespace=namespace))
    command.stamp(alembic_config(pg_url, schema), REV1)
    assert read_db_revisions(db, schema=schema) == (REV1,)
    assert registry.current_published() is None

    command.stamp(alembic_config(pg_url, schema, "publish_stamp=true"), "head")
    assert read_db_revisions(db, schema=schema) == (REV2,)
    assert registry.current_published() == revision_part([REV2])


def test_unreachable_store_never_fails_the_migration(
    pg_url: str,
    schema: str,
    db: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SA_CACHE_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="sa_cache"):
        command.upgrade(alembic_config(pg_url, schema), "head")
    assert read_db_revisions(db, schema=schema) == (REV2,)
    assert "could not publish the new key version" in caplog.text


def test_failed_migration_publishes_nothing(
    pg_url: str, schema: str, store: str, namespace: str, db: sa.Engine
) -> None:
    """A run that fails and rolls back leaves the published version and the entries alone."""
    cfg = alembic_config(pg_url, schema)
    cache = Cache.from_url(store, namespace=namespace)
    registry = VersionRegistry(cache)
    command.upgrade(cfg, REV1)
    all_gen = cache.generation_keys([])
    token = cache.backend.get_many(all_gen)[0]
    with db.begin() as conn:  # make revision 2's ADD COLUMN fail
        conn.execute(sa.text(f'ALTER TABLE "{schema}".example_item ADD COLUMN price int'))
    with pytest.raises(sa.exc.ProgrammingError):
        command.upgrade(cfg, "head")
    assert read_db_revisions(db, schema=schema) == (REV1,)
    assert registry.current_published() == revision_part([REV1])
    assert token is not NO_VALUE
    assert cache.backend.get_many(all_gen)[0] == token


def test_publish_waits_for_the_commit_and_skips_no_change(
    schema: str, store: str, namespace: str, db: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Called inside a transaction it publishes nothing (yet); an unchanged revision is a no-op."""
    cfg = alembic_config(database_url("postgresql"), schema)
    command.upgrade(cfg, REV1)
    cache = Cache.from_url(store, namespace=namespace)
    all_gen = cache.generation_keys([])
    token = cache.backend.get_many(all_gen)[0]
    assert token is not NO_VALUE
    assert configure_kwargs(None) == {}
    hook = configure_kwargs(cache)["on_version_apply"]
    step = MigrationInfo(ScriptDirectory.from_config(cfg).revision_map, True, False, REV1, ())
    with db.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table_schema": schema})
        with conn.begin():
            hook(ctx=ctx, step=step, heads={REV1}, run_args={})
            with caplog.at_level(logging.WARNING, logger="sa_cache"):
                assert publish_after_migrations(cache, conn) is None
            assert "inside an open transaction" in caplog.text
        assert publish_after_migrations(cache, conn) is None  # REV1 is already published
        assert publish_after_migrations(cache, conn) is None  # and nothing is pending now
    assert cache.backend.get_many(all_gen)[0] == token
    assert VersionRegistry(cache).current_published() == revision_part([REV1])


@pytest.mark.usefixtures("quick_joins")
def test_track_follows_a_migration_without_restart(
    pg_url: str, schema: str, store: str, namespace: str, db: sa.Engine
) -> None:
    """A running instance (track()) moves to the new revision when the hook publishes it."""
    from sa_cache.versioning import track

    cfg = alembic_config(pg_url, schema)
    command.upgrade(cfg, REV1)
    md = sa.MetaData()
    example_table(md, price=False, schema=schema)
    app = Cache.from_url(store, namespace=namespace)
    registry = track(app, db, md, schema=schema, interval=0.05)
    try:
        before = app.version
        assert before == compute_version((REV1,), schema_hash(md))
        assert before in registry.live_versions()
        entry = app.keys.entity("example_item", "(1,)")
        app.bump(deletes=[entry])  # one live version: no fan-out yet
        command.upgrade(cfg, "head")
        deadline = time.monotonic() + 5
        while app.version == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.version == f"{revision_part([REV2])}-{split_version(before)[1]}"  # type: ignore[index]
        # The old code's version is still live (within the grace period): deletes reach it.
        fanned = app.fan_out([app.keys.entity("example_item", "(1,)")])
        assert any(k.startswith(f"{namespace}:{before}:") for k in fanned)
    finally:
        app.close()


def test_fan_out_outlives_a_store_that_lost_the_live_versions(
    redis_url: str, namespace: str, cleanup: list[Cache]
) -> None:
    """Redis restarted empty (or evicted the live keys): a version read live within the
    grace period still gets the deletes fanned out to it until its next heartbeat
    (it got none: its entries kept rows other versions' commits had changed)."""
    base = Cache.from_url(redis_url, namespace=namespace)
    cleanup.append(base)
    mine = sibling(base, compute_version([REV1], shape(price=False)))
    other = sibling(base, compute_version([REV1], shape(price=True)))
    VersionRegistry(other).heartbeat()
    registry = VersionRegistry(mine)
    registry.sync()
    key = mine.keys.entity("example_item", "1")
    fanned = [key, other.keys.entity("example_item", "1")]
    assert registry.fan_out([key]) == fanned
    base.backend.unlink_many(list(base.backend.scan_keys(f"{namespace}:meta:*")))  # type: ignore[attr-defined]
    registry.sync()  # reads no live version but its own now
    assert registry.fan_out([key]) == fanned
    registry.grace = 0.01  # once the grace period has passed, it is gone
    time.sleep(0.02)
    registry.sync()
    assert registry.fan_out([key]) == [key]


def test_a_failed_migration_without_transactional_ddl_invalidates_everything(
    store: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """MariaDB commits DDL as it runs: a failed step may have committed rows no
    revision announces, so every entry is invalidated (on PostgreSQL the failed run
    rolls back whole, and the entries stay: the test above)."""
    url = database_url("mariadb")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS example_item, alembic_version")
    try:
        cfg = alembic_config(url, "")
        cache = Cache.from_url(store, namespace=namespace)
        command.upgrade(cfg, REV1)
        all_gen = cache.generation_keys([])
        token = cache.backend.get_many(all_gen)[0]
        with engine.begin() as conn:  # make revision 2's ADD COLUMN fail
            conn.exec_driver_sql("ALTER TABLE example_item ADD COLUMN price int")
        with pytest.raises(sa.exc.OperationalError):
            command.upgrade(cfg, "head")
        assert VersionRegistry(cache).current_published() == revision_part([REV1])
        assert cache.backend.get_many(all_gen)[0] != token
        assert "every cache entry was invalidated" in caplog.text
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS example_item, alembic_version")
        engine.dispose()
