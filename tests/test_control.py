"""Results, deleting finished jobs, and tasks that complete in their own transaction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

import pgtq
from tests.sides import Side


async def test_a_result_over_the_cap_fails_the_job(side: Side, dsn: str) -> None:
    app = pgtq.App(dsn, result_max_bytes=100)

    @app.task(retry=pgtq.Retry(max_attempts=3, base=0))
    def big() -> str:
        return "x" * 200

    @app.task
    def small() -> str:
        return "x" * 10

    b = await side.defer(big)
    s = await side.defer(small)
    await side.run_worker(app, wait=False)
    with pytest.raises(pgtq.JobFailed, match="result_max_bytes of 100") as info:
        await side.wait(app, b)
    assert info.value.error["type"] == "ResultTooLarge"
    job = await side.get(app, b)
    assert job is not None and job.attempts == 1  # not retried: it would not get smaller
    assert await side.wait(app, s) == "x" * 10
    await app.close_async()


@pytest.mark.parametrize(
    ("mode", "left"),
    [("never", {"succeeded", "failed"}), ("successful", {"failed"}), ("always", set())],
)
async def test_delete_jobs_option(app: pgtq.App, sql: Any, mode: str, left: set[str]) -> None:
    @app.task
    def ok() -> None: ...

    @app.task
    def bad() -> None:
        raise ValueError("no")

    await ok.defer_async()
    await bad.defer_async()
    stats = await app.run_worker_async(wait=False, delete_jobs=mode)
    assert stats.by_status == {"succeeded": 1, "failed": 1}
    assert {row[0] for row in sql("SELECT status FROM pgtq.jobs")} == left


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("raises", [False, True], ids=["commits", "raises"])
async def test_a_transactional_task_commits_with_its_job(
    app: pgtq.App, sql: Any, kind: str, raises: bool
) -> None:
    """The task's row and the job's success commit together, or neither does."""
    sql("CREATE TABLE IF NOT EXISTS ledger (job_id bigint)")
    sql("TRUNCATE ledger")
    insert = sa.text("INSERT INTO ledger VALUES (:id)")

    if kind == "sync":

        @app.task(transactional=True)
        def write(ctx: pgtq.JobContext) -> str:
            assert isinstance(ctx.connection, sa.Connection)
            ctx.connection.execute(insert, {"id": ctx.job_id})
            if raises:
                raise RuntimeError("after the write")
            return "written"

    else:

        @app.task(transactional=True)
        async def write(ctx: pgtq.JobContext) -> str:
            await ctx.connection.execute(insert, {"id": ctx.job_id})
            if raises:
                raise RuntimeError("after the write")
            return "written"

    job_id = await write.defer_async()
    stats = await app.run_worker_async(wait=False)
    if raises:
        assert stats.by_status == {"failed": 1}
        assert sql("SELECT count(*) FROM ledger") == [(0,)]
        with pytest.raises(pgtq.JobFailed, match="after the write"):
            await app.jobs.wait_async(job_id)
    else:
        assert stats.by_status == {"succeeded": 1}
        assert sql("SELECT job_id FROM ledger") == [(job_id,)]
        assert await app.jobs.wait_async(job_id) == "written"
        events = [e.type for e in await app.jobs.history_async(job_id)]
        assert events == ["deferred", "started", "succeeded"]


async def test_a_transactional_task_whose_job_was_taken_away_rolls_back(
    app: pgtq.App, sql: Any
) -> None:
    """If the job is no longer this worker's when the task ends, its writes roll back."""
    sql("CREATE TABLE IF NOT EXISTS ledger (job_id bigint)")
    sql("TRUNCATE ledger")

    @app.task(transactional=True)
    def write(ctx: pgtq.JobContext) -> None:
        ctx.connection.execute(sa.text("INSERT INTO ledger VALUES (1)"))
        # Another worker rescued the job meanwhile:
        sql("UPDATE pgtq.jobs SET worker_id = 'someone-else' WHERE id = %s", ctx.job_id)

    await write.defer_async()
    await app.run_worker_async(wait=False)
    assert sql("SELECT count(*) FROM ledger") == [(0,)]
    assert sql("SELECT status, worker_id FROM pgtq.jobs") == [("doing", "someone-else")]


async def test_results_have_a_retention_period(side: Side, app: pgtq.App, sql: Any) -> None:
    @app.task
    def answer() -> int:
        return 42

    old = await side.defer(answer)
    new = await side.defer(answer)
    await side.run_worker(app, wait=False)
    sql(
        "UPDATE pgtq.jobs SET created_at = created_at - interval '2 days', "
        "started_at = started_at - interval '2 days', "
        "finished_at = finished_at - interval '2 days' WHERE id = %s",
        old,
    )
    assert await side.call(app.jobs, "clear_results", timedelta(days=1)) == 1
    assert sql("SELECT id, result FROM pgtq.jobs ORDER BY id") == [(old, None), (new, 42)]
    assert [e.type for e in await side.call(app.jobs, "history", old)][-1] == "succeeded"
