"""The application's own tables (what its Alembic revisions create beside pgtq's)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("email", sa.Text, nullable=False),
    # The job that sends the confirmation: deferred in the same transaction as the order.
    sa.Column("confirmation_job_id", sa.BigInteger, nullable=True),
)
