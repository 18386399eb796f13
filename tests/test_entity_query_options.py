"""A primary-key select of a registered model given a `with_cache` option.

Such a select is answered from the row's entity entry, as ``session.get`` is — unless
the option asks for what an entity entry does not carry: ``tags`` (which
``cache.invalidate_tags`` must reach) and ``relationships=True`` (lazy loads cached
with the query). Those go the query cache's way, with an entry of their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from models import Country, User
from sqlalchemy import select

import sa_cache
from sa_cache import with_cache


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(User, ttl=3600)
    cache.register(Country, ttl=3600)
    yield from make_env(engine, cache)


def _outside(env: Env, sql: str) -> None:
    """A change the application does not see (another program, a migration script)."""
    with env.engine.begin() as conn:
        conn.execute(sa.text(sql))


def test_invalidate_tags_reaches_a_tagged_primary_key_select(env: Env) -> None:
    """README: ``with_cache(tags=...)`` and ``cache.invalidate_tags(...)`` drop cached
    reads after a change made outside the application. Answered from the entity entry,
    which carries no tag, the select kept serving the old row until the entity TTL
    (an hour here) (README audit rc-01)."""
    stmt = select(Country).where(Country.code == "DE").options(with_cache(ttl=60, tags=("geo",)))

    def read() -> str:
        with env.Session() as s:
            return s.scalars(stmt).one().name

    assert read() == "Germany"
    env.cache.wait_for_fills()
    env.log.clear()
    assert read() == "Germany"
    assert env.log.selects == []  # a hit
    _outside(env, "UPDATE sac_countries SET name = 'Allemagne' WHERE code = 'DE'")
    assert read() == "Germany"  # (the cache cannot know yet)
    env.cache.invalidate_tags("geo")
    assert read() == "Allemagne"


def test_relationships_true_caches_the_lazy_loads_of_a_primary_key_select(env: Env) -> None:
    """``relationships=True`` caches the lazy loads of the objects the query loaded; on a
    registered model's primary-key select every lazy load went to the database, run after
    run (README audit rc-02)."""
    stmt = select(User).where(User.id == 1).options(with_cache(ttl=60, relationships=True))

    def emails() -> list[str]:
        with env.Session() as s:
            return sorted(a.email for a in s.scalars(stmt).one().addresses)

    first = emails()
    assert first  # (user 1 has addresses: the lazy load returns rows)
    env.cache.wait_for_fills()
    env.log.clear()
    assert emails() == first
    assert env.log.selects == []  # the select and its lazy load: both hits


def test_a_plain_option_is_still_answered_from_the_entity_entry(env: Env) -> None:
    """Without tags or relationships the select is served as ``session.get`` is: from the
    entry a write-through commit refreshed, with no SQL."""
    stmt = select(User).where(User.id == 1).options(with_cache(ttl=60))
    with env.Session() as s:
        assert s.scalars(stmt).one().name == "user1"
    with env.Session() as s:
        user = s.get(User, 1)
        assert user is not None
        user.name = "renamed"
        s.commit()
    env.log.clear()
    with env.Session() as s:
        assert s.scalars(stmt).one().name == "renamed"
    assert env.log.selects == []


def test_only_write_behind_models_keep_the_entity_entry_for_tags() -> None:
    """The decision itself: a write-behind row's entry is the row (the database trails
    its queue), so even a tagged select reads it."""
    assert with_cache().entity_served("through")
    assert with_cache().entity_served("invalidate")
    assert not with_cache(tags=("t",)).entity_served("through")
    assert not with_cache(relationships=True).entity_served("invalidate")
    assert with_cache(tags=("t",), relationships=True).entity_served("behind")
