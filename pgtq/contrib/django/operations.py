"""The migration operation that brings pgtq's schema to head with pgtq's Alembic revisions.

One source of truth: the Django migration does not copy pgtq's DDL, it runs the revisions
``pgtq migrate`` runs, with pgtq's own version table (``pgtq.alembic_version``) and its
advisory lock. So ``manage.py migrate`` and ``pgtq migrate`` may run in either order, or at
once: whichever comes second finds the schema at head and does nothing.
``manage.py sqlmigrate pgtq 0001`` prints the upgrade from an empty schema (Alembic's
offline SQL, what ``pgtq migrate --sql`` prints).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from django.db.migrations.operations.base import Operation

from pgtq import migrations
from pgtq.connectors import sync_url
from pgtq.contrib.django.integration import pgtq_settings, url_of
from pgtq.schema import DEFAULT_SCHEMA


def upgrade_pgtq(connection: Any) -> None:
    """Bring pgtq's schema to head on ``connection``'s database (a Django connection), if it
    is pgtq's (``PGTQ["DATABASE"]``); a schema at head costs one query."""
    conf = pgtq_settings()
    if connection.alias != (conf.get("DATABASE") or "default"):
        return
    schema = conf.get("SCHEMA") or DEFAULT_SCHEMA
    url = conf.get("DSN") or url_of(connection.settings_dict, connection.alias)
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            migrations.upgrade(conn, schema)
    finally:
        engine.dispose()


def after_migrate(sender: Any, using: str = "default", **kwargs: Any) -> None:
    """``post_migrate``: a later pgtq brings revisions the Django migration (run once per
    database) never saw; every ``manage.py migrate`` brings pgtq to head."""
    from django.db import connections

    upgrade_pgtq(connections[using])


class MigratePgtq(Operation):
    """Upgrade pgtq's schema to the revisions this pgtq ships, on the database being migrated
    when it is pgtq's (``PGTQ["DATABASE"]``, default ``"default"``).

    It runs on a connection of its own and commits there (pgtq's revisions take their own
    lock and version table), so a migration holding it is not atomic. Backwards it does
    nothing: dropping pgtq's jobs is never a side effect (``pgtq migrate`` has no downgrade
    either; ``pgtq.migrations.downgrade`` does it on purpose)."""

    reversible = True
    reduces_to_sql = True
    atomic = False

    def state_forwards(self, app_label: str, state: Any) -> None:
        """No Django model state: pgtq's models are unmanaged views of its tables."""

    def database_forwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        conf = pgtq_settings()
        connection = schema_editor.connection
        if connection.alias != (conf.get("DATABASE") or "default"):
            return
        schema = conf.get("SCHEMA") or DEFAULT_SCHEMA
        if schema_editor.collect_sql:  # sqlmigrate: the script, not run
            schema_editor.collected_sql.append(migrations.sql(schema))
            return
        upgrade_pgtq(connection)

    def database_backwards(
        self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any
    ) -> None:
        """Leave pgtq's tables (see the class's documentation)."""

    def describe(self) -> str:
        return "Upgrade pgtq's schema to head (pgtq's Alembic revisions)"

    @property
    def migration_name_fragment(self) -> str:
        return "pgtq_schema"


__all__ = ["MigratePgtq", "after_migrate", "upgrade_pgtq"]
