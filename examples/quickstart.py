"""A minimal sa_cache application: run it with ``python examples/quickstart.py [CACHE_URL]``.

It uses SQLite and, by default, the in-process ``memory://`` store; pass
``redis://127.0.0.1:6379/0`` to use Redis.
"""

from __future__ import annotations

import sys

import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

import sa_cache


class Base(DeclarativeBase):
    pass


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    country_code: Mapped[str] = mapped_column(ForeignKey("countries.code"))
    country: Mapped[Country] = relationship()


def main(url: str = "memory://") -> dict[str, int]:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    cache = sa_cache.Cache.from_url(url, namespace="quickstart")
    cache.register(Country, ttl=86_400)  # entity cache, write-through
    SessionLocal = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)

    with SessionLocal() as session:
        session.add_all([Country(code="DE", name="Germany"), Country(code="FR", name="France")])
        session.add_all([User(id=i, name=f"user {i}", country_code="DE") for i in range(1, 6)])
        session.commit()

    germans = select(User).where(User.country_code == "DE").options(sa_cache.with_cache(ttl=60))
    for _ in range(3):
        with SessionLocal() as session:
            statements.clear()
            users = session.scalars(germans).all()  # read-through: the database once
            country = session.get(Country, "DE")  # entity cache: written through at commit
            assert country is not None
            print(f"{len(users)} users in {country.name}; SQL statements: {len(statements)}")

    with SessionLocal() as session:  # a commit invalidates what it touched
        session.add(User(id=6, name="user 6", country_code="DE"))
        session.commit()
    with SessionLocal() as session:
        print(f"after the insert: {len(session.scalars(germans).all())} users")

    stats = cache.stats.snapshot()
    print({k: v for k, v in sorted(stats.items()) if k.startswith(("query.", "entity."))})
    cache.close()
    return stats


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "memory://")
