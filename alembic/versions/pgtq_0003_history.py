"""History: the job_events table, written by statement-level triggers on jobs.

Revision ID: pgtq_0003
Revises: pgtq_0002
Create Date: 2026-11-23

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.
Additive only, so workers of the previous release keep running while it rolls out (their
status changes are recorded too: the triggers see every write).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from pgtq.migrations import revision_schema

revision: str = "pgtq_0003"
down_revision: str | Sequence[str] | None = "pgtq_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"

# One row per status change. Statement-level triggers with transition tables: a batch of 500
# completions costs one INSERT ... SELECT, not 500 trigger calls.
FUNCTION = """
CREATE OR REPLACE FUNCTION "{schema}".record_job_history() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO "{schema}".job_events (job_id, type, attempt)
        SELECT id, 'deferred', attempts FROM new_jobs;
    ELSE
        INSERT INTO "{schema}".job_events (job_id, type, attempt, worker_id, error)
        SELECT n.id,
               CASE
                   WHEN n.status = 'doing' THEN 'started'
                   WHEN n.status = 'todo' AND o.status = 'doing'
                        AND n.error ->> 'type' = 'WorkerLostError' THEN 'rescued'
                   WHEN n.status = 'todo' AND o.status = 'doing'
                        AND n.attempts < o.attempts THEN 'released'
                   WHEN n.status = 'todo' THEN 'retried'
                   ELSE n.status
               END,
               n.attempts,
               coalesce(n.worker_id, o.worker_id),
               CASE WHEN n.status IN ('todo', 'failed', 'aborted')
                         AND o.status = 'doing' THEN n.error END
        FROM new_jobs AS n JOIN old_jobs AS o ON o.id = n.id
        WHERE n.status IS DISTINCT FROM o.status;
    END IF;
    RETURN NULL;
END;
$$
"""


def upgrade() -> None:
    schema = revision_schema()
    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column(
            "at",
            sa.DateTime(timezone=True),
            server_default=sa.func.clock_timestamp(),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("error", JSONB(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="job_events_pkey"),
        schema=schema,
    )
    op.create_index("job_events_job_idx", "job_events", ["job_id", "id"], schema=schema)
    op.execute(FUNCTION.format(schema=schema))
    op.execute(
        f'CREATE TRIGGER jobs_history_inserted AFTER INSERT ON "{schema}".jobs '
        "REFERENCING NEW TABLE AS new_jobs FOR EACH STATEMENT "
        f'EXECUTE FUNCTION "{schema}".record_job_history()'
    )
    op.execute(
        f'CREATE TRIGGER jobs_history_updated AFTER UPDATE ON "{schema}".jobs '
        "REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs FOR EACH STATEMENT "
        f'EXECUTE FUNCTION "{schema}".record_job_history()'
    )


def downgrade() -> None:
    schema = revision_schema()
    op.execute(f'DROP TRIGGER IF EXISTS jobs_history_updated ON "{schema}".jobs')
    op.execute(f'DROP TRIGGER IF EXISTS jobs_history_inserted ON "{schema}".jobs')
    op.execute(f'DROP FUNCTION IF EXISTS "{schema}".record_job_history()')
    op.drop_index("job_events_job_idx", table_name="job_events", schema=schema)
    op.drop_table("job_events", schema=schema)
