"""Models shared by the SQLAlchemy tests."""

from __future__ import annotations

import datetime
import decimal
import enum

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Tier(enum.Enum):
    free = "free"
    pro = "pro"


tag_links = sa.Table(
    "sac_user_tags",
    Base.metadata,
    sa.Column("user_id", sa.ForeignKey("sac_users.id"), primary_key=True),
    sa.Column("tag_id", sa.ForeignKey("sac_tags.id"), primary_key=True),
)


class Country(Base):
    __tablename__ = "sac_countries"
    code: Mapped[str] = mapped_column(sa.String(2), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class User(Base):
    __tablename__ = "sac_users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50))
    country_code: Mapped[str | None] = mapped_column(sa.ForeignKey("sac_countries.code"))
    created: Mapped[datetime.datetime] = mapped_column(
        sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
    )
    balance: Mapped[decimal.Decimal] = mapped_column(sa.Numeric(10, 2))
    tier: Mapped[Tier] = mapped_column(sa.Enum(Tier), default=Tier.free)
    prefs: Mapped[dict[str, object] | None] = mapped_column(sa.JSON, nullable=True)

    country: Mapped[Country | None] = relationship()
    addresses: Mapped[list[Address]] = relationship(back_populates="user", order_by="Address.id")
    tags: Mapped[list[Tag]] = relationship(secondary=tag_links, order_by="Tag.id")


class Address(Base):
    __tablename__ = "sac_addresses"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("sac_users.id"))
    email: Mapped[str] = mapped_column(sa.String(100))
    user: Mapped[User] = relationship(back_populates="addresses")


class Tag(Base):
    __tablename__ = "sac_tags"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(sa.String(50))


def seed(session: sa.orm.Session, users: int = 3) -> None:
    """Countries DE/FR, ``users`` users with two addresses each, tags on user 1."""
    session.add_all([Country(code="DE", name="Germany"), Country(code="FR", name="France")])
    tags = [Tag(id=1, label="a"), Tag(id=2, label="b")]
    for i in range(1, users + 1):
        session.add(
            User(
                id=i,
                name=f"user{i}",
                country_code="DE" if i % 2 else "FR",
                created=datetime.datetime(2024, 1, i, 12, 30, 15, 250000),
                balance=decimal.Decimal("10.50") * i,
                tier=Tier.pro if i == 1 else Tier.free,
                prefs={"n": i, "tags": ["x", "y"]},
                addresses=[
                    Address(id=i * 10 + 1, email=f"u{i}a@example.com"),
                    Address(id=i * 10 + 2, email=f"u{i}b@example.com"),
                ],
                tags=tags if i == 1 else [],
            )
        )
    session.commit()
