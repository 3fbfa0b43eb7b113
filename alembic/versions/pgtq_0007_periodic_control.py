"""Periodic control: the run-time state of each periodic schedule (paused, resumed, run now).

Revision ID: pgtq_0007
Revises: pgtq_0006
Create Date: 2026-12-03

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.

Schedules live in code (``@app.periodic``); what an operator decides at run time (``pgtq
periodic pause``, ``resume``, ``run-now``) has to hold for every scheduler of the fleet, so it
lives in the database, one row per schedule, keyed like ``periodic_ticks``. ``resumed_at``
is what keeps a resumed schedule from deferring the ticks it skipped while paused (a
scheduler that restarts looks back ``max_delay``). Additive only: a new table that workers of
the previous release never read, so they keep running while it rolls out (their schedulers
do not know about pauses until they are replaced).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pgtq.migrations import revision_schema

revision: str = "pgtq_0007"
down_revision: str | Sequence[str] | None = "pgtq_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"


def upgrade() -> None:
    op.create_table(
        "periodic_schedules",
        sa.Column("task_name", sa.Text(), nullable=False),
        sa.Column("periodic_id", sa.Text(), server_default="", nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_now_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_now_job_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("task_name", "periodic_id", name="periodic_schedules_pkey"),
        schema=revision_schema(),
    )


def downgrade() -> None:
    op.drop_table("periodic_schedules", schema=revision_schema())
