"""create example_item

Revision ID: 4f2a6c1d9b10
Revises:
Create Date: 2025-01-06 10:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4f2a6c1d9b10"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the example table (in the -x schema=... schema when given)."""
    op.create_table(
        "example_item",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        schema=op.get_context().version_table_schema,
    )


def downgrade() -> None:
    """Drop the example table."""
    op.drop_table("example_item", schema=op.get_context().version_table_schema)
