"""Control: periodic ticks, fleet-wide limits (queue caps and rates, concurrency keys), and
the trace context a job carries.

Revision ID: pgtq_0004
Revises: pgtq_0003
Create Date: 2026-11-23

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.
Additive only: new nullable columns and new tables, so workers of the previous release keep
running while it rolls out.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from pgtq.migrations import revision_schema

revision: str = "pgtq_0004"
down_revision: str | Sequence[str] | None = "pgtq_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"


def upgrade() -> None:
    schema = revision_schema()
    op.add_column("jobs", sa.Column("concurrency_key", sa.Text(), nullable=True), schema=schema)
    op.add_column("jobs", sa.Column("trace_context", JSONB(), nullable=True), schema=schema)
    op.create_index(
        "jobs_key_doing_idx",
        "jobs",
        ["concurrency_key"],
        schema=schema,
        postgresql_where=sa.text("status = 'doing' AND concurrency_key IS NOT NULL"),
    )
    op.add_column("queues", sa.Column("concurrency", sa.Integer(), nullable=True), schema=schema)
    op.add_column("queues", sa.Column("rate_limit", sa.Float(), nullable=True), schema=schema)
    op.create_table(
        "periodic_ticks",
        sa.Column("task_name", sa.Text(), nullable=False),
        sa.Column("periodic_id", sa.Text(), server_default="", nullable=False),
        sa.Column("tick_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("task_name", "periodic_id", "tick_at", name="periodic_ticks_pkey"),
        schema=schema,
    )
    op.create_table(
        "limit_buckets",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("key", name="limit_buckets_pkey"),
        schema=schema,
    )


def downgrade() -> None:
    schema = revision_schema()
    op.drop_table("limit_buckets", schema=schema)
    op.drop_table("periodic_ticks", schema=schema)
    op.drop_column("queues", "rate_limit", schema=schema)
    op.drop_column("queues", "concurrency", schema=schema)
    op.drop_index("jobs_key_doing_idx", table_name="jobs", schema=schema)
    op.drop_column("jobs", "trace_context", schema=schema)
    op.drop_column("jobs", "concurrency_key", schema=schema)
