"""Writes made through a ``schema_translate_map`` (the multi-tenant recipe: models name a
placeholder schema, each tenant's engine maps it to the tenant's). The database writes
the translated schema's table, so what was cached of that table through a spelling of
the real schema (an admin or reporting model, a Core ``Table``) must not be served after
the write — the reverse of test_schema_spelling's translated reads. Tables of one name
in other schemas keep their entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from test_schema_spelling import TABLE, model, tenants, values

import sa_cache
from sa_cache.invalidation import tables_written, translated

TENANT_A = "sac_sp_tenant_a"


def test_the_translated_spelling_of_a_write() -> None:
    """`translated` gives the generations of the tables as the map names them (the
    ``None`` key, or SQLAlchemy's ``"_none"``, maps unqualified tables; a ``None`` value
    drops the schema), only those the statement's own spelling does not move."""
    placeholder = sa.Table(TABLE, sa.MetaData(), sa.Column("id"), schema="p")
    written = tables_written(sa.update(placeholder).values(id=1))
    assert written == {f"p.{TABLE}", f"*.{TABLE}"}
    assert translated(written, {"p": "a"}) == {f"a.{TABLE}"}
    assert translated(written, {"p": None}) == {TABLE}
    assert translated(written, {"other": "a"}) == frozenset()
    for none_key in ({None: "a"}, {"_none": "a"}, {None: "a", "_none": "a"}):
        assert translated(frozenset({TABLE}), none_key) == {f"a.{TABLE}", f"*.{TABLE}"}
    assert translated(frozenset({"*"}), {None: "a"}) == frozenset()


@pytest.mark.parametrize("how", ["core", "orm", "orm_registered"])
def test_a_translated_write_reaches_reads_naming_the_real_schema(
    engine: sa.Engine, namespace: str, tmp_path: Path, how: str
) -> None:
    """A write through the map (placeholder ``per_tenant`` -> tenant A's schema) changes
    tenant A's table: the query entry and the entity entry cached through tenant A's
    model are not served after the commit; tenant B's stay hits. ``orm_registered``:
    the placeholder model is registered too (its flush records the row, keyed as
    mapped: tenant A's entries go by their row generation)."""
    with tenants(engine, namespace, tmp_path) as (env, a, b):
        for _ in range(2):
            assert values(env, a) == values(env, b) == (0, 0)
            env.cache.wait_for_fills()
        _, placeholder = model("per_tenant", "Translated")
        if how == "orm_registered":
            env.cache.register(placeholder, ttl=300)
        translated_engine = env.engine.execution_options(
            schema_translate_map={"per_tenant": TENANT_A}
        )
        writers = sessionmaker(translated_engine, class_=sa_cache.CachingSession, cache=env.cache)
        with writers() as writer:
            if how == "core":
                writer.execute(sa.update(placeholder).where(placeholder.id == 1).values(v=1))
            else:
                writer.get(placeholder, 1).v = 1
            writer.commit()
        with env.engine.connect() as conn:  # the database has it
            assert conn.execute(select(a.v)).scalar() == 1
        env.log.clear()
        assert values(env, b) == (0, 0)
        assert env.log.statements == []  # tenant B: still hits
        assert values(env, a) == (1, 1)


def test_a_translated_autocommit_write_reaches_reads_naming_the_real_schema(
    engine: sa.Engine, namespace: str, tmp_path: Path
) -> None:
    """On an AUTOCOMMIT connection the translated flush is committed as it runs: tenant
    A's entries go then, while the writing Session is still open."""
    with tenants(engine, namespace, tmp_path) as (env, a, _):
        assert values(env, a) == (0, 0)
        env.cache.wait_for_fills()
        _, placeholder = model("per_tenant", "Translated")
        env.cache.register(placeholder, ttl=300)
        translated_engine = env.engine.execution_options(
            schema_translate_map={"per_tenant": TENANT_A}, isolation_level="AUTOCOMMIT"
        )
        writers = sessionmaker(translated_engine, class_=sa_cache.CachingSession, cache=env.cache)
        with writers() as writer:
            writer.get(placeholder, 1).v = 1
            writer.flush()
            with env.engine.connect() as conn:
                assert conn.execute(select(a.v)).scalar() == 1
            env.cache.wait_for_fills()
            assert values(env, a) == (1, 1)  # the writer is still open
