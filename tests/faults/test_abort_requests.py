"""An abort request must survive the faults that end an attempt without the worker seeing
it: a claimed job given back, an attempt that fails and would be retried, a dead worker's job
put back by a rescue. ``abort()`` answered ``doing`` ("asked to stop"): the job must not wait
to run again (``decide`` ends an attempt whose abort was requested ``aborted``).

Found by the state machine (test_state_machine.py); these pin each path down.
"""

from __future__ import annotations

from typing import Any

import pgtq
from pgtq import statements
from pgtq.model import Status, dumps


def _register(app: pgtq.App, *workers: str) -> None:
    """A claim takes jobs only for a registered (live) worker."""
    for worker in workers:
        app.sync.run(statements.register_worker(app.statements, worker, "host", 1, None))


def _claim_and_abort(app: pgtq.App, task: Any, worker: str = "w1") -> int:
    job_id = int(task.defer())
    _register(app, worker)
    claimed = app.sync.run(statements.claim_jobs(app.statements, worker, None, 1))
    assert [c.id for c in claimed] == [job_id]
    assert app.jobs.abort(job_id) == Status.DOING
    return job_id


def test_a_released_job_whose_abort_was_requested_does_not_wait_to_run(dsn: str, sql: Any) -> None:
    """A worker gives back a claimed job it never started (shutdown) after an abort request
    it did not see (its LISTEN was down, or the NOTIFY raced the release)."""
    app = pgtq.App(dsn)
    try:

        @app.task
        def job() -> None: ...

        job_id = _claim_and_abort(app, job)
        released = app.sync.run(statements.release_jobs(app.statements, "w1", [job_id]))
        assert released == [job_id]
        status, abort_requested = sql(
            "SELECT status, abort_requested FROM pgtq.jobs WHERE id = %s", job_id
        )[0]
        _register(app, "w2")
        again = [c.id for c in app.sync.run(statements.claim_jobs(app.statements, "w2", None, 1))]
        assert status in ("cancelled", "aborted") and not again, (
            f"released to {status} with abort_requested={abort_requested}; "
            f"claimed again by another worker: {again}"
        )
    finally:
        app.close()


def test_a_retry_of_an_attempt_whose_abort_was_requested_ends_it_aborted(
    dsn: str, sql: Any
) -> None:
    """The attempt failed on its own (retry policy: try again) before the worker saw the
    abort request: the completion writes ``todo`` and clears the request."""
    app = pgtq.App(dsn)
    try:

        @app.task
        def job() -> None: ...

        job_id = _claim_and_abort(app, job)
        outcome = statements.Outcomes.empty()
        err = dumps({"type": "RuntimeError", "message": "failed on its own"})
        outcome.add(job_id, Status.TODO, error=err, retry_in=0.0)
        assert app.sync.run(statements.complete_jobs(app.statements, "w1", outcome)) == [job_id]
        status = sql("SELECT status FROM pgtq.jobs WHERE id = %s", job_id)[0][0]
        assert status == "aborted", f"an aborted job was put back to {status} to run again"
    finally:
        app.close()


async def test_the_rescue_of_a_job_whose_abort_was_requested_does_not_run_it_again(
    app: pgtq.App, sql: Any
) -> None:
    """A job hangs, the user aborts it; its worker was dead all along. The rescue must end
    it, not retry it."""
    ran: list[int] = []

    @app.task(retry=pgtq.Retry(max_attempts=3, base=0))
    def job(ctx: pgtq.JobContext) -> None:
        ran.append(ctx.attempt)

    job_id = await job.defer_async()
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, last_heartbeat) "
        "VALUES ('ghost', 'h', 1, now() - interval '1 hour');"
        "UPDATE pgtq.jobs SET status = 'doing', attempts = 1, worker_id = 'ghost'"
    )
    assert await app.jobs.abort_async(job_id) == Status.DOING
    await app.run_worker_async(wait=False, rescue_after=60, fetch_job_polling_interval=0.05)
    job_row = await app.jobs.get_async(job_id)
    assert job_row is not None
    assert ran == [], f"the aborted job ran again (attempts {ran}), ending {job_row.status}"
    assert job_row.status == Status.ABORTED
