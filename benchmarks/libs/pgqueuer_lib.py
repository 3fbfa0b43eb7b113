"""PgQueuer 1.6 through its public API, the way its own benchmark (tools/benchmark.py) runs it.

One asyncpg connection per process (``AsyncpgDriver``), ``Queries.install()`` for the schema
(what ``pgq install`` runs), ``Queries.enqueue`` with scalars (one job) or lists (a batch),
``SyncQueries`` over a psycopg connection from a plain thread, and a ``PgQueuer`` whose
``run(batch_size=...)`` dequeues ``batch_size`` jobs per statement (no ``max_concurrent_tasks``:
unlimited, its default). PgQueuer 1.6 has no sync entrypoints (registering one raises
``TypeError``), so it has no sync burn-down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from benchmarks.libs.base import (
    ASYNC_TASK,
    SCHED_TASK,
    Adapter,
    AsyncEnqueuer,
    Fetch,
    Kind,
    Recorder,
    ScheduleEnqueuer,
    StartRecorder,
    SyncEnqueuer,
    task_name,
    until_stopped,
)

if TYPE_CHECKING:
    from pgqueuer import Queries
    from pgqueuer.queries import SyncQueries


class _Async:
    def __init__(self, queries: Queries, entrypoint: str) -> None:
        self.queries = queries
        self.entrypoint = entrypoint

    async def batch(self, ns: Sequence[int]) -> None:
        await self.queries.enqueue(
            [self.entrypoint] * len(ns), [str(n).encode() for n in ns], [0] * len(ns)
        )

    async def single(self, n: int) -> None:
        await self.queries.enqueue(self.entrypoint, str(n).encode(), 0)


class _Scheduled:
    def __init__(self, queries: Queries) -> None:
        self.queries = queries

    async def defer(self, n: int, delay: float | None) -> None:
        from datetime import timedelta

        after = None if delay is None else timedelta(seconds=delay)
        await self.queries.enqueue(SCHED_TASK, str(n).encode(), 0, execute_after=after)


class _Sync:
    def __init__(self, queries: SyncQueries) -> None:
        self.queries = queries

    def single(self, n: int) -> None:
        self.queries.enqueue(ASYNC_TASK, str(n).encode(), 0)


class PgqueuerAdapter(Adapter):
    name = "pgqueuer"
    title = "PgQueuer"
    module = "pgqueuer"
    distributions = ("pgqueuer", "asyncpg", "psycopg")
    preload = ("pgqueuer", "asyncpg")
    jobs_table = "pgqueuer"
    remaining_sql = "SELECT count(*) FROM pgqueuer"  # finished jobs move to pgqueuer_log
    total_sql = "SELECT count(*) FROM pgqueuer_log WHERE status = 'queued'"
    supports_sync_tasks: ClassVar[bool] = False
    # It deletes a finished job (its log keeps no execute_after): the handler's start minus
    # the job's execute_after as PgQueuer hands it to the handler.
    lateness_source = "handler: time.time() at start - job.execute_after"

    async def install(self, dsn: str) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn)
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def async_enqueuer(self, dsn: str, kind: Kind) -> AsyncIterator[AsyncEnqueuer]:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn)
        try:
            yield _Async(Queries(AsyncpgDriver(conn)), task_name(kind))
        finally:
            await conn.close()

    @contextlib.contextmanager
    def sync_enqueuer(self, dsn: str) -> Iterator[SyncEnqueuer]:
        import psycopg
        from pgqueuer.db import SyncPsycopgDriver
        from pgqueuer.queries import SyncQueries

        with psycopg.connect(dsn, autocommit=True) as conn:
            yield _Sync(SyncQueries(SyncPsycopgDriver(conn)))

    async def run_worker(
        self, dsn: str, *, kind: Kind, batch: int, recorder: Recorder, stop: asyncio.Event
    ) -> None:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Job, PgQueuer

        if kind != "async":
            raise NotImplementedError("PgQueuer 1.6 has no sync entrypoints")
        conn = await asyncpg.connect(dsn)
        pgq = PgQueuer(AsyncpgDriver(conn))
        record = recorder.record

        @pgq.entrypoint(ASYNC_TASK)
        async def noop_async(job: Job) -> None:
            record(int(job.payload or b"-1"))

        runner = asyncio.create_task(pgq.run(**self.worker_settings(kind, batch)))
        try:
            await until_stopped(runner, stop)
            pgq.shutdown.set()  # documented graceful stop
            await runner
        finally:
            if not runner.done():
                runner.cancel()
            await conn.close()

    @classmethod
    def worker_settings(cls, kind: Kind, batch: int) -> dict[str, Any]:
        return {"batch_size": batch}

    @contextlib.asynccontextmanager
    async def schedule_enqueuer(self, dsn: str) -> AsyncIterator[ScheduleEnqueuer]:
        import asyncpg
        from pgqueuer import AsyncpgDriver, Queries

        conn = await asyncpg.connect(dsn)
        try:
            yield _Scheduled(Queries(AsyncpgDriver(conn)))
        finally:
            await conn.close()

    async def run_schedule_worker(
        self, dsn: str, *, recorder: StartRecorder, stop: asyncio.Event
    ) -> None:
        from datetime import timedelta

        import asyncpg
        from pgqueuer import AsyncpgDriver, Job, PgQueuer
        from pgqueuer.errors import RetryRequested

        conn = await asyncpg.connect(dsn)
        pgq = PgQueuer(AsyncpgDriver(conn))
        start = recorder.start

        @pgq.entrypoint(SCHED_TASK)
        async def sched_noop(job: Job) -> None:
            if start(int(job.payload or b"-1"), job.execute_after.timestamp()):
                raise RetryRequested(delay=timedelta(seconds=1), reason="fails once")

        runner = asyncio.create_task(pgq.run())  # the defaults
        try:
            await until_stopped(runner, stop)
            pgq.shutdown.set()
            await runner
        finally:
            if not runner.done():
                runner.cancel()
            await conn.close()

    @classmethod
    def schedule_settings(cls) -> dict[str, Any]:
        return {
            "worker": "PgQueuer.run() (defaults: dequeue_timeout=30 s, batch_size=10)",
            "retry": "the handler raises RetryRequested(delay=timedelta(seconds=1))",
            "schedule": "Queries.enqueue(..., execute_after=timedelta(seconds=s))",
        }

    @classmethod
    def verify(cls, fetch: Fetch, expect: int) -> list[str]:
        (left,) = fetch("SELECT count(*) FROM pgqueuer")
        picked, succeeded, distinct, other = fetch(
            "SELECT count(*) FILTER (WHERE status = 'picked'),"
            " count(*) FILTER (WHERE status = 'successful'),"
            " count(DISTINCT job_id) FILTER (WHERE status = 'successful'),"
            " count(*) FILTER (WHERE status NOT IN ('queued', 'picked', 'successful'))"
            " FROM pgqueuer_log"
        )
        problems = []
        if left:
            problems.append(f"{left} job(s) still in the queue table")
        if succeeded != expect or distinct != expect:
            problems.append(
                f"{succeeded} 'successful' log rows ({distinct} jobs), expected {expect}"
            )
        if picked != expect:
            problems.append(f"{picked} 'picked' log rows, expected {expect} (one per job)")
        if other:
            problems.append(f"{other} log rows with another final status (exception, canceled...)")
        return problems
