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
    @app.task
    def noop() -> None: ...

    job_id = await side.defer(noop)
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, last_heartbeat) "
        "VALUES ('ghost', 'h', 1, now() - interval '1 hour')"
    )
    sql("UPDATE pgtq.jobs SET status = 'doing', attempts = 1, worker_id = 'ghost'")
    await side.run_worker(app, wait=False)  # no retry policy: the rescue fails the job
    await side.retry(app, job_id)
    await side.run_worker(app, wait=False)
    types = [e.type for e in await side.call(app.jobs, "history", job_id)]
    assert types == ["deferred", "started", "failed", "retried", "started", "succeeded"]


async def test_history_can_be_turned_off(side: Side, app: pgtq.App, sql: Any) -> None:
    @app.task
    def noop() -> None: ...

    await side.call(app.jobs, "set_history", False)
    try:
        quiet = await side.defer(noop)
        await side.run_worker(app, wait=False)
        assert await side.call(app.jobs, "history", quiet) == []
    finally:
        await side.call(app.jobs, "set_history", True)
    loud = await side.defer(noop)
    assert [e.type for e in await side.call(app.jobs, "history", loud)] == ["deferred"]
