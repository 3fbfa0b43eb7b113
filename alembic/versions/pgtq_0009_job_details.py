"""Job details: tags, metadata, progress, and a job's own timeout and attempt budget.

Revision ID: pgtq_0009
Revises: pgtq_0008
Create Date: 2026-12-03

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.

- ``tags`` (text[]) and ``meta`` (jsonb): what ``configure(tags=..., meta=...)`` gives a job,
  for people and filters (``jobs.list(tags=...)``, the bulk operations); pgtq never reads
  them. A GIN index over the tagged jobs serves the tag filters; jobs without tags are not
  in it, so it costs a plain defer nothing.
- ``progress`` (jsonb, ``{"fraction": ..., "message": ...}``): what a running task reported
  last with ``ctx.set_progress``, written by the worker's completer.
- ``timeout`` (seconds) and ``max_attempts``: ``configure(timeout=..., max_attempts=...)``,
  which override the task's for this job; NULL keeps the task's.

Additive: every column is nullable without a default (no table rewrite), and workers of the
previous release never name them. The index is built with the table locked for writes: on
a table of millions of jobs, untagged rows are skipped but still read once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from pgtq.migrations import revision_schema

revision: str = "pgtq_0009"
down_revision: str | Sequence[str] | None = "pgtq_0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"


def upgrade() -> None:
    schema = revision_schema()
    for name, kind in (
        ("tags", postgresql.ARRAY(sa.Text())),
        ("meta", postgresql.JSONB()),
        ("progress", postgresql.JSONB()),
        ("timeout", sa.Float()),
        ("max_attempts", sa.Integer()),
    ):
        op.add_column("jobs", sa.Column(name, kind, nullable=True), schema=schema)
    op.create_index(
        "jobs_tags_idx",
        "jobs",
        ["tags"],
        schema=schema,
        postgresql_using="gin",
        postgresql_where=sa.text("tags IS NOT NULL"),
    )


def downgrade() -> None:
    schema = revision_schema()
    op.drop_index("jobs_tags_idx", table_name="jobs", schema=schema)
    for name in ("max_attempts", "timeout", "progress", "meta", "tags"):
        op.drop_column("jobs", name, schema=schema)
