"""The job history: every status change recorded, each failed attempt with its error."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pgtq
from tests.sides import Side


async def test_history_records_every_transition(side: Side, app: pgtq.App, sql: Any) -> None:
    @app.task(retry=pgtq.Retry(max_attempts=3, base=0))
    def flaky(ctx: pgtq.JobContext) -> int:
        if ctx.attempt < 3:
            raise ValueError(f"attempt {ctx.attempt}")
        return ctx.attempt

    job_id = await side.defer(flaky)
    await side.run_worker(app, wait=False)
    events = await side.call(app.jobs, "history", job_id)
    assert [(e.type, e.attempt) for e in events] == [
        ("deferred", 0),
        ("started", 1),
        ("retried", 1),
        ("started", 2),
        ("retried", 2),
        ("started", 3),
        ("succeeded", 3),
    ]
    errors = [e.error["message"] for e in events if e.error]
    assert errors == ["attempt 1", "attempt 2"]
    assert all(e.worker_id for e in events[1:])

    cancelled = await side.defer(flaky.configure(schedule_in=timedelta(hours=1)))
    await side.abort(app, cancelled)
    assert [e.type for e in await side.call(app.jobs, "history", cancelled)] == [
        "deferred",
        "cancelled",
    ]


async def test_rescue_and_manual_retry_are_recorded(side: Side, app: pgtq.App, sql: Any) -> None:
    @app.task  # no retry policy: a rescue still runs it again; its own failure is final
    def noop(ctx: pgtq.JobContext) -> None:
        if ctx.attempt == 2:
            raise RuntimeError("the second attempt fails")

    job_id = await side.defer(noop)
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, last_heartbeat) "
        "VALUES ('ghost', 'h', 1, now() - interval '1 hour')"
    )
    sql("UPDATE pgtq.jobs SET status = 'doing', attempts = 1, worker_id = 'ghost'")
    await side.run_worker(app, wait=False)  # rescued, then run again: it fails
    await side.retry(app, job_id)
    await side.run_worker(app, wait=False)
    types = [e.type for e in await side.call(app.jobs, "history", job_id)]
    assert types == [
        "deferred",
        "started",
        "rescued",
        "started",
        "failed",
        "retried",
        "started",
        "succeeded",
    ]


async def test_the_hot_path_stores_no_event(side: Side, app: pgtq.App, sql: Any) -> None:
    """Deferred, started and succeeded are read off the row: nothing is written for them."""

    @app.task
    def noop() -> None: ...

    job_id = await side.defer(noop)
    await side.run_worker(app, wait=False)
    assert sql("SELECT count(*) FROM pgtq.job_events") == [(0,)]
    events = await side.call(app.jobs, "history", job_id)
    assert [(e.type, e.attempt) for e in events] == [
        ("deferred", 0),
        ("started", 1),
        ("succeeded", 1),
    ]
    (job,) = sql("SELECT created_at, started_at, finished_at, worker_id FROM pgtq.jobs")
    assert [e.at for e in events] == list(job[:3])
    assert [e.worker_id for e in events] == [None, job[3], job[3]]


async def test_deleted_jobs_keep_their_history(side: Side, app: pgtq.App, sql: Any) -> None:
    @app.task(retry=pgtq.Retry(max_attempts=2, base=0))
    def flaky(ctx: pgtq.JobContext) -> None:
        if ctx.attempt == 1:
            raise ValueError("once")

    job_id = await side.defer(flaky)
    await side.run_worker(app, wait=False, delete_jobs="successful")
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]
    events = await side.call(app.jobs, "history", job_id)
    assert [(e.type, e.attempt) for e in events] == [
        ("deferred", 0),
        ("started", 1),
        ("retried", 1),
        ("started", 2),
        ("succeeded", 2),
    ]
    # What was stored for the deletion is shown once: the row is gone, nothing is read twice.
    assert sql("SELECT count(*) FROM pgtq.job_history") == [(5,)]


async def test_history_can_be_turned_off(side: Side, app: pgtq.App, sql: Any) -> None:
    """Off, nothing is stored: a job's history is what its row tells, the current attempt."""

    @app.task(retry=pgtq.Retry(max_attempts=2, base=0))
    def flaky(ctx: pgtq.JobContext) -> None:
        if ctx.attempt == 1:
            raise ValueError("once")

    await side.call(app.jobs, "set_history", False)
    try:
        quiet = await side.defer(flaky)
        await side.run_worker(app, wait=False)
        assert sql("SELECT count(*) FROM pgtq.job_events") == [(0,)]
        assert [(e.type, e.attempt) for e in await side.call(app.jobs, "history", quiet)] == [
            ("deferred", 0),
            ("started", 2),
            ("succeeded", 2),
        ]
    finally:
        await side.call(app.jobs, "set_history", True)
    loud = await side.defer(flaky)
    await side.run_worker(app, wait=False)
    assert [e.type for e in await side.call(app.jobs, "history", loud)] == [
        "deferred",
        "started",
        "retried",
        "started",
        "succeeded",
    ]
