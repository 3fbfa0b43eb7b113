"""Workflows: job dependencies, a ``blocked`` status, and what releases a blocked job.

Revision ID: pgtq_0011
Revises: pgtq_0010
Create Date: 2026-12-03

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.

- ``blocked``, a new status: a job waiting for its parents. The status CHECK constraint is
  swapped, not altered: the new one is added ``NOT VALID`` (no scan, a short lock), then
  validated (a scan under a lock that lets reads and writes go on), then the old one is
  dropped and the new one takes its name.
- ``job_dependencies (child_id, parent_id, on_parent_failure)``: one row per edge (its
  primary key leads with the parent: a finishing parent finds its children by index; a
  second index finds a child's parents). An edges table, not an array column: fan-in and
  fan-out of any width cost one small row per edge, and both directions are an index read.
- ``jobs.pending_parents``: on a child, how many parents have not settled yet; the statement
  that settles a parent decrements it and releases the child (``blocked → todo``) at 0, so
  a fan-in of n parents costs one row update per parent, never a recount.
- ``jobs.children``: on a parent, how many edges name it (NULL on every other job): the
  completion statement the worker runs for jobs without children refuses a row where it is
  set (the worker then writes that job with the variant that settles its children), so a job
  with no dependency pays one NULL test. A completion that began before a child of its job
  was added sees more ``children`` than edges, and calls ``workflow_retry`` (SQLSTATE 40001:
  the worker writes it again, and then sees the edge).
- ``jobs.failed_parents``: on a batch's ``on_failure`` callback, how many parents ended
  badly so far (its ``failure`` edges settle whatever the end; it runs only if one failed).
- ``jobs_blocked_idx``: the blocked jobs per queue (partial: no other job is in it), so the
  controls that take blocked jobs (cancel, abort, a list by status) never scan the table.
- ``jobs.workflow_id``: the workflow a job belongs to (``jobs.list(workflow=...)``), with a
  partial index over the jobs that have one.
- The history: a release (``blocked → todo``) is no retry: ``record_job_history`` skips it,
  and ``job_history`` shows neither a start nor an end for a blocked job.

Old workers during a rolling upgrade: they claim ``status = 'todo'`` only (their claim
indexes are partial on it), so they never take a blocked job; their completion statement
does not know ``children`` and writes a parent without settling its children: a workflow
whose parent an old worker finishes waits (a blocked child) until ``pgtq migrate`` finished
and the new workers run; ``app.jobs.retry`` of that parent, or re-deferring, resumes it. Run
workflows once the old workers are gone.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pgtq.migrations import revision_schema

revision: str = "pgtq_0011"
down_revision: str | Sequence[str] | None = "pgtq_0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"

STATUSES = "'todo', 'doing', 'succeeded', 'failed', 'cancelled', 'aborted'"

RETRY_FUNCTION = """
CREATE OR REPLACE FUNCTION "{schema}".workflow_retry(missed bigint) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    IF missed > 0 THEN
        RAISE EXCEPTION 'pgtq: % child job(s) were added while their parent completed: '
            'write the completion again', missed USING ERRCODE = '40001';
    END IF;
    RETURN 0;
END;
$$
"""

# pgtq_0008's function with one case first: a release from ``blocked`` is no retry.
HISTORY_FUNCTION = """
CREATE OR REPLACE FUNCTION "{schema}".record_job_history() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'blocked' THEN
        RETURN NULL;
    ELSIF OLD.status = 'doing' THEN
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
BLOCKED_CASE = """    IF OLD.status = 'blocked' THEN
        RETURN NULL;
    ELSIF OLD.status = 'doing' THEN"""
PREVIOUS_HISTORY_FUNCTION = HISTORY_FUNCTION.replace(
    BLOCKED_CASE, "    IF OLD.status = 'doing' THEN"
)
assert PREVIOUS_HISTORY_FUNCTION != HISTORY_FUNCTION

VIEW = """
CREATE OR REPLACE VIEW "{schema}".job_history AS
SELECT e.job_id, e.type, e.at, e.attempt, e.worker_id, e.error,
       CASE e.type WHEN 'deferred' THEN 0 WHEN 'started' THEN 1 ELSE 2 END AS rank,
       e.id AS seq
FROM "{schema}".job_events AS e
UNION ALL
SELECT j.id, x.type, x.at, x.attempt, x.worker_id, x.error, x.rank, 0
FROM "{schema}".jobs AS j
CROSS JOIN LATERAL (
    VALUES ('deferred', j.created_at, 0, NULL::text, NULL::jsonb, 0),
           ('started', coalesce(j.started_at, j.finished_at, j.created_at), j.attempts,
            j.worker_id, NULL::jsonb, 1),
           (j.status, j.finished_at, j.attempts, j.worker_id,
            CASE WHEN j.status IN ('failed', 'aborted') THEN j.error END, 2)
) AS x (type, at, attempt, worker_id, error, rank)
WHERE CASE x.rank
          WHEN 0 THEN true
          WHEN 1 THEN j.status NOT IN ('todo', 'cancelled'{extra})
          ELSE j.status NOT IN ('todo', 'doing'{extra})
      END
  AND NOT EXISTS (
      SELECT FROM "{schema}".job_events AS d WHERE d.job_id = j.id AND d.type = 'deferred'
  )
"""


def _swap_status_check(schema: str, statuses: str) -> None:
    """Replace the status CHECK: add the new one NOT VALID, validate it, drop the old."""
    table = f'"{schema}".jobs'
    op.execute(
        f"ALTER TABLE {table} ADD CONSTRAINT jobs_status_check_new "
        f"CHECK (status IN ({statuses})) NOT VALID"
    )
    op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT jobs_status_check_new")
    op.execute(f"ALTER TABLE {table} DROP CONSTRAINT jobs_status_check")
    op.execute(f"ALTER TABLE {table} RENAME CONSTRAINT jobs_status_check_new TO jobs_status_check")


def upgrade() -> None:
    schema = revision_schema()
    _swap_status_check(schema, STATUSES + ", 'blocked'")
    for name, kind in (
        ("pending_parents", sa.Integer()),
        ("children", sa.Integer()),
        ("workflow_id", sa.BigInteger()),
        ("failed_parents", sa.Integer()),
    ):
        op.add_column("jobs", sa.Column(name, kind, nullable=True), schema=schema)
    op.create_index(
        "jobs_blocked_idx",
        "jobs",
        ["queue"],
        schema=schema,
        postgresql_where=sa.text("status = 'blocked'"),
    )
    op.create_index(
        "jobs_workflow_idx",
        "jobs",
        ["workflow_id"],
        schema=schema,
        postgresql_where=sa.text("workflow_id IS NOT NULL"),
    )
    op.create_table(
        "job_dependencies",
        sa.Column("parent_id", sa.BigInteger(), nullable=False),
        sa.Column("child_id", sa.BigInteger(), nullable=False),
        sa.Column("on_parent_failure", sa.Text(), nullable=False, server_default="cancel"),
        sa.PrimaryKeyConstraint("parent_id", "child_id", name="job_dependencies_pkey"),
        sa.CheckConstraint(
            "on_parent_failure IN ('cancel', 'run', 'hold', 'failure')",
            name="job_dependencies_on_parent_failure_check",
        ),
        schema=schema,
    )
    op.create_index("job_dependencies_child_idx", "job_dependencies", ["child_id"], schema=schema)
    op.execute(RETRY_FUNCTION.format(schema=schema))
    op.execute(HISTORY_FUNCTION.format(schema=schema))
    op.execute(VIEW.format(schema=schema, extra=", 'blocked'"))


def downgrade() -> None:
    schema = revision_schema()
    op.execute(VIEW.format(schema=schema, extra=""))
    op.execute(PREVIOUS_HISTORY_FUNCTION.format(schema=schema))
    op.execute(f'DROP FUNCTION "{schema}".workflow_retry(bigint)')
    op.drop_index("job_dependencies_child_idx", table_name="job_dependencies", schema=schema)
    op.drop_table("job_dependencies", schema=schema)
    op.drop_index("jobs_workflow_idx", table_name="jobs", schema=schema)
    op.drop_index("jobs_blocked_idx", table_name="jobs", schema=schema)
    for name in ("failed_parents", "workflow_id", "children", "pending_parents"):
        op.drop_column("jobs", name, schema=schema)
    # Blocked jobs cannot stay: they go back to what an old pgtq knows, cancelled.
    op.execute(
        f"UPDATE \"{schema}\".jobs SET status = 'cancelled', finished_at = now() "
        "WHERE status = 'blocked'"
    )
    _swap_status_check(schema, STATUSES)
