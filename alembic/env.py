"""Alembic's entry point for pgtq's own revisions.

``pgtq.migrations`` runs it (``pgtq migrate``, ``App.migrate``) with the connection and schema
in ``config.attributes``; a developer writing a new revision runs it through
``alembic -c alembic/alembic.ini ...`` with ``PGTQ_DSN`` set. The logic lives in
``pgtq.migrations.run_env`` so that it is typed and tested. A user's own Alembic project never
runs this file: it only borrows the ``versions/`` directory beside it.
"""

from pgtq.migrations import run_env

run_env()
