"""The Django tests run the example project (examples/django_project) on a database of their
own: Django's settings are the project's, ``DATABASE_URL`` points them at a database made by
``make_database``, and ``manage.py migrate`` (Django's tables, the shop's, and pgtq's by
its Django migration) prepares it once per run."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL

from tests.conftest import libpq

pytest.importorskip("django")
if sys.version_info < (3, 12):  # Django 6's django.tasks needs 3.12: the backport here
    pytest.importorskip("django_tasks")

PROJECT = Path(__file__).resolve().parents[2] / "examples" / "django_project"

SQL = Callable[..., list[tuple[object, ...]]]


@pytest.fixture(scope="session")
def django_url(make_database: Callable[[], URL]) -> Iterator[URL]:
    """The project's database, migrated by ``manage.py migrate`` (in this process)."""
    import django
    from django.core.management import call_command
    from django.test.utils import setup_test_environment, teardown_test_environment

    url = make_database()
    os.environ["DATABASE_URL"] = url.render_as_string(hide_password=False)
    os.environ["DJANGO_SETTINGS_MODULE"] = "shop.settings"
    if str(PROJECT) not in sys.path:
        sys.path.insert(0, str(PROJECT))
    django.setup()
    setup_test_environment()  # the test client's response.context, locmem e-mail
    call_command("migrate", verbosity=0)
    yield url
    teardown_test_environment()
    from django.db import connections

    from pgtq.contrib.django.integration import reset_apps

    reset_apps()
    connections.close_all()


@pytest.fixture
def django_sql(django_url: URL) -> Callable[..., list[tuple[object, ...]]]:
    """Run SQL on the project's database, outside Django (what committed)."""

    def run(query: str, *params: object) -> list[tuple[object, ...]]:
        with psycopg.connect(libpq(django_url), autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    return run


@pytest.fixture
def project(django_url: URL, django_sql: SQL) -> URL:
    """The project's database with pgtq's tables and the orders emptied for this test."""
    django_sql(
        "TRUNCATE pgtq.jobs, pgtq.workers, pgtq.queues, pgtq.job_events, orders_order "
        "RESTART IDENTITY"
    )
    return django_url
