"""Jobs as a user sees them: ``Job``, ``Status``, the ``JobContext`` a task receives, and
``app.jobs`` (the :class:`JobManager`) to inspect and control them.

Every sync/async pair below is a shell around one query from ``pgtq.statements``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import numbers
import operator
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, TypedDict, Unpack, cast, overload

from sqlalchemy.engine import Connection
from typing_extensions import TypeVar

from pgtq import statements, validation
from pgtq import watcher as watcher_module
from pgtq.connectors import execute
from pgtq.errors import (
    InvalidArguments,
    JobFailed,
    JobIsRunning,
    JobNotFound,
    JobTimeout,
)
from pgtq.health import serves
from pgtq.model import ERROR_MESSAGE_MAX, ClaimedJob, Deferred, Job, JobEvent, Status
from pgtq.reports import STALE_AFTER, Stats, Throughput, WorkerInfo
from pgtq.watcher import Pending, Waiter, Watcher, read_jobs

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = [
    "InvalidFilter",
    "Job",
    "JobContext",
    "JobFilter",
    "JobIsRunning",
    "JobManager",
    "JobSelection",
    "NoFilter",
    "OldJobs",
    "Status",
]


class State:
    """The default per-worker state: an object to hang resources on (``state.http = ...``).

    Pass your own typed object to ``run_worker(state=...)`` and annotate tasks with
    ``ctx: JobContext[MyState]`` to have the type checker follow it.
    """

    def __repr__(self) -> str:
        return f"State({', '.join(sorted(vars(self)))})"

    if TYPE_CHECKING:  # any attribute, for the type checker too (and no Any in JobContext)

        def __getattr__(self, name: str) -> Any: ...

        def __setattr__(self, name: str, value: Any) -> None: ...


#: A task's ``ctx.state`` type; ``JobContext`` alone is ``JobContext[State]``, a default with
#: no ``Any`` in it, so mypy can tell a task's context parameter from its arguments.
S = TypeVar("S", default=State)


@dataclass(eq=False)
class JobContext(Generic[S]):
    """What a running task knows about its job, and how it learns it should stop.

    ``state`` is the worker's state: what its startup hooks opened (a client, a pool), shared
    by every task it runs and closed by its shutdown hooks.
    """

    job_id: int
    task_name: str
    queue: str
    attempt: int
    worker_id: str
    app: App
    args: dict[str, Any] = field(default_factory=dict)
    start_timestamp: float = field(default_factory=time.time)
    # A plain attribute: set once by the worker's loop, read by the task's thread (atomic in
    # CPython); cheaper per job than a threading.Event.
    _abort_reason: str | None = field(default=None, repr=False)
    #: For a ``transactional=True`` task: the connection whose transaction also completes
    #: the job (a SQLAlchemy ``Connection`` for a sync task, ``AsyncConnection`` for async).
    connection: Any = field(default=None, repr=False)
    state: S = field(default=cast(Any, None), repr=False)
    #: Where ``set_progress`` hands its record (the worker's completer); None: only kept here.
    _report_progress: ProgressSink | None = field(default=None, repr=False)
    _progress: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def for_job(
        cls,
        job: ClaimedJob,
        app: App,
        worker_id: str,
        state: Any = None,
        report_progress: ProgressSink | None = None,
    ) -> JobContext[Any]:
        return cls(
            job_id=job.id,
            task_name=job.task_name,
            queue=job.queue,
            attempt=job.attempts,
            worker_id=worker_id,
            app=app,
            args=job.args,
            state=state,
            _report_progress=report_progress,
        )

    def set_progress(self, fraction: float, message: str | None = None) -> None:
        """Say how far the task is: ``fraction`` from 0 to 1, and a short ``message``
        (at most :data:`MAX_PROGRESS_MESSAGE` bytes), shown as ``job.progress`` and in the
        dashboard. Cheap enough for a loop: the value is handed to the worker, whose next
        write takes the latest of each job (with the outcomes it writes anyway, else within
        :data:`pgtq.completer.PROGRESS_INTERVAL`); never a round trip of its own. Callable
        from a sync task's thread. InvalidArguments for a value out of range."""
        record = progress_record(fraction, message, self.attempt)
        self._progress = record
        if self._report_progress is not None:
            self._report_progress(self.job_id, self.attempt, record)

    async def set_progress_async(self, fraction: float, message: str | None = None) -> None:
        """:meth:`set_progress` for an async task (it does no I/O either: it never waits)."""
        self.set_progress(fraction, message)

    @property
    def progress(self) -> dict[str, Any] | None:
        """What ``set_progress`` was last given here (``{"fraction", "message", "attempt"}``),
        None before: what a test of a task that builds its own context reads."""
        return self._progress

    def parent_results(self) -> dict[int, Any]:
        """The results of the jobs this one depends on (``depends_on``, a chain's previous
        job, a chord's members), by id in id order (the order they were deferred in); a
        parent that did not succeed (an ``on_parent_failure="run"`` edge) gives None. One
        read, done when called: a job without parents never pays it."""
        return self.app.sync.run(statements.parent_results(self.app.statements, self.job_id))

    async def parent_results_async(self) -> dict[int, Any]:
        """:meth:`parent_results` for an async task."""
        query = statements.parent_results(self.app.statements, self.job_id)
        return await self.app.async_connector().run(query)

    def should_abort(self) -> bool:
        """True once the job was aborted, timed out, or the worker is shutting down."""
        return self._abort_reason is not None

    def abort_reason(self) -> str | None:
        """Why ``should_abort()`` turned true: ``"requested"``, ``"timeout"`` or ``"shutdown"``."""
        return self._abort_reason

    def request_abort(self, reason: str) -> bool:
        """Set by the worker; the first reason wins. Returns whether this call set it."""
        if self._abort_reason is not None:
            return False
        self._abort_reason = reason
        return True


#: ``report(job_id, attempt, record)``: where a context hands a progress record
#: (:func:`progress_record`; never changed once handed over).
ProgressSink = Callable[[int, int, dict[str, Any]], None]

#: The longest ``set_progress`` message, in UTF-8 bytes.
MAX_PROGRESS_MESSAGE = 1000


def progress_record(fraction: object, message: object, attempt: int) -> dict[str, Any]:
    """``set_progress``'s arguments, checked, as stored in ``jobs.progress``: the attempt that
    reported it goes with it, so a later attempt's row never shows an earlier one's bar."""
    if (
        not isinstance(fraction, numbers.Real)
        or isinstance(fraction, bool)
        or not 0.0 <= float(fraction) <= 1.0  # also refuses NaN
    ):
        raise InvalidArguments(f"fraction must be a number from 0 to 1, got {fraction!r}")
    if message is not None:
        try:
            check_text("message", message, max_bytes=MAX_PROGRESS_MESSAGE)
        except InvalidFilter as exc:
            raise InvalidArguments(str(exc)) from None
    return {"fraction": float(fraction), "message": message, "attempt": attempt}


def running_progress(job: Job) -> tuple[float, str | None] | None:
    """The progress a running job's current attempt reported (fraction, message), None if it
    reported none: what the dashboard and ``pgtq jobs list`` show as a bar. An earlier
    attempt's record (the job was retried or rescued) is not this attempt's progress."""
    record = job.progress
    if job.status is not Status.DOING or not isinstance(record, dict):
        return None
    fraction, message = record.get("fraction"), record.get("message")
    if record.get("attempt", job.attempts) != job.attempts or not isinstance(fraction, int | float):
        return None
    return min(max(float(fraction), 0.0), 1.0), message if isinstance(message, str) else None


_PENDING = object()


def _settle(job_id: int, job: Job | None, app: App) -> Any:
    """What ``wait`` returns for this state of the job: its result (read back as its task's
    return annotation: a ``datetime`` for ``-> datetime``), an error, or _PENDING."""
    if job is None:
        raise JobNotFound(f"no job with id {job_id}")
    if job.status == Status.SUCCEEDED:
        task = app.lookup_task(job.task_name)
        decode = None if task is None else task.decode_result
        return job.result if decode is None or job.result is None else decode(job.result)
    if job.status.is_final:
        raise JobFailed(job_id, job.status.value, job.error)
    return _PENDING


def _wait_ids(job_ids: Iterable[int]) -> builtins.list[int]:
    """The ids a wait takes, each checked (InvalidFilter for a non-integer); JobNotFound for
    one outside the ``bigint`` range (no job has it), as ``wait`` says of any unknown id."""
    if isinstance(job_ids, str | bytes | Mapping) or not isinstance(job_ids, Iterable):
        raise InvalidFilter(f"job_ids must be a collection of job ids, got {job_ids!r}")
    ids = []
    for job_id in job_ids:
        checked = check_job_id(job_id)
        if checked is None:
            raise JobNotFound(f"no job with id {job_id}")
        ids.append(checked)
    return ids


def _left(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (0.0 once past it), None for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _sleep(watcher: Watcher | None, delays: Iterator[float], left: float | None) -> float | None:
    """How long a waiter sleeps unless woken: until its deadline while the app listens (a
    NOTIFY, the watcher's re-check or a change of the LISTEN wakes it), up to
    :data:`~pgtq.watcher.STARTING` while its first LISTEN opens, else the next of ``wait``'s
    polling delays."""
    if watcher is not None and watcher.listening:
        return left
    starting = watcher is not None and watcher.starting
    delay = watcher_module.STARTING if starting else next(delays)
    return delay if left is None else min(delay, left)


def _poll_delays() -> Iterator[float]:
    """Short first (most jobs finish fast), then capped, so a long wait costs little."""
    delay = 0.005
    while True:
        yield delay
        delay = min(delay * 1.5, 0.25)


def _timeout(
    job_id: int, timeout: float | None, job: Job | None, workers: Iterable[WorkerInfo]
) -> JobTimeout:
    """``wait``'s timeout, saying the job's state and, when no live worker takes its queue,
    the likely cause: no worker is running (the first thing a newcomer forgets)."""
    message = f"job {job_id} did not finish within {timeout} s"
    if job is None:
        return JobTimeout(message)
    message += f" (status {job.status.value}, queue {job.queue!r})"
    if not any(w.is_alive() and serves(w, job.queue) for w in workers):
        message += (
            f": no worker of queue {job.queue!r} beat in the last {STALE_AFTER:.0f} s; is one "
            f"running? (pgtq worker MODULE:APP)"
        )
    return JobTimeout(message)


#: ``status=`` of ``list``: a status, its name, or several of them.
StatusFilter = Status | str | Iterable[Status | str] | None

#: ``limit`` of :class:`JobFilter` when it is not given.
DEFAULT_LIMIT = 100


#: ``before=`` / ``since=``: an instant (timezone-aware), or how long ago (a ``timedelta`` or
#: seconds, counted on the database's clock).
Moment = datetime | timedelta | float


class JobSelection(TypedDict, total=False):
    """Which jobs, declared once: the filters of ``app.jobs.list`` and of the bulk controls
    (``retry_many``, ``cancel_many``, ``abort_many``, ``delete_many``), which ``pgtq jobs`` and
    the web dashboard build too. A filter left out, or None, does not filter; every one given
    must match.

    ``ids``: jobs with one of these ids. ``status``: one status (or its name) or several.
    ``tags``: jobs having every one of these tags (``configure(tags=...)``; a list of
    non-empty strings, served by an index over tagged jobs). ``search``: jobs whose
    arguments, as JSON text, contain it (ignoring case). ``before`` / ``since``: created
    before / at or after an instant, or that long ago (:data:`Moment`). ``workflow``: the
    jobs of one workflow (its id: ``Job.workflow_id``, a handle's ``id``).
    """

    ids: Iterable[int] | None
    queue: str | None
    status: StatusFilter
    task: str | None
    lock: str | None
    tags: Iterable[str] | None
    search: str | None
    before: Moment | None
    since: Moment | None
    workflow: int | None


class JobFilter(JobSelection, total=False):
    """One page of the jobs a :class:`JobSelection` selects: what ``app.jobs.list`` /
    ``list_async`` take as ``**filters: Unpack[JobFilter]``.

    ``limit``: a page of at most this many (default :data:`DEFAULT_LIMIT`). ``after``: the last
    id of the previous page (keyset pagination; with ``newest_first``, pages go from the
    newest job back).
    """

    limit: int
    after: int | None
    newest_first: bool


class OldJobs(TypedDict, total=False):
    """Which of the jobs that ended long enough ago ``delete_old_jobs`` / ``_async`` delete,
    declared once: succeeded ones always, failed ones with ``include_failed``, cancelled and
    aborted ones with ``include_cancelled`` (both default False), of ``queue`` only when
    given."""

    include_failed: bool
    include_cancelled: bool
    queue: str | None


Q = TypeVar("Q")
R = TypeVar("R")


class AppOperations:
    """What ``app.jobs`` and ``app.queues`` share: each of their twins is one query from
    ``pgtq.statements``, run by :meth:`_run` (sync) or :meth:`_run_async`."""

    def __init__(self, app: App) -> None:
        self._app = app

    @property
    def _s(self) -> statements.Statements:
        return self._app.statements

    def _run(self, query: statements.Query[Q]) -> Q:
        return self._app.sync.run(query)

    async def _run_async(self, query: statements.Query[Q]) -> Q:
        return await self._app.async_connector().run(query)


class JobManager(AppOperations):
    """``app.jobs``: read and control jobs from sync or async code."""

    def get(self, job_id: int) -> Job | None:
        return self._run(_by_id(statements.get_job, self._s, job_id))

    async def get_async(self, job_id: int) -> Job | None:
        return await self._run_async(_by_id(statements.get_job, self._s, job_id))

    def abort(self, job_id: int) -> Status | None:
        """A waiting job is cancelled at once; a running one is asked to stop (see JobContext).

        Returns the status after the request (``cancelled`` or ``doing``), or None when the job
        had already ended.
        """
        return self._run(_by_id(statements.abort_job, self._s, job_id))

    async def abort_async(self, job_id: int) -> Status | None:
        return await self._run_async(_by_id(statements.abort_job, self._s, job_id))

    def retry(self, job_id: int) -> bool:
        """Put a failed, aborted or cancelled job back to ``todo``. False if it was not one."""
        return self._run(_by_id(statements.retry_job, self._s, job_id))

    async def retry_async(self, job_id: int) -> bool:
        return await self._run_async(_by_id(statements.retry_job, self._s, job_id))

    def reschedule(
        self,
        job_id: int,
        *,
        at: datetime | None = None,
        in_: timedelta | float | None = None,
        priority: int | None = None,
    ) -> bool:
        """Move a waiting job: to run no sooner than ``at`` (timezone-aware) or ``in_``
        (seconds or a timedelta from the database server's now; 0: due now), and/or at
        another ``priority``; what is not given stays. Idle workers hear of it as of a new
        job. False if it is not waiting (no such job, running, or ended): a running job is
        never touched. Every argument is checked first (:class:`pgtq.InvalidArguments`)."""
        return self._run(_reschedule_query(self._s, job_id, at, in_, priority))

    async def reschedule_async(
        self,
        job_id: int,
        *,
        at: datetime | None = None,
        in_: timedelta | float | None = None,
        priority: int | None = None,
    ) -> bool:
        return await self._run_async(_reschedule_query(self._s, job_id, at, in_, priority))

    def fail(self, job_id: int, reason: str) -> bool:
        """End a waiting job ``failed`` now, without running it, whatever its retry policy,
        with the error ``{"type": "Failed", "message": reason}`` (incident work: a job that
        must not run). False if there is no waiting job by that id (none, ended, or taken by a
        worker as this ran); a running job raises :class:`JobIsRunning`: stop it with
        :meth:`abort`."""
        return _failed(job_id, self._run(_fail_query(self._s, job_id, reason)))

    async def fail_async(self, job_id: int, reason: str) -> bool:
        return _failed(job_id, await self._run_async(_fail_query(self._s, job_id, reason)))

    def counts(self) -> dict[tuple[str, Status], int]:
        """Jobs per (queue, status)."""
        return self._run(statements.status_counts(self._s))

    async def counts_async(self) -> dict[tuple[str, Status], int]:
        return await self._run_async(statements.status_counts(self._s))

    def counts_of(self, job_ids: Iterable[int]) -> dict[Status, tuple[int, int]]:
        """Of these jobs, per status: how many have it, and how many of those needed more
        than one attempt (how ``pgtq demo`` follows its jobs). Ids no job has count nowhere."""
        return self._run(_counts_of_query(self._s, job_ids))

    async def counts_of_async(self, job_ids: Iterable[int]) -> dict[Status, tuple[int, int]]:
        return await self._run_async(_counts_of_query(self._s, job_ids))

    def history(self, job_id: int) -> list[JobEvent]:
        """Every status change of the job, oldest first (each failed attempt with its error)."""
        return self._run(_by_id(statements.job_history, self._s, job_id))

    async def history_async(self, job_id: int) -> list[JobEvent]:
        return await self._run_async(_by_id(statements.job_history, self._s, job_id))

    def dependencies(self, job_id: int) -> list[statements.Dependency]:
        """The job's parents (the jobs it depends on), then its children, in id order."""
        return self._run(_by_id(statements.dependencies, self._s, job_id))

    async def dependencies_async(self, job_id: int) -> list[statements.Dependency]:
        return await self._run_async(_by_id(statements.dependencies, self._s, job_id))

    def workflow_edges(self, workflow_id: int) -> list[tuple[int, int]]:
        """The edges ``(parent, child)`` among the jobs of a workflow (``Job.workflow_id``)."""
        return self._run(statements.workflow_edges(self._s, check_integer("workflow", workflow_id)))

    async def workflow_edges_async(self, workflow_id: int) -> list[tuple[int, int]]:
        query = statements.workflow_edges(self._s, check_integer("workflow", workflow_id))
        return await self._run_async(query)

    def set_history(self, enabled: bool) -> None:
        """Record history (the default) or not, for every client of the database: off, the
        triggers are disabled and cost nothing. Needs the owner of pgtq's tables."""
        self._run(statements.set_history(self._s, enabled))

    async def set_history_async(self, enabled: bool) -> None:
        await self._run_async(statements.set_history(self._s, enabled))

    @overload
    def wait(self, job_id: Deferred[R], timeout: float | None = None) -> R: ...

    @overload
    def wait(self, job_id: int, timeout: float | None = None) -> Any: ...

    def wait(self, job_id: int, timeout: float | None = None) -> Any:
        """Block until the job is final: its result, or JobFailed; JobTimeout past ``timeout``.
        Given what ``task.defer`` returned, mypy types the result as the task's. Woken by the
        app's LISTEN when the job ends (polling while it is down: pgtq/watcher.py)."""
        for job in self._ended(_wait_ids([job_id]), check_timeout(timeout)):
            return _settle(job_id, job, self._app)
        raise AssertionError("unreachable")  # pragma: no cover

    @overload
    async def wait_async(self, job_id: Deferred[R], timeout: float | None = None) -> R: ...

    @overload
    async def wait_async(self, job_id: int, timeout: float | None = None) -> Any: ...

    async def wait_async(self, job_id: int, timeout: float | None = None) -> Any:
        async for job in self._ended_async(_wait_ids([job_id]), check_timeout(timeout)):
            return _settle(job_id, job, self._app)
        raise AssertionError("unreachable")  # pragma: no cover

    def wait_many(self, job_ids: Iterable[int], timeout: float | None = None) -> builtins.list[Any]:
        """Block until every job is final: their results, in the order of ``job_ids``. As
        :meth:`wait` does for one job: once all have ended, JobFailed for the first of
        ``job_ids`` that did not succeed (read the others with :meth:`get`, or use
        :meth:`watch`); JobNotFound for an id no job has; JobTimeout past ``timeout`` (for
        them all, naming the first job still pending)."""
        ids = _wait_ids(job_ids)
        ended = {job.id: job for job in self._ended(ids, check_timeout(timeout))}
        return [_settle(job_id, ended[job_id], self._app) for job_id in ids]

    async def wait_many_async(
        self, job_ids: Iterable[int], timeout: float | None = None
    ) -> builtins.list[Any]:
        ids = _wait_ids(job_ids)
        ended = {job.id: job async for job in self._ended_async(ids, check_timeout(timeout))}
        return [_settle(job_id, ended[job_id], self._app) for job_id in ids]

    def watch(self, job_ids: Iterable[int], timeout: float | None = None) -> Iterator[Job]:
        """The jobs as each becomes final (succeeded or not), in the order they finished; a
        job already final comes at once; each job once. JobNotFound for an id no job has;
        JobTimeout once ``timeout`` seconds passed with jobs still pending."""
        return self._ended(_wait_ids(job_ids), check_timeout(timeout))

    def watch_async(
        self, job_ids: Iterable[int], timeout: float | None = None
    ) -> AsyncIterator[Job]:
        """:meth:`watch` for async code (``async for job in app.jobs.watch_async(ids)``): one
        server-sent event per job, say."""
        return self._ended_async(_wait_ids(job_ids), check_timeout(timeout))

    def _ended(self, ids: builtins.list[int], timeout: float | None) -> Iterator[Job]:
        """The sync wait loop: the jobs of ``ids`` as they end. Each wake-up reads only the
        jobs a NOTIFY named (all of them while polling); :class:`~pgtq.watcher.Pending` is
        the state both loops share."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = Pending(ids)
        watcher = self._app.watchers.sync()
        woken = threading.Event()
        waiter = Waiter(pending.pending, woken.set)
        if watcher is not None:
            watcher.register(waiter)
        try:
            delays = _poll_delays()
            while True:
                woken.clear()
                heard, delivered = waiter.take()
                if delivered:
                    yield from pending.take(pending.to_read({j.id for j in delivered}), delivered)
                listening = watcher is not None and watcher.listening
                read = pending.to_read(heard if listening else None)
                if read:
                    jobs = self._run(read_jobs(self._s, read))
                    yield from pending.take(read, jobs)
                if pending.done:
                    return
                left = _left(deadline)
                if left == 0.0:
                    job_id, job = pending.first_pending()
                    workers = self._run(statements.worker_heartbeats(self._s))
                    raise _timeout(job_id, timeout, job, workers)
                woken.wait(_sleep(watcher, delays, left))
        finally:
            if watcher is not None:
                watcher.unregister(waiter)

    async def _ended_async(
        self, ids: builtins.list[int], timeout: float | None
    ) -> AsyncIterator[Job]:
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = Pending(ids)
        watcher = self._app.watchers.for_loop()
        woken = asyncio.Event()
        waiter = Waiter(pending.pending, woken.set)
        if watcher is not None:
            watcher.register(waiter)
        try:
            delays = _poll_delays()
            while True:
                woken.clear()
                heard, delivered = waiter.take()
                if delivered:
                    for job in pending.take(pending.to_read({j.id for j in delivered}), delivered):
                        yield job
                listening = watcher is not None and watcher.listening
                read = pending.to_read(heard if listening else None)
                if read:
                    jobs = await self._run_async(read_jobs(self._s, read))
                    for job in pending.take(read, jobs):
                        yield job
                if pending.done:
                    return
                left = _left(deadline)
                if left == 0.0:
                    job_id, last = pending.first_pending()
                    workers = await self._run_async(statements.worker_heartbeats(self._s))
                    raise _timeout(job_id, timeout, last, workers)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_sleep(watcher, delays, left)):
                        await woken.wait()
        finally:
            if watcher is not None:
                watcher.unregister(waiter)

    # == operations: list, stats, clean-up, cancel ===============================================

    def list(self, **filters: Unpack[JobFilter]) -> builtins.list[Job]:
        """One page of jobs matching every filter given (:class:`JobFilter`: ``ids``,
        ``queue``, ``status``, ``task``, ``lock``, ``tags``, ``search``, ``before``,
        ``since``, ``limit=100``, ``after``, ``newest_first=False``), in id order: the same
        filters as the bulk controls', so a list previews what one would change.

        Keyset pagination: pass the last id of a page as ``after`` to get the next one.
        No index serves a search: it reads the jobs the other filters select, in page order,
        until it has a page; on a big table, narrow it with a status or a queue.
        """
        return self._run(_list_query(self._s, filters))

    async def list_async(self, **filters: Unpack[JobFilter]) -> builtins.list[Job]:
        return await self._run_async(_list_query(self._s, filters))

    def stats(self, window: float = 60.0) -> Stats:
        """Per queue: counts, the wait of the oldest due job, jobs/s over ``window`` seconds;
        and the workers with their heartbeat age and running jobs. Cheap on a big table: see
        :data:`pgtq.reports.COUNTED_STATUSES`."""
        return self._app.sync.run_in_transaction(_stats_reader(self._s, window))

    async def stats_async(self, window: float = 60.0) -> Stats:
        return await self._app.async_connector().run_in_transaction(_stats_reader(self._s, window))

    def throughput(
        self, window: float = 3600.0, bucket: float = 60.0, *, queue: str | None = None
    ) -> Throughput:
        """Jobs that ended per ``bucket`` seconds over the last ``window`` seconds, by status:
        the web dashboard's chart. Reads only the jobs that ended in the window (an index
        range, like the rates of :meth:`stats`), so an hour of it is cheap on a big table."""
        return self._run(_throughput_query(self._s, window, bucket, queue))

    async def throughput_async(
        self, window: float = 3600.0, bucket: float = 60.0, *, queue: str | None = None
    ) -> Throughput:
        return await self._run_async(_throughput_query(self._s, window, bucket, queue))

    def delete_old_jobs(self, older_than: timedelta | float, **which: Unpack[OldJobs]) -> int:
        """Delete jobs that ended more than ``older_than`` (seconds or a timedelta) ago.

        Succeeded jobs always; failed ones with ``include_failed``; cancelled and aborted ones
        with ``include_cancelled``; only those of ``queue`` when given (:class:`OldJobs`).
        Waiting and running jobs never. Returns how many went.
        """
        return self._run(_delete_query(self._s, older_than, which))

    async def delete_old_jobs_async(
        self, older_than: timedelta | float, **which: Unpack[OldJobs]
    ) -> int:
        return await self._run_async(_delete_query(self._s, older_than, which))

    def clear_results(self, older_than: timedelta | float) -> int:
        """Drop the stored results of jobs that ended more than ``older_than`` ago, keeping the
        jobs and their history: a retention period for results. Returns how many."""
        return self._run(_clear_query(self._s, older_than))

    async def clear_results_async(self, older_than: timedelta | float) -> int:
        return await self._run_async(_clear_query(self._s, older_than))

    def cancel(self, job_id: int) -> bool:
        """Cancel a waiting job (``todo → cancelled``). False if it is not waiting: a running
        job is stopped with :meth:`abort`."""
        return self._run(_by_id(statements.cancel_job, self._s, job_id))

    async def cancel_async(self, job_id: int) -> bool:
        return await self._run_async(_by_id(statements.cancel_job, self._s, job_id))

    # == bulk controls: one statement each, over the jobs a JobSelection selects ===============
    # Each acts on the jobs its single-id twin would (statements.ACTS_ON) and returns the ids
    # it changed, in order. ``dry_run``: the ids it would change now, changing nothing. With
    # no filter at all it raises NoFilter, unless ``all=True`` says every job is meant.

    def retry_many(
        self, *, all: bool = False, dry_run: bool = False, **filters: Unpack[JobSelection]
    ) -> builtins.list[int]:
        """Put the failed, aborted and cancelled jobs selected back to ``todo``, due now,
        waking the workers of their queues: incident work (``status="failed", task=...,
        since=...``)."""
        return self._run(_bulk_query(self._s, "retry", filters, all, dry_run))

    async def retry_many_async(
        self, *, all: bool = False, dry_run: bool = False, **filters: Unpack[JobSelection]
    ) -> builtins.list[int]:
        return await self._run_async(_bulk_query(self._s, "retry", filters, all, dry_run))

    def cancel_many(
        self, *, all: bool = False, dry_run: bool = False, **filters: Unpack[JobSelection]
    ) -> builtins.list[int]:
        """Cancel the waiting jobs selected; running ones are left alone (:meth:`abort_many`)."""
        return self._run(_bulk_query(self._s, "cancel", filters, all, dry_run))

    async def cancel_many_async(
        self, *, all: bool = False, dry_run: bool = False, **filters: Unpack[JobSelection]
    ) -> builtins.list[int]:
        return await self._run_async(_bulk_query(self._s, "cancel", filters, all, dry_run))

    def abort_many(
        self, *, all: bool = False, dry_run: bool = False, **filters: Unpack[JobSelection]
    ) -> builtins.list[int]:
        """Cancel the waiting jobs selected at once and ask the running ones to stop: their
        workers end them ``aborted`` (a job that ends first keeps its outcome)."""
        return self._run(_bulk_query(self._s, "abort", filters, all, dry_run))

    async def abort_many_async(
        self, *, all: bool = False, dry_run: bool = False, **filters: Unpack[JobSelection]
    ) -> builtins.list[int]:
        return await self._run_async(_bulk_query(self._s, "abort", filters, all, dry_run))

    def delete_many(
        self, *, all: bool = False, dry_run: bool = False, **filters: Unpack[JobSelection]
    ) -> builtins.list[int]:
        """Delete the jobs selected, waiting or ended, with their history; never a running
        one (abort it first): ``status="doing"`` raises InvalidFilter, and a job a worker
        claims meanwhile is skipped."""
        return self._run(_bulk_query(self._s, "delete", filters, all, dry_run))

    async def delete_many_async(
        self, *, all: bool = False, dry_run: bool = False, **filters: Unpack[JobSelection]
    ) -> builtins.list[int]:
        return await self._run_async(_bulk_query(self._s, "delete", filters, all, dry_run))


class InvalidFilter(InvalidArguments, ValueError):
    """An argument of ``app.jobs`` or ``app.queues`` (a job id, a filter of ``list``, an age,
    a window, a queue name) cannot be used as given; the message names it. Raised before
    anything is sent to the database, the same on the sync and async sides. A
    :class:`pgtq.InvalidArguments`, and a ``ValueError``."""


class NoFilter(InvalidFilter):
    """A bulk control (``retry_many``, ``delete_many``, ...) was given no filter: it would act
    on every job. Pass ``ids=`` or a filter, or ``all=True`` to mean every job."""


# == argument checks: the one pure place the twins of app.jobs and app.queues share ==========
# Each returns the value as sent to PostgreSQL or raises InvalidFilter naming the argument, so
# no argument reaches the driver to fail there (a raw DataError, or a value out of range).

#: Ids are PostgreSQL ``bigint``: an integer outside this range is no job's id.
ID_RANGE = (-(2**63), 2**63 - 1)
#: The largest ``limit`` (PostgreSQL ``integer``).
MAX_LIMIT = 2**31 - 1
#: The longest age, window or bucket in seconds (1000 years): PostgreSQL can subtract it from
#: now (``now() - 1e20 seconds`` is out of its range).
MAX_SECONDS = 1000 * 365.25 * 86400
#: The shortest ``throughput`` bucket (1 ms): bucket numbers stay within ``bigint``.
MIN_BUCKET = 0.001


def check_integer(name: str, value: object) -> int:
    """An integer (``int`` or anything with ``__index__``, not ``bool``), else InvalidFilter."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise InvalidFilter(f"{name} must be an integer, got {value!r}")


def check_job_id(job_id: object) -> int | None:
    """A job id as an int; None for an integer outside :data:`ID_RANGE` (no job has it: a read
    finds nothing, an action changes nothing, as for any id that does not exist)."""
    checked = check_integer("job_id", job_id)
    return checked if ID_RANGE[0] <= checked <= ID_RANGE[1] else None


def check_seconds(name: str, value: object, *, positive: bool = False) -> float:
    """Seconds (a number or a ``timedelta``), finite, not negative (``positive``: above 0) and
    at most :data:`MAX_SECONDS`."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidFilter(f"{name} must be seconds or a timedelta, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        kind = "positive" if positive else "0 or more"
        raise InvalidFilter(f"{name} must be a finite number of seconds, {kind}, got {value!r}")
    if seconds > MAX_SECONDS:
        limit = f"{MAX_SECONDS:.0f} s (1000 years)"
        raise InvalidFilter(f"{name} must be at most {limit}, got {value!r}")
    return seconds


def check_text(name: str, value: object, *, max_bytes: int | None = None) -> str:
    """A ``str`` PostgreSQL can hold as text (no NUL, no lone surrogate), of at most
    ``max_bytes`` bytes in UTF-8 when given."""
    if not isinstance(value, str):
        raise InvalidFilter(f"{name} must be a str, got {value!r}")
    if "\x00" in value:
        raise InvalidFilter(f"{name} must not contain a NUL character")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise InvalidFilter(f"{name} must be valid Unicode (it has a lone surrogate)") from None
    if max_bytes is not None and size > max_bytes:
        raise InvalidFilter(f"{name} is {size} bytes in UTF-8, over the limit of {max_bytes}")
    return value


def check_timeout(timeout: object) -> float | None:
    """``wait``'s timeout: None (no limit) or a number of seconds that is not NaN."""
    if timeout is None:
        return None
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or timeout != timeout:
        raise InvalidFilter(f"timeout must be None or a number of seconds, got {timeout!r}")
    return float(timeout)


def _by_id(
    build: Callable[[statements.Statements, int], statements.Query[Q]],
    s: statements.Statements,
    job_id: object,
) -> statements.Query[Q]:
    """The query about one job, its id checked: an id outside the ``bigint`` range runs a
    statement with no row, so ``get`` gives None, ``retry``/``cancel`` False, ``abort`` None,
    ``history`` [] (no job has that id)."""
    checked = check_job_id(job_id)
    if checked is None:
        return statements.no_such_job(s, build(s, 0))
    return build(s, checked)


#: The longest ``reason`` of ``fail``, in UTF-8 bytes: an error message's bound.
REASON_MAX_BYTES = ERROR_MESSAGE_MAX


def _renamed(name: str, check: Callable[[Any], Q], value: object) -> Q:
    """A :mod:`pgtq.validation` check of ``configure``'s field, its error naming ``name``
    (``reschedule(at=...)`` is ``configure(schedule_at=...)``'s check)."""
    try:
        return check(value)
    except InvalidArguments as exc:
        field, _, message = str(exc).partition(": ")
        raise InvalidArguments(f"{name}: {message or field}") from None


def _reschedule_query(
    s: statements.Statements,
    job_id: object,
    at: object,
    in_: object,
    priority: object,
) -> statements.Query[bool]:
    if at is None and in_ is None and priority is None:
        raise InvalidArguments("reschedule: give at=, in_= or priority= (nothing would change)")
    if at is not None and in_ is not None:
        raise InvalidArguments("at, in_: give one of them, not both")
    when = None if at is None else _renamed("at", validation.check_schedule_at, at)
    seconds = None if in_ is None else _renamed("in_", validation.schedule_seconds, in_)
    rank = None if priority is None else validation.check_priority(priority)
    return _by_id(lambda s, i: statements.reschedule_job(s, i, when, seconds, rank), s, job_id)


def _fail_query(
    s: statements.Statements, job_id: object, reason: object
) -> statements.Query[tuple[Status | None, bool]]:
    reason = check_text("reason", reason, max_bytes=REASON_MAX_BYTES)
    if not reason.strip():
        raise InvalidFilter("reason must say why the job fails, got an empty text")
    return _by_id(lambda s, i: statements.fail_job(s, i, reason), s, job_id)


def _failed(job_id: int, found: tuple[Status | None, bool]) -> bool:
    """What ``fail`` returns for what its statement found, or JobIsRunning."""
    status, failed = found
    if status is Status.DOING:
        raise JobIsRunning(
            f"job {job_id} is running: fail acts on waiting jobs only; stop it with "
            "abort (it ends aborted), or let it end"
        )
    return failed


def _counts_of_query(
    s: statements.Statements, job_ids: Iterable[int]
) -> statements.Query[dict[Status, tuple[int, int]]]:
    checked = (check_job_id(job_id) for job_id in job_ids)
    return statements.status_counts_of(s, [i for i in checked if i is not None])


def parse_statuses(status: StatusFilter) -> builtins.list[Status] | None:
    """``status=`` as a list of Status, rejecting unknown names with the known ones."""
    if status is None:
        return None
    given = [status] if isinstance(status, str) else builtins.list(status)
    try:
        return [Status(s) for s in given]
    except ValueError:
        known = ", ".join(s.value for s in Status)
        raise InvalidFilter(f"unknown status in {given!r}: use one of {known}") from None


def _optional_text(name: str, value: object) -> str | None:
    return None if value is None else check_text(name, value)


def _list_query(
    s: statements.Statements, filters: Mapping[str, Any]
) -> statements.Query[builtins.list[Job]]:
    """The page ``filters`` select, each checked (InvalidFilter naming a bad one; TypeError
    for a name :class:`JobFilter` does not have, as for any unknown keyword)."""
    _refuse_unknown("list", filters, JobFilter.__optional_keys__)
    limit = check_integer("limit", filters.get("limit", DEFAULT_LIMIT))
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidFilter(f"limit must be from 1 to {MAX_LIMIT}, got {limit}")
    after = filters.get("after")
    if after is not None:
        after = check_integer("after", after)
        if not ID_RANGE[0] <= after <= ID_RANGE[1]:
            raise InvalidFilter(f"after must be a job id (a bigint), got {after}")
    return statements.list_jobs(
        s,
        check_selection(filters),
        limit=limit,
        after=after,
        newest_first=bool(filters.get("newest_first", False)),
    )


#: The filters of :class:`JobSelection` that are text, checked alike.
_TEXT_FILTERS = ("queue", "task", "lock", "search")


def check_selection(filters: Mapping[str, Any]) -> statements.Selection:
    """The :class:`JobSelection` in ``filters`` (other keys ignored), each filter checked:
    InvalidFilter names a bad one. Every face's filters pass here, once."""
    text = {name: _optional_text(name, filters.get(name)) for name in _TEXT_FILTERS}
    text["search"] = text["search"] or None  # an empty search matches every job
    statuses = parse_statuses(filters.get("status"))
    return statements.Selection(
        ids=check_ids(filters.get("ids")),
        statuses=tuple(statuses) if statuses else None,  # [] filters nothing, as in list
        tags=check_tags(filters.get("tags")),
        before=check_moment("before", filters.get("before")),
        since=check_moment("since", filters.get("since")),
        workflow=_optional_id("workflow", filters.get("workflow")),
        **text,
    )


def _optional_id(name: str, value: object) -> int | None:
    return None if value is None else check_integer(name, value)


def check_ids(ids: object) -> tuple[int, ...] | None:
    """``ids=``: None, or a collection of job ids (an id outside the bigint range is no job's,
    so it is dropped: it selects nothing, as for any id no job has)."""
    if ids is None:
        return None
    if isinstance(ids, str | bytes | Mapping) or not isinstance(ids, Iterable):
        raise InvalidFilter(f"ids must be a collection of job ids, got {ids!r}")
    checked = (check_integer("ids", i) for i in ids)
    return tuple(sorted({i for i in checked if ID_RANGE[0] <= i <= ID_RANGE[1]}))


def check_tags(tags: object) -> tuple[str, ...] | None:
    """``tags=``: None, or a collection of non-empty strings (a bare string is refused: is
    ``"ab"`` one tag or two?); the jobs having all of them. No tag (``[]``) filters nothing."""
    if tags is None:
        return None
    if isinstance(tags, str | bytes | Mapping) or not isinstance(tags, Iterable):
        hint = f": tags=[{tags!r}]" if isinstance(tags, str) else ""
        raise InvalidFilter(f"tags must be a list of tags, got {tags!r}{hint}")
    checked: set[str] = set()
    for tag in tags:
        text = check_text("tags", tag)
        if not text:
            raise InvalidFilter("tags must be non-empty strings, got ''")
        checked.add(text)
    return tuple(sorted(checked)) or None


def check_moment(name: str, value: object) -> datetime | float | None:
    """``before=`` / ``since=``: a timezone-aware datetime (a naive one is ambiguous: whose
    local time?), or how long ago as seconds or a timedelta (:func:`check_seconds`)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise InvalidFilter(
                f"{name} must be timezone-aware (a naive datetime is ambiguous), got {value!r}: "
                "e.g. datetime(..., tzinfo=UTC)"
            )
        return value
    if not isinstance(value, timedelta | numbers.Real) or isinstance(value, bool):
        raise InvalidFilter(
            f"{name} must be a timezone-aware datetime, a timedelta or seconds ago, got {value!r}"
        )
    return check_seconds(name, value)


def _bulk_query(
    s: statements.Statements,
    action: statements.Action,
    filters: Mapping[str, Any],
    every: object,
    dry_run: object,
) -> statements.Query[builtins.list[int]]:
    """The bulk ``action`` on the jobs ``filters`` select, every argument checked first."""
    method = f"{action}_many"
    _refuse_unknown(method, filters, JobSelection.__optional_keys__)
    for name, flag in (("all", every), ("dry_run", dry_run)):
        if not isinstance(flag, bool):
            raise InvalidFilter(f"{name} must be True or False, got {flag!r}")
    selection = check_selection(filters)
    acts_on = statements.ACTS_ON[action]
    outside = [st.value for st in selection.statuses or () if st not in acts_on]
    if outside:
        takes = ", ".join(st.value for st in acts_on)
        hint = (
            ": a running job is aborted (abort_many), never deleted" if "doing" in outside else ""
        )
        raise InvalidFilter(
            f"status {', '.join(outside)}: {method} acts only on jobs that are {takes}{hint}"
        )
    if selection.is_empty and not every:
        raise NoFilter(
            f"{method} was given no filter, so it would act on every job: pass ids=, a filter "
            "(status=, task=, queue=, tags=, before=, ...), or all=True to mean every job"
        )
    return statements.bulk_jobs(s, action, selection, preview=dry_run is True)


#: At most this many buckets in a ``throughput``: a chart's width, not a table dump.
MAX_BUCKETS = 1000


def _throughput_query(
    s: statements.Statements, window: float, bucket: float, queue: str | None
) -> statements.Query[Throughput]:
    window = check_seconds("window", window, positive=True)
    bucket = check_seconds("bucket", bucket, positive=True)
    if bucket < MIN_BUCKET:
        raise InvalidFilter(f"bucket must be at least {MIN_BUCKET} s, got {bucket}")
    if window / bucket > MAX_BUCKETS:
        raise InvalidFilter(
            f"over {MAX_BUCKETS} buckets of {bucket} s in {window} s: use bigger ones"
        )
    return statements.throughput(s, window, bucket, _optional_text("queue", queue))


def _clear_query(s: statements.Statements, older_than: timedelta | float) -> statements.Query[int]:
    return statements.clear_old_results(s, check_seconds("older_than", older_than))


def _delete_query(
    s: statements.Statements, older_than: timedelta | float, which: Mapping[str, Any]
) -> statements.Query[int]:
    _refuse_unknown("delete_old_jobs", which, OldJobs.__optional_keys__)
    seconds = check_seconds("older_than", older_than)
    kept = [Status.SUCCEEDED]
    if which.get("include_failed"):
        kept.append(Status.FAILED)
    if which.get("include_cancelled"):
        kept += [Status.CANCELLED, Status.ABORTED]
    queue = _optional_text("queue", which.get("queue"))
    return statements.delete_old_jobs(s, seconds, tuple(kept), queue)


def _refuse_unknown(method: str, given: Mapping[str, Any], known: frozenset[str]) -> None:
    """A keyword the method's TypedDict does not have: TypeError, as Python says it."""
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}")


def _stats_reader(s: statements.Statements, window: float) -> Callable[[Connection], Stats]:
    """``stats()``'s reads as one function over a connection, run in one transaction."""
    window = check_seconds("window", window, positive=True)
    queries = statements.stats_queries(s, window)

    def read(conn: Connection) -> Stats:
        counts, finished, workers, paused = (execute(conn, q) for q in queries)
        return statements.to_stats(window, counts, finished, workers, paused)

    return read
