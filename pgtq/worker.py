"""The worker: owns a run's lifecycle and wires the units that do the work.

One asyncio loop (uvloop when installed) does all the I/O, split as River splits it:

- the *fetcher* (:mod:`pgtq.fetcher`) claims up to the free room whenever a NOTIFY arrives,
  a slot frees up, a scheduled job becomes due or the polling interval passes; the SQL of
  claiming is :mod:`pgtq.claims`;
- the *runner* (:mod:`pgtq.runner`) runs each job as an asyncio task (async tasks on the
  loop, sync ones in a thread pool) and ends it in one outcome (:mod:`pgtq.outcomes`);
- the *completer* (:mod:`pgtq.completer`) writes the outcomes gathered since its last write
  in one guarded statement;
- the *heartbeat* (:mod:`pgtq.heartbeat`) keeps the worker's row fresh and rescues the jobs
  of dead workers; the listener and the abort poller turn NOTIFYs and abort requests into
  claims and cancellations.

The worker itself starts and stops them, tracks the attempts it runs, and shuts down
gracefully: unstarted jobs go back, running ones get ``shutdown_graceful_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pgtq import revisions, statements
from pgtq.claims import CLAIMS_IN_FLIGHT, Claims
from pgtq.completer import Completer
from pgtq.connectors import first_line
from pgtq.errors import ConfigurationError, SchemaNotMigrated
from pgtq.eventloop import run_on_new_loop
from pgtq.fetcher import Fetcher
from pgtq.heartbeat import Heartbeat, new_worker_id
from pgtq.jobs import JobContext, State
from pgtq.model import ClaimedJob, Status
from pgtq.outcomes import (
    JobTimeoutError,
    Outcome,
    OutcomeNotWritable,
    ResultTooLarge,
    UnknownTaskError,
    WorkerLostError,
    aborted_on_request,
    decide,
    rescue_outcome,
)
from pgtq.periodic import run_scheduler
from pgtq.retry import backoff_delays
from pgtq.runner import Attempt, Ended, JobRunner
from pgtq.threads import ThreadRunner

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.connectors import AsyncConnector

__all__ = [
    "CLAIMS_IN_FLIGHT",
    "JobTimeoutError",
    "Outcome",
    "OutcomeNotWritable",
    "ResultTooLarge",
    "UnknownTaskError",
    "Worker",
    "WorkerLostError",
    "WorkerStats",
    "decide",
    "rescue_outcome",
    "run_in_new_loop",
]

logger = logging.getLogger("pgtq.worker")

Hook = Callable[..., Any]  # () or (state)

_DELETE_STATUSES: dict[str, tuple[str, ...]] = {
    "never": (),
    "successful": (Status.SUCCEEDED.value,),
    "always": (Status.SUCCEEDED.value, Status.FAILED.value, Status.ABORTED.value),
}

#: How long aborted jobs get to stop at shutdown before the worker gives them back and leaves.
SHUTDOWN_ABORT_GRACE = 1.0
#: How often a worker that shut down checks whether the attempts that ignored it have ended.
LINGER_CHECK_INTERVAL = 0.1
#: How long a shutdown keeps trying to write outcomes to a database that does not answer.
SHUTDOWN_WRITE_TIMEOUT = 10.0


@dataclass
class WorkerStats:
    """What a worker did: returned by ``run_worker``."""

    processed: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0


class Worker:
    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        batch_size: int | None = None,
        prefetch: int | None = None,
        fetch_job_polling_interval: float = 5.0,
        abort_job_polling_interval: float = 1.0,
        shutdown_graceful_timeout: float | None = 30.0,
        heartbeat_interval: float = 5.0,
        rescue_after: float = 30.0,
        delete_jobs: Literal["never", "successful", "always"] = "never",
        startup_hooks: Iterable[Hook] = (),
        shutdown_hooks: Iterable[Hook] = (),
        wait: bool = True,
        install_signal_handlers: bool = False,
        worker_id: str | None = None,
        state: object | None = None,
        periodic: bool = True,
        summary_interval: float | None = 60.0,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if delete_jobs not in _DELETE_STATUSES:
            raise ConfigurationError("delete_jobs must be 'never', 'successful' or 'always'")
        self.app = app
        self.queues = list(queues) if queues else None
        self.concurrency = concurrency
        self.batch_size = batch_size or min(concurrency, 100)
        # Jobs claimed ahead of free slots, so the next claim overlaps running jobs.
        self.prefetch = self.batch_size if prefetch is None else prefetch
        self.fetch_interval = fetch_job_polling_interval
        self.abort_interval = abort_job_polling_interval
        self.graceful_timeout = shutdown_graceful_timeout
        self.heartbeat_interval = heartbeat_interval
        #: Seconds between the INFO line that sums up what the worker did (None: never).
        self.summary_interval = summary_interval
        # A worker silent this long is dead: any live worker puts its running jobs back.
        self.rescue_after = rescue_after
        # Jobs ending so are deleted instead of kept (their history stays in job_events).
        self._delete_statuses = _DELETE_STATUSES[delete_jobs]
        self.startup_hooks = list(startup_hooks)
        self.shutdown_hooks = list(shutdown_hooks)
        self.wait = wait
        self.install_signal_handlers = install_signal_handlers
        self.worker_id = worker_id or new_worker_id()
        self.stats = WorkerStats()
        #: Resources the startup hooks open, shared by the tasks (``ctx.state``).
        self.state = state if state is not None else State()
        # Run the periodic scheduler too (not while draining: it would keep adding jobs).
        self.periodic = periodic and wait and bool(app.periodic_tasks)
        self._running: dict[int, Attempt] = {}
        self._held: dict[int, ClaimedJob] = {}  # claimed, not started yet (in claim order)
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # a second signal: stop waiting for running jobs
        self._completer = Completer(
            app.statements, self._id, self._delete_statuses, on_written=self._changed
        )
        # Made when the run starts (they need its connector, its thread pool).
        self._claims: Claims | None = None
        self._fetcher: Fetcher | None = None
        self._runner: JobRunner | None = None
        self._heartbeat: Heartbeat | None = None

    def _id(self) -> str:
        return self.worker_id

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> WorkerStats:
        started = time.monotonic()
        # Signals first: a SIGTERM that lands while the worker starts stops it cleanly too.
        removers = self._add_signal_handlers() if self.install_signal_handlers else []
        try:
            return await self._run(started)
        finally:
            for remove in removers:
                remove()

    async def _run(self, started: float) -> WorkerStats:
        connector = self.app.async_connector()
        await self._check_schema(connector)
        threads = None
        if any(not t.is_async for t in self.app.tasks.values()):
            threads = ThreadRunner(self.concurrency, asyncio.get_running_loop(), name="pgtq-job")
        self._runner = JobRunner(self.app, self._id, self._delete_statuses, connector, threads)
        claims = self._claims = Claims(
            self.app,
            connector,
            worker_id=self._id,
            queues=self.queues,
            serial=self.concurrency == 1,
            holding=self._holding,
            completer=self._completer,
            stopping=self._stopping,
        )
        self._fetcher = Fetcher(
            claims,
            self,
            batch_size=self.batch_size,
            fetch_interval=self.fetch_interval,
            wait=self.wait,
            stopping=self._stopping,
        )
        heartbeat = self._heartbeat = Heartbeat(
            self.app,
            connector,
            worker_id=self._id,
            queues=self.queues,
            interval=self.heartbeat_interval,
            rescue_after=self.rescue_after,
            declared_dead=self._declared_dead,
            every_beat=claims.refresh_limits,
            rescued=self._count_rescued,
        )
        await heartbeat.register()
        await claims.open()
        self._completer.connection = await connector.dedicated()
        background: list[asyncio.Task[None]] = []
        logger.info("worker %s started", self.worker_id, extra={"worker": self.worker_id})
        try:
            await _run_hooks(self.startup_hooks, self.state)
            await heartbeat.rescue()  # jobs a crashed worker left: before claiming anything
            background = [
                asyncio.create_task(self._completer.run(), name="pgtq-completer"),
                asyncio.create_task(self._abort_poll_loop(connector), name="pgtq-abort-poller"),
                asyncio.create_task(heartbeat.run(), name="pgtq-heartbeat"),
                asyncio.create_task(self._listen_loop(connector), name="pgtq-listener"),
            ]
            if self.summary_interval:
                background.append(asyncio.create_task(self._summary_loop(), name="pgtq-summary"))
            if self.periodic:
                background.append(
                    asyncio.create_task(
                        run_scheduler(self.app, stop=self._stopping), name="pgtq-scheduler"
                    )
                )
            try:
                await self._fetcher.run()
            except asyncio.CancelledError:
                # Cancelling run_worker_async is a graceful shutdown, then the cancel goes on.
                self._stopping.set()
                await self._shutdown()
                raise
            await self._shutdown()
        finally:
            for bg in background:
                bg.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await claims.close()
            if self._completer.connection is not None:
                await self._completer.connection.close()
            if self._running:
                self._linger(list(self._running.values()), threads)
            else:
                with contextlib.suppress(Exception):
                    await heartbeat.unregister()
            with contextlib.suppress(Exception):
                await _run_hooks(self.shutdown_hooks, self.state)
            if threads is not None:
                threads.shutdown()
            self.stats.elapsed = time.monotonic() - started
            logger.info(
                "worker %s stopped: %s job(s) in %.1f s%s",
                self.worker_id,
                self.stats.processed,
                self.stats.elapsed,
                "".join(f", {n} {k}" for k, n in sorted(self.stats.by_status.items())),
                extra={"worker": self.worker_id},
            )
        return self.stats

    async def _check_schema(self, connector: AsyncConnector) -> None:
        """Once, at start: missing tables or a pending pre revision refuse (with the command
        to run); a newer schema only warns (a rolling upgrade, see revisions.require_schema).
        pgtq.revisions needs no Alembic: importing it cost a fresh worker 0.4 s."""
        schema = await connector.run_in_transaction(
            lambda conn: revisions.schema_status(conn, self.app.schema)
        )
        refusal = schema.error()
        if isinstance(refusal, SchemaNotMigrated):  # missing, or behind: SchemaTooOld
            raise refusal
        if refusal is not None:
            logger.warning("%s", schema.message, extra={"worker": self.worker_id})

    def stop(self) -> None:
        """Stop claiming; running jobs get ``shutdown_graceful_timeout`` to finish."""
        self._stopping.set()
        if self._fetcher is not None:
            self._fetcher.stop()

    # -- NOTIFYs and abort requests -----------------------------------------------------------

    async def _listen_loop(self, connector: AsyncConnector) -> None:
        """LISTEN, and LISTEN again after the connection is lost (polling covers the gap)."""
        assert self._fetcher is not None
        s = self.app.statements
        delays = backoff_delays()
        while True:
            try:
                listener = await connector.listen([s.channel, s.abort_channel], self._on_notify)
            except Exception as exc:
                delay = next(delays)
                logger.warning("LISTEN failed (%s); polling, retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            delays = backoff_delays()
            self._fetcher.look_again()  # jobs may have been deferred while nobody listened
            try:
                await listener.lost.wait()
                logger.warning("the LISTEN connection was lost; reconnecting")
            finally:
                await listener.close()

    def _on_notify(self, channel: str, payload: str) -> None:
        s = self.app.statements
        if channel == s.channel and self._fetcher is not None:
            queue, due_in = statements.parse_announcement(payload)
            if self.queues is None or queue in self.queues:
                if due_in is None:
                    self._fetcher.announce()
                else:
                    self._fetcher.due_in(due_in)
        elif channel == s.abort_channel:
            with contextlib.suppress(ValueError):
                self._request_abort(int(payload), "requested")

    async def _abort_poll_loop(self, connector: AsyncConnector) -> None:
        while True:
            await asyncio.sleep(self.abort_interval)
            if not self._running:
                continue
            try:
                ids = await connector.run(
                    statements.abort_requested_ids(self.app.statements, self.worker_id)
                )
            except Exception as exc:
                logger.warning("polling for aborted jobs failed: %s", first_line(exc))
                continue
            for job_id in ids:
                self._request_abort(job_id, "requested")

    def _request_abort(self, job_id: int, reason: str) -> None:
        held = self._held.pop(job_id, None) if reason == "requested" else None
        if held is not None:
            self._write(held, aborted_on_request())
            return
        attempt = self._running.get(job_id)
        if attempt is not None:
            attempt.stop(reason)

    # -- the jobs it holds (the fetcher's Holder) ---------------------------------------------

    def room(self) -> int:
        """How many more jobs this worker may hold (running, held back or being claimed)."""
        return self.concurrency + self.prefetch - len(self._running) - len(self._held)

    def hold(self, jobs: Iterable[ClaimedJob]) -> None:
        for job in jobs:
            self._held[job.id] = job

    def idle(self) -> bool:
        """Nothing running or held, and every outcome written."""
        return not self._running and not self._held and self._completer.idle

    def start(self) -> None:
        """Run held jobs while there are free slots; the rest wait."""
        while self._held and len(self._running) < self.concurrency:
            job_id = next(iter(self._held))
            self._start(self._held.pop(job_id))

    def _holding(self) -> Iterator[int]:
        yield from self._running
        yield from self._held

    def _start(self, job: ClaimedJob) -> None:
        assert self._runner is not None
        ctx = JobContext.for_job(job, self.app, self.worker_id, self.state)
        attempt = Attempt(job, ctx, self.app.lookup_task(job.task_name))
        older = self._running.get(job.id)
        if older is not None:
            # An older attempt of this job still runs here: it was rescued from this worker
            # while it was unreachable. Stop it: one attempt at a time, and its outcome is
            # not written (the guard on the attempt refuses it anyway).
            older.stop("shutdown")
        self._running[job.id] = attempt
        settle = functools.partial(self._settle, attempt)
        # The loop's own create_task: asyncio.create_task is a Python wrapper around it.
        loop = asyncio.get_running_loop()
        run = self._runner.run(attempt, settle)
        attempt.future = loop.create_task(run, name=f"pgtq-job-{job.id}")

    def _settle(self, attempt: Attempt, ended: Ended | None) -> None:
        """An attempt ended: write its outcome, unless it is written already, or the attempt
        was abandoned (the worker was declared dead, or a newer attempt took its place)."""
        if self._running.get(attempt.job.id) is attempt:
            del self._running[attempt.job.id]
            if ended is not None and not ended.written:
                self._write(attempt.job, ended.outcome)
                return
            if ended is not None:
                self._count(ended.outcome)
        self._changed()

    def _write(self, job: ClaimedJob, outcome: Outcome) -> None:
        self._completer.add(job, outcome)
        if outcome.retry_in and self._fetcher is not None:
            self._fetcher.due_in(outcome.retry_in)  # its next attempt is due then: be awake
        self._count(outcome)
        self._changed()

    def _changed(self) -> None:
        if self._fetcher is not None:
            self._fetcher.changed()

    def _count(self, outcome: Outcome) -> None:
        self.stats.processed += 1
        self.stats.by_status[outcome.label] += 1

    def _count_rescued(self, rescued: int) -> None:
        self.stats.by_status["rescued"] += rescued

    async def _declared_dead(self) -> None:
        """This worker was declared dead (a long pause, a partition) and its jobs rescued:
        they may be running elsewhere now. Drop every attempt it still holds (nothing of
        theirs is written: their outcomes would be about a job that is no longer ours) and
        live on under a new id."""
        old = self.worker_id
        self.worker_id = new_worker_id()
        self._held.clear()
        for job_id, attempt in list(self._running.items()):
            del self._running[job_id]
            attempt.stop("shutdown")
        logger.warning(
            "worker %s had been declared dead and its jobs rescued; it goes on as %s",
            old,
            self.worker_id,
            extra={"worker": self.worker_id},
        )

    async def _summary_loop(self) -> None:
        """Every ``summary_interval``: one INFO line of what was done since the last one."""
        assert self.summary_interval
        last, since = Counter(self.stats.by_status), time.monotonic()
        while True:
            await asyncio.sleep(self.summary_interval)
            now, counts = time.monotonic(), Counter(self.stats.by_status)
            done = counts - last
            ended = sum(n for label, n in done.items() if label != "rescued")
            if ended or self._running:
                logger.info(
                    "%s job(s) in %.0f s (%.1f/s)%s; %s running",
                    ended,
                    now - since,
                    ended / (now - since),
                    "".join(f", {n} {label}" for label, n in sorted(done.items())),
                    len(self._running),
                    extra={"worker": self.worker_id, "jobs": ended, **done},
                )
            last, since = counts, now

    # -- shutdown -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop claiming, give back what never started, let running jobs finish within the
        grace period, abort the rest (they go back to ``todo``), and write every outcome."""
        await self._release_held()
        await self._wait_running(self.graceful_timeout)
        if self._running:
            for job_id in list(self._running):
                self._request_abort(job_id, "shutdown")
            await self._wait_running(SHUTDOWN_ABORT_GRACE)
        if self._running:
            # A sync task that ignores should_abort(), an async one that swallows its
            # cancellation: they cannot be stopped. Their jobs are not given back while they
            # run (another worker would start them: twice at once). They stay ``doing`` under
            # this worker, whose heartbeat goes on while they run (see ``_linger``).
            logger.error(
                "%s job(s) did not stop within the shutdown grace: %s; they stay this "
                "worker's until they end (or this process exits and another worker rescues "
                "them)",
                len(self._running),
                ", ".join(str(job_id) for job_id in self._running),
                extra={"worker": self.worker_id},
            )
        await self._completer.write(give_up_after=SHUTDOWN_WRITE_TIMEOUT)

    async def _release_held(self) -> None:
        """Claimed jobs that never started go back to ``todo`` at once, attempt undone."""
        if not self._held or self._claims is None:
            return
        ids, self._held = list(self._held), {}
        try:
            await self._claims.release(ids)
        except Exception:
            # Still ours and ``doing``: a rescue puts them back once this worker is gone.
            logger.exception("releasing %s unstarted jobs failed", len(ids))

    async def _wait_running(self, timeout: float | None) -> None:
        """Until every running job is done, ``timeout`` passes, or a second signal."""
        futures = [a.future for a in self._running.values() if a.future is not None]
        if not futures:
            return
        waiters = {
            asyncio.ensure_future(asyncio.wait(futures)),
            asyncio.ensure_future(self._hurry.wait()),
        }
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    def _linger(self, stuck: list[Attempt], threads: ThreadRunner | None) -> None:
        """Keep the worker's heartbeat while attempts that ignored the shutdown still run,
        then give their jobs back and unregister: a daemon thread on the sync connector, so it
        outlives this loop and never keeps the process alive. If the process exits first,
        the heartbeat stops and another worker rescues the jobs ``rescue_after`` later."""
        loop = asyncio.get_running_loop()
        outcomes = statements.Outcomes.empty()
        for attempt in stuck:
            outcome = decide(attempt.task, attempt.job, abort_reason="shutdown")
            outcomes.add(
                attempt.job.id,
                outcome.status,
                outcome.result,
                outcome.error,
                outcome.retry_in,
                attempt=attempt.job.attempts,
            )
        worker_id, s, app = self.worker_id, self.app.statements, self.app
        futures = [a.future for a in stuck if a.task is not None and a.task.is_async]

        def running_still() -> bool:
            if threads is not None and threads.busy:
                return True
            return not loop.is_closed() and any(f is not None and not f.done() for f in futures)

        def linger() -> None:
            beat = time.monotonic()
            try:
                sync = app.sync  # made here: an app built on an AsyncEngine may have none
                while running_still():
                    time.sleep(LINGER_CHECK_INTERVAL)
                    if time.monotonic() - beat >= self.heartbeat_interval:
                        beat = time.monotonic()
                        if not sync.run(statements.heartbeat(s, worker_id)):
                            return  # declared dead meanwhile: its jobs were rescued
                sync.run(statements.complete_jobs(s, worker_id, outcomes))
                sync.run(statements.unregister_worker(s, worker_id))
                logger.info("the jobs that did not stop have ended; given back")
            except Exception as exc:
                logger.warning("lingering for jobs that did not stop failed: %s", exc)

        threading.Thread(target=linger, name="pgtq-linger", daemon=True).start()

    def _add_signal_handlers(self) -> list[Callable[[], object]]:
        loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            return []
        count = 0

        def on_signal() -> None:
            nonlocal count
            count += 1
            if count == 1:
                logger.info("stopping: waiting for running jobs (signal again to stop now)")
                self.stop()
            else:
                logger.info("stopping now: running jobs go back to the queue")
                self.stop()
                self._hurry.set()

        removers: list[Callable[[], object]] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
            removers.append(functools.partial(loop.remove_signal_handler, sig))
        return removers


async def _run_hooks(hooks: Iterable[Hook], state: object) -> None:
    """Run hooks in order; a hook that takes an argument gets the worker's state."""
    for hook in hooks:
        takes_state = bool(inspect.signature(hook).parameters)
        value = hook(state) if takes_state else hook()
        if isinstance(value, Awaitable):
            await value


def run_in_new_loop(app: App, options: dict[str, Any]) -> WorkerStats:
    """``App.run_worker``: the async worker on a loop of its own (uvloop when installed);
    see :func:`pgtq.eventloop.run_on_new_loop`."""

    async def main() -> WorkerStats:
        try:
            return await Worker(app, **options).run()
        finally:
            await app.close_loop_connector()

    return run_on_new_loop(
        main(),
        grace=SHUTDOWN_ABORT_GRACE,
        cancel_on_sigint=not options.get("install_signal_handlers"),
    )
