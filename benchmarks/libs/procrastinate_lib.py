"""Procrastinate 3.10 through its public API.

``PsycopgConnector`` (a psycopg_pool pool; its default size), ``SchemaManager.apply_schema_async``
(what ``procrastinate schema --apply`` runs), ``defer_async`` / ``batch_defer_async``, a
``SyncPsycopgConnector`` app for ``defer`` from a plain thread (its documented sync setup),
and ``App.run_worker_async(concurrency=...)``. Its worker fetches and finishes one job per
statement; ``concurrency`` is how many jobs run at once, so it stands for the batch size.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from benchmarks.libs.base import (
    ASYNC_TASK,
    SCHED_TASK,
    SYNC_TASK,
    Adapter,
    AsyncEnqueuer,
    Fetch,
    Kind,
    Recorder,
    ScheduleEnqueuer,
    StartRecorder,
    SyncEnqueuer,
    until_stopped,
)

if TYPE_CHECKING:
    import procrastinate


def _app(connector: Any, recorder: Recorder | None = None) -> procrastinate.App:
    import procrastinate

    app = procrastinate.App(connector=connector)
    record = recorder.record if recorder is not None else None
    record_thread = recorder.record_from_thread if recorder is not None else None

    @app.task(name=ASYNC_TASK)
    async def noop_async(n: int) -> None:
        if record is not None:
            record(n)

    @app.task(name=SYNC_TASK)
    def noop_sync(n: int) -> None:
        if record_thread is not None:
            record_thread(n)

    return app


def _async_app(dsn: str, recorder: Recorder | None = None) -> procrastinate.App:
    import procrastinate

    return _app(procrastinate.PsycopgConnector(conninfo=dsn), recorder)


def _sched_app(dsn: str, recorder: StartRecorder | None = None) -> procrastinate.App:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    start = recorder.start if recorder is not None else None

    @app.task(
        name=SCHED_TASK,
        pass_context=True,
        retry=procrastinate.RetryStrategy(max_attempts=2, wait=1),
    )
    async def sched_noop(context: Any, n: int) -> None:
        if start is not None:
            at = context.job.scheduled_at
            if start(n, at.timestamp() if at is not None else None):
                raise RuntimeError("fails once (the retry figure)")

    return app


class _Scheduled:
    def __init__(self, task: Any) -> None:
        self.task = task

    async def defer(self, n: int, delay: float | None) -> None:
        if delay is None:
            await self.task.defer_async(n=n)
        else:
            await self.task.configure(schedule_in={"seconds": delay}).defer_async(n=n)


class _Async:
    def __init__(self, task: Any) -> None:
        self.task = task

    async def batch(self, ns: Sequence[int]) -> None:
        await self.task.batch_defer_async(*({"n": n} for n in ns))

    async def single(self, n: int) -> None:
        await self.task.defer_async(n=n)


class _Sync:
    def __init__(self, task: Any) -> None:
        self.task = task

    def single(self, n: int) -> None:
        self.task.defer(n=n)


class ProcrastinateAdapter(Adapter):
    name = "procrastinate"
    title = "Procrastinate"
    module = "procrastinate"
    distributions = ("procrastinate", "psycopg", "psycopg-pool")
    preload = ("procrastinate", "psycopg", "psycopg_pool")
    jobs_table = "procrastinate_jobs"
    remaining_sql = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
    total_sql = "SELECT count(*) FROM procrastinate_jobs"
    # Its jobs table has no start time: the last 'started' event of the job is its start.
    lateness_sql = (
        "SELECT (j.args->>'n')::int, extract(epoch FROM j.scheduled_at),"
        " extract(epoch FROM (SELECT max(e.at) FROM procrastinate_events e"
        " WHERE e.job_id = j.id AND e.type = 'started')) FROM procrastinate_jobs j"
    )
    lateness_source = (
        "database: last 'started' procrastinate_events.at - procrastinate_jobs.scheduled_at"
    )

    async def install(self, dsn: str) -> None:
        app = _async_app(dsn)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    @contextlib.asynccontextmanager
    async def async_enqueuer(self, dsn: str, kind: Kind) -> AsyncIterator[AsyncEnqueuer]:
        app = _async_app(dsn)
        async with app.open_async():
            yield _Async(app.tasks[ASYNC_TASK if kind == "async" else SYNC_TASK])

    @contextlib.contextmanager
    def sync_enqueuer(self, dsn: str) -> Iterator[SyncEnqueuer]:
        import procrastinate

        app = _app(procrastinate.SyncPsycopgConnector(conninfo=dsn))
        with app.open():
            yield _Sync(app.tasks[ASYNC_TASK])

    async def run_worker(
        self, dsn: str, *, kind: Kind, batch: int, recorder: Recorder, stop: asyncio.Event
    ) -> None:
        app = _async_app(dsn, recorder)
        async with app.open_async():
            worker = asyncio.create_task(
                app.run_worker_async(
                    **self.worker_settings(kind, batch), install_signal_handlers=False
                )
            )
            await until_stopped(worker, stop)
            if not worker.done():
                worker.cancel()  # documented: cancelling run_worker_async stops gracefully
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    @classmethod
    def worker_settings(cls, kind: Kind, batch: int) -> dict[str, Any]:
        return {"concurrency": batch}

    @contextlib.asynccontextmanager
    async def schedule_enqueuer(self, dsn: str) -> AsyncIterator[ScheduleEnqueuer]:
        app = _sched_app(dsn)
        async with app.open_async():
            yield _Scheduled(app.tasks[SCHED_TASK])

    async def run_schedule_worker(
        self, dsn: str, *, recorder: StartRecorder, stop: asyncio.Event
    ) -> None:
        app = _sched_app(dsn, recorder)
        async with app.open_async():
            worker = asyncio.create_task(app.run_worker_async(install_signal_handlers=False))
            await until_stopped(worker, stop)
            if not worker.done():
                worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    @classmethod
    def schedule_settings(cls) -> dict[str, Any]:
        return {
            "worker": "app.run_worker_async() (defaults: fetch_job_polling_interval=5)",
            "retry": "RetryStrategy(max_attempts=2, wait=1)",
            "schedule": "task.configure(schedule_in={'seconds': s}).defer_async(n=n)",
        }

    @classmethod
    def verify(cls, fetch: Fetch, expect: int) -> list[str]:
        total, succeeded, not_once, distinct = fetch(
            "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'),"
            " count(*) FILTER (WHERE attempts <> 1), count(DISTINCT args->>'n')"
            " FROM procrastinate_jobs"
        )
        problems = []
        if total != expect or distinct != expect:
            problems.append(f"{total} job rows ({distinct} distinct n), expected {expect}")
        if succeeded != expect:
            problems.append(f"{expect - succeeded} job(s) not succeeded")
        if not_once:
            problems.append(f"{not_once} job(s) finished a number of times other than once")
        return problems
