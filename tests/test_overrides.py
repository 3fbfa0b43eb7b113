"""A job's own ``timeout`` and ``max_attempts``, honoured by the worker.

Until ``configure(timeout=..., max_attempts=...)`` lands (another change of issue 21), the
tests set the columns with SQL right after ``defer``, before any worker runs: what the
worker reads is the row, whoever wrote it. Switch them to ``configure`` once both land.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import pgtq
from tests.conftest import eventually
from tests.sides import Side


def _override(
    sql: Any, job_id: int, *, timeout: float | None = None, most: int | None = None
) -> None:
    sql("UPDATE pgtq.jobs SET timeout = %s, max_attempts = %s WHERE id = %s", timeout, most, job_id)


async def test_a_jobs_own_timeout_replaces_its_tasks(side: Side, app: pgtq.App, sql: Any) -> None:
    """Shorter than the task's, or where the task has none, it stops the attempt; longer,
    it lets the job run past the task's. Jobs without one keep the task's."""

    @app.task(timeout=30)
    async def patient(ctx: pgtq.JobContext) -> str:
        await asyncio.sleep(30)
        return "never"

    saw: list[str | None] = []

    @app.task
    def unbounded(ctx: pgtq.JobContext, wait: float) -> str:
        deadline = time.monotonic() + wait
        while not ctx.should_abort() and time.monotonic() < deadline:
            time.sleep(0.01)
        saw.append(ctx.abort_reason())
        return "done"

    @app.task(timeout=0.2)
    async def hasty(pause: float) -> str:
        await asyncio.sleep(pause)
        return "in time"

    short_async = await side.defer(patient)
    _override(sql, short_async, timeout=0.2)
    short_sync = await side.defer(unbounded, wait=30)
    _override(sql, short_sync, timeout=0.2)
    plain_sync = await side.defer(unbounded, wait=0.3)
    longer = await side.defer(hasty, pause=0.5)
    _override(sql, longer, timeout=30)
    plain_async = await side.defer(hasty, pause=2)

    await side.run_worker(app, wait=False, concurrency=5)

    for job_id in (short_async, short_sync):
        with pytest.raises(pgtq.JobFailed, match=r"timeout of 0\.2 s") as info:
            await side.wait(app, job_id)
        assert info.value.error["type"] == "JobTimeoutError"
    assert sorted(saw, key=str) == [None, "timeout"]  # the plain one ran to its end
    assert await side.wait(app, plain_sync) == "done"
    assert await side.wait(app, longer) == "in time"  # past the task's 0.2 s
    with pytest.raises(pgtq.JobFailed, match=r"timeout of 0\.2 s"):
        await side.wait(app, plain_async)


async def test_a_jobs_own_max_attempts_replaces_the_policys(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    """With a ``Retry`` policy: the job's budget, the policy's backoff (here none)."""

    @app.task(retry=pgtq.Retry(max_attempts=4, base=0, jitter=0))
    def always_fails() -> None:
        raise ValueError("no")

    fewer = await side.defer(always_fails)
    _override(sql, fewer, most=2)
    more = await side.defer(always_fails)
    _override(sql, more, most=6)
    plain = await side.defer(always_fails)

    stats = await side.run_worker(app, wait=False)
    assert stats.by_status == {"retried": 1 + 5 + 3, "failed": 3}
    attempts = {}
    for job_id in (fewer, more, plain):
        job = await side.get(app, job_id)
        assert job is not None and job.status is pgtq.Status.FAILED
        attempts[job_id] = job.attempts
    assert attempts == {fewer: 2, more: 6, plain: 4}


async def test_a_budget_retries_a_task_without_a_policy_with_the_default_backoff(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    """No policy is one attempt; a job's budget of two retries it once, after the default
    ``Retry()`` backoff (1 s, plus at most 10 % jitter)."""

    @app.task
    def once() -> None:
        raise ValueError("no")

    job_id = await side.defer(once)
    _override(sql, job_id, most=2)
    plain = await side.defer(once)
    await side.run_worker(app, wait=False)

    job = await side.get(app, job_id)
    assert job is not None and job.status is pgtq.Status.TODO and job.attempts == 1
    assert job.error is not None and job.error["type"] == "ValueError"
    [(delay,)] = sql(
        "SELECT extract(epoch FROM scheduled_at - started_at)::float FROM pgtq.jobs WHERE id = %s",
        job_id,
    )
    assert 1.0 <= delay <= 1.1 + 0.5, delay  # from its start: the attempt's time added
    ended = await side.get(app, plain)
    assert ended is not None and ended.status is pgtq.Status.FAILED and ended.attempts == 1

    await eventually(
        lambda: (
            sql("SELECT scheduled_at <= now() FROM pgtq.jobs WHERE id = %s", job_id) == [(True,)]
        )
    )
    await side.run_worker(app, wait=False)
    job = await side.get(app, job_id)
    assert job is not None and job.status is pgtq.Status.FAILED and job.attempts == 2


async def test_a_budget_caps_a_retry_function(side: Side, app: pgtq.App, sql: Any) -> None:
    """A function policy decides as before, but never past the job's budget (it is not
    even asked then)."""
    asked: list[int] = []

    def forever(attempt: int, exc: BaseException) -> float:
        asked.append(attempt)
        return 0.0

    @app.task(retry=forever)
    def fails(n: int) -> None:
        if n:
            raise ValueError("no")

    job_id = await side.defer(fails, n=1)
    _override(sql, job_id, most=3)
    await side.run_worker(app, wait=False)
    job = await side.get(app, job_id)
    assert job is not None and job.status is pgtq.Status.FAILED and job.attempts == 3
    assert asked == [1, 2]


async def test_snoozes_do_not_spend_a_jobs_own_budget(side: Side, app: pgtq.App, sql: Any) -> None:
    """A snooze gives its attempt back, against the job's budget as against the policy's."""
    runs = 0

    @app.task(retry=pgtq.Retry(max_attempts=5, base=0, jitter=0))
    def busy() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise pgtq.Snooze(0)
        raise ValueError("no")

    job_id = await side.defer(busy)
    _override(sql, job_id, most=2)
    await side.run_worker(app, wait=False)
    job = await side.get(app, job_id)
    assert job is not None and job.status is pgtq.Status.FAILED
    assert (runs, job.attempts) == (4, 2)  # two snoozes, then two attempts that failed
