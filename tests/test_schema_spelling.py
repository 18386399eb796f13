"""One table, two spellings: a model declared with its schema (the connection's default
one) and a statement naming the table without it — or the reverse — read and write the
same rows, so a write spelled one way invalidates what was cached through the other.
Tables of one name in several schemas (tenants) keep their invalidations apart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env, schemas
from sqlalchemy import column, select, table
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sa_cache

TABLE = "sac_sp_counter"
env_of = contextmanager(make_env)


def model(schema: str | None, name: str = "Counter") -> tuple[sa.MetaData, Any]:
    """A registered-model candidate mapped to ``TABLE`` in ``schema``."""

    class Base(DeclarativeBase):
        pass

    counter = type(
        name,
        (Base,),
        {
            "__tablename__": TABLE,
            "__table_args__": {"schema": schema},
            "__annotations__": {"id": Mapped[int], "v": Mapped[int]},
            "id": mapped_column(primary_key=True, autoincrement=False),
            "v": mapped_column(),
        },
    )
    return Base.metadata, counter


def seeded(*models: Any) -> Any:
    """A ``make_env`` seed: row 1, ``v=0``, of each model."""

    def seed(session: Session) -> None:
        session.add_all([m(id=1, v=0) for m in models])
        session.commit()

    return seed


def default_schema(engine: sa.Engine) -> str:
    with engine.connect():
        pass
    name = engine.dialect.default_schema_name
    assert name, engine.dialect.name
    return str(name)


def other_spelling(how: str, schema: str | None) -> Any:
    """``TABLE`` as a statement may name it: a lightweight ``table()`` or a ``Table`` of
    another MetaData, in ``schema``."""
    if how == "table":
        return table(TABLE, column("id"), column("v"), schema=schema)
    return sa.Table(
        TABLE,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", sa.Integer),
        schema=schema,
    )


def values(env: Env, counter: Any, session: Session | None = None) -> tuple[int, int]:
    """(a cached query's value, the cached entity's value) of row 1."""
    query = select(counter.v).order_by(counter.id).options(sa_cache.with_cache(ttl=60))
    if session is not None:
        return session.scalars(query).one(), session.get(counter, 1).v
    with env.Session() as s:
        return s.scalars(query).one(), s.get(counter, 1).v


def write_spelled_otherwise(env: Env, counter: Any, target: Any) -> None:
    """Row 1's ``v`` set to 1 by a Core UPDATE of ``target`` through a Session: in it
    (its own write) and, once committed, elsewhere, both cached reads give 1."""
    assert values(env, counter) == (0, 0)
    env.cache.wait_for_fills()
    env.log.clear()
    assert values(env, counter) == (0, 0)
    assert env.log.statements == []  # both cached
    with env.Session() as writer:
        writer.execute(sa.update(target).where(target.c.id == 1).values(v=1))
        assert values(env, counter, writer) == (1, 1)  # its own write
        writer.commit()
    assert values(env, counter) == (1, 1)


@pytest.mark.parametrize("how", ["table", "metadata"])
def test_an_unqualified_write_reaches_a_model_declared_with_its_schema(
    engine: sa.Engine, cache_url: str, namespace: str, how: str
) -> None:
    metadata, counter = model(default_schema(engine))
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(counter, ttl=300)
    with env_of(engine, cache, metadata, seeded(counter)) as env:
        write_spelled_otherwise(env, counter, other_spelling(how, None))


@pytest.mark.parametrize("how", ["table", "metadata"])
def test_a_write_naming_the_default_schema_reaches_an_unqualified_model(
    engine: sa.Engine, cache_url: str, namespace: str, how: str
) -> None:
    metadata, counter = model(None)
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(counter, ttl=300)
    with env_of(engine, cache, metadata, seeded(counter)) as env:
        write_spelled_otherwise(env, counter, other_spelling(how, default_schema(engine)))


@contextmanager
def tenants(engine: sa.Engine, namespace: str, tmp_path: Path) -> Iterator[tuple[Env, Any, Any]]:
    """``TABLE`` in the schemas of two tenants, a model of each registered."""
    names = ["sac_sp_tenant_a", "sac_sp_tenant_b"]
    base = schemas(engine, names, tmp_path)
    metadata = sa.MetaData()
    _, a = model(names[0], "TenantA")
    _, b = model(names[1], "TenantB")
    for m in (a, b):
        m.__table__.to_metadata(metadata)
    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    cache.register(a, ttl=300)
    cache.register(b, ttl=300)
    try:
        with env_of(base, cache, metadata, seeded(a, b)) as env:
            yield env, a, b
    finally:
        if base is not engine:
            base.dispose()


def test_tables_of_one_name_in_two_schemas_keep_their_own_invalidations(
    engine: sa.Engine, namespace: str, tmp_path: Path
) -> None:
    """A write to tenant A's table leaves tenant B's cached reads alone (each spelling
    still names one table: the schema is not dropped from generations)."""
    with tenants(engine, namespace, tmp_path) as (env, a, b):
        assert values(env, a) == values(env, b) == (0, 0)
        env.cache.wait_for_fills()
        with env.Session() as writer:
            writer.execute(sa.update(a).where(a.id == 1).values(v=1))
            writer.commit()
        env.log.clear()
        assert values(env, b) == (0, 0)
        assert env.log.statements == []  # tenant B: still hits
        assert values(env, a) == (1, 1)  # tenant A: invalidated


@pytest.mark.parametrize("qualified_model", [True, False])
def test_invalidate_by_the_other_spelling(
    engine: sa.Engine, namespace: str, qualified_model: bool
) -> None:
    """``cache.invalidate`` (and ``sa-cache invalidate``) given the table's name spelled
    the other way drops what was cached through the model."""
    schema = default_schema(engine)
    metadata, counter = model(schema if qualified_model else None)
    cache = sa_cache.Cache.from_url("memory://", namespace=namespace)
    cache.register(counter, ttl=300)
    with env_of(engine, cache, metadata, seeded(counter)) as env:
        assert values(env, counter) == (0, 0)
        with env.engine.begin() as conn:  # behind the cache's back
            conn.execute(sa.update(counter.__table__).values(v=1))
        env.cache.wait_for_fills()
        assert values(env, counter) == (0, 0)  # cached
        env.cache.invalidate(TABLE if qualified_model else f"{schema}.{TABLE}")
        assert values(env, counter) == (1, 1)


def test_unflushed_changes_count_as_own_writes_under_either_spelling(
    engine: sa.Engine, cache_url: str, namespace: str
) -> None:
    """Rule 2 with ``autoflush=False``: a cached query of the table goes to the database
    while the Session holds an unflushed change of it, whichever spelling its model
    used."""
    metadata, qualified = model(default_schema(engine), "Qualified")
    _, plain = model(None, "Plain")
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    with env_of(engine, cache, metadata, seeded(qualified)) as env:
        query = select(plain.v).options(sa_cache.with_cache(ttl=60))
        with env.Session() as s:
            assert s.scalars(query).all() == [0]
        env.cache.wait_for_fills()
        env.log.clear()
        with env.Session(autoflush=False) as s:
            assert s.scalars(query).all() == [0]
            assert env.log.selects == []  # a hit
            s.get(qualified, 1).v = 5  # unflushed
            assert s.scalars(query).all() == [0]  # (the database has not got it either)
            assert len(env.log.selects) == 2  # the get, then the query: not served


def test_a_translated_read_sees_a_write_naming_the_real_schema(
    engine: sa.Engine, namespace: str, tmp_path: Path
) -> None:
    """The multi-tenant recipe: the model names a placeholder schema that the engine's
    ``schema_translate_map`` maps to the tenant's. A write naming the tenant's schema
    (an admin path, a Core statement) must reach the cached reads made through the map
    — in another Session and, before it commits, in its own."""
    with tenants(engine, namespace, tmp_path) as (env, a, _):
        _, placeholder = model("per_tenant", "Translated")
        translated = env.engine.execution_options(
            schema_translate_map={"per_tenant": "sac_sp_tenant_a"}
        )
        readers = sessionmaker(translated, class_=sa_cache.CachingSession, cache=env.cache)
        query = select(placeholder.v).options(sa_cache.with_cache(ttl=60))
        for _ in range(2):
            with readers() as s:
                assert s.scalars(query).all() == [0]
            env.cache.wait_for_fills()
        real = table(TABLE, column("id"), column("v"), schema="sac_sp_tenant_a")
        with readers() as writer:
            writer.execute(sa.update(real).where(real.c.id == 1).values(v=1))
            assert writer.scalars(query).all() == [1]  # its own write
            writer.commit()
        with readers() as s:
            assert s.scalars(query).all() == [1]
        assert values(env, a) == (1, 1)
