"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

A frozen snapshot: write the DDL out here, never import pgtq.schema's tables. Build objects in
revision_schema() (pass schema=schema; quote it in raw SQL), never in a literal 'pgtq'. Add
first, remove later: workers of the previous release must keep working on the new schema.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pgtq.migrations import revision_schema
${imports if imports else ""}
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}
#: Rolling upgrades (docs/deployment.md): "pre" if additive, so workers of the previous release
#: keep working; "post" if it removes or changes what the previous release uses.
phase = "pre"


def upgrade() -> None:
    schema = revision_schema()
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    schema = revision_schema()
    ${downgrades if downgrades else "pass"}
