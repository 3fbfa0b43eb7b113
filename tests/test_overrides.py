"""A job's own ``timeout`` and ``max_attempts``, honoured by the worker.

Until ``configure(timeout=..., max_attempts=...)`` lands (another change of issue 21), the
tests set the columns with SQL right after ``defer``, before any worker runs: what the
worker reads is the row, whoever wrote it. Switch them to ``configure`` once both land.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import pgtq
from pgtq import JobIsRunning
from pgtq.statements import Announcement
from tests.conftest import Notifications, eventually
from tests.sides import Side


def _override(  # the rest set the columns after the defer, as a row from SQL may have them
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

    short_async = await side.defer(patient.configure(timeout=0.2))
    short_sync = await side.defer(unbounded.configure(timeout=0.2), wait=30)
    plain_sync = await side.defer(unbounded, wait=0.3)
    longer = await side.defer(hasty.configure(timeout=30), pause=0.5)
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

    fewer = await side.defer(always_fails.configure(max_attempts=2))
    more = await side.defer(always_fails.configure(max_attempts=6))
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

    job_id = await side.defer(once.configure(max_attempts=2))
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


# -- app.jobs.reschedule / fail: incident work on one waiting job ----------------------------


async def _row(sql: Any, job_id: int) -> tuple[Any, ...]:
    [row] = sql(
        "SELECT status, priority, scheduled_at, scheduled_at <= now(), error, finished_at "
        "FROM pgtq.jobs WHERE id = %s",
        job_id,
    )
    return tuple(row)


async def test_reschedule_moves_a_waiting_job_and_announces_it(
    side: Side, app: pgtq.App, sql: Any, notifications: Notifications
) -> None:
    @app.task(queue="emails")
    def send(n: int) -> None: ...

    job_id = await side.defer(send.configure(schedule_in=3600), n=1)
    await notifications.until_marker()  # the insert's own announcement, out of the way

    assert await side.call(app.jobs, "reschedule", job_id, in_=0, priority=5) is True
    status, priority, _, due, _, _ = await _row(sql, job_id)
    assert (status, priority, due) == ("todo", 5, True)
    assert await notifications.until_marker() == [Announcement("emails", first=job_id, jobs=1)]

    later = datetime(2040, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert await side.call(app.jobs, "reschedule", job_id, at=later) is True
    _, priority, at, due, _, _ = await _row(sql, job_id)
    assert (priority, at, due) == (5, later, False)  # the priority stays
    [heard] = await notifications.until_marker()
    assert heard.queue == "emails" and heard.due_in is not None and heard.due_in > 3600

    assert await side.call(app.jobs, "reschedule", job_id, priority=-1) is True
    _, priority, at, _, _, _ = await _row(sql, job_id)
    assert (priority, at) == (-1, later)  # the schedule stays, and nobody is woken
    assert await notifications.until_marker() == []

    assert await side.call(app.jobs, "reschedule", job_id, in_=timedelta(minutes=1)) is True
    [heard] = await notifications.until_marker()
    assert heard.due_in is not None and 50 < heard.due_in <= 60

    # No waiting job by that id: False, as retry and cancel say.
    assert await side.call(app.jobs, "cancel", job_id) is True
    assert await side.call(app.jobs, "reschedule", job_id, in_=0) is False
    assert await side.call(app.jobs, "reschedule", 999_999, in_=0) is False
    assert await side.call(app.jobs, "reschedule", 2**63, in_=0) is False
    assert await notifications.until_marker() == []


async def test_a_rescheduled_job_wakes_an_idle_worker(side: Side, app: pgtq.App) -> None:
    """The worker polls every 60 s and knows of nothing due for an hour: only the
    announcement can make it run the job now."""
    done = asyncio.Event()

    @app.task
    async def later() -> None:
        done.set()

    job_id = await side.defer(later.configure(schedule_in=3600))
    worker = asyncio.create_task(app.run_worker_async(fetch_job_polling_interval=60))
    try:
        await eventually(lambda: _registered(app))
        assert await side.call(app.jobs, "reschedule", job_id, in_=0) is True
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


async def _registered(app: pgtq.App) -> bool:
    return bool((await app.jobs.stats_async()).workers)


async def test_a_running_job_is_neither_rescheduled_nor_failed(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    release = threading.Event()

    @app.task
    def holds() -> str:
        release.wait(30)
        return "finished"

    job_id = await side.defer(holds)
    worker = asyncio.create_task(app.run_worker_async())
    try:
        await eventually(lambda: sql("SELECT status FROM pgtq.jobs") == [("doing",)])
        before = await _row(sql, job_id)
        assert await side.call(app.jobs, "reschedule", job_id, in_=600, priority=9) is False
        with pytest.raises(JobIsRunning, match="abort"):
            await side.call(app.jobs, "fail", job_id, "stop it")
        assert await _row(sql, job_id) == before
        release.set()
        assert await side.wait(app, job_id) == "finished"
    finally:
        release.set()
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


async def test_fail_ends_a_waiting_job_at_once_without_retry(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    ran: list[int] = []

    @app.task(retry=pgtq.Retry(max_attempts=5, base=0, jitter=0))
    def poison(n: int) -> None:
        ran.append(n)
        if n == 1:
            raise ValueError("bad data")

    fresh = await side.defer(poison, n=0)
    assert await side.call(app.jobs, "fail", fresh, "the input file is corrupt") is True
    job = await side.get(app, fresh)
    assert job is not None and job.status is pgtq.Status.FAILED and job.attempts == 0
    assert job.error == {"type": "Failed", "message": "the input file is corrupt"}
    assert job.finished_at is not None
    with pytest.raises(pgtq.JobFailed, match="Failed: the input file is corrupt"):
        await side.wait(app, fresh)
    history = await side.call(app.jobs, "history", fresh)
    assert [(e.type, e.attempt) for e in history] == [("deferred", 0), ("failed", 0)]
    assert history[-1].error == job.error and history[-1].at == job.finished_at
    assert await side.call(app.jobs, "fail", fresh, "again") is False  # ended already

    # A job waiting for its retry: its attempt stays in its history.
    retried = await side.defer(poison.configure(priority=1), n=1)
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', attempts = 1, worker_id = 'w', "
        "started_at = now() WHERE id = %s",
        retried,
    )
    sql(
        "UPDATE pgtq.jobs SET status = 'todo', worker_id = NULL, scheduled_at = now() + "
        "interval '1 hour', error = '{\"type\": \"ValueError\"}' WHERE id = %s",
        retried,
    )
    assert await side.call(app.jobs, "fail", retried, "no more") is True
    history = await side.call(app.jobs, "history", retried)
    assert [(e.type, e.attempt) for e in history] == [
        ("deferred", 0),
        ("started", 1),
        ("retried", 1),
        ("failed", 1),
    ]

    await side.run_worker(app, wait=False)
    assert ran == []  # neither ran again
    assert await side.call(app.jobs, "fail", 999_999, "x") is False
    assert await side.call(app.jobs, "fail", -(2**63) - 1, "x") is False


async def test_fail_stores_no_history_while_history_is_off(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    @app.task
    def t() -> None: ...

    job_id = await side.defer(t)
    await side.call(app.jobs, "set_history", False)
    try:
        assert await side.call(app.jobs, "fail", job_id, "off") is True
    finally:
        await side.call(app.jobs, "set_history", True)
    assert sql("SELECT count(*) FROM pgtq.job_events") == [(0,)]


async def test_bad_arguments_are_refused_before_anything_is_written(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    @app.task
    def t() -> None: ...

    job_id = await side.defer(t)
    before = await _row(sql, job_id)
    naive = datetime(2040, 1, 1)
    for kwargs, message in [
        ({}, "give at=, in_= or priority="),
        ({"at": datetime.now(UTC), "in_": 5}, "not both"),
        ({"at": naive}, "^at: must be timezone-aware"),
        ({"at": "2040-01-01"}, "^at: must be a datetime"),
        ({"at": datetime(1999, 1, 1, tzinfo=UTC)}, "^at: must be between"),
        ({"in_": float("nan")}, "^in_: must be a finite delay"),
        ({"in_": "soon"}, "^in_: must be a number of seconds"),
        ({"priority": 1.5}, "^priority: must be an integer"),
        ({"priority": 2**31}, "^priority: must be within"),
    ]:
        with pytest.raises(pgtq.InvalidArguments, match=message):
            await side.call(app.jobs, "reschedule", job_id, **kwargs)
    for reason, message in [
        ("", "must say why"),
        ("  ", "must say why"),
        (None, "must be a str"),
        ("a\x00b", "NUL"),
        ("x" * 4001, "over the limit of 4000"),
    ]:
        with pytest.raises(pgtq.InvalidArguments, match=message):
            await side.call(app.jobs, "fail", job_id, reason)
    assert await _row(sql, job_id) == before
