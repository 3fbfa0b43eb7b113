"""Fixtures: a real PostgreSQL, a fresh database per test run, and the sync/async ``side``.

The server is found in this order: ``PGTQ_TEST_DSN`` (a server URL whose user may create
databases), PostgreSQL on 127.0.0.1:5432, else an embedded one from ``pgserver`` started in a
temporary directory (``PGTQ_TEST_SERVER=embedded`` forces that, to check the fallback). Each
run creates its own databases and drops them at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import URL, make_url

import pgtq
from pgtq.statements import Announcement, parse_announcement

pytest_plugins = ["tests.sides", "tests.pgbouncer"]


#: The fixtures that reach PostgreSQL (each one depends on ``server_url``): a test marked
#: ``unit`` may use none of them, so ``nox -s unit`` runs with no server at all.
DATABASE_FIXTURES = frozenset(
    {"server_url", "make_database", "migrated_url", "dsn", "sql", "app", "notifications"}
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a ``unit`` test that asks for a database fixture, before the fixture connects."""
    if item.get_closest_marker("unit") is None:
        return
    used = DATABASE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if used:
        pytest.fail(
            f"{item.nodeid} is marked unit but uses the database fixture(s) {sorted(used)}: "
            "drop the marker or the fixture",
            pytrace=False,
        )


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _libpq(url: URL) -> str:
    """A libpq connection string for psycopg (handles unix-socket URLs from pgserver)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url() -> Iterator[URL]:
    """A URL of the server's maintenance database (``postgres``)."""
    env = os.environ.get("PGTQ_TEST_DSN")
    if env:
        yield make_url(env).set(drivername="postgresql")
        return
    if os.environ.get("PGTQ_TEST_SERVER") != "embedded" and _reachable("127.0.0.1", 5432):
        yield make_url("postgresql://postgres@127.0.0.1:5432/postgres")
        return
    pgserver = pytest.importorskip("pgserver", reason="no PostgreSQL server and no pgserver")
    datadir = tempfile.mkdtemp(prefix="pgtq-test-pg-")
    server = pgserver.get_server(datadir, cleanup_mode="stop")
    try:
        yield make_url(server.get_uri()).set(drivername="postgresql")
    finally:
        server.cleanup()
        shutil.rmtree(datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def make_database(server_url: URL) -> Iterator[Callable[[], URL]]:
    """Create a fresh, empty database; all are dropped when the run ends."""
    created: list[str] = []

    def make() -> URL:
        name = f"pgtq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return server_url.set(database=name)

    yield make
    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def migrated_url(make_database: Callable[[], URL]) -> URL:
    """One database for the run, migrated once; tests share it and empty the tables."""
    url = make_database()
    app = pgtq.App(url)
    app.migrate()
    app.close()
    return url


@pytest.fixture
def dsn(migrated_url: URL) -> str:
    """The test database's URL, with pgtq's tables emptied for this test."""
    with psycopg.connect(_libpq(migrated_url), autocommit=True) as conn:
        conn.execute(
            "TRUNCATE pgtq.jobs, pgtq.workers, pgtq.queues, pgtq.job_events, pgtq.periodic_ticks, "
            "pgtq.periodic_schedules, "
            "pgtq.limit_buckets, pgtq.job_dependencies RESTART IDENTITY"
        )
    return migrated_url.render_as_string(hide_password=False)


@pytest.fixture
def sql(migrated_url: URL) -> Iterator[Callable[..., list[tuple[Any, ...]]]]:
    """Run SQL on the test database outside pgtq, to check what is really stored."""
    conn = psycopg.connect(_libpq(migrated_url), autocommit=True)

    def run(query: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []

    yield run
    conn.close()


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[pgtq.App]:
    application = pgtq.App(dsn)
    yield application
    await application.close_async()


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 10.0
) -> None:
    """Poll ``check`` until it is true, failing after ``timeout`` seconds (never a bare sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    delay = 0.01
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def libpq(url: URL | str) -> str:
    return _libpq(make_url(url))


def user_env(**settings: str) -> dict[str, str]:
    """The environment of a user's shell, for a subprocess: this one less the checkout's
    (PYTHONPATH, an active virtualenv, pgtq's settings), this interpreter's directory first on
    PATH (its ``python`` and ``pgtq``), plus ``settings`` (e.g. ``PGTQ_DSN=...``)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PGTQ_")
    }
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return {**env, **settings}


class Notifications:
    """A LISTEN on the jobs' channel. ``until_marker()`` defers a marker job (queue
    ``marker``) and returns the payloads that arrived before its own: notifications come in
    commit order, so what is not there by then was never sent (no sleep, no timeout guess)."""

    def __init__(self, dsn: str, channel: str, marker: pgtq.Task[..., Any]) -> None:
        self.conn = psycopg.connect(_libpq(make_url(dsn)), autocommit=True)
        self.conn.execute(f'LISTEN "{channel}"')
        self.marker = marker

    async def until_marker(self) -> list[Announcement]:
        await self.marker.defer_async()

        def read() -> list[Announcement]:
            seen: list[Announcement] = []
            for n in self.conn.notifies(timeout=10):
                heard = parse_announcement(n.payload)
                if heard.queue == "marker":
                    return seen
                seen.append(heard)
            raise AssertionError(f"the marker's NOTIFY did not come (got {seen})")

        return await asyncio.to_thread(read)

    async def queues_until_marker(self) -> list[str]:
        return [heard.queue for heard in await self.until_marker()]


@pytest.fixture
def notifications(app: pgtq.App, dsn: str) -> Iterator[Notifications]:
    @app.task(queue="marker")
    def marker() -> None: ...

    listening = Notifications(dsn, app.statements.channel, marker)
    yield listening
    listening.conn.close()
