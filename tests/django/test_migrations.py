"""pgtq's schema in Django's migration framework: ``manage.py migrate`` runs pgtq's Alembic
revisions (one source of truth) to head, ``sqlmigrate`` shows their SQL, and the standalone
``pgtq migrate`` before or after it finds nothing left to do."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from pgtq import migrations
from pgtq.connectors import sync_url
from tests.django.test_commands import manage

pytestmark = pytest.mark.timeout(120)


def revisions_at(url: URL) -> set[str]:
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return migrations.current(conn, "pgtq")
    finally:
        engine.dispose()


def test_manage_migrate_brings_pgtq_to_head(django_url: URL) -> None:
    assert revisions_at(django_url) == migrations.heads()


def test_sqlmigrate_shows_pgtqs_revisions(django_url: URL) -> None:
    shown = manage(django_url, "sqlmigrate", "pgtq", "0001")
    assert shown.returncode == 0, shown.stderr
    assert "Upgrade pgtq's schema to head" in shown.stdout
    assert "CREATE TABLE pgtq.jobs" in shown.stdout
    assert shown.stdout.count("CREATE TABLE") > 3


@pytest.mark.slow
def test_pgtq_migrate_then_manage_migrate(make_database: Callable[[], URL]) -> None:
    """The standalone ``pgtq migrate`` first (as an existing fleet has it), then Django's:
    the Django migration finds pgtq at head and records itself; both again change nothing.
    Then a later pgtq's revision, which Django's migration (run once per database) never
    saw, stood in for by a schema one revision behind: the next ``manage.py migrate``
    applies it."""
    url = make_database()
    first = manage(url, "pgtq", "migrate")
    assert first.returncode == 0, first.stderr
    assert revisions_at(url) == migrations.heads()
    django = manage(url, "migrate", "--noinput")
    assert django.returncode == 0, django.stderr
    assert "Applying pgtq.0001_pgtq_schema... OK" in django.stdout
    assert revisions_at(url) == migrations.heads()
    again = manage(url, "pgtq", "migrate")
    assert again.returncode == 0, again.stderr
    assert revisions_at(url) == migrations.heads()
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            migrations.downgrade(conn, "pgtq", "-1")
    finally:
        engine.dispose()
    assert revisions_at(url) != migrations.heads()
    later = manage(url, "migrate", "--noinput")
    assert later.returncode == 0, later.stderr
    assert "No migrations to apply" in later.stdout  # nothing new for Django itself
    assert revisions_at(url) == migrations.heads()
