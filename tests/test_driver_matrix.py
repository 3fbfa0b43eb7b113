"""Every driver path works: one matrix over the drivers, the worker's queues and its limits.

The worker (claim, complete, retry, abort, fleet-wide limits, a periodic tick) runs over
{asyncpg, psycopg async} x {all queues, one queue, several queues} x {with and without
limits}: each combination takes its own statements (``claim`` all/one/some, or
``claim_limited`` all/some) through its own driver. The twins run over {psycopg sync,
asyncpg, psycopg async}. A bound parameter named like a column of the table a statement
writes broke one of these paths once (psycopg async, one queue: nothing ran); the guard
against the whole class is ``test_statements.py``, this is the proof that each path runs.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

import pgtq
from tests.conftest import eventually
from tests.sides import AsyncSide, Side, SyncSide

ROOT = Path(__file__).resolve().parent.parent

#: The async drivers, by the URL an app is given (``App`` derives its async engine from it).
ASYNC_DRIVERS = {"asyncpg": "postgresql+asyncpg", "psycopg-async": "postgresql+psycopg"}

#: The worker's queues.
QUEUES: dict[str, list[str] | None] = {
    "all-queues": None,
    "one-queue": ["q1"],
    "some-queues": ["q1", "q2"],
}


def with_driver(dsn: str, driver: str) -> str:
    return make_url(dsn).set(drivername=driver).render_as_string(hide_password=False)


@pytest.fixture
async def driver_app(dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[pgtq.App]:
    app = pgtq.App(with_driver(dsn, ASYNC_DRIVERS[request.param]))
    yield app
    await app.close_async()


@pytest.mark.parametrize("limited", [False, True], ids=["no-limits", "limits"])
@pytest.mark.parametrize("queues", list(QUEUES))
@pytest.mark.parametrize("driver_app", list(ASYNC_DRIVERS), indirect=True)
async def test_the_worker_runs_on_every_driver_path(
    driver_app: pgtq.App, queues: str, limited: bool
) -> None:
    app = driver_app
    worker_queues = QUEUES[queues]
    limits: dict[str, Any] = {"concurrency": 3, "rate_limit": "1000/s"} if limited else {}
    attempts: dict[str, int] = {}
    started = asyncio.Event()
    # The jobs go to q1 and q2 (to q1 alone for a worker of q1 alone), one to ``elsewhere``.
    second = "q2" if worker_queues != ["q1"] else "q1"

    @app.task(queue="q1", **limits)
    async def double(n: int) -> int:
        return 2 * n

    @app.task(queue=second, **limits)
    def triple(n: int) -> int:  # a sync task: the worker's thread pool
        return 3 * n

    @app.task(queue="q1", retry=pgtq.Retry(max_attempts=2, base=0, jitter=0))
    async def flaky(key: str) -> str:
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] == 1:
            raise RuntimeError("first attempt fails")
        return key

    @app.task(queue=second)
    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()  # until aborted

    @app.periodic(cron="* * * * *", max_delay=timedelta(seconds=90))
    @app.task(queue="q1", **limits)
    async def tick(timestamp: int) -> int:
        return timestamp

    @app.task(queue="elsewhere")
    async def not_mine() -> None: ...

    if limited:
        await app.queues.set_limits_async(second, concurrency=4, rate_limit="1000/s")
    doubles = await double.defer_many_async([{"n": n} for n in range(6)])
    triples = await triple.defer_many_async([{"n": n} for n in range(6)])
    retried = await flaky.defer_async(key="k")
    aborted = await forever.defer_async()
    other = await not_mine.defer_async()
    expected = {*doubles, *triples, retried, aborted}

    worker = asyncio.create_task(
        app.run_worker_async(
            queues=worker_queues,
            concurrency=8,
            fetch_job_polling_interval=0.05,
            abort_job_polling_interval=0.05,
            shutdown_graceful_timeout=5,
        )
    )
    try:
        await asyncio.wait_for(started.wait(), timeout=10)
        assert await app.jobs.abort_async(aborted) == pgtq.Status.DOING

        async def done() -> bool:
            if worker.done():  # a crashed worker fails the test with its own error
                worker.result()
            finished = await app.jobs.list_async(status=["succeeded", "aborted"], limit=1000)
            ended = {j.id for j in finished}
            return expected <= ended and any(j.task_name == tick.name for j in finished)

        await eventually(done, timeout=15)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)

    for job_id, n in zip(doubles, range(6), strict=True):
        assert await app.jobs.wait_async(job_id, timeout=1) == 2 * n
    for job_id, n in zip(triples, range(6), strict=True):
        assert await app.jobs.wait_async(job_id, timeout=1) == 3 * n
    job = await app.jobs.get_async(retried)
    assert job is not None and job.status == pgtq.Status.SUCCEEDED and job.attempts == 2
    assert job.result == "k"
    job = await app.jobs.get_async(aborted)
    assert job is not None and job.status == pgtq.Status.ABORTED
    ran = [j for j in await app.jobs.list_async(task=tick.name) if j.status != pgtq.Status.TODO]
    assert ran and all(j.result == j.args["timestamp"] for j in ran)
    job = await app.jobs.get_async(other)
    assert job is not None
    if worker_queues is None:  # it ran, or was still to run when the worker stopped
        assert job.status in (pgtq.Status.SUCCEEDED, pgtq.Status.TODO)
    else:  # never claimed by a worker of other queues
        assert job.status == pgtq.Status.TODO and job.attempts == 0


# -- the command line --------------------------------------------------------------------------


async def test_pgtq_worker_of_one_queue_drains_it_on_psycopg_async(dsn: str) -> None:
    """``pgtq worker APP -q Q --one-shot --dsn postgresql+psycopg://...`` as a user runs it
    (``tests/apps/basic.py``): the path that ran nothing and never returned. (The command on
    asyncpg is ``test_cli.py``'s; a process starts in seconds, so one here.)"""
    app = pgtq.App(dsn)

    @app.task
    def add(a: int, b: int) -> int: ...

    @app.task(queue="greetings")
    async def greet(name: str) -> str: ...

    try:
        greeted = await greet.defer_many_async([{"name": "Ada"}, {"name": "Bob"}])
        added = await add.defer_async(a=1, b=2)
        command = [sys.executable, "-m", "pgtq", "worker", "tests.apps.basic:app"]
        url = with_driver(dsn, ASYNC_DRIVERS["psycopg-async"])
        command += ["-q", "greetings", "--one-shot", "--dsn", url]
        env = {k: v for k, v in os.environ.items() if k != "PGTQ_DSN"}
        env["PYTHONPATH"] = str(ROOT)
        done = await asyncio.to_thread(
            subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert [await app.jobs.wait_async(i, timeout=1) for i in greeted] == [
            "hello Ada",
            "hello Bob",
        ]
        job = await app.jobs.get_async(added)
        assert job is not None and job.status == pgtq.Status.TODO  # not its queue
    finally:
        await app.close_async()


# -- the twins -------------------------------------------------------------------------------

#: (the side that calls the twins, the URL's driver): the sync twins always use psycopg.
TWIN_PATHS = {
    "psycopg-sync": (SyncSide(), "postgresql+psycopg"),
    "asyncpg": (AsyncSide(), "postgresql+asyncpg"),
    "psycopg-async": (AsyncSide(), "postgresql+psycopg"),
}


@pytest.mark.parametrize("path", list(TWIN_PATHS))
async def test_the_twins_work_on_every_driver(dsn: str, path: str) -> None:
    side, driver = TWIN_PATHS[path]
    app = pgtq.App(with_driver(dsn, driver))
    try:
        await _twins(side, app)
    finally:
        await app.close_async()


async def drain(side: Side, app: pgtq.App, *, queues: list[str], timeout: float = 15) -> Any:
    """``run_worker(queues=..., wait=False)`` through ``side``, failing past ``timeout``: a
    worker whose every claim fails never drains (the bug this file is about)."""
    options: dict[str, Any] = {"queues": queues, "wait": False}
    if isinstance(side, AsyncSide):
        return await asyncio.wait_for(app.run_worker_async(**options), timeout)
    # ``run_worker`` in a thread of its own (a daemon: a stuck one cannot hold up the run).
    ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()

    def run() -> None:
        try:
            stats = app.run_worker(install_signal_handlers=False, **options)
        except BaseException as exc:  # handed to the test
            loop.call_soon_threadsafe(ended.set_exception, exc)
        else:
            loop.call_soon_threadsafe(ended.set_result, stats)

    threading.Thread(target=run, daemon=True).start()
    return await asyncio.wait_for(ended, timeout)


async def _twins(side: Side, app: pgtq.App) -> None:
    @app.task(queue="q1", retry=pgtq.Retry(max_attempts=1))
    async def echo(text: str) -> str:
        if text == "boom":
            raise ValueError("boom")
        return text

    @app.task(queue="q2")
    def other(n: int) -> int:
        return n

    first = await side.defer(echo, text="a")
    many = await side.defer_many(echo, [{"text": "b"}, {"text": "c"}])
    boom = await side.defer(echo, text="boom")
    locked = await side.defer(echo.configure(lock="L", priority=3), text="locked")
    waiting = await side.defer(other, n=1)
    cancelled = await side.defer(other.configure(schedule_in=timedelta(hours=1)), n=2)
    with pytest.raises(pgtq.AlreadyEnqueued):
        for _ in range(2):
            await side.defer(other.configure(queueing_lock="once", queue="q3"), n=3)

    job = await side.get(app, first)
    assert job is not None and job.status == pgtq.Status.TODO and job.args == {"text": "a"}
    assert await side.get(app, 10**12) is None
    listed = await side.call(app.jobs, "list", queue="q1", status="todo")
    assert [j.id for j in listed] == [first, *many, boom, locked]
    assert [j.id for j in await side.call(app.jobs, "list", lock="L")] == [locked]
    found = await side.call(app.jobs, "list", task=echo.name, search="boom")
    assert [j.id for j in found] == [boom]

    assert await side.abort(app, cancelled) == pgtq.Status.CANCELLED
    assert await side.call(app.jobs, "cancel", cancelled) is False  # already ended
    assert await side.retry(app, cancelled) is True
    assert await side.call(app.jobs, "cancel", cancelled) is True

    assert await side.call(app.queues, "pause", "q2") is True
    queues = {q.name: q.paused for q in await side.call(app.queues, "list")}
    assert queues == {"q1": False, "q2": True, "q3": False}

    # A worker of one queue drains it on this path (the sync side: ``run_worker``).
    stats = await drain(side, app, queues=["q1"])
    assert stats.by_status["succeeded"] == 4 and stats.by_status["failed"] == 1
    assert await side.wait(app, first) == "a"
    assert [await side.wait(app, i) for i in many] == ["b", "c"]
    with pytest.raises(pgtq.JobFailed):
        await side.wait(app, boom)
    job = await side.get(app, waiting)
    assert job is not None and job.status == pgtq.Status.TODO  # its queue is paused

    # Then a worker of two queues, under limits (the limited claim).
    assert await side.retry(app, boom) is True
    assert await side.call(app.queues, "resume", "q2") is True
    await side.call(app.queues, "set_limits", "q1", concurrency=5, rate_limit="100/s")
    stats = await drain(side, app, queues=["q1", "q2"])
    assert stats.by_status["failed"] == 1 and stats.by_status["succeeded"] == 1
    assert await side.wait(app, waiting) == 1
    history = await side.call(app.jobs, "history", boom)
    assert [e.type for e in history].count("failed") == 2

    counts = await side.call(app.jobs, "counts")
    assert counts[("q1", pgtq.Status.SUCCEEDED)] == 4
    stats_now = await side.call(app.jobs, "stats")
    assert stats_now.queues["q1"].counts[pgtq.Status.FAILED] == 1
    assert await side.call(app.jobs, "delete_old_jobs", older_than=0, queue="q2") == 1
    assert await side.call(app.jobs, "clear_results", older_than=0) == 4
