"""The insert announces its jobs itself: the insert trigger goes.

Revision ID: pgtq_0006
Revises: pgtq_0005
Create Date: 2026-12-02

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.

Since this release, pgtq's inserts (``defer``, ``defer_many``, periodic ticks) send their
``pg_notify`` in the statement itself. The statement-level trigger with a transition table
that did it before cost ~60 µs of a ~400 µs single enqueue (the tuplestore, a PL/pgSQL call
and its query). Dropping it is a *post* step: an enqueuer of the previous release relies on it
to wake the workers (without it, its jobs are found by polling only, up to
``fetch_job_polling_interval`` late). While both run, a new enqueuer's jobs notify twice in
one transaction, which PostgreSQL folds into one.

Jobs inserted with plain SQL (not through pgtq) no longer wake the workers at once: send
``SELECT pg_notify('pgtq_<schema>', '<queue>')`` in the same transaction, or let polling
find them.
"""

from collections.abc import Sequence

from alembic import op

from pgtq.migrations import revision_schema

revision: str = "pgtq_0006"
down_revision: str | Sequence[str] | None = "pgtq_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: the previous release's enqueuers need the trigger, so apply this once
#: they are all gone.
phase = "post"

FUNCTION = """
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

TRIGGER = """
CREATE TRIGGER jobs_notify_inserted
AFTER INSERT ON {schema}.jobs
REFERENCING NEW TABLE AS new_jobs
FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_jobs_inserted()
"""


def upgrade() -> None:
    quoted = f'"{revision_schema()}"'
    op.execute(f"DROP TRIGGER IF EXISTS jobs_notify_inserted ON {quoted}.jobs")
    op.execute(f"DROP FUNCTION IF EXISTS {quoted}.notify_jobs_inserted()")


def downgrade() -> None:
    quoted = f'"{revision_schema()}"'
    op.execute(FUNCTION.format(schema=quoted))
    op.execute(TRIGGER.format(schema=quoted))
