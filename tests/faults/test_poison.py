"""The poison zoo: whatever a task returns or raises, short of killing its process, ends as an
outcome of that job alone. Healthy jobs around it finish, the worker stays up, and a stop
ends the process in bounded time even when a task will not stop.

Each test runs real worker processes (``tests/faults/worker.py``) against the test database.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest

from pgtq.worker import SHUTDOWN_ABORT_GRACE, SHUTDOWN_WRITE_TIMEOUT
from tests.faults import worker as script
from tests.faults.conftest import Workers, until

#: What each hostile kind must end as: (status, the error record's type).
POISONS = {
    "return_nul": ("failed", "TypeError"),
    "return_surrogate": ("failed", "TypeError"),
    "return_object": ("failed", "TypeError"),
    "return_deep": ("failed", "TypeError"),
    "raise_nul": ("failed", "ValueError"),
    "raise_surrogate": ("failed", "ValueError"),
    "raise_huge": ("failed", "ValueError"),
    "system_exit": ("failed", "SystemExit"),
    "keyboard_interrupt": ("failed", "KeyboardInterrupt"),
    "custom_base": ("failed", "CustomBase"),
    "bad_str": ("failed", "BadStr"),
}

#: How long after the grace period a stopped worker may take to exit: the abort grace, the
#: last outcome write's bound, and a margin for the interpreter's exit.
EXIT_BOUND = SHUTDOWN_ABORT_GRACE + SHUTDOWN_WRITE_TIMEOUT + 5.0


def _defer(dsn: str, task: str, **kwargs: Any) -> int:
    app = script.build(dsn)
    try:
        return app.get_task(task).defer(**kwargs)
    finally:
        app.close()


def _final(sql: Any, ids: list[int]) -> bool:
    rows = sql(
        "SELECT count(*) FROM pgtq.jobs WHERE id = ANY(%s) "
        "AND status IN ('succeeded', 'failed', 'aborted', 'cancelled')",
        ids,
    )
    return bool(rows[0][0] == len(ids))


@pytest.mark.slow
@pytest.mark.parametrize("side", ["sync", "async"])
async def test_hostile_tasks_fail_their_own_job_and_nothing_else(
    dsn: str, sql: Any, workers: Workers, side: str
) -> None:
    healthy: list[int] = []
    poisoned: dict[int, str] = {}
    for kind in POISONS:
        # Healthy jobs on both sides of each poison, so they share its claim and its batch.
        healthy.append(_defer(dsn, f"noop_{side}", n=len(healthy)))
        poisoned[_defer(dsn, f"poison_{side}", kind=kind)] = kind
        healthy.append(_defer(dsn, f"noop_{side}", n=len(healthy)))
    w = workers.start(concurrency=4, wait=False)

    ids = [*healthy, *poisoned]
    await until(lambda: _final(sql, ids), timeout=60, what=lambda: workers.diagnose())
    # The worker drained the queue and left by itself: nothing a task did stopped it early.
    assert await w.exit_code(timeout=30) == 0, w.log_text()

    rows = sql("SELECT id, status, error FROM pgtq.jobs WHERE id = ANY(%s)", ids)
    by_id = {job_id: (status, error) for job_id, status, error in rows}
    assert {by_id[i][0] for i in healthy} == {"succeeded"}
    for job_id, kind in poisoned.items():
        status, error = by_id[job_id]
        assert (status, error["type"]) == POISONS[kind], (kind, error)
        assert len(json.dumps(error)) < 100_000, kind  # clipped, not 10 MB
    bad_str = next(i for i, k in poisoned.items() if k == "bad_str")
    assert "__str__ failed" in by_id[bad_str][1]["message"]
    # Every job ran exactly once: nothing was retried forever or handed out twice.
    starts = [r.job_id for r in w.runs() if r.event == "start"]
    assert sorted(starts) == sorted(ids)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["stubborn_sync", "stubborn_async"])
async def test_a_task_that_ignores_the_stop_never_runs_twice_at_once(
    dsn: str, sql: Any, workers: Workers, task: str
) -> None:
    """SIGTERM with a job that will not stop: the process exits in bounded time without
    handing the job back while it runs; another worker runs it only once this one is gone."""
    grace = 1.0
    job_id = _defer(dsn, task, seconds=30.0)
    first = workers.start(concurrency=2, shutdown_graceful_timeout=grace)
    await until(
        lambda: any(r.event == "start" for r in first.runs()),
        timeout=20,
        what=lambda: workers.diagnose(),
    )
    # The rescuer waits 3 s of silence: the first process's heartbeat lingers while its
    # stuck task runs, until the interpreter exits (its last second, under load, is spent
    # tearing down modules, when no task code can run any more).
    second = workers.start(concurrency=2, rescue_after=3.0)
    await until(
        lambda: sql("SELECT count(*) FROM pgtq.workers")[0][0] == 2,
        timeout=20,
        what="the second worker registered",
    )
    stopped = time.monotonic()
    first.send(signal.SIGTERM)
    assert await first.exit_code(timeout=grace + EXIT_BOUND) == 0, first.log_text()
    exited_at = time.time()
    assert time.monotonic() - stopped < grace + EXIT_BOUND
    assert "did not stop within the shutdown grace" in first.log_text()

    # The second worker rescues it once the first is gone, and runs it to the end.
    await until(
        lambda: sql("SELECT status FROM pgtq.jobs WHERE id = %s", job_id)[0][0] == "succeeded",
        timeout=30,
        what=lambda: workers.diagnose(),
    )
    first_runs = [r for r in first.runs() if r.job_id == job_id]
    second_starts = [r for r in second.runs() if r.job_id == job_id and r.event == "start"]
    assert [r.event for r in first_runs][:1] == ["start"]
    assert "ok" not in [r.event for r in first_runs]  # it died with its process
    assert len(second_starts) == 1
    # No overlap: the second attempt began after the first one's process had ended.
    assert second_starts[0].at >= exited_at - 0.05
    history = sql(
        "SELECT type FROM pgtq.job_history WHERE job_id = %s ORDER BY at, rank, seq", job_id
    )
    assert [h[0] for h in history].count("started") == 2


@pytest.mark.slow
async def test_sigterm_exits_in_bounded_time_with_stuck_tasks_of_both_kinds(
    dsn: str, sql: Any, workers: Workers
) -> None:
    stuck = [
        _defer(dsn, "stubborn_sync", seconds=120.0),
        _defer(dsn, "stubborn_async", seconds=120.0),
    ]
    healthy = [_defer(dsn, "noop_async", n=i) for i in range(5)]
    w = workers.start(concurrency=8, shutdown_graceful_timeout=0.5)
    await until(lambda: _final(sql, healthy), timeout=20, what=lambda: workers.diagnose())
    await until(
        lambda: {r.job_id for r in w.runs() if r.event == "start"} >= set(stuck),
        timeout=20,
        what=lambda: workers.diagnose(),
    )
    w.send(signal.SIGTERM)
    assert await w.exit_code(timeout=0.5 + EXIT_BOUND) == 0, w.log_text()
    # Not handed back while they ran: still this (dead) worker's, for a rescue to take.
    rows = sql("SELECT status FROM pgtq.jobs WHERE id = ANY(%s)", stuck)
    assert [r[0] for r in rows] == ["doing", "doing"]


@pytest.mark.slow
async def test_a_killed_workers_job_runs_again_whatever_its_retry_policy(
    dsn: str, sql: Any, workers: Workers
) -> None:
    job_id = _defer(dsn, "fragile_sync", seconds=30.0)  # no retry policy
    first = workers.start()
    await until(lambda: bool(first.runs()), timeout=20, what=lambda: workers.diagnose())
    first.send(signal.SIGKILL)
    await first.exit_code(timeout=10)
    workers.start()
    await until(
        lambda: sql("SELECT status FROM pgtq.jobs WHERE id = %s", job_id)[0][0] == "succeeded",
        timeout=30,
        what=lambda: workers.diagnose(),
    )
    history = sql(
        "SELECT type FROM pgtq.job_history WHERE job_id = %s ORDER BY at, rank, seq", job_id
    )
    assert [h[0] for h in history] == ["deferred", "started", "rescued", "started", "succeeded"]


@pytest.mark.slow
async def test_a_job_that_kills_its_workers_fails_after_max_rescues(
    dsn: str, sql: Any, workers: Workers
) -> None:
    """``crasher`` (max_rescues=1) kills every worker that runs it: rescued once, it runs
    again and kills the second worker; the third fails it instead of dying in turn."""
    job_id = _defer(dsn, "crasher")
    for n in range(2):
        w = workers.start()
        assert await w.exit_code(timeout=30) == -signal.SIGKILL, w.log_text()
        assert sum(r.event == "start" for r in workers.runs()) == n + 1
    survivor = workers.start()
    await until(
        lambda: sql("SELECT status FROM pgtq.jobs WHERE id = %s", job_id)[0][0] == "failed",
        timeout=30,
        what=lambda: workers.diagnose(),
    )
    assert survivor.alive()
    error = sql("SELECT error FROM pgtq.jobs WHERE id = %s", job_id)[0][0]
    assert error["type"] == "WorkerLostError" and "max_rescues of 1" in error["message"]
    history = [
        h[0]
        for h in sql(
            "SELECT type FROM pgtq.job_history WHERE job_id = %s ORDER BY at, rank, seq", job_id
        )
    ]
    assert history.count("rescued") == 1 and history[-1] == "failed"
