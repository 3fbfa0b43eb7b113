"""pgtq's initial schema: jobs, workers, the NOTIFY trigger.

Revision ID: pgtq_0001
Revises:
Create Date: 2026-11-23

A frozen snapshot of ``pgtq/schema.py`` at this revision (a drift test compares the two):
the DDL is written out here, never imported, so later edits of schema.py cannot change
what this revision does.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from pgtq.migrations import revision_schema

revision: str = "pgtq_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("pgtq",)
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"

NOTIFY_FUNCTION_SQL = """
CREATE OR REPLACE FUNCTION {schema}.notify_jobs_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgtq_' || TG_TABLE_SCHEMA, q.queue)
    FROM (SELECT DISTINCT queue FROM new_jobs
          WHERE scheduled_at IS NULL OR scheduled_at <= now()) AS q;
    RETURN NULL;
END;
$$
"""

NOTIFY_TRIGGER_SQL = """
CREATE TRIGGER jobs_notify_inserted
AFTER INSERT ON {schema}.jobs
REFERENCING NEW TABLE AS new_jobs
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_jobs_inserted()
"""

# The jobs table is updated several times per job: vacuum it early and often, and leave room
# in each page so an update can stay on the same page.
JOBS_STORAGE_SQL = """
ALTER TABLE {schema}.jobs SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    fillfactor = 90
)
"""


def upgrade() -> None:
    schema = revision_schema()
    quoted = f'"{schema}"'
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False, server_default="default"),
        sa.Column("task_name", sa.Text(), nullable=False),
        sa.Column(
            "args", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column("status", sa.Text(), nullable=False, server_default="todo"),
        sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lock", sa.Text(), nullable=True),
        sa.Column("queueing_lock", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("abort_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.Column("error", postgresql.JSONB(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="jobs_pkey"),
        sa.CheckConstraint(
            "status IN ('todo', 'doing', 'succeeded', 'failed', 'cancelled', 'aborted')",
            name="jobs_status_check",
        ),
        schema=schema,
    )
    op.create_index(
        "jobs_claim_idx",
        "jobs",
        [sa.text("priority DESC"), "id"],
        schema=schema,
        postgresql_where=sa.text("status = 'todo'"),
    )
    op.create_index(
        "jobs_queue_claim_idx",
        "jobs",
        ["queue", sa.text("priority DESC"), "id"],
        schema=schema,
        postgresql_where=sa.text("status = 'todo'"),
    )
    op.create_index(
        "jobs_lock_doing_idx",
        "jobs",
        ["lock"],
        unique=True,
        schema=schema,
        postgresql_where=sa.text("status = 'doing' AND lock IS NOT NULL"),
    )
    op.create_index(
        "jobs_queueing_lock_todo_idx",
        "jobs",
        ["queueing_lock"],
        unique=True,
        schema=schema,
        postgresql_where=sa.text("status = 'todo' AND queueing_lock IS NOT NULL"),
    )
    op.create_index(
        "jobs_worker_doing_idx",
        "jobs",
        ["worker_id"],
        schema=schema,
        postgresql_where=sa.text("status = 'doing'"),
    )
    op.execute(JOBS_STORAGE_SQL.format(schema=quoted))

    op.create_table(
        "workers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "last_heartbeat",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("id", name="workers_pkey"),
        schema=schema,
    )

    op.execute(NOTIFY_FUNCTION_SQL.format(schema=quoted))
    op.execute(NOTIFY_TRIGGER_SQL.format(schema=quoted))


def downgrade() -> None:
    schema = revision_schema()
    quoted = f'"{schema}"'
    op.execute(f"DROP TRIGGER IF EXISTS jobs_notify_inserted ON {quoted}.jobs")
    op.execute(f"DROP FUNCTION IF EXISTS {quoted}.notify_jobs_inserted()")
    op.drop_table("workers", schema=schema)
    op.drop_table("jobs", schema=schema)
    # The schema stays: pgtq's own version table lives in it.
