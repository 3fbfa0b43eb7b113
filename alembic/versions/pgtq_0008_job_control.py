"""Job control: a job counts the times its task said "not yet" (``raise pgtq.Snooze``) and
its history names them; a key can be unique per period (``configure(unique_for=...)``).

Revision ID: pgtq_0008
Revises: pgtq_0007
Create Date: 2026-12-03

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.

A snooze sends the job back to ``todo`` with its attempt given back, like a release; the new
``snoozes`` column counts them (a job snoozes at most ``pgtq.model.MAX_SNOOZES`` times) and
tells the history trigger to record ``snoozed`` rather than ``released``.

``unique_key`` holds a ``queueing_lock`` with the period it was deferred in
(``<key>@<period number>``); its unique index keeps one job per key and period, whatever
the job's status but failed, cancelled or aborted. The index is built with the table locked
for writes (it is empty, but the build reads the table once): seconds on a table of millions
of jobs, during which defers wait.

Additive: workers of the previous release never read the columns, and the trigger's other
cases are unchanged.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pgtq.migrations import revision_schema

revision: str = "pgtq_0008"
down_revision: str | Sequence[str] | None = "pgtq_0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"

# pgtq_0005's function with one case first: a snooze (the count went up) is ``snoozed``.
FUNCTION = """
CREATE OR REPLACE FUNCTION "{schema}".record_job_history() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'doing' THEN
        INSERT INTO "{schema}".job_events (job_id, type, at, attempt, worker_id, error)
        VALUES (OLD.id, 'started', coalesce(OLD.started_at, clock_timestamp()), OLD.attempts,
                OLD.worker_id, NULL),
               (NEW.id,
                CASE WHEN NEW.snoozes > OLD.snoozes THEN 'snoozed'
                     WHEN NEW.attempts < OLD.attempts THEN 'released'
                     WHEN NEW.error ->> 'type' = 'WorkerLostError' THEN 'rescued'
                     ELSE 'retried' END,
                clock_timestamp(), NEW.attempts, OLD.worker_id, NEW.error);
    ELSE
        -- a manual retry of an ended job: its last attempt (if it ran), its end, the retry
        INSERT INTO "{schema}".job_events (job_id, type, at, attempt, worker_id, error)
        SELECT OLD.id, 'started', coalesce(OLD.started_at, OLD.finished_at), OLD.attempts,
               OLD.worker_id, NULL
        WHERE OLD.status <> 'cancelled' AND OLD.attempts > 0
        UNION ALL
        SELECT OLD.id, OLD.status, coalesce(OLD.finished_at, clock_timestamp()), OLD.attempts,
               OLD.worker_id,
               CASE WHEN OLD.status IN ('failed', 'aborted') THEN OLD.error END
        UNION ALL
        SELECT NEW.id, 'retried', clock_timestamp(), NEW.attempts, NULL, NULL;
    END IF;
    RETURN NULL;
END;
$$
"""

SNOOZE_CASE = "WHEN NEW.snoozes > OLD.snoozes THEN 'snoozed'\n                     "
#: pgtq_0005's function, for the downgrade: the same without the snooze case.
PREVIOUS_FUNCTION = FUNCTION.replace(SNOOZE_CASE, "")
assert PREVIOUS_FUNCTION != FUNCTION


def upgrade() -> None:
    schema = revision_schema()
    op.add_column(
        "jobs",
        sa.Column("snoozes", sa.Integer(), server_default="0", nullable=False),
        schema=schema,
    )
    op.execute(FUNCTION.format(schema=schema))
    op.add_column("jobs", sa.Column("unique_key", sa.Text(), nullable=True), schema=schema)
    op.create_index(
        "jobs_unique_key_idx",
        "jobs",
        ["unique_key"],
        unique=True,
        schema=schema,
        postgresql_where=sa.text(
            "unique_key IS NOT NULL AND status NOT IN ('failed', 'cancelled', 'aborted')"
        ),
    )


def downgrade() -> None:
    schema = revision_schema()
    op.drop_index("jobs_unique_key_idx", table_name="jobs", schema=schema)
    op.drop_column("jobs", "unique_key", schema=schema)
    op.execute(PREVIOUS_FUNCTION.format(schema=schema))
    op.drop_column("jobs", "snoozes", schema=schema)
