"""orders

Revision ID: app_0001
Revises:
Create Date: 2026-11-23

The application's first revision: a branch of its own (label ``app``), beside pgtq's.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "app_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("app",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("confirmation_job_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("orders")
