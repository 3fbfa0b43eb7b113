"""Running one attempt: call its task (async on the loop, sync in a thread), bound it by its
timeout (the job's own, else the task's), decide its outcome, and report it (observers,
the job's log line).

:meth:`JobRunner.run` ends every attempt in exactly one way: an :class:`Ended` (the outcome,
and whether it is already written, as a transactional task's success is) or ``None`` when
the job is no longer this worker's. Whatever the task raises or returns becomes that outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from pgtq import observers, statements
from pgtq.jobs import JobContext
from pgtq.model import ClaimedJob, Status
from pgtq.outcomes import (
    SUCCEEDED_NONE,
    Outcome,
    UnknownTaskError,
    decide,
    decide_safely,
    timeout_of,
)
from pgtq.tasks import Task, call_task
from pgtq.worklog import log_attempt

if TYPE_CHECKING:
    from pgtq.scope import WorkerScope
    from pgtq.threads import ThreadRunner

logger = logging.getLogger("pgtq.worker")


@dataclass(eq=False)
class Attempt:
    """A claimed job this worker runs: the job, its context, its task (None: unknown here)."""

    job: ClaimedJob
    ctx: JobContext
    task: Task[..., Any] | None
    future: asyncio.Task[None] | None = None

    def stop(self, reason: str) -> None:
        """Ask the attempt to stop: ``ctx.should_abort()`` turns true, an async task is
        cancelled (a sync one cannot be)."""
        stopped = self.ctx.request_abort(reason)
        if stopped and self.task is not None and self.task.is_async and self.future is not None:
            self.future.cancel()


class Ended(NamedTuple):
    """How an attempt ended: its outcome, and whether it is written already (a transactional
    task's success commits with the task's own writes)."""

    outcome: Outcome
    written: bool = False


#: How nearly every job ends (it returned None): made once, not per job.
_SUCCEEDED = Ended(SUCCEEDED_NONE)


class _RollBack(Exception):
    """Rolls a transactional task's writes back; ``ended`` is what the attempt comes to."""

    def __init__(self, ended: Ended | None) -> None:
        self.ended = ended


def _begin(ctx: JobContext, fn: Callable[..., Any], *args: Any) -> Any:
    """In the task's thread: a call stopped before a thread took it up (a shutdown, a worker
    that found it was declared dead, a timeout) does not begin, as if the task had seen
    ``ctx.should_abort()`` at once. Its job may be running elsewhere by now."""
    if ctx.should_abort():
        return None
    return fn(*args)


class JobRunner:
    """Runs attempts for one worker (its app, thread pool, connector and id)."""

    def __init__(
        self, scope: WorkerScope, delete_statuses: tuple[str, ...], threads: ThreadRunner | None
    ) -> None:
        self.app = scope.app
        self._worker_id = scope.worker_id
        self._delete_statuses = delete_statuses
        self._connector = scope.connector
        self._threads = threads

    async def run(self, attempt: Attempt, settle: Callable[[Ended | None], None]) -> None:
        """Run the attempt; ``settle`` gets how it ended as soon as that is known (before the
        attempt is reported)."""
        job, ctx, task = attempt.job, attempt.ctx, attempt.task
        # Observers and per-job (DEBUG) lines want the duration; a worker with neither skips
        # the clock. An attempt that did not succeed is logged whatever the level.
        watched = bool(observers.installed()) or logger.isEnabledFor(logging.DEBUG)
        started = time.monotonic() if watched else 0.0
        observed = (
            observers.job_started(job, ctx, waited=job.waited, trace_context=job.trace_context)
            if watched
            else None
        )
        ended: Ended | None = None
        result: Any = None
        exc: BaseException | None = None
        try:
            if task is None:
                exc = UnknownTaskError(
                    f"no task named {job.task_name!r} is registered on this worker's app"
                )
            elif task.transactional:
                ended = await self._in_transaction(task, ctx, job)
            elif task.is_async:
                # The common case, without a coroutine around it: no timeout, the task's
                # nor the job's own.
                if task.timeout is None and job.timeout is None:
                    result = await call_task(task, ctx, job.args)
                else:
                    result = await self._call_async(task, ctx, job)
            else:
                result = await self._call_sync(task, ctx, job)
        except asyncio.CancelledError:
            if ctx.abort_reason() is None:  # cancelled from outside: treat as shutdown
                ctx.request_abort("shutdown")
        except _RollBack as rollback:
            ended = rollback.ended
            if ended is None:  # the job is no longer ours: nothing to write or report
                settle(None)
                return
        except BaseException as e:
            # Whatever a task raises is its job's outcome: SystemExit, KeyboardInterrupt or a
            # custom BaseException fail the attempt; they never end the worker (only its own
            # signals do) and never leave the job ``doing``.
            exc = e
        if ended is None:
            outcome = decide_safely(task, job, result, exc, ctx.abort_reason())
            ended = _SUCCEEDED if outcome is SUCCEEDED_NONE else Ended(outcome)
        settle(ended)
        outcome = ended.outcome
        if not watched and outcome.status is Status.SUCCEEDED:
            return
        try:
            duration: float | None = None
            if watched:
                duration = time.monotonic() - started
                observers.job_finished(
                    observed, job, ctx, status=outcome.label, duration=duration, error=exc
                )
            log_attempt(job, task, outcome, exc, duration, self._worker_id())
        except Exception:
            logger.exception("reporting the end of job %s failed", job.id)

    async def _call_async(self, task: Task[..., Any], ctx: JobContext, job: ClaimedJob) -> Any:
        coro = call_task(task, ctx, job.args)
        timeout = timeout_of(task, job)
        if timeout is None:
            return await coro
        # Not asyncio.timeout: the reason is set before the cancellation is delivered, so a
        # task that catches its CancelledError reads ``ctx.abort_reason() == "timeout"``.
        me = asyncio.current_task()
        assert me is not None

        def time_out() -> None:
            if ctx.request_abort("timeout"):
                me.cancel()

        timer = asyncio.get_running_loop().call_later(timeout, time_out)
        try:
            return await coro
        finally:
            timer.cancel()

    async def _call_sync(
        self,
        task: Task[..., Any],
        ctx: JobContext,
        job: ClaimedJob,
        call: Callable[[Task[..., Any], JobContext, ClaimedJob], Any] | None = None,
    ) -> Any:
        """Run the task (or ``call``, in a transaction) in the thread pool."""
        assert self._threads is not None
        loop = asyncio.get_running_loop()
        timeout = timeout_of(task, job)
        timer = (
            loop.call_later(timeout, ctx.request_abort, "timeout") if timeout is not None else None
        )
        try:
            # A sync task cannot be interrupted: shield it so a cancel (shutdown) waits for the
            # thread, which sees ctx.should_abort() turn true.
            if call is not None:
                future = self._threads.submit(_begin, ctx, call, task, ctx, job)
            elif observers.installed():
                # Observers (tracing) keep state in context variables: run the task in a copy
                # of this task's context so its span is the current one in the thread too.
                run = contextvars.copy_context().run
                future = self._threads.submit(run, _begin, ctx, call_task, task, ctx, job.args)
            else:
                future = self._threads.submit(_begin, ctx, call_task, task, ctx, job.args)
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            ctx.request_abort("shutdown")
            with contextlib.suppress(BaseException):
                return await future
            raise
        finally:
            if timer is not None:
                timer.cancel()

    # -- transactional tasks: the task's writes and its job's success commit together --------

    async def _in_transaction(
        self, task: Task[..., Any], ctx: JobContext, job: ClaimedJob
    ) -> Ended | None:
        """None: a sync call stopped before it began (its outcome follows the stop)."""
        if not task.is_async:
            ended: Ended | None = await self._call_sync(task, ctx, job, self._sync_in_transaction)
            return ended
        async with self._connector.transaction() as conn:
            ctx.connection = conn
            result = await self._call_async(task, ctx, job)
            outcome, query, again = self._success(task, ctx, job, result)
            run = self._connector.run
            if not await run(query, connection=conn) and not await run(again, connection=conn):
                raise _RollBack(None)  # rescued or aborted meanwhile: roll back
            return Ended(outcome, written=True)

    def _sync_in_transaction(self, task: Task[..., Any], ctx: JobContext, job: ClaimedJob) -> Ended:
        """In the task's thread."""
        with self.app.sync.transaction() as conn:
            ctx.connection = conn
            result = call_task(task, ctx, job.args)
            outcome, query, again = self._success(task, ctx, job, result)
            run = self.app.sync.run
            if not run(query, connection=conn) and not run(again, connection=conn):
                raise _RollBack(None)  # rescued or aborted meanwhile: roll back
            return Ended(outcome, written=True)

    def _success(
        self, task: Task[..., Any], ctx: JobContext, job: ClaimedJob, result: Any
    ) -> tuple[Outcome, statements.Query[list[int]], statements.Query[list[int]]]:
        """The outcome, and the statement writing it inside the task's transaction, then the
        one writing it if the first did not (a job with children: its children are settled
        by the same transaction); any outcome but a success rolls the task's writes back
        (raises)."""
        outcome = decide(task, job, result=result, abort_reason=ctx.abort_reason())
        if outcome.status != Status.SUCCEEDED:
            raise _RollBack(Ended(outcome))
        single = statements.Outcomes.empty()
        single.add(job.id, outcome.status, outcome.result, attempt=job.attempts)
        s, me, deleting = self.app.statements, self._worker_id(), self._delete_statuses
        query = statements.complete_jobs(s, me, single, deleting)
        again = statements.complete_jobs(s, me, single, deleting, releasing=True)
        return outcome, query, again
