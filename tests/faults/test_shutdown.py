"""SIGTERM with sync and async jobs running, and jobs claimed but not started: what finishes
in the grace period succeeds, the rest goes back to ``todo``, and the process exits 0 in time.
A second SIGTERM stops at once."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.faults import worker as script
from tests.faults.conftest import WorkerProcess, Workers, until


def _history(sql: Any, job_id: int) -> list[str]:
    rows = sql("SELECT type FROM pgtq.job_history WHERE job_id = %s ORDER BY at, rank, seq", job_id)
    return [r[0] for r in rows]


def _job(sql: Any, job_id: int) -> tuple[str, int]:
    status, attempts = sql("SELECT status, attempts FROM pgtq.jobs WHERE id = %s", job_id)[0]
    return status, attempts


def _started(w: WorkerProcess) -> set[int]:
    return {r.job_id for r in w.runs() if r.event == "start"}


def _defer(dsn: str, task: str, seconds: float, priority: int) -> int:
    app = script.build(dsn)
    try:
        return app.get_task(task).configure(priority=priority).defer(seconds=seconds)
    finally:
        app.close()


@pytest.mark.slow
async def test_sigterm_lets_jobs_finish_within_the_grace_period_and_gives_back_the_rest(
    dsn: str, sql: Any, workers: Workers
) -> None:
    grace = 2.0
    # Four slots; the claim takes the high-priority jobs first, so these four run ...
    quick_sync = _defer(dsn, "cooperative", 1.0, priority=10)
    quick_async = _defer(dsn, "sleepy", 1.0, priority=10)
    long_sync = _defer(dsn, "cooperative", 60.0, priority=10)
    long_async = _defer(dsn, "sleepy", 60.0, priority=10)
    # ... and these four are claimed ahead (prefetch) but never start.
    unstarted = [_defer(dsn, "sleepy", 60.0, priority=0) for _ in range(4)]
    running = {quick_sync, quick_async, long_sync, long_async}
    w = workers.start(concurrency=4, prefetch=4, shutdown_graceful_timeout=grace)

    def all_claimed() -> bool:
        doing = sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'doing'")[0][0]
        return _started(w) == running and doing == 8

    await until(all_claimed, timeout=20, what="4 jobs running and 4 claimed ahead")
    signalled, signalled_at = time.monotonic(), time.time()
    w.send(signal.SIGTERM)
    assert await w.exit_code(timeout=grace + 10) == 0
    took = time.monotonic() - signalled
    assert took <= grace + 2, f"exit took {took:.2f} s, over the grace period + 2 s"

    ends = {(r.job_id, r.event): r.at for r in w.runs() if r.event != "start"}
    for job_id in (quick_sync, quick_async):  # running at the signal, done within the grace
        assert _job(sql, job_id) == ("succeeded", 1)
        assert signalled_at < ends[job_id, "ok"] < signalled_at + grace
        assert _history(sql, job_id) == ["deferred", "started", "succeeded"]
    assert (long_sync, "abort") in ends  # it saw should_abort() turn true
    assert (long_async, "cancelled") in ends
    for job_id in (long_sync, long_async):
        assert _job(sql, job_id) == ("todo", 1)
        assert _history(sql, job_id) == ["deferred", "started", "retried"]
        error = sql("SELECT error FROM pgtq.jobs WHERE id = %s", job_id)[0][0]
        assert "shut down" in error["message"]
    for job_id in unstarted:
        assert _job(sql, job_id) == ("todo", 0)
        assert _history(sql, job_id) == ["deferred", "started", "released"]
    assert not {r.job_id for r in w.runs()} & set(unstarted)
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]
    print(f"\nSIGTERM → exit 0 in {took:.2f} s (grace period {grace} s)")


@pytest.mark.slow
async def test_a_second_sigterm_stops_at_once(dsn: str, sql: Any, workers: Workers) -> None:
    long_sync = _defer(dsn, "cooperative", 60.0, priority=10)
    long_async = _defer(dsn, "sleepy", 60.0, priority=10)
    unstarted = [_defer(dsn, "sleepy", 60.0, priority=0) for _ in range(2)]
    w = workers.start(concurrency=2, prefetch=2, shutdown_graceful_timeout=60.0)
    await until(
        lambda: (
            _started(w) == {long_sync, long_async}
            and sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'doing'")[0][0] == 4
        ),
        timeout=20,
        what="2 jobs running and 2 claimed ahead",
    )
    w.send(signal.SIGTERM)
    # The first signal is being handled: the unstarted jobs were given back ...
    await until(
        lambda: all(_history(sql, j)[-1:] == ["released"] for j in unstarted),
        timeout=10,
        what="the claimed-ahead jobs released",
    )
    assert w.alive()  # ... and it waits (up to 60 s) for the running ones.
    second = time.monotonic()
    w.send(signal.SIGTERM)
    assert await w.exit_code(timeout=15) == 0
    took = time.monotonic() - second
    assert took < 2.0, f"a second SIGTERM took {took:.2f} s to stop the worker"
    for job_id in (long_sync, long_async):
        assert _job(sql, job_id) == ("todo", 1)
        assert _history(sql, job_id) == ["deferred", "started", "retried"]
    print(f"\nsecond SIGTERM → exit 0 in {took:.2f} s")
