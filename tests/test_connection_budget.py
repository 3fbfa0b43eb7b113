"""The connection budget (docs/howto/connections.md): what each role opens, counted on the
server (``pg_stat_activity`` of the test's own database, by ``application_name``), and where a
worker LISTENs (``App(listen_dsn=...)``, or not at all)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

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


def _plain(dsn: str) -> str:
    return make_url(dsn).set(drivername="postgresql").render_as_string(hide_password=False)


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
        await eventually(lambda: _backends(sql, name) == 4)  # started: claims, completer, pool
        loop = asyncio.get_running_loop()
        deferred = loop.time()
        await ping.defer_async()
        await asyncio.wait_for(ran.wait(), timeout=10)
        waited = loop.time() - deferred
        assert _listening(sql) == []
    # Found by the next poll: within the interval, plus a claim and the start.
    assert waited < 0.5 + 1.0


# -- an app that defers: within the engine's pool ---------------------------------------------


class _Peak:
    """The most backends of one application_name seen at once, sampled on a connection of
    its own (not counted: another application_name) while the load runs."""

    def __init__(self, dsn: str, name: str) -> None:
        self._dsn, self._name = dsn, name
        self.most = 0

    async def during(self, load: Awaitable[Any]) -> Any:
        conn = await asyncpg.connect(_plain(self._dsn))
        running = asyncio.ensure_future(load)
        try:
            while True:
                now = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = $1 AND backend_type = 'client backend'",
                    self._name,
                )
                self.most = max(self.most, now)
                if running.done():
                    return running.result()
                await asyncio.sleep(0.002)
        finally:
            await conn.close()


async def _defers_and_reads(app: pgtq.App, defers: int = 20, reads: int = 10) -> None:
    """Concurrent defers (the fast path) and job reads (SQLAlchemy's pooled path)."""

    @app.task(name="noop")
    def noop(n: int) -> None: ...

    first = await noop.defer_async(n=-1)
    await asyncio.gather(
        *(noop.defer_async(n=i) for i in range(defers)),
        *(app.jobs.get_async(first) for _ in range(reads)),
    )


def _sync_defers_and_reads(app: pgtq.App, defers: int = 20, reads: int = 10) -> Awaitable[Any]:
    @app.task(name="noop")
    def noop(n: int) -> None: ...

    first = noop.defer(n=-1)
    pool = ThreadPoolExecutor(defers + reads)
    loop = asyncio.get_running_loop()
    calls = [loop.run_in_executor(pool, lambda i=i: noop.defer(n=i)) for i in range(defers)]
    calls += [loop.run_in_executor(pool, app.jobs.get, first) for _ in range(reads)]

    async def all_done() -> None:
        try:
            await asyncio.gather(*calls)
        finally:
            pool.shutdown()

    return all_done()


def _users_async_engine(dsn: str, driver: str, name: str) -> AsyncEngine:
    """The user's AsyncEngine, pool_size=2 and no overflow, its backends named ``name``."""
    if driver == "asyncpg":
        url = make_url(dsn).set(drivername="postgresql+asyncpg")
        named = {"server_settings": {"application_name": name}}
        return create_async_engine(url, pool_size=2, max_overflow=0, connect_args=named)
    url = make_url(_named(dsn, name)).set(drivername="postgresql+psycopg")
    return create_async_engine(url, pool_size=2, max_overflow=0)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_defers_stay_within_the_users_pool(dsn: str, sql: Sql, driver: str) -> None:
    name = _name()
    engine = _users_async_engine(dsn, driver, name)
    app = pgtq.App(async_engine=engine)
    peak = _Peak(dsn, name)
    try:
        await peak.during(_defers_and_reads(app))
    finally:
        await app.close_async()
        await engine.dispose()
    assert 1 <= peak.most <= 2


async def test_sync_defers_stay_within_the_users_pool(dsn: str, sql: Sql) -> None:
    name = _name()
    url = make_url(_named(dsn, name)).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, pool_size=2, max_overflow=0)
    app = pgtq.App(engine=engine)
    peak = _Peak(dsn, name)
    try:
        await peak.during(_sync_defers_and_reads(app))
    finally:
        app.close()
        engine.dispose()
    assert 1 <= peak.most <= 2


@pytest.mark.parametrize("side", ["sync", "async"])
async def test_max_connections_bounds_an_app_that_defers(dsn: str, sql: Sql, side: str) -> None:
    name = _name()
    app = pgtq.App(_named(dsn, name), max_connections=3)
    peak = _Peak(dsn, name)
    try:
        load = _defers_and_reads(app) if side == "async" else _sync_defers_and_reads(app)
        await peak.during(load)
    finally:
        await app.close_async()
    assert 1 <= peak.most <= 3


# -- a worker: its own connections, plus its app's pool ---------------------------------------


async def test_an_idle_worker_holds_its_documented_connections(dsn: str, sql: Sql) -> None:
    """LISTEN 1 + claims 2 + completer 1, opened at start, plus the pool's one connection that
    its heartbeat and look-ups share (docs/howto/connections.md)."""
    from pgtq.claims import CLAIMS_IN_FLIGHT

    name = _name()
    app = pgtq.App(_named(dsn, name))
    async with _running(app):
        await eventually(lambda: _listening(sql) == [name])
        await eventually(lambda: _backends(sql, name) == 1 + CLAIMS_IN_FLIGHT + 1 + 1)


async def test_a_busy_worker_stays_within_its_budget(dsn: str, sql: Sql) -> None:
    """With max_connections=1 the worker's total is exact: 4 of its own + 1 in the pool, while
    jobs that defer jobs run, beat and complete."""
    name = _name()
    app = pgtq.App(_named(dsn, name), max_connections=1)

    @app.task(name="chain")
    async def chain(n: int) -> None:
        if n % 2 == 0:
            await chain.defer_async(n=n + 1)  # the fast path, inside the worker

    jobs = 200
    await chain.defer_many_async([{"n": i * 2} for i in range(jobs)])
    async with _running(app, concurrency=20, heartbeat_interval=0.05):
        await eventually(lambda: _backends(sql, name) == 5)
        peak = _Peak(dsn, name)

        async def all_run() -> None:
            await eventually(
                lambda: (
                    sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'")
                    == [(2 * jobs,)]
                ),
                timeout=60,
            )

        await peak.during(all_run())
    assert peak.most == 5
