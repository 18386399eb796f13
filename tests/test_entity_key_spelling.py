"""An object whose primary key is spelled otherwise than its row's, though the database
finds it equal: ``'de'`` or ``'DE '`` for the row ``'DE'`` under MariaDB's default
(case-insensitive, ``PAD SPACE``) collation, an upper-case string UUID, a TypeDecorator
key its bind processing changes (``"Python"`` stored as ``"python"``). Readers key an
entry by the row's key as loads give it back, so an update or delete of such an object
must not leave that entry as it was: when the object's identity is not known to be the
row's spelling, the table's row generation moves. Objects loaded from the database or
an entry, and ones whose insert stored the key as given, keep being written through.
(Audit d2, D2-08 / D2-09.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sa_cache
from sa_cache.entity import EntitySpec
from sa_cache.entity_types import (
    AS_GIVEN,
    EQUAL_SPELLINGS,
    STORED_OTHERWISE,
    key_spelling_of,
)


class LowerKey(sa.TypeDecorator[str]):
    """Keys stored in lower case (a slug / e-mail recipe)."""

    impl = sa.String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.lower()


class KBase(DeclarativeBase):
    pass


class Land(KBase):
    __tablename__ = "sac_ks_land"
    code: Mapped[str] = mapped_column(sa.String(5), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class Token(KBase):
    __tablename__ = "sac_ks_token"
    id = mapped_column(sa.Uuid(as_uuid=False), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class Tag(KBase):
    __tablename__ = "sac_ks_tag"
    slug = mapped_column(LowerKey, primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(50))


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    for model in (Land, Token, Tag):
        cache.register(model)
    yield from make_env(engine, cache, KBase.metadata)


def _served(env: Env, model: Any, pk: Any, attr: str) -> Any:
    """What the cached Session gives (None: no row)."""
    env.cache.wait_for_fills()
    with env.Session() as s:
        obj = s.get(model, pk)
        return None if obj is None else getattr(obj, attr)


def _stored(env: Env, model: Any, pk: Any, attr: str) -> Any:
    with Session(env.engine) as s:
        obj = s.get(model, pk)
        return None if obj is None else getattr(obj, attr)


def _hit(env: Env, model: Any, pk: Any, attr: str) -> Any:
    """The value served without SQL (asserted)."""
    env.cache.wait_for_fills()
    env.log.clear()
    value = _served(env, model, pk, attr)
    assert env.log.statements == []
    return value


def _detached(obj: Any) -> Any:
    sa.orm.make_transient_to_detached(obj)
    return obj


def _seeded_lands(env: Env) -> None:
    with env.Session() as s:
        s.add_all([Land(code="DE", name="Germany"), Land(code="FR", name="France")])
        s.commit()
    for code, name in (("DE", "Germany"), ("FR", "France")):
        assert _served(env, Land, code, "name") == name
        assert _hit(env, Land, code, "name") == name


@pytest.mark.parametrize("dialect_name", ["mariadb"])
@pytest.mark.parametrize("spelling", ["de", "DE "], ids=["case", "trailing-space"])
@pytest.mark.parametrize("how", ["update", "merge-load-false", "delete"])
def test_a_case_insensitive_spelling_of_the_key_reaches_the_rows_entry(
    env: Env, spelling: str, how: str
) -> None:
    """An object made detached (or merged with ``load=False``, the dogpile recipe) under
    a spelling the collation finds equal writes the row ``'DE'``: the entry of
    ``('DE',)`` must not keep the old row (or the deleted one)."""
    _seeded_lands(env)
    with env.Session() as s:
        if how == "update":
            obj = _detached(Land(code=spelling, name="Germany"))
            s.add(obj)
            obj.name = "Deutschland"
        elif how == "merge-load-false":
            merged = s.merge(_detached(Land(code=spelling, name="Germany")), load=False)
            merged.name = "Deutschland"
        else:
            s.delete(s.merge(_detached(Land(code=spelling, name="Germany")), load=False))
        s.commit()
    expected = None if how == "delete" else "Deutschland"
    assert _stored(env, Land, "DE", "name") == expected
    assert _served(env, Land, "DE", "name") == expected


@pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])
def test_an_upper_case_string_uuid_reaches_the_rows_entry(env: Env) -> None:
    """``Uuid(as_uuid=False)``: the database finds the upper-case spelling equal (a
    ``uuid`` on PostgreSQL, a case-insensitive ``CHAR(32)`` on MariaDB)."""
    key = "0f6c1f9e-3c3b-4c2e-9a53-4b1e2b7f9d10"
    with env.Session() as s:
        s.add(Token(id=key, name="a"))
        s.commit()
    key = _stored(env, Token, key, "id")  # as the database gives it back
    assert _served(env, Token, key, "name") == "a"
    assert _hit(env, Token, key, "name") == "a"
    with env.Session() as s:
        obj = _detached(Token(id=key.upper(), name="a"))
        s.add(obj)
        obj.name = "b"
        s.commit()
    assert _stored(env, Token, key, "name") == "b"
    assert _served(env, Token, key, "name") == "b"


def test_a_typedecorator_key_respelled_on_bind_reaches_the_rows_entry(env: Env) -> None:
    """The inserted object keeps the key it was given (``"Python"``); the row's is
    ``"python"``, and other requests fill and read its entry. The held object's later
    UPDATE (``WHERE slug = 'python'``) must reach that entry."""
    held = sessionmaker(
        env.engine, class_=sa_cache.CachingSession, cache=env.cache, expire_on_commit=False
    )
    with held() as s:
        tag = Tag(slug="Python", title="a")
        s.add(tag)
        s.commit()
        assert _served(env, Tag, "python", "title") == "a"  # another request fills it
        assert _hit(env, Tag, "python", "title") == "a"
        tag.title = "b"
        s.commit()
    assert _stored(env, Tag, "python", "title") == "b"
    assert _served(env, Tag, "python", "title") == "b"


def test_a_typedecorator_key_changed_by_the_application_reaches_the_rows_entry(
    env: Env,
) -> None:
    """A loaded object given a new key its bind processing changes (``"Ruby"`` stored
    as ``"ruby"``): from then on its identity is not the row's spelling."""
    with env.Session() as s:
        s.add(Tag(slug="python", title="a"))
        s.commit()
    held = sessionmaker(
        env.engine, class_=sa_cache.CachingSession, cache=env.cache, expire_on_commit=False
    )
    with held() as s:
        tag = s.get(Tag, "python")
        assert tag is not None
        tag.slug = "Ruby"
        s.commit()
        assert _served(env, Tag, "ruby", "title") == "a"
        assert _hit(env, Tag, "ruby", "title") == "a"
        tag.title = "b"
        s.commit()
    assert _stored(env, Tag, "ruby", "title") == "b"
    assert _served(env, Tag, "ruby", "title") == "b"


@pytest.mark.parametrize("loaded", ["entry", "database"])
def test_a_loaded_objects_update_is_still_written_through(env: Env, loaded: str) -> None:
    """An object loaded (from the entry, or by a query the database answers) holds its
    row's key as readers key it, whatever the collation or key type: its update is
    written through, and the table's other entries stay."""
    _seeded_lands(env)
    with env.Session() as s:
        s.add(Tag(slug="python", title="a"))
        s.commit()
    assert _served(env, Tag, "python", "title") == "a"  # (an update is written over it)
    with env.Session() as s:
        if loaded == "entry":
            land, tag = s.get(Land, "DE"), s.get(Tag, "python")
        else:
            land = s.scalars(sa.select(Land).where(Land.name == "Germany")).one()
            tag = s.scalars(sa.select(Tag).where(Tag.title == "a")).one()
        assert land is not None
        assert tag is not None
        land.name = "Deutschland"
        tag.title = "b"
        s.commit()
    assert _hit(env, Land, "DE", "name") == "Deutschland"  # written through
    assert _hit(env, Land, "FR", "name") == "France"  # no row generation moved
    assert _hit(env, Tag, "python", "title") == "b"


def test_an_inserted_objects_later_update_is_still_written_through(env: Env) -> None:
    """A key the database stores as it is given (a string under any collation) is the
    row's spelling once inserted: a held object's later update is written through."""
    _seeded_lands(env)
    held = sessionmaker(
        env.engine, class_=sa_cache.CachingSession, cache=env.cache, expire_on_commit=False
    )
    with held() as s:
        land = Land(code="IT", name="Italy")
        s.add(land)
        s.commit()
        land.name = "Italia"
        s.commit()
    assert _hit(env, Land, "IT", "name") == "Italia"
    assert _hit(env, Land, "FR", "name") == "France"


_coded = sa.Table(  # (never created: its collations are of one database each)
    "sac_ks_coded",
    sa.MetaData(),
    sa.Column("code", sa.String(5)),
    sa.Column("exact", sa.String(5, collation="utf8mb4_nopad_bin")),
    sa.Column("padded", sa.String(5, collation="utf8mb4_bin")),
    sa.Column("nocase", sa.String(5, collation="NOCASE")),
    sa.Column("c_collated", sa.String(5, collation="C")),
    sa.Column("number", sa.Integer),
    sa.Column("choice", sa.Enum("a", "b", native_enum=False)),
    sa.Column("uuid_text", sa.Uuid(as_uuid=False)),
    sa.Column("uuid_object", sa.Uuid()),
    sa.Column("slug", LowerKey),
)


@pytest.mark.parametrize(
    ("column", "sqlite", "postgresql", "mariadb"),
    [
        ("code", AS_GIVEN, AS_GIVEN, EQUAL_SPELLINGS),
        ("exact", EQUAL_SPELLINGS, EQUAL_SPELLINGS, AS_GIVEN),
        ("padded", EQUAL_SPELLINGS, EQUAL_SPELLINGS, EQUAL_SPELLINGS),
        ("nocase", EQUAL_SPELLINGS, EQUAL_SPELLINGS, EQUAL_SPELLINGS),
        ("c_collated", EQUAL_SPELLINGS, AS_GIVEN, EQUAL_SPELLINGS),
        ("number", AS_GIVEN, AS_GIVEN, AS_GIVEN),
        ("choice", AS_GIVEN, AS_GIVEN, AS_GIVEN),
        ("uuid_text", STORED_OTHERWISE, STORED_OTHERWISE, STORED_OTHERWISE),
        ("uuid_object", AS_GIVEN, AS_GIVEN, AS_GIVEN),
        ("slug", STORED_OTHERWISE, STORED_OTHERWISE, STORED_OTHERWISE),
    ],
)
def test_key_spellings_by_type_and_dialect(
    column: str, sqlite: int, postgresql: int, mariadb: int
) -> None:
    """Which key types may be spelled otherwise than their row's, on each database
    (no server: the column types only)."""
    mapper: Any = sa.orm.registry().map_imperatively(
        type(f"Keyed_{column}", (), {}), _coded, primary_key=[_coded.c[column]]
    )
    spec = EntitySpec(mapper, None, "through")
    found = {d: key_spelling_of(spec, d) for d in ("sqlite", "postgresql", "mariadb")}
    assert found == {"sqlite": sqlite, "postgresql": postgresql, "mariadb": mariadb}
