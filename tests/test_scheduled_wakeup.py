"""An idle worker wakes when the earliest job scheduled ahead becomes due, not at its next
poll: for jobs deferred ahead while it sleeps (their NOTIFY says when), jobs scheduled before
it started (it asks the database), and its own retries. Each test uses a polling interval far
longer than its deadline, so a job that starts in time was not found by polling. How late
jobs start is measured in ``benchmarks/`` (``probes lateness``), not here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import pgtq
from pgtq import statements
from tests.conftest import eventually
from tests.sides import Side

POLL = 120.0  # never reached within a test's deadline


def lateness(sql: Any, job_id: int, attempt_event: str = "started") -> float:
    """Seconds from when the job was due to when its (last) attempt started."""
    rows = sql(
        "SELECT extract(epoch FROM started_at - scheduled_at) FROM pgtq.jobs WHERE id = %s",
        job_id,
    )
    return float(rows[0][0])


@pytest.fixture
async def idle_worker(app: pgtq.App) -> AsyncIterator[asyncio.Task[Any]]:
    """A worker whose polling interval is never reached; started by the test via ``start``."""
    tasks: list[asyncio.Task[Any]] = []

    def start() -> asyncio.Task[Any]:
        task = asyncio.create_task(app.run_worker_async(fetch_job_polling_interval=POLL))
        tasks.append(task)
        return task

    yield start  # type: ignore[misc]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _succeeded(app: pgtq.App, job_id: int) -> bool:
    job = await app.jobs.get_async(job_id)
    return job is not None and job.status == pgtq.Status.SUCCEEDED


async def _registered(sql: Any) -> bool:
    return bool(sql("SELECT count(*) FROM pgtq.workers")[0][0])


async def test_a_job_deferred_ahead_while_the_worker_sleeps_starts_when_due(
    app: pgtq.App, sql: Any, idle_worker: Any, side: Side
) -> None:
    @app.task
    async def ping() -> None: ...

    idle_worker()
    await eventually(lambda: _registered(sql))
    await side.defer(ping)  # the worker claims it, finds nothing else, and sleeps
    job_id = await side.defer(ping.configure(schedule_in=1.0))
    await eventually(lambda: _succeeded(app, job_id), timeout=15)
    assert 0 <= lateness(sql, job_id) < 5


async def test_a_job_scheduled_before_the_worker_started_starts_when_due(
    app: pgtq.App, sql: Any, idle_worker: Any
) -> None:
    @app.task
    async def ping() -> None: ...

    job_id = await ping.configure(schedule_in=1.5).defer_async()
    idle_worker()  # no NOTIFY will come for this job: the worker asks when it is due
    await eventually(lambda: _succeeded(app, job_id), timeout=15)
    assert 0 <= lateness(sql, job_id) < 5


async def test_an_earlier_job_moves_the_wake_up_earlier(
    app: pgtq.App, sql: Any, idle_worker: Any, side: Side
) -> None:
    @app.task
    async def ping() -> None: ...

    late = await side.defer(ping.configure(schedule_in=60.0))
    idle_worker()
    await eventually(lambda: _registered(sql))
    soon = await side.defer(ping.configure(schedule_in=1.0))
    await eventually(lambda: _succeeded(app, soon), timeout=15)
    job = await app.jobs.get_async(late)
    assert job is not None and job.status == pgtq.Status.TODO


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_retry_starts_when_its_backoff_is_over(
    app: pgtq.App, sql: Any, idle_worker: Any, kind: str
) -> None:
    def fail_once(ctx: pgtq.JobContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("once")

    async def fail_once_async(ctx: pgtq.JobContext) -> None:
        fail_once(ctx)

    flaky = app.task(name="flaky", retry=pgtq.Retry(max_attempts=2, base=1.0, jitter=0))(
        fail_once_async if kind == "async" else fail_once
    )

    job_id = await flaky.defer_async()
    idle_worker()
    await eventually(lambda: _succeeded(app, job_id), timeout=15)
    job = await app.jobs.get_async(job_id)
    assert job is not None and job.attempts == 2
    assert 0 <= lateness(sql, job_id) < 5


def test_announcements_parse() -> None:
    parse, heard = statements.parse_announcement, statements.Announcement
    assert parse("emails") == heard("emails")
    assert parse("@1.25 emails") == heard("emails", due_in=1.25)
    assert parse("@-0.5 a b") == heard("a b", due_in=-0.5)
    assert parse("@soon emails") == heard("@soon emails")
    assert parse("#42:3 a b") == heard("a b", first=42, jobs=3)
    assert parse("#42 emails") == heard("#42 emails")  # not the named form: a queue's name
