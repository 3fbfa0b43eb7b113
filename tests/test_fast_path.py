"""The driver fast path's contract: mappers take positional rows on every path (typed, checked
by mypy), counts come from ``RETURNING``, and a dedicated connection runs only queries with a
driver form, whatever the driver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

import pgtq
from pgtq import statements
from pgtq.connectors import DedicatedConnection
from pgtq.fastpath import NoDriverForm
from tests.mypy_check import TYPING, errors_without_ignores, mypy

ROOT = Path(__file__).resolve().parent.parent

ASYNC_DRIVERS = {"asyncpg": "postgresql+asyncpg", "psycopg-async": "postgresql+psycopg"}


@pytest.fixture(params=list(ASYNC_DRIVERS))
async def driver_app(dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[pgtq.App]:
    url = make_url(dsn).set(drivername=ASYNC_DRIVERS[request.param])
    app = pgtq.App(url.render_as_string(hide_password=False))
    yield app
    await app.close_async()


@pytest.fixture
async def dedicated(driver_app: pgtq.App) -> AsyncIterator[DedicatedConnection]:
    conn = await driver_app.async_connector().dedicated()
    yield conn
    await conn.close()


async def test_a_dedicated_connection_refuses_a_query_without_a_driver_form(
    driver_app: pgtq.App, dedicated: DedicatedConnection
) -> None:
    """Not silently run another way: the worker's hot loops run only driver forms."""
    query = statements.get_job(driver_app.statements, 1)
    assert not query.driver
    with pytest.raises(NoDriverForm, match="driver form"):
        await dedicated.run(query)
    # It is a TypeError (a programming error), and the connection still works.
    assert issubclass(NoDriverForm, TypeError)
    forget = statements.forget_dead_workers(driver_app.statements, 3600.0, "me")
    assert await dedicated.run(forget) == []


async def test_the_worker_s_dedicated_queries_have_a_driver_form(
    driver_app: pgtq.App, dedicated: DedicatedConnection
) -> None:
    """Claim, complete (keeping and deleting) and release: what the worker runs on them."""
    s = driver_app.statements
    app = driver_app

    @app.task
    def noop() -> None: ...

    job_id = await noop.defer_async()
    assert await app.async_connector().run(statements.register_worker(s, "w1", "h", 1, None)) == 1
    claimed = await dedicated.run(statements.claim_jobs(s, "w1", None, 10))
    assert [job.id for job in claimed] == [job_id]
    assert await dedicated.run(statements.release_jobs(s, "w1", [job_id])) == [job_id]
    claimed = await dedicated.run(statements.claim_jobs(s, "w1", ["default"], 10))
    outcomes = statements.Outcomes.empty()
    outcomes.add(job_id, pgtq.Status.SUCCEEDED, attempt=claimed[0].attempts)
    assert await dedicated.run(statements.complete_jobs(s, "w1", outcomes, ("succeeded",))) == [
        job_id
    ]


async def test_counts_come_from_returning_on_every_path(driver_app: pgtq.App) -> None:
    """A write's count is its RETURNING's rows (no rowcount), on the sync and async sides."""
    s = driver_app.statements
    sync, connector = driver_app.sync, driver_app.async_connector()
    assert sync.run(statements.heartbeat(s, "nobody")) == 0
    assert await connector.run(statements.register_worker(s, "w1", "h", 1, ["a"])) == 1
    assert await connector.run(statements.heartbeat(s, "w1")) == 1
    assert sync.run(statements.heartbeat(s, "w1")) == 1
    assert await connector.run(statements.delete_old_ticks(s, 3600.0)) == 0
    assert sync.run(statements.unregister_worker(s, "w1")) == 1
    assert await connector.run(statements.unregister_worker(s, "w1")) == 0
    # A statement with no rows at all (ALTER TABLE) maps none.
    assert await connector.run(statements.set_history(s, True)) is None


async def test_a_job_reads_the_same_by_position_on_every_path(driver_app: pgtq.App) -> None:
    """``to_job`` reads ``job_columns`` by position: the same Job through SQLAlchemy (sync,
    async) and straight from the driver rows (a fast-path run of the same statement)."""
    app = driver_app

    @app.task(queue="q", priority=3)
    def work(x: int) -> None: ...

    job_id = await work.configure(lock="L").defer_async(x=1)
    found = app.jobs.get(job_id)
    assert found == await app.jobs.get_async(job_id)
    assert found is not None
    assert (found.id, found.queue, found.task_name, found.args) == (job_id, "q", "work", {"x": 1})
    assert (found.status, found.priority, found.lock) == (pgtq.Status.TODO, 3, "L")
    query = statements.get_job(app.statements, job_id)
    query.driver = True  # the same statement and mapper, on the driver's records
    conn = await app.async_connector().dedicated()
    try:
        assert await conn.run(query) == found
    finally:
        await conn.close()


# -- the type: checked by mypy -------------------------------------------------------------------


@pytest.mark.slow
def test_a_mapper_written_against_a_result_does_not_type_check(tmp_path: Path) -> None:
    usage = TYPING / "mappers_usage.py"
    checked = mypy(usage)
    # Every mapper over rows type-checks, and every `type: ignore` is needed.
    assert checked.returncode == 0, checked.stdout + checked.stderr
    errors = errors_without_ignores(usage, tmp_path)
    assert len(errors) == 3, errors
    assert sum("Result[Any]" in e for e in errors) == 2, errors
    assert any("rowcount" in e for e in errors), errors


# -- the connection a defer keeps for the next one ------------------------------------------------


async def test_sequential_defers_reuse_one_pooled_connection_and_hold_none_after(
    app: pgtq.App,
) -> None:
    """A checkout costs a third of a ``defer_async``: one that follows at once reuses the
    connection; the loop's next step gives it back, so none is held idle, and pgtq's own
    pooled statements take it back first (the pool never grows for them)."""
    from sqlalchemy import event

    @app.task
    async def noop() -> None: ...

    engine = app.async_connector().engine
    checkouts: list[int] = []
    event.listen(engine.sync_engine.pool, "checkout", lambda *_: checkouts.append(1))
    ids = [await noop.defer_async() for _ in range(50)]
    assert len(checkouts) <= 2  # not one a defer
    await asyncio.sleep(0)  # the loop's next step
    assert engine.pool.checkedout() == 0  # given back: none held idle
    for job_id in ids[:10]:  # a pooled statement right after a defer: the same connection
        await noop.defer_async()
        assert (await app.jobs.get_async(job_id)).id == job_id
    assert engine.pool.checkedout() == 0 and engine.pool.size() >= 1
    assert engine.pool.checkedin() == 1  # one connection served them all
