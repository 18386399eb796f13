"""add example_item.price

Revision ID: 8c3e5b7a2d41
Revises: 4f2a6c1d9b10
Create Date: 2025-01-06 10:05:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8c3e5b7a2d41"
down_revision: str | Sequence[str] | None = "4f2a6c1d9b10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add a price column; existing rows get 0 (a data migration the cache cannot see)."""
    op.add_column(
        "example_item",
        sa.Column("price", sa.Numeric(10, 2), nullable=False, server_default="0"),
        schema=op.get_context().version_table_schema,
    )


def downgrade() -> None:
    """Drop the price column."""
    op.drop_column("example_item", "price", schema=op.get_context().version_table_schema)
