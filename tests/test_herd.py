"""Many idle workers on one queue: a job deferred wakes one of them, not all (``pgtq.turns``).

Counted by the workers themselves (``WorkerStats.claims``): before turns, every idle worker
claimed at each NOTIFY, so five workers sent five claims a job, four of them empty. The
workers poll once an hour here: every job below was found through a NOTIFY.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

import pgtq
from pgtq.worker import Worker
from tests.conftest import eventually

JOBS = 20


@asynccontextmanager
async def fleet(
    app: pgtq.App, sql: Any, size: int, concurrency: int
) -> AsyncIterator[list[Worker]]:
    """``size`` workers of queue ``q``, listening and each knowing all the others."""
    workers = [
        Worker(
            app,
            queues=["q"],
            concurrency=concurrency,
            prefetch=0,
            fetch_job_polling_interval=3600,
            heartbeat_interval=0.2,
            summary_interval=None,
        )
        for _ in range(size)
    ]
    runs = [asyncio.create_task(w.run()) for w in workers]

    seen: list[object] = []

    def ready() -> bool:
        listening = sql(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )[0][0]
        rosters = [len(w._listener.roster) if w._listener else 0 for w in workers]
        # Each worker's claims at start: its first, and one once it listens (both empty).
        claims = [w.stats.claims for w in workers]
        seen[:] = [f"listening {listening}", f"rosters {rosters}", f"claims {claims}"]
        return listening == size and rosters == [size] * size and min(claims) >= 2

    try:
        try:
            await eventually(ready)
        except AssertionError as exc:
            raise AssertionError(f"the fleet never got ready: {seen}") from exc
        yield workers
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*runs)


def total(workers: list[Worker], count: Callable[[Worker], int]) -> int:
    return sum(count(w) for w in workers)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_idle_workers_answer_each_job_by_turns(app: pgtq.App, sql: Any, kind: str) -> None:
    """Sync tasks (threads) and async ones: one claim a job either way."""
    ran: list[int] = []

    if kind == "sync":

        @app.task(queue="q", name="ping")
        def ping_sync(n: int) -> None:
            ran.append(n)

    else:

        @app.task(queue="q", name="ping")
        async def ping_async(n: int) -> None:
            ran.append(n)

    ping = app.tasks["ping"]

    async with fleet(app, sql, 5, concurrency=2) as workers:
        before = total(workers, lambda w: w.stats.claims)
        for n in range(JOBS):
            await app.jobs.wait_async(await ping.defer_async(n=n), timeout=10)
        claims = total(workers, lambda w: w.stats.claims) - before
    assert ran == list(range(JOBS))  # each once
    # One claim a job: the worker whose turn it is. Without turns: five a job.
    assert claims <= JOBS + 2, f"{claims} claims for {JOBS} jobs"
    assert sum(1 for w in workers if w.stats.processed) >= 4  # turns rotate with the ids


async def test_a_worker_without_room_passes_its_turn_on(app: pgtq.App, sql: Any) -> None:
    """Every worker busy but one: each job still runs at once (no poll), on the free one."""
    release, started = asyncio.Event(), asyncio.Event()
    ran: list[int] = []
    finished = asyncio.Event()

    @app.task(queue="q")
    async def hold() -> None:
        started.set()
        await release.wait()

    @app.task(queue="q")
    async def ping(n: int) -> None:
        ran.append(n)
        finished.set()

    async with fleet(app, sql, 4, concurrency=1) as workers:
        for _ in range(3):
            started.clear()
            await hold.defer_async()
            await asyncio.wait_for(started.wait(), 10)
        for n in range(8):  # most of these turns fall to a busy worker
            finished.clear()
            await ping.defer_async(n=n)
            await asyncio.wait_for(finished.wait(), 10)
        release.set()
    assert ran == list(range(8))
    assert sorted(w.stats.processed for w in workers) == [1, 1, 1, 8]


async def test_a_burst_is_drained_by_the_whole_fleet(app: pgtq.App, sql: Any) -> None:
    """The worker whose turn it is cannot take 200 jobs: its full claim calls the others."""
    gate = asyncio.Event()

    @app.task(queue="q")
    async def slow(n: int) -> None:
        await gate.wait()

    async with fleet(app, sql, 4, concurrency=10) as workers:
        await slow.defer_many_async([{"n": n} for n in range(200)])
        # Every worker fills its 10 slots from the one announcement.
        await eventually(lambda: all(w._attempts.running for w in workers))
        await eventually(lambda: sum(len(w._attempts.running) for w in workers) == 40)
        gate.set()
        await eventually(lambda: total(workers, lambda w: w.stats.processed) == 200)
