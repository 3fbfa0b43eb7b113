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
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pgtq import revisions, statistics
from pgtq.attempts import Attempts
from pgtq.claims import CLAIMS_IN_FLIGHT, Claims
from pgtq.completer import Completer
from pgtq.errors import ConfigurationError, SchemaNotMigrated
from pgtq.eventloop import add_stop_signals, run_on_new_loop
from pgtq.fetcher import Fetcher
from pgtq.heartbeat import Heartbeat, linger, new_worker_id
from pgtq.jobs import State
from pgtq.listener import Listener
from pgtq.model import Status
from pgtq.outcomes import (
    JobTimeoutError,
    Outcome,
    OutcomeNotWritable,
    ResultTooLarge,
    UnknownTaskError,
    WorkerLostError,
    decide,
    rescue_outcome,
)
from pgtq.periodic import run_scheduler
from pgtq.queues import at_worker_start
from pgtq.runner import JobRunner
from pgtq.scope import WorkerScope
from pgtq.threads import ThreadRunner
from pgtq.worklog import log_summaries

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
    #: Claim statements sent, and how many of them came back with no job (an idle fleet's
    #: cost: see ``pgtq.turns``).
    claims: int = 0
    empty_claims: int = 0


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
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # a second signal: stop waiting for running jobs
        self._completer = Completer(
            app.statements,
            self._id,
            self._delete_statuses,
            on_written=self._written,
            batch=self.batch_size,
            running=lambda: bool(self._attempts.running),
            notify=app.notify_completions,
        )
        self._attempts = Attempts(
            app,
            concurrency=concurrency,
            prefetch=self.prefetch,
            worker_id=self._id,
            state=self.state,
            completer=self._completer,
            count=self._count,
        )
        # Made when the run starts (they need its connector, its thread pool).
        self._claims: Claims | None = None
        self._fetcher: Fetcher | None = None
        self._listener: Listener | None = None

    def _id(self) -> str:
        return self.worker_id

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> WorkerStats:
        started = time.monotonic()
        # Signals first: a SIGTERM that lands while the worker starts stops it cleanly too.
        removers = (
            add_stop_signals(self.stop, self._hurry.set) if self.install_signal_handlers else []
        )
        try:
            return await self._run(started)
        finally:
            for remove in removers:
                remove()

    async def _every_beat(
        self, claims: Claims, listener: Listener, connector: AsyncConnector
    ) -> None:
        """What a heartbeat refreshes besides the worker's row: the queues' limits, the live
        workers (whose turn it is to claim, :mod:`pgtq.turns`), and the planner's statistics
        of the jobs table (:mod:`pgtq.statistics`)."""
        await claims.refresh_limits()
        await listener.read_roster()
        await statistics.refresh(connector, self.app.statements)

    async def _run(self, started: float) -> WorkerStats:
        connector = self.app.async_connector()
        await self._check_schema(connector)
        await at_worker_start(self.app, self.queues, self.worker_id)  # a typo: warned
        threads = None
        if any(not t.is_async for t in self.app.tasks.values()):
            threads = ThreadRunner(self.concurrency, asyncio.get_running_loop(), name="pgtq-job")
        attempts = self._attempts
        scope = WorkerScope(self.app, connector, self._id, self.queues)
        attempts.runner = JobRunner(scope, self._delete_statuses, threads)
        claims = self._claims = Claims(
            scope,
            serial=self.concurrency == 1,
            holding=attempts.ids,
            completer=self._completer,
            stopping=self._stopping,
            claimed=self._count_claim,
        )
        self._fetcher = attempts.fetcher = Fetcher(
            claims,
            attempts,
            batch_size=self.batch_size,
            fetch_interval=self.fetch_interval,
            wait=self.wait,
            stopping=self._stopping,
        )
        heartbeat = Heartbeat(
            scope,
            interval=self.heartbeat_interval,
            rescue_after=self.rescue_after,
            declared_dead=self._declared_dead,
            every_beat=lambda: self._every_beat(claims, listener, connector),
            rescued=self._count_rescued,
            renewed=attempts.changed,
        )
        attempts.leased = heartbeat.leased
        listener = self._listener = Listener(
            scope, self._fetcher, attempts, abort_interval=self.abort_interval
        )
        background: list[asyncio.Task[None]] = []
        try:
            # Inside the ``try``: a worker cancelled while it opens its connections closes
            # them and leaves no row behind. Registered last, once it can work.
            await claims.open()
            self._completer.connection = await connector.dedicated()
            await heartbeat.register()
            logger.info("worker %s started", self.worker_id, extra={"worker": self.worker_id})
            await _run_hooks(self.startup_hooks, self.state)
            await heartbeat.rescue()  # jobs a crashed worker left: before claiming anything
            await listener.read_roster()
            await statistics.refresh(connector, self.app.statements)  # a bulk-loaded backlog
            background = [
                asyncio.create_task(self._completer.run(), name="pgtq-completer"),
                asyncio.create_task(listener.poll_aborts(), name="pgtq-abort-poller"),
                asyncio.create_task(heartbeat.run(), name="pgtq-heartbeat"),
                asyncio.create_task(heartbeat.keep_house(), name="pgtq-housekeeping"),
                asyncio.create_task(listener.listen(), name="pgtq-listener"),
            ]
            if self.summary_interval:
                summaries = log_summaries(
                    self.summary_interval,
                    self.stats.by_status,
                    lambda: len(attempts.running),
                    self._id,
                )
                background.append(asyncio.create_task(summaries, name="pgtq-summary"))
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
            if attempts.running:
                linger(
                    self.app,
                    self.worker_id,
                    list(attempts.running.values()),
                    threads=threads,
                    interval=self.heartbeat_interval,
                    check_every=LINGER_CHECK_INTERVAL,
                )
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

    def _written(self, frees: bool) -> None:
        """Outcomes were written: jobs may be claimable if they freed some, or if a limit's
        slot may have freed (fleet-wide limits)."""
        limited = self._claims is not None and self._claims.limited
        self._attempts.changed(claimable=frees or limited)

    def _count(self, outcome: Outcome) -> None:
        self.stats.processed += 1
        self.stats.by_status[outcome.label] += 1

    def _count_claim(self, jobs: int) -> None:
        self.stats.claims += 1
        self.stats.empty_claims += not jobs

    def _count_rescued(self, rescued: int) -> None:
        self.stats.by_status["rescued"] += rescued

    async def _declared_dead(self) -> None:
        """This worker was declared dead (a long pause, a partition) and its jobs rescued:
        they may be running elsewhere now. Drop every attempt it still holds (nothing of
        theirs is written: their outcomes would be about a job that is no longer ours) and
        live on under a new id."""
        old = self.worker_id
        self.worker_id = new_worker_id()
        self._attempts.drop()
        logger.warning(
            "worker %s had been declared dead and its jobs rescued; it goes on as %s",
            old,
            self.worker_id,
            extra={"worker": self.worker_id},
        )

    # -- shutdown -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop claiming, give back what never started, let running jobs finish within the
        grace period, abort the rest (they go back to ``todo``), and write every outcome."""
        attempts = self._attempts
        await self._release_held()
        await attempts.wait(self.graceful_timeout, self._hurry)
        if attempts.running:
            for job_id in list(attempts.running):
                attempts.request_abort(job_id, "shutdown")
            await attempts.wait(SHUTDOWN_ABORT_GRACE, self._hurry)
        if attempts.running:
            # A sync task that ignores should_abort(), an async one that swallows its
            # cancellation: they cannot be stopped. Their jobs are not given back while they
            # run (another worker would start them: twice at once). They stay ``doing`` under
            # this worker, whose heartbeat goes on while they run (see ``heartbeat.linger``).
            logger.error(
                "%s job(s) did not stop within the shutdown grace: %s; they stay this "
                "worker's until they end (or this process exits and another worker rescues "
                "them)",
                len(attempts.running),
                ", ".join(str(job_id) for job_id in attempts.running),
                extra={"worker": self.worker_id},
            )
        await self._completer.write(give_up_after=SHUTDOWN_WRITE_TIMEOUT)

    async def _release_held(self) -> None:
        """Claimed jobs that never started go back to ``todo`` at once, attempt undone."""
        if not self._attempts.held or self._claims is None:
            return
        ids = self._attempts.take_held()
        try:
            await self._claims.release(ids)
            logger.info(
                "gave back %s unstarted job(s): %s",
                len(ids),
                ", ".join(map(str, ids)),
                extra={"worker": self.worker_id},
            )
        except Exception:
            # Still ours and ``doing``: a rescue puts them back once this worker is gone.
            logger.exception("releasing %s unstarted jobs failed", len(ids))


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
