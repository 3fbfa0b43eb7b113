"""Helpers to test code that defers jobs, and the tasks themselves, on a real PostgreSQL.

:func:`migrated_schema` points your app at a fresh PostgreSQL schema, migrated, for the length
of a test (dropped at the end), so tests never see each other's jobs nor touch real ones;
:func:`drain` then runs every due job in-process, as a worker would, and returns when none is
left. A pytest fixture::

    import pytest
    import pgtq.testing
    from myapp.tasks import app

    @pytest.fixture
    def jobs_app():
        with pgtq.testing.migrated_schema(app, dsn="postgresql://localhost/test") as a:
            yield a

    def test_signup_sends_a_mail(jobs_app, client):
        client.post("/signup", data={"email": "a@example.com"})
        stats = pgtq.testing.drain(jobs_app)
        assert stats.by_status == {"succeeded": 1}

Async code uses ``migrated_schema_async`` and ``drain_async``, their twins.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from pgtq.app import App
from pgtq.model import Job, Status
from pgtq.schema import validate_schema_name

if TYPE_CHECKING:
    from pgtq.worker import WorkerStats

__all__ = ["drain", "drain_async", "migrated_schema", "migrated_schema_async"]

#: Quick enough for tests: a retry due in 0.1 s is claimed 0.1 s later at most.
DRAIN_OPTIONS: dict[str, Any] = {
    "fetch_job_polling_interval": 0.05,
    "abort_job_polling_interval": 0.05,
    "shutdown_graceful_timeout": 5.0,
}


def _fresh_name(prefix: str) -> str:
    return validate_schema_name(f"{prefix}_{uuid.uuid4().hex[:12]}")


def _drop(schema: str) -> str:
    return f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'


@contextlib.contextmanager
def migrated_schema(
    app: App, *, dsn: str | URL | None = None, prefix: str = "pgtq_test"
) -> Iterator[App]:
    """Run ``app`` (its tasks, ``app.jobs``, workers) on a throw-away schema, migrated.

    ``dsn``: the test database (default: the app's own). The schema is dropped on exit and
    the app pointed back where it was. Do not share one app between tests running in
    parallel threads.
    """
    schema = _fresh_name(prefix)
    with app.pointed_at(schema=schema, dsn=dsn):
        app.migrate()
        try:
            yield app
        finally:
            app.sync.run_in_transaction(lambda conn: conn.execute(sa.text(_drop(schema))))


@contextlib.asynccontextmanager
async def migrated_schema_async(
    app: App, *, dsn: str | URL | None = None, prefix: str = "pgtq_test"
) -> AsyncIterator[App]:
    """:func:`migrated_schema` inside an event loop (migrates and drops with the async engine)."""
    schema = _fresh_name(prefix)
    with app.pointed_at(schema=schema, dsn=dsn):
        await app.migrate_async()
        try:
            yield app
        finally:
            await app.async_connector().run_in_transaction(
                lambda conn: conn.execute(sa.text(_drop(schema)))
            )
            await app.close_loop_connector()


def _next_due(jobs: list[Job], queues: Sequence[str] | None, within: float) -> float | None:
    """Seconds until the first waiting job falls due, if that is within ``within`` seconds."""
    now = datetime.now(UTC)
    waits = [
        max(0.0, (job.scheduled_at - now).total_seconds()) if job.scheduled_at else 0.0
        for job in jobs
        if queues is None or job.queue in queues
    ]
    soonest = min(waits, default=None)
    return soonest if soonest is not None and soonest <= within else None


def _add(total: WorkerStats | None, more: WorkerStats) -> WorkerStats:
    if total is None:
        return more
    total.processed += more.processed
    total.by_status.update(more.by_status)
    total.elapsed += more.elapsed
    return total


def drain(
    app: App,
    queues: Sequence[str] | None = None,
    *,
    retries_within: float = 1.0,
    **options: Any,
) -> WorkerStats:
    """Run every due job in this thread, as a worker would, and return the worker's stats.

    Jobs falling due within ``retries_within`` seconds (a retry with a short backoff) are
    waited for and run too; jobs scheduled later stay waiting. ``options`` go to the worker.
    """
    total: WorkerStats | None = None
    while True:
        total = _add(
            total,
            app.run_worker(
                queues=queues,
                wait=False,
                install_signal_handlers=False,
                **{**DRAIN_OPTIONS, **options},
            ),
        )
        delay = _next_due(app.jobs.list(status=Status.TODO, limit=1000), queues, retries_within)
        if delay is None:
            return total
        time.sleep(delay)


async def drain_async(
    app: App,
    queues: Sequence[str] | None = None,
    *,
    retries_within: float = 1.0,
    **options: Any,
) -> WorkerStats:
    """:func:`drain` on the running event loop."""
    total: WorkerStats | None = None
    while True:
        total = _add(
            total,
            await app.run_worker_async(queues=queues, wait=False, **{**DRAIN_OPTIONS, **options}),
        )
        waiting = await app.jobs.list_async(status=Status.TODO, limit=1000)
        delay = _next_due(waiting, queues, retries_within)
        if delay is None:
            return total
        await asyncio.sleep(delay)
