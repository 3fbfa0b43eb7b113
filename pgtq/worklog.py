"""The worker's log lines: one per attempt that did not succeed (and, at DEBUG, per success),
and the periodic summary of what a worker did.

All under the ``pgtq.worker`` logger, with the ``extra`` fields ``--log-format json`` writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgtq.model import ClaimedJob, Status, clip, error_record
from pgtq.outcomes import Outcome

if TYPE_CHECKING:
    from pgtq.tasks import Task

logger = logging.getLogger("pgtq.worker")


def log_attempt(
    job: ClaimedJob,
    task: Task[..., Any] | None,
    outcome: Outcome,
    exc: BaseException | None,
    duration: float | None,
    worker_id: str,
) -> None:
    """A job's line: DEBUG when it succeeded (one per job: a busy worker's INFO log stays
    quiet), INFO when it will run again, WARNING when it failed or was aborted; those
    name the exception and the attempt."""
    level = (
        logging.DEBUG
        if outcome.status is Status.SUCCEEDED
        else logging.INFO
        if outcome.status is Status.TODO
        else logging.WARNING
    )
    if not logger.isEnabledFor(level):
        return
    most = job.max_attempts  # the job's own budget, else its task's policy's
    if most is None and task is not None:
        most = task.retry.max_attempts
    of = f" of {most}" if most is not None else ""
    extra: dict[str, Any] = {
        "job_id": job.id,
        "task": job.task_name,
        "queue": job.queue,
        "attempt": job.attempts,
        "worker": worker_id,
        "status": outcome.label,
    }
    text = f"job {job.id} {job.task_name} {outcome.label} (attempt {job.attempts}{of})"
    if duration is not None:
        extra["duration"] = duration
        text += f" in {duration:.3f} s"
    if exc is not None:
        record = error_record(exc, with_traceback=False)
        extra["error"] = record["type"]
        extra["error_message"] = record["message"]
        message = record["message"].strip().split("\n", 1)[0]
        text += f": {record['type']}: {message}" if message else f": {record['type']}"
    elif outcome.error is not None and outcome.status is not Status.SUCCEEDED:
        text += f": {clip(outcome.error, 500)}"
    if outcome.status is Status.TODO and outcome.retry_in is not None:
        extra["retry_in"] = outcome.retry_in
        text += f"; runs again in {outcome.retry_in:.1f} s"
    logger.log(level, "%s", text, extra=extra)


async def log_summaries(
    interval: float,
    by_status: Counter[str],
    running: Callable[[], int],
    worker_id: Callable[[], str],
) -> None:
    """Every ``interval``: one INFO line of what was done since the last one (none while a
    worker has nothing to tell)."""
    last, since = Counter(by_status), time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now, counts = time.monotonic(), Counter(by_status)
        done = counts - last
        ended = sum(n for label, n in done.items() if label != "rescued")
        if ended or running():
            logger.info(
                "%s job(s) in %.0f s (%.1f/s)%s; %s running",
                ended,
                now - since,
                ended / (now - since),
                "".join(f", {n} {label}" for label, n in sorted(done.items())),
                running(),
                extra={"worker": worker_id(), "jobs": ended, **done},
            )
        last, since = counts, now
