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

To check what code under test deferred without running it, :func:`assert_deferred` finds
the one job of a task with the given arguments (:func:`deferred`: all of them)::

    def test_signup_defers_a_welcome(jobs_app, client):
        client.post("/signup", data={"email": "a@example.com"})
        job = pgtq.testing.assert_deferred(jobs_app, send_welcome, email="a@example.com")
        assert job.queue == "mail"

Async code uses the ``_async`` twins.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from pgtq import statements
from pgtq.app import App
from pgtq.errors import ConfigurationError
from pgtq.jobs import JobContext
from pgtq.model import Deferred, Job, Status
from pgtq.schema import validate_schema_name
from pgtq.tasks import DeferItem, Deferrer, Task, call_task

if TYPE_CHECKING:
    from pgtq.worker import WorkerStats

__all__ = [
    "Eager",
    "EagerRun",
    "assert_deferred",
    "assert_deferred_async",
    "deferred",
    "deferred_async",
    "drain",
    "drain_async",
    "eager",
    "migrated_schema",
    "migrated_schema_async",
]

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
    include_scheduled: bool = False,
    **options: Any,
) -> WorkerStats:
    """Run every due job in this thread, as a worker would, and return the worker's stats.

    Jobs falling due within ``retries_within`` seconds (a retry with a short backoff) are
    waited for and run too; jobs scheduled later stay waiting. With ``include_scheduled``,
    every waiting job runs now, however far ahead it was scheduled or backed off, round
    after round until a round runs nothing (a job in a paused queue still waits).
    ``options`` go to the worker.
    """
    total: WorkerStats | None = None
    while True:
        if include_scheduled:
            app.sync.run(statements.make_due(app.statements, queues))
        stats = app.run_worker(
            queues=queues,
            wait=False,
            install_signal_handlers=False,
            **{**DRAIN_OPTIONS, **options},
        )
        total = _add(total, stats)
        if include_scheduled:
            if not stats.processed:
                return total
            continue
        delay = _next_due(app.jobs.list(status=Status.TODO, limit=1000), queues, retries_within)
        if delay is None:
            return total
        time.sleep(delay)


async def drain_async(
    app: App,
    queues: Sequence[str] | None = None,
    *,
    retries_within: float = 1.0,
    include_scheduled: bool = False,
    **options: Any,
) -> WorkerStats:
    """:func:`drain` on the running event loop."""
    total: WorkerStats | None = None
    while True:
        if include_scheduled:
            await app.async_connector().run(statements.make_due(app.statements, queues))
        stats = await app.run_worker_async(
            queues=queues, wait=False, **{**DRAIN_OPTIONS, **options}
        )
        total = _add(total, stats)
        if include_scheduled:
            if not stats.processed:
                return total
            continue
        waiting = await app.jobs.list_async(status=Status.TODO, limit=1000)
        delay = _next_due(waiting, queues, retries_within)
        if delay is None:
            return total
        await asyncio.sleep(delay)


# -- what was deferred ---------------------------------------------------------------------------

#: Jobs read per page by :func:`deferred`.
_PAGE = 1000


def _task_name(task: Task[..., Any] | Any | str | None) -> str | None:
    """A task (or a blueprint's task) or a task's name, as the name jobs carry."""
    if task is None or isinstance(task, str):
        return task
    name = getattr(task, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"expected a task or a task's name, got {task!r}")
    return name


def _as_stored(app: App, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` as a job stores them (the app's JSON read back: a datetime as its ISO
    text, a tuple as a list), to compare with what was deferred."""
    return {key: json.loads(app.codec.dumps(value)) for key, value in arguments.items()}


def matching(jobs: Sequence[Job], arguments: dict[str, Any]) -> list[Job]:
    """The jobs whose stored arguments include every one of ``arguments`` (given as
    stored: see :func:`_as_stored`)."""
    return [
        job
        for job in jobs
        if all(key in job.args and job.args[key] == value for key, value in arguments.items())
    ]


def _verdict(task: str | None, arguments: dict[str, Any], jobs: list[Job]) -> Job:
    found = matching(jobs, arguments)
    if len(found) == 1:
        return found[0]
    what = f"task {task!r}" if task else "any task"
    shown = "\n".join(f"  job {j.id} {j.task_name} {j.status} {j.args!r}" for j in jobs[:20])
    more = f"\n  ... and {len(jobs) - 20} more" if len(jobs) > 20 else ""
    raise AssertionError(
        f"expected one job of {what} with arguments including {arguments!r}, found "
        f"{len(found)}; its jobs:\n{shown or '  (none)'}{more}"
    )


def deferred(
    app: App, task: Task[..., Any] | Any | str | None = None, /, **arguments: Any
) -> list[Job]:
    """The jobs of ``task`` (a task or its name; None: any), whatever their status, whose
    arguments include ``arguments``, oldest first: what the code under test deferred."""
    name = _task_name(task)
    jobs: list[Job] = []
    while True:
        after = jobs[-1].id if jobs else None
        page = app.jobs.list(task=name, limit=_PAGE, after=after)
        jobs.extend(page)
        if len(page) < _PAGE:
            return matching(jobs, _as_stored(app, arguments))


async def deferred_async(
    app: App, task: Task[..., Any] | Any | str | None = None, /, **arguments: Any
) -> list[Job]:
    """:func:`deferred` from async code."""
    name = _task_name(task)
    jobs: list[Job] = []
    while True:
        after = jobs[-1].id if jobs else None
        page = await app.jobs.list_async(task=name, limit=_PAGE, after=after)
        jobs.extend(page)
        if len(page) < _PAGE:
            return matching(jobs, _as_stored(app, arguments))


def assert_deferred(app: App, task: Task[..., Any] | Any | str | None, /, **arguments: Any) -> Job:
    """The one job of ``task`` whose arguments include ``arguments``; an AssertionError
    listing the task's jobs when there is none, or more than one."""
    return _verdict(_task_name(task), _as_stored(app, arguments), deferred(app, task))


async def assert_deferred_async(
    app: App, task: Task[..., Any] | Any | str | None, /, **arguments: Any
) -> Job:
    """:func:`assert_deferred` from async code."""
    return _verdict(_task_name(task), _as_stored(app, arguments), await deferred_async(app, task))


# -- eager: run at defer time, in-process ---------------------------------------------------------


@dataclass
class EagerRun:
    """One job ``defer`` ran at once under :func:`eager`: its arguments as the task got them
    (through JSON, as from the database), and its result or the exception it raised."""

    job_id: int
    task_name: str
    queue: str
    args: dict[str, Any]
    result: Any = None
    error: BaseException | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None


class Eager:
    """Runs each deferred job at once, in the caller (:func:`eager`); ``runs`` in order."""

    def __init__(self, app: App, *, propagate: bool) -> None:
        self.app = app
        self.propagate = propagate
        self.runs: list[EagerRun] = []
        self._ids = itertools.count(1)

    def _prepare(self, deferrer: Deferrer[..., Any], items: Sequence[DeferItem]) -> list[EagerRun]:
        """Check and encode as ``defer`` does, then decode: what the task gets is JSON's."""
        arguments = json.loads(deferrer.encoded_arguments(items))
        return [
            EagerRun(next(self._ids), deferrer.task.name, deferrer.options.queue, args)
            for args in arguments
        ]

    def _context(self, run: EagerRun) -> JobContext[Any]:
        return JobContext(
            job_id=run.job_id,
            task_name=run.task_name,
            queue=run.queue,
            attempt=1,
            worker_id="eager",
            app=self.app,
            args=run.args,
        )

    def _ended(self, run: EagerRun, result: Any, error: BaseException | None) -> Deferred[Any]:
        run.result, run.error = result, error
        self.runs.append(run)
        if error is not None and self.propagate:
            raise error
        return Deferred(run.job_id)

    def run(self, deferrer: Deferrer[..., Any], items: Sequence[DeferItem]) -> list[Deferred[Any]]:
        """``defer``/``defer_many``: sync tasks run in this thread, async ones in a loop of
        their own (not from inside a running loop: use ``defer_async`` there)."""
        task = deferrer.task
        if task.is_async and _loop_running():
            raise ConfigurationError(
                "pgtq.testing.eager: a sync defer() of an async task inside a running event "
                "loop cannot run it: use defer_async() there"
            )
        ids = []
        for run in self._prepare(deferrer, items):
            try:
                value = call_task(task, self._context(run), run.args)
                if task.is_async:
                    value = asyncio.run(value)
            except Exception as exc:
                ids.append(self._ended(run, None, exc))
            else:
                ids.append(self._ended(run, value, None))
        return ids

    async def run_async(
        self, deferrer: Deferrer[..., Any], items: Sequence[DeferItem]
    ) -> list[Deferred[Any]]:
        """``defer_async``/``defer_many_async``: async tasks awaited here, sync ones in a
        thread (as a worker runs them)."""
        ids = []
        for run in self._prepare(deferrer, items):
            task = deferrer.task
            context = self._context(run)
            try:
                if task.is_async:
                    value = await call_task(task, context, run.args)
                else:
                    value = await asyncio.to_thread(call_task, task, context, run.args)
            except Exception as exc:
                ids.append(self._ended(run, None, exc))
            else:
                ids.append(self._ended(run, value, None))
        return ids


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def eager(app: App, *, propagate: bool = True) -> Iterator[list[EagerRun]]:
    """While in this block, ``defer`` and its twins run each job at once, in-process,
    instead of writing it: the arguments are checked and encoded as ``defer`` does and
    decoded as a worker does, and the task runs with a bare context (attempt 1, no retry,
    no timeout, no middleware but the task's own, nothing written to the database). For unit
    tests of code that defers: lower fidelity than :func:`drain` on a real worker. Yields
    the list of runs; with ``propagate`` a task's exception is raised from ``defer``."""
    if app.eager is not None:
        raise ConfigurationError("pgtq.testing.eager: already on for this app")
    runner = Eager(app, propagate=propagate)
    app.eager = runner
    try:
        yield runner.runs
    finally:
        app.eager = None
