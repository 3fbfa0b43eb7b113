"""pgtq through its public API: ``App.migrate_async``, ``defer*``, ``App.run_worker_async``."""

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
    import pgtq


def _app(
    dsn: str, recorder: Recorder | None = None
) -> tuple[pgtq.App, pgtq.Task[..., Any], pgtq.Task[..., Any]]:
    import pgtq

    app = pgtq.App(dsn)
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

    return app, noop_async, noop_sync


def _sched_app(dsn: str, recorder: StartRecorder | None = None) -> tuple[pgtq.App, Any]:
    import pgtq

    app = pgtq.App(dsn)
    start = recorder.start if recorder is not None else None

    @app.task(name=SCHED_TASK, retry=pgtq.Retry(max_attempts=2, base=1, jitter=0))
    async def sched_noop(n: int) -> None:
        if start is not None and start(n):
            raise RuntimeError("fails once (the retry figure)")

    return app, sched_noop


class _Scheduled:
    def __init__(self, task: pgtq.Task[..., Any]) -> None:
        self.task = task

    async def defer(self, n: int, delay: float | None) -> None:
        if delay is None:
            await self.task.defer_async(n=n)
        else:
            await self.task.configure(schedule_in=delay).defer_async(n=n)


class _Async:
    def __init__(self, task: pgtq.Task[..., Any]) -> None:
        self.task = task

    async def batch(self, ns: Sequence[int]) -> None:
        await self.task.defer_many_async([{"n": n} for n in ns])

    async def single(self, n: int) -> None:
        await self.task.defer_async(n=n)


class _Sync:
    def __init__(self, task: pgtq.Task[..., Any]) -> None:
        self.task = task

    def single(self, n: int) -> None:
        self.task.defer(n=n)


class PgtqAdapter(Adapter):
    name = "pgtq"
    title = "pgtq"
    module = "pgtq"
    distributions = ("pgtq", "sqlalchemy", "asyncpg", "psycopg")
    preload = (
        "pgtq",
        "pgtq.worker",
        "sqlalchemy.ext.asyncio",
        "sqlalchemy.dialects.postgresql.asyncpg",
        "asyncpg",
    )
    jobs_table = "pgtq.jobs"
    remaining_sql = "SELECT count(*) FROM pgtq.jobs WHERE status IN ('todo', 'doing')"
    total_sql = "SELECT count(*) FROM pgtq.jobs"
    lateness_sql = (
        "SELECT (args->>'n')::int, extract(epoch FROM scheduled_at),"
        " extract(epoch FROM started_at) FROM pgtq.jobs"
    )
    lateness_source = "database: pgtq.jobs.started_at - scheduled_at"

    async def install(self, dsn: str) -> None:
        app, _, _ = _app(dsn)
        try:
            await app.migrate_async()
        finally:
            await app.close_async()

    @contextlib.asynccontextmanager
    async def async_enqueuer(self, dsn: str, kind: Kind) -> AsyncIterator[AsyncEnqueuer]:
        app, noop_async, noop_sync = _app(dsn)
        try:
            yield _Async(noop_async if kind == "async" else noop_sync)
        finally:
            await app.close_async()

    @contextlib.contextmanager
    def sync_enqueuer(self, dsn: str) -> Iterator[SyncEnqueuer]:
        app, noop_async, _ = _app(dsn)
        try:
            yield _Sync(noop_async)
        finally:
            app.close()

    async def run_worker(
        self, dsn: str, *, kind: Kind, batch: int, recorder: Recorder, stop: asyncio.Event
    ) -> None:
        app, _, _ = _app(dsn, recorder)
        worker = asyncio.create_task(app.run_worker_async(**self.worker_settings(kind, batch)))
        try:
            await until_stopped(worker, stop)
            if not worker.done():
                worker.cancel()  # documented: cancelling run_worker_async is a graceful stop
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        finally:
            await app.close_async()

    @classmethod
    def worker_settings(cls, kind: Kind, batch: int) -> dict[str, Any]:
        return {"concurrency": batch, "batch_size": batch}

    @contextlib.asynccontextmanager
    async def schedule_enqueuer(self, dsn: str) -> AsyncIterator[ScheduleEnqueuer]:
        app, task = _sched_app(dsn)
        try:
            yield _Scheduled(task)
        finally:
            await app.close_async()

    async def run_schedule_worker(
        self, dsn: str, *, recorder: StartRecorder, stop: asyncio.Event
    ) -> None:
        app, _ = _sched_app(dsn, recorder)
        worker = asyncio.create_task(app.run_worker_async())  # the defaults
        try:
            await until_stopped(worker, stop)
            if not worker.done():
                worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        finally:
            await app.close_async()

    @classmethod
    def schedule_settings(cls) -> dict[str, Any]:
        return {
            "worker": "app.run_worker_async() (defaults: fetch_job_polling_interval=5)",
            "retry": "Retry(max_attempts=2, base=1, jitter=0)",
            "schedule": "task.configure(schedule_in=seconds).defer_async(n=n)",
        }

    @classmethod
    def verify(cls, fetch: Fetch, expect: int) -> list[str]:
        total, succeeded, not_once, distinct = fetch(
            "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'),"
            " count(*) FILTER (WHERE attempts <> 1), count(DISTINCT args->>'n') FROM pgtq.jobs"
        )
        problems = []
        if total != expect or distinct != expect:
            problems.append(f"{total} job rows ({distinct} distinct n), expected {expect}")
        if succeeded != expect:
            problems.append(f"{expect - succeeded} job(s) not succeeded")
        if not_once:
            problems.append(f"{not_once} job(s) claimed a number of times other than once")
        return problems
