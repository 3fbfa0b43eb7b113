"""Watchers: the done channel's NOTIFY only while somebody listens for it.

Revision ID: pgtq_0012
Revises: pgtq_0011
Create Date: 2026-12-03

A frozen snapshot, like every pgtq revision: the DDL is written out here, never imported.

- ``watchers (id, expires_at)``: one row per app side that LISTENs for the jobs that end
  (``app.jobs.wait`` and its kin, pgtq/watcher.py), written when its LISTEN comes up and
  kept alive while it lasts. The statements that end jobs announce them (the NOTIFY of
  ``<channel>_done``) only while a row has not expired: a NOTIFY costs its commit the
  server's notification queue (a lock, an entry, a signal to every listener), which a
  burn-down of jobs nobody waits for paid at every completion for nothing.
- Unlogged: nothing in it must survive a crash (a watcher writes its row again within its
  refresh interval, and its waiters re-check meanwhile), and its writes skip the WAL.

Additive: workers of the previous release never name it and announce every job that ends,
as before; a waiter hears them either way.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pgtq.migrations import revision_schema

revision: str = "pgtq_0012"
down_revision: str | Sequence[str] | None = "pgtq_0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
#: Rolling upgrades: additive, safe while workers of the previous release run.
phase = "pre"


def upgrade() -> None:
    op.create_table(
        "watchers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="watchers_pkey"),
        schema=revision_schema(),
        prefixes=["UNLOGGED"],
    )


def downgrade() -> None:
    op.drop_table("watchers", schema=revision_schema())
