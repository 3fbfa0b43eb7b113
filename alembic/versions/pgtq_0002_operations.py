"""Operations: the queues table (pause / resume) and the indexes behind stats and clean-up.

Revision ID: pgtq_0002
Revises: pgtq_0001
Create Date: 2026-11-23

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.
Additive only, so workers of the previous release keep running while it rolls out.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pgtq.migrations import revision_schema

revision: str = "pgtq_0002"
down_revision: str | Sequence[str] | None = "pgtq_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"


def upgrade() -> None:
    schema = revision_schema()
    op.create_table(
        "queues",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name="queues_pkey"),
        schema=schema,
    )
    op.create_index(
        "jobs_finished_at_idx",
        "jobs",
        ["finished_at"],
        schema=schema,
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )
    op.create_index(
        "jobs_unsuccessful_idx",
        "jobs",
        ["queue", "status"],
        schema=schema,
        postgresql_where=sa.text("status IN ('failed', 'aborted', 'cancelled')"),
    )


def downgrade() -> None:
    schema = revision_schema()
    op.drop_index("jobs_unsuccessful_idx", table_name="jobs", schema=schema)
    op.drop_index("jobs_finished_at_idx", table_name="jobs", schema=schema)
    op.drop_table("queues", schema=schema)
