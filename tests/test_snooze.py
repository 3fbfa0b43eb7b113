"""``raise pgtq.Snooze(seconds)`` ("not yet": back to waiting, the attempt given back) and
``raise pgtq.Discard(reason)`` ("never": failed now, whatever the retry policy), decided by
pure functions and written by the worker's completion path, on both sides."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

import pgtq
from pgtq.model import MAX_SNOOZES, SNOOZED, ClaimedJob, Status
from pgtq.outcomes import decide, decide_safely
from tests.sides import Side

JOB = ClaimedJob(1, "default", "t", {}, 1, 0, None)


# -- the decisions (no database) ----------------------------------------------------------


def test_a_snooze_goes_back_to_waiting_and_is_written_as_snoozed() -> None:
    outcome = decide(None, JOB, exc=pgtq.Snooze(30))
    assert outcome.status is Status.TODO and outcome.retry_in == 30.0 and outcome.snooze
    assert outcome.value == SNOOZED and outcome.label == SNOOZED
    assert outcome.error is None  # a snooze is no error


def test_an_abort_or_a_shutdown_wins_over_a_snooze() -> None:
    assert decide(None, JOB, exc=pgtq.Snooze(1), abort_reason="requested").status is (
        Status.ABORTED
    )
    shutdown = decide(None, JOB, exc=pgtq.Snooze(1), abort_reason="shutdown")
    assert shutdown.status is Status.TODO and not shutdown.snooze


def test_a_discard_fails_at_once_whatever_the_retry_policy() -> None:
    app = pgtq.App("postgresql://unused")

    @app.task(retry=10)
    def hopeful() -> None: ...

    outcome = decide(hopeful, JOB, exc=pgtq.Discard("the account is gone"))
    assert outcome.status is Status.FAILED and outcome.retry_in is None
    assert outcome.error is not None and "the account is gone" in outcome.error
    assert '"Discard"' in outcome.error
    retried = decide(hopeful, JOB, exc=RuntimeError("flaky"))
    assert retried.status is Status.TODO and not retried.snooze  # the policy still applies


@pytest.mark.parametrize("seconds", [-1, math.inf, math.nan, 4e9, "30", True, None])
def test_a_bad_snooze_is_an_error_of_the_task(seconds: Any) -> None:
    with pytest.raises(pgtq.InvalidArguments, match=r"Snooze\(seconds\)"):
        pgtq.Snooze(seconds)


def test_a_snooze_changed_after_it_was_raised_fails_its_job_only() -> None:
    snooze = pgtq.Snooze(1)
    snooze.seconds = math.nan  # hostile task code
    outcome = decide_safely(None, JOB, None, snooze, None)
    assert outcome.status is Status.FAILED and outcome.error is not None


# -- on PostgreSQL, both sides ------------------------------------------------------------


async def test_a_snoozed_job_runs_again_without_spending_its_retry_budget(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    calls: list[int] = []

    @app.task(retry=None)  # one attempt only: snoozes must not spend it
    def polling(ctx: pgtq.JobContext) -> str:
        calls.append(ctx.attempt)
        if len(calls) < 3:
            raise pgtq.Snooze(0)
        return "ready"

    job_id = await side.defer(polling)
    stats = await side.run_worker(app, wait=False)
    job = await side.get(app, job_id)
    assert job is not None and job.status is Status.SUCCEEDED and job.result == "ready"
    assert calls == [1, 1, 1]  # the same attempt each time: it was given back
    assert job.attempts == 1
    assert sql("SELECT snoozes FROM pgtq.jobs WHERE id = %s", job_id) == [(2,)]
    assert stats.by_status == {"snoozed": 2, "succeeded": 1}
    events = [(e.type, e.attempt) for e in await side.call(app.jobs, "history", job_id)]
    assert events == [
        ("deferred", 0),
        ("started", 1),
        ("snoozed", 0),
        ("started", 1),
        ("snoozed", 0),
        ("started", 1),
        ("succeeded", 1),
    ]


async def test_a_snooze_waits_its_seconds(side: Side, app: pgtq.App, sql: Any) -> None:
    @app.task
    async def busy_elsewhere() -> None:
        raise pgtq.Snooze(60)

    job_id = await side.defer(busy_elsewhere)
    await side.run_worker(app, wait=False)
    rows = sql(
        "SELECT status, attempts, snoozes, worker_id, "
        "scheduled_at BETWEEN now() + interval '55 s' AND now() + interval '61 s' "
        "FROM pgtq.jobs WHERE id = %s",
        job_id,
    )
    assert rows == [("todo", 0, 1, None, True)]


async def test_the_snooze_past_the_bound_fails_the_job(side: Side, app: pgtq.App, sql: Any) -> None:
    @app.task(retry=5)
    def never_ready() -> None:
        raise pgtq.Snooze(0)

    job_id = await side.defer(never_ready)
    sql("UPDATE pgtq.jobs SET snoozes = %s WHERE id = %s", MAX_SNOOZES - 1, job_id)
    await side.run_worker(app, wait=False)
    job = await side.get(app, job_id)
    assert job is not None and job.status is Status.FAILED
    assert job.error is not None and job.error["type"] == "SnoozeLimit"
    assert sql("SELECT snoozes, attempts FROM pgtq.jobs WHERE id = %s", job_id) == [
        (MAX_SNOOZES, 1)
    ]


async def test_a_discarded_job_fails_once(side: Side, app: pgtq.App) -> None:
    @app.task(retry=pgtq.Retry(max_attempts=5, base=0, jitter=0))
    async def doomed() -> None:
        raise pgtq.Discard("the invoice was deleted")

    job_id = await side.defer(doomed)
    await side.run_worker(app, wait=False)
    job = await side.get(app, job_id)
    assert job is not None and job.status is Status.FAILED and job.attempts == 1
    assert job.error is not None
    assert (job.error["type"], job.error["message"]) == ("Discard", "the invoice was deleted")


@pytest.mark.parametrize("delete_jobs", ["never", "successful"])
async def test_snoozes_in_a_batch_of_other_outcomes(
    side: Side, app: pgtq.App, sql: Any, delete_jobs: str
) -> None:
    """A completion batch holding snoozes among successes and failures (the snoozing
    variant of the statement, also with ``delete_jobs``) writes each job's own outcome."""
    seen: set[int] = set()

    @app.task(retry=pgtq.Retry(max_attempts=2, base=0, jitter=0))
    async def mixed(ctx: pgtq.JobContext, n: int) -> int:
        first = ctx.job_id not in seen
        seen.add(ctx.job_id)
        if first and n % 3 == 0:
            raise pgtq.Snooze(0)
        if first and n % 3 == 1:
            raise RuntimeError("once")
        return n

    ids = await side.defer_many(mixed, [{"n": n} for n in range(60)])
    await side.run_worker(app, wait=False, concurrency=20, delete_jobs=delete_jobs)
    rows = dict(
        (job_id, (status, attempts, snoozes))
        for job_id, status, attempts, snoozes in sql(
            "SELECT id, status, attempts, snoozes FROM pgtq.jobs"
        )
    )
    for n, job_id in enumerate(ids):
        expected = ("succeeded", 2 if n % 3 == 1 else 1, 1 if n % 3 == 0 else 0)
        if delete_jobs == "successful":
            assert job_id not in rows
        else:
            assert rows[job_id] == expected, (n, rows[job_id])


async def test_a_snooze_of_a_job_whose_abort_was_requested_ends_it_aborted(
    side: Side, app: pgtq.App
) -> None:
    running = asyncio.Event()
    release = asyncio.Event()

    @app.task
    async def stubborn() -> None:
        running.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            raise pgtq.Snooze(0) from None  # swallows the abort and snoozes
        raise pgtq.Snooze(0)

    job_id = await side.defer(stubborn)
    worker = asyncio.create_task(app.run_worker_async(wait=False, install_signal_handlers=False))
    await asyncio.wait_for(running.wait(), 10)
    await side.abort(app, job_id)
    await asyncio.wait_for(worker, 20)
    job = await side.get(app, job_id)
    assert job is not None and job.status is Status.ABORTED


# -- a retry policy written as a function -------------------------------------------------


def test_a_retry_function_decides_the_delay_and_where_the_job_goes() -> None:
    app = pgtq.App("postgresql://unused")

    def policy(attempt: int, exc: BaseException) -> float | pgtq.RetryDecision | None:
        if isinstance(exc, TimeoutError):
            return pgtq.RetryDecision(5, queue="slow", priority=-1)
        return 2.5 * attempt if attempt < 3 else None

    @app.task(retry=policy)
    def calls_partner() -> None: ...

    moved = decide(calls_partner, JOB, exc=TimeoutError())
    assert (moved.status, moved.retry_in, moved.move) == (Status.TODO, 5.0, ("slow", -1))
    later = decide(calls_partner, JOB._replace(attempts=2), exc=RuntimeError())
    assert (later.status, later.retry_in, later.move) == (Status.TODO, 5.0, None)
    assert decide(calls_partner, JOB._replace(attempts=3), exc=RuntimeError()).status is (
        Status.FAILED
    )


@pytest.mark.parametrize(
    ("decided", "field"),
    [(-1.0, "delay"), (math.nan, "delay"), ("soon", "delay"), (pgtq.Retry(), "delay")],
)
def test_a_retry_function_that_decides_nonsense_fails_its_job(decided: Any, field: str) -> None:
    app = pgtq.App("postgresql://unused")

    @app.task(retry=lambda attempt, exc: decided)
    def broken_policy() -> None: ...

    outcome = decide_safely(broken_policy, JOB, None, RuntimeError("x"), None)
    assert outcome.status is Status.FAILED
    assert outcome.error is not None and field in outcome.error


def test_a_retry_decision_names_its_bad_field() -> None:
    with pytest.raises(pgtq.InvalidArguments, match="queue"):
        pgtq.RetryDecision(1, queue="")
    with pytest.raises(pgtq.InvalidArguments, match="priority"):
        pgtq.RetryDecision(1, priority=2**31)
    with pytest.raises(pgtq.InvalidArguments, match=r"RetryDecision\(delay\)"):
        pgtq.RetryDecision(-5)


async def test_a_retry_moves_its_job_to_another_queue_and_priority(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    ran: list[tuple[str, int]] = []

    def to_the_slow_lane(attempt: int, exc: BaseException) -> pgtq.RetryDecision | None:
        return pgtq.RetryDecision(0, queue="slow", priority=7) if attempt == 1 else None

    @app.task(retry=to_the_slow_lane)
    def heavy(ctx: pgtq.JobContext) -> None:
        ran.append((ctx.queue, ctx.attempt))
        if ctx.attempt == 1:
            raise RuntimeError("too big for the fast lane")

    job_id = await side.defer(heavy)
    other_id = await side.defer(heavy)
    await side.run_worker(app, wait=False, queues=["default"], concurrency=2)
    assert sorted(ran) == [("default", 1), ("default", 1)]
    assert sql("SELECT status, queue, priority FROM pgtq.jobs WHERE id = %s", job_id) == [
        ("todo", "slow", 7)
    ]
    await side.run_worker(app, wait=False, queues=["slow"])
    for done in (job_id, other_id):
        job = await side.get(app, done)
        assert job is not None and (job.status, job.queue, job.priority) == (
            Status.SUCCEEDED,
            "slow",
            7,
        )
    assert sorted(ran) == [("default", 1), ("default", 1), ("slow", 2), ("slow", 2)]


async def test_moves_snoozes_and_plain_outcomes_in_one_batch(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    """The variant with every rare column: each job gets its own outcome, and a job that
    does not move keeps its queue and priority."""

    def policy(attempt: int, exc: BaseException) -> pgtq.RetryDecision | None:
        return pgtq.RetryDecision(0, priority=3) if attempt == 1 else None

    @app.task(retry=policy)
    async def varied(ctx: pgtq.JobContext, n: int) -> int:
        if ctx.attempt == 1 and n % 3 == 1:
            raise RuntimeError("moved")
        if n % 3 == 2 and sql_snoozes(ctx.job_id) == 0:
            raise pgtq.Snooze(0)
        return n

    def sql_snoozes(job_id: int) -> int:
        return int(sql("SELECT snoozes FROM pgtq.jobs WHERE id = %s", job_id)[0][0])

    ids = await side.defer_many(varied, [{"n": n} for n in range(30)])
    await side.run_worker(app, wait=False, concurrency=30)
    rows = {
        job_id: rest
        for job_id, *rest in sql("SELECT id, status, priority, attempts, snoozes FROM pgtq.jobs")
    }
    for n, job_id in enumerate(ids):
        expected = {0: ["succeeded", 0, 1, 0], 1: ["succeeded", 3, 2, 0], 2: ["succeeded", 0, 1, 1]}
        assert rows[job_id] == expected[n % 3], n
