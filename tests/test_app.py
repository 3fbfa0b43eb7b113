"""Setting up an App: DSN, engines, schema name, errors that say what to do."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import pgtq
from pgtq.connectors import async_url, sync_url
from tests.sides import Side


def test_urls_are_derived_for_each_side() -> None:
    assert sync_url("postgresql://u:p@h:5433/db").drivername == "postgresql+psycopg"
    assert async_url("postgresql://u:p@h:5433/db").drivername == "postgresql+asyncpg"
    assert async_url("postgresql+asyncpg://h/db").drivername == "postgresql+asyncpg"
    # A URL that names psycopg keeps psycopg on the async side too.
    assert async_url("postgresql+psycopg://h/db").drivername == "postgresql+psycopg"
    assert sync_url("postgresql+asyncpg://u:p@h/db").render_as_string(hide_password=False) == (
        "postgresql+psycopg://u:p@h/db"
    )
    with pytest.raises(pgtq.ConfigurationError, match="PostgreSQL"):
        sync_url("mysql://h/db")


@pytest.mark.parametrize("how", ["dsn", "engine", "async_engine", "both", "psycopg_async"])
async def test_every_way_to_build_an_app_defers_on_both_sides(how: str, dsn: str, sql: Any) -> None:
    engine = sa.create_engine(sync_url(dsn)) if how in ("engine", "both") else None
    aengine = None
    if how in ("async_engine", "both"):
        aengine = create_async_engine(async_url(dsn))
    if how == "psycopg_async":
        aengine = create_async_engine(async_url(sync_url(dsn)))
        assert aengine.url.drivername == "postgresql+psycopg"
    app = pgtq.App(dsn if how == "dsn" else None, engine=engine, async_engine=aengine)

    @app.task
    def noop(n: int) -> int:
        return n

    await noop.defer_async(n=1)
    noop.defer(n=2)
    stats = await app.run_worker_async(wait=False)
    assert stats.by_status["succeeded"] == 2
    await app.close_async()
    assert sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'") == [(2,)]
    # The user's engines are theirs: still usable after the app closed.
    if engine is not None:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT 1")) == 1
        engine.dispose()
    if aengine is not None:
        async with aengine.connect() as aconn:
            assert await aconn.scalar(sa.text("SELECT 1")) == 1
        await aengine.dispose()


async def test_context_managers_open_and_close(dsn: str) -> None:
    with pgtq.App(dsn) as app:
        assert app.jobs.get(1) is None
    async with pgtq.App(dsn) as app:
        assert await app.jobs.get_async(1) is None


@pytest.mark.parametrize("name", ["Bad-Name", "1abc", "pg_catalog", "a; drop", "x" * 64, ""])
def test_invalid_schema_names_are_refused(name: str) -> None:
    with pytest.raises(pgtq.ConfigurationError, match="invalid schema name"):
        pgtq.App("postgresql://localhost/x", schema=name)


async def test_custom_schema(side: Side, make_database: Any) -> None:
    app = pgtq.App(make_database(), schema="jobs_here")
    await side.migrate(app)

    @app.task
    def noop() -> str:
        return "ok"

    job_id = await side.defer(noop)
    await side.run_worker(app, wait=False)
    assert await side.wait(app, job_id) == "ok"
    await app.close_async()


async def test_unreachable_database_names_host_and_port(side: Side) -> None:
    app = pgtq.App("postgresql://postgres@127.0.0.1:1/nowhere", connect_timeout=2)

    @app.task
    def noop() -> None: ...

    with pytest.raises(pgtq.DatabaseUnreachable, match=r"127\.0\.0\.1:1/nowhere") as info:
        await side.defer(noop)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    await app.close_async()


async def test_unmigrated_database_says_to_migrate(side: Side, make_database: Any) -> None:
    app = pgtq.App(make_database())

    @app.task
    def noop() -> None: ...

    with pytest.raises(pgtq.SchemaNotMigrated, match="pgtq migrate"):
        await side.defer(noop)
    await app.close_async()


def test_no_database_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGTQ_DSN", raising=False)
    app = pgtq.App()
    with pytest.raises(pgtq.ConfigurationError, match="PGTQ_DSN"):
        app.jobs.get(1)


def test_dsn_from_the_environment(monkeypatch: pytest.MonkeyPatch, dsn: str) -> None:
    monkeypatch.setenv("PGTQ_DSN", dsn)
    with pgtq.App() as app:
        assert app.jobs.get(1) is None


def test_task_registration_errors() -> None:
    app = pgtq.App("postgresql://localhost/x")

    @app.task
    def same() -> None: ...

    with pytest.raises(pgtq.ConfigurationError, match="already registered"):
        app.task(name="same")(lambda: None)
    with pytest.raises(pgtq.ConfigurationError, match="reserved"):
        app.task(lambda connection: None)
    with pytest.raises(pgtq.UnknownTask, match="known tasks: same"):
        app.get_task("other")
    assert same() is None  # a task is still a plain callable


async def test_a_pooled_connection_killed_while_idle_is_replaced(
    side: Side, app: pgtq.App, sql: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection idle past PING_AFTER_IDLE is pinged on checkout; a dead one is replaced."""
    import pgtq.connectors

    monkeypatch.setattr(pgtq.connectors, "PING_AFTER_IDLE", 0.0)

    @app.task
    def noop() -> None: ...

    await side.defer(noop)
    killed = sql(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    assert killed[0][0] >= 1
    await side.defer(noop)
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(2,)]


async def test_without_prepared_statements_for_pgbouncer(side: Side, dsn: str) -> None:
    """prepared_statements=False: drivers never keep prepared statements; everything works."""
    app = pgtq.App(dsn, prepared_statements=False)

    @app.task
    async def echo(n: int) -> int:
        return n

    job_id = await side.defer(echo, n=5)
    await side.run_worker(app, wait=False)
    assert await side.wait(app, job_id) == 5
    with app.sync.engine.connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold is None  # type: ignore[union-attr]
    async with app.async_connector().engine.connect() as aconn:
        raw = await aconn.get_raw_connection()
        assert raw.driver_connection._stmt_cache.get_max_size() == 0  # type: ignore[union-attr]
    await app.close_async()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "expected"), [(None, True), ("off", False), ("OFF", False), ("0", False), ("on", True)]
)
def test_prepared_statements_come_from_the_environment_when_not_given(
    env: str | None, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PGTQ_PREPARED_STATEMENTS``: every ``pgtq`` command given only a DSN works behind
    PgBouncer in transaction mode (tests/test_pgbouncer.py runs one); the parameter wins."""
    if env is None:
        monkeypatch.delenv("PGTQ_PREPARED_STATEMENTS", raising=False)
    else:
        monkeypatch.setenv("PGTQ_PREPARED_STATEMENTS", env)
    assert pgtq.App("postgresql://localhost/x").prepared_statements is expected
    given = pgtq.App("postgresql://localhost/x", prepared_statements=True)
    assert given.prepared_statements is True


@pytest.mark.unit
def test_a_bad_prepared_statements_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGTQ_PREPARED_STATEMENTS", "maybe")
    with pytest.raises(pgtq.ConfigurationError, match="PGTQ_PREPARED_STATEMENTS takes on or off"):
        pgtq.App("postgresql://localhost/x")
    with pytest.raises(pgtq.ConfigurationError, match="prepared_statements takes True or False"):
        pgtq.App("postgresql://localhost/x", prepared_statements="no")  # type: ignore[arg-type]


@pytest.mark.unit
def test_behind_a_transaction_pooler_workers_listen_only_on_a_listen_dsn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``prepared_statements=False`` (PgBouncer in transaction mode): no LISTEN on the app's
    DSN, where it never delivers; the workers poll, or LISTEN on ``listen_dsn``."""
    monkeypatch.delenv("PGTQ_LISTEN_DSN", raising=False)
    dsn = "postgresql://localhost:6432/x"
    assert pgtq.App(dsn).listens is True
    assert pgtq.App(dsn, prepared_statements=False).listens is False
    direct = pgtq.App(dsn, prepared_statements=False, listen_dsn="postgresql://localhost/x")
    assert direct.listens is True and direct.listen_url is not None
    monkeypatch.setenv("PGTQ_LISTEN_DSN", "postgresql://localhost/x")
    assert pgtq.App(dsn, prepared_statements=False).listens is True
