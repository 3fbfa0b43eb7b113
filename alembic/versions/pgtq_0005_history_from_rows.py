"""History read from the rows: the hot path writes no event at all.

Revision ID: pgtq_0005
Revises: pgtq_0004
Create Date: 2026-11-23

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.

pgtq_0003 wrote one ``job_events`` row per status change: three rows per job on the way
``deferred → started → succeeded``, a quarter of a burn-down's time. But a job's row already
tells its current attempt (``created_at``, ``started_at``, ``finished_at``, ``status``,
``attempts``, ``worker_id``, ``error``). Only what the row is about to forget is stored now: when
an attempt ends in a return to ``todo`` (retried, released, rescued, or a manual retry of an
ended job), a row-level trigger whose ``WHEN`` is false on every other update stores that
attempt's ``started`` and its end. The ``job_history`` view merges the stored events with the
ones read off the row. Jobs that already have a stored ``deferred`` event (written by
pgtq_0003, or by a worker deleting the jobs it completes) are shown from their stored events
only. Safe while workers of the previous release run: they write jobs the same way, and the
triggers see every write.
"""

from collections.abc import Sequence

from alembic import op

from pgtq.migrations import revision_schema

revision: str = "pgtq_0005"
down_revision: str | Sequence[str] | None = "pgtq_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: safe while workers of the previous release run.
phase = "pre"

# Row level, fired only when a job goes back to ``todo`` (its WHEN is checked in C, no call
# otherwise). OLD still holds the attempt that ends: store its start and its end.
FUNCTION = """
CREATE OR REPLACE FUNCTION "{schema}".record_job_history() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'doing' THEN
        INSERT INTO "{schema}".job_events (job_id, type, at, attempt, worker_id, error)
        VALUES (OLD.id, 'started', coalesce(OLD.started_at, clock_timestamp()), OLD.attempts,
                OLD.worker_id, NULL),
               (NEW.id,
                CASE WHEN NEW.attempts < OLD.attempts THEN 'released'
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

TRIGGER = """
CREATE TRIGGER jobs_history_updated AFTER UPDATE ON "{schema}".jobs
FOR EACH ROW WHEN (NEW.status = 'todo' AND OLD.status <> 'todo')
EXECUTE FUNCTION "{schema}".record_job_history()
"""

# ``rank`` orders events of the same instant: deferred, started, then the rest.
VIEW = """
CREATE VIEW "{schema}".job_history AS
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
          WHEN 1 THEN j.status NOT IN ('todo', 'cancelled')
          ELSE j.status NOT IN ('todo', 'doing')
      END
  AND NOT EXISTS (
      SELECT FROM "{schema}".job_events AS d WHERE d.job_id = j.id AND d.type = 'deferred'
  )
"""

# pgtq_0003's statement-level versions, for the downgrade.
OLD_FUNCTION = """
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
    op.execute(f'DROP TRIGGER IF EXISTS jobs_history_inserted ON "{schema}".jobs')
    op.execute(f'DROP TRIGGER IF EXISTS jobs_history_updated ON "{schema}".jobs')
    op.execute(FUNCTION.format(schema=schema))
    op.execute(TRIGGER.format(schema=schema))
    op.execute(VIEW.format(schema=schema))


def downgrade() -> None:
    schema = revision_schema()
    op.execute(f'DROP VIEW IF EXISTS "{schema}".job_history')
    op.execute(f'DROP TRIGGER IF EXISTS jobs_history_updated ON "{schema}".jobs')
    op.execute(OLD_FUNCTION.format(schema=schema))
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
