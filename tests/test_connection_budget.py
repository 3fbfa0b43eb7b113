"""The connection budget (docs/howto/connections.md): what each role opens, counted on the
server (``pg_stat_activity`` of the test's own database, by ``application_name``), and where a
worker LISTENs (``App(listen_dsn=...)``, or not at all)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

import pgtq
from tests.conftest import eventually

Sql = Callable[..., list[tuple[Any, ...]]]


def _named(dsn: str, name: str) -> str:
    """The DSN with an application_name, so the test counts only its own backends."""
    return (
        make_url(dsn)
        .update_query_dict({"application_name": name})
        .render_as_string(hide_password=False)
    )


def _name() -> str:
    return f"pgtq-budget-{uuid.uuid4().hex[:8]}"


def _backends(sql: Sql, name: str) -> int:
    return int(
        sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = %s AND backend_type = 'client backend'",
            name,
        )[0][0]
    )


def _listening(sql: Sql) -> list[str]:
    """The application_name of every backend of this database whose last statement was a
    LISTEN (a worker's LISTEN connection)."""
    return [
        row[0]
        for row in sql(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN%%'"
        )
    ]


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", True])
def test_max_connections_must_be_a_whole_number_of_at_least_one(bad: Any) -> None:
    with pytest.raises(pgtq.ConfigurationError, match="max_connections"):
        pgtq.App("postgresql://u@h/db", max_connections=bad)


def test_max_connections_needs_an_engine_pgtq_makes() -> None:
    url = "postgresql+psycopg://u@h/db"
    engine, async_engine = sa.create_engine(url), create_async_engine(url)
    with pytest.raises(pgtq.ConfigurationError, match="max_connections"):
        pgtq.App(engine=engine, async_engine=async_engine, max_connections=2)
    app = pgtq.App(async_engine=async_engine, max_connections=2)  # bounds the sync engine
    assert app.sync.engine.pool.size() == 2  # type: ignore[attr-defined]
    app.close()


@pytest.mark.parametrize("bad", ["", "mysql://u@h/db", "not a url", 5, True])
def test_listen_dsn_takes_a_postgresql_dsn_or_false(bad: Any) -> None:
    with pytest.raises(pgtq.ConfigurationError, match=r"listen_dsn|PostgreSQL|database URL"):
        pgtq.App("postgresql://u@h/db", listen_dsn=bad)


def test_listen_dsn_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGTQ_LISTEN_DSN", "postgresql://u@direct:5432/db")
    app = pgtq.App("postgresql://u@bouncer:6432/db")
    assert app.listens and app.listen_url is not None and app.listen_url.host == "direct"
    given = pgtq.App("postgresql://u@bouncer:6432/db", listen_dsn=False)
    assert not given.listens  # the parameter wins
    monkeypatch.setenv("PGTQ_LISTEN_DSN", "off")
    off = pgtq.App("postgresql://u@bouncer:6432/db")
    assert not off.listens and off.listen_url is None
    monkeypatch.delenv("PGTQ_LISTEN_DSN")
    default = pgtq.App("postgresql://u@bouncer:6432/db")
    assert default.listens and default.listen_url is None


# -- workers ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _running(app: pgtq.App, **options: Any) -> AsyncIterator[asyncio.Task[Any]]:
    worker = asyncio.create_task(app.run_worker_async(**options))
    try:
        yield worker
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        await app.close_async()


async def test_a_worker_listens_on_its_listen_dsn(dsn: str, sql: Sql) -> None:
    """The LISTEN backend is the listen DSN's (its application_name), and NOTIFYs still reach
    the worker there: a job is picked up long before the polling interval."""
    app = pgtq.App(_named(dsn, "pgtq-budget-app"), listen_dsn=_named(dsn, "pgtq-budget-listen"))
    ran = asyncio.Event()

    @app.task
    async def ping() -> None:
        ran.set()

    async with _running(app, fetch_job_polling_interval=60):
        await eventually(lambda: _listening(sql) == ["pgtq-budget-listen"])
        await ping.defer_async()
        await asyncio.wait_for(ran.wait(), timeout=10)


async def test_a_worker_that_does_not_listen_finds_jobs_by_polling(dsn: str, sql: Sql) -> None:
    name = _name()
    app = pgtq.App(_named(dsn, name), listen_dsn=False)
    ran = asyncio.Event()

    @app.task
    async def ping() -> None:
        ran.set()

    async with _running(app, fetch_job_polling_interval=0.5):
        await eventually(lambda: _backends(sql, name) >= 3)  # started: claims, completer
        loop = asyncio.get_running_loop()
        deferred = loop.time()
        await ping.defer_async()
        await asyncio.wait_for(ran.wait(), timeout=10)
        waited = loop.time() - deferred
        assert _listening(sql) == []
    # Found by the next poll: within the interval, plus a claim and the start.
    assert waited < 0.5 + 1.0
