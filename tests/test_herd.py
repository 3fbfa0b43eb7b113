"""Many idle workers on one queue: a job deferred wakes one of them, not all (``pgtq.turns``).

Counted by the workers themselves (``WorkerStats.claims``): before turns, every idle worker
claimed at each NOTIFY, so five workers sent five claims a job, four of them empty.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pgtq
from pgtq.worker import Worker
from tests.conftest import eventually

WORKERS = 5
JOBS = 20


async def test_idle_workers_answer_each_job_by_turns(app: pgtq.App, sql: Any) -> None:
    ran: list[int] = []
    finished = asyncio.Event()

    @app.task(queue="q")
    async def ping(n: int) -> None:
        ran.append(n)
        finished.set()

    workers = [
        Worker(
            app,
            queues=["q"],
            concurrency=2,
            fetch_job_polling_interval=3600,  # only NOTIFYs wake them: no claim by polling
            heartbeat_interval=0.2,
            summary_interval=None,
        )
        for _ in range(WORKERS)
    ]
    runs = [asyncio.create_task(w.run()) for w in workers]
    try:

        def ready() -> bool:
            listening = sql(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )[0][0]
            rosters = [len(w._turns.roster) if w._turns else 0 for w in workers]
            return listening == WORKERS and rosters == [WORKERS] * WORKERS

        await eventually(ready)
        before = sum(w.stats.claims for w in workers)
        for n in range(JOBS):
            finished.clear()
            await ping.defer_async(n=n)
            await asyncio.wait_for(finished.wait(), 10)
        await eventually(lambda: sum(w.stats.processed for w in workers) == JOBS)
        claims = sum(w.stats.claims for w in workers) - before
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*runs)
    assert ran == list(range(JOBS))  # each once
    # One claim a job when the worker at turn 0 answers; a second when the taken notice
    # comes later than the next turn (a loaded machine). Without turns: WORKERS a job.
    assert claims <= 2 * JOBS, f"{claims} claims for {JOBS} jobs"
    # Every worker took a share: turns rotate with the jobs' ids.
    assert sum(1 for w in workers if w.stats.processed) >= 3
