"""Entity reads of a REPEATABLE READ transaction whose snapshot predates the last write
to the table (MariaDB's default isolation): it is not served the table's entries, and it
must not take them away from everyone else either."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from helpers import Env, make_env
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sa_cache

pytestmark = pytest.mark.parametrize("dialect_name", ["postgresql", "mariadb"])


class RBase(DeclarativeBase):
    pass


class Country(RBase):
    __tablename__ = "sac_rr_countries"
    code: Mapped[str] = mapped_column(sa.String(2), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class Other(RBase):
    __tablename__ = "sac_rr_other"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


@pytest.fixture
def env(engine: sa.Engine, cache_url: str, namespace: str) -> Iterator[Env]:
    cache = sa_cache.Cache.from_url(cache_url, namespace=namespace)
    cache.register(Country, ttl=3600)
    yield from make_env(engine, cache, RBase.metadata)


def get_de(session: Session, how: str) -> Country | None:
    if how == "get":
        return session.get(Country, "DE")
    return session.scalars(select(Country).where(Country.code == "DE")).one_or_none()


@pytest.mark.parametrize("how", ["get", "select"])
def test_an_older_snapshot_s_read_leaves_the_current_entry_alone(env: Env, how: str) -> None:
    """A write to another row of the table moves its generation past the reader's
    snapshot: the reader loads DE from the database, and DE's entry — current, served to
    everyone else — stays (it was leased over and deleted, since the reader's load
    cannot be stored)."""
    with Session(env.engine) as plain:
        plain.add_all([Country(code="DE", name="Germany"), Country(code="FR", name="France")])
        plain.commit()
    with env.Session() as s:
        assert get_de(s, how) is not None  # filled
    env.cache.wait_for_fills()
    rr = env.Session(bind=env.engine.execution_options(isolation_level="REPEATABLE READ"))
    with rr as reader:
        reader.execute(select(Other.id)).all()  # the snapshot is taken here
        with env.Session() as writer:  # another row of the table
            writer.get(Country, "FR").name = "République française"  # type: ignore[union-attr]
            writer.commit()
        env.log.clear()
        with env.Session() as s:
            assert get_de(s, how).name == "Germany"  # type: ignore[union-attr]
        assert env.log.statements == []  # a hit: the entry is current
        assert get_de(reader, how).name == "Germany"  # type: ignore[union-attr]
        assert len(env.log.selects) == 1  # not served to the older snapshot: loaded
        reader.commit()
    env.cache.wait_for_fills()
    env.log.clear()
    with env.Session() as s:
        assert get_de(s, how).name == "Germany"  # type: ignore[union-attr]
    assert env.log.statements == []  # still a hit
