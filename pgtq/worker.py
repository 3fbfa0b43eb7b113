"""The worker: claims jobs in batches, runs them, writes their outcomes in batches.

One asyncio loop (uvloop when installed) does all the I/O:

- the *fetcher* claims up to the free slots in one statement whenever a NOTIFY arrives, a
  slot frees up, or ``fetch_job_polling_interval`` passes;
- each job runs as an asyncio task: async tasks on the loop, sync tasks in a thread pool;
- the *completer* writes every outcome gathered since its last write in one statement,
  guarded so a job that is no longer this worker's is never overwritten;
- the *abort poller* and the listener turn abort requests into cancellation (async tasks) or
  ``ctx.should_abort()`` (sync tasks); a heartbeat keeps the worker's row fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pgtq import observers, revisions, statements
from pgtq.connectors import execute, first_line, is_data_error, sqlstate
from pgtq.errors import ConfigurationError, SchemaNotMigrated
from pgtq.jobs import JobContext, State
from pgtq.limits import Limit, allowances, bucket_key, charges
from pgtq.model import ClaimedJob, Status, clip, dumps, error_record, unstorable_json
from pgtq.periodic import run_scheduler
from pgtq.retry import backoff_delays
from pgtq.tasks import Task, call_task
from pgtq.threads import ThreadRunner

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from pgtq.app import App
    from pgtq.connectors import AsyncConnector, DedicatedConnection

logger = logging.getLogger("pgtq.worker")

Hook = Callable[..., Any]  # () or (state)

_DELETE_STATUSES: dict[str, tuple[str, ...]] = {
    "never": (),
    "successful": (Status.SUCCEEDED.value,),
    "always": (Status.SUCCEEDED.value, Status.FAILED.value, Status.ABORTED.value),
}


@dataclass
class WorkerStats:
    """What a worker did: returned by ``run_worker``."""

    processed: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended, as it will be written."""

    status: Status
    result: str | None = None
    error: str | None = None
    retry_in: float | None = None
    # Derived once here, not per job on the hot path (an enum's ``value`` and ``hash`` are
    # Python-level calls): the status as written, and the label stats and logs use.
    value: str = field(init=False, repr=False, compare=False)
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", self.status.value)
        object.__setattr__(self, "label", _LABELS[self.status])


_LABELS = {status: "retried" if status is Status.TODO else status.value for status in Status}
#: The outcome of nearly every job (it returned None): one object, no JSON encoding.
_SUCCEEDED_NONE = Outcome(Status.SUCCEEDED, result="null")


#: How long aborted jobs get to stop at shutdown before the worker gives them back and leaves.
SHUTDOWN_ABORT_GRACE = 1.0
#: How often a worker that shut down checks whether the attempts that ignored it have ended.
LINGER_CHECK_INTERVAL = 0.1
#: How long a shutdown keeps trying to write outcomes to a database that does not answer.
SHUTDOWN_WRITE_TIMEOUT = 10.0


class WorkerLostError(Exception):
    """Stored as the error of an attempt whose worker died (or went silent) while running it."""


class ResultTooLarge(Exception):
    """Stored as the error of a job whose result is over ``App(result_max_bytes=...)``."""


class OutcomeNotWritable(Exception):
    """Stored as the error of an attempt whose outcome PostgreSQL refused to store."""


class UnknownTaskError(Exception):
    """Stored as the error of a job whose task this worker does not have."""


class JobTimeoutError(Exception):
    """Stored as the error of an attempt that ran past its task's ``timeout``."""


def rescue_outcome(task: Task[Any] | None, old_worker: str, rescuer: str, rescues: int) -> Outcome:
    """What a rescue writes for a job whose worker died running it: pure.

    A lost worker is not a failed job: it goes back to ``todo`` and runs again whatever its
    retry policy (its attempt stays counted), as River, Oban or Celery's ``acks_late`` do. A
    job whose worker died ``max_rescues`` times already is likely what kills them: it ends
    ``failed``. A task this worker does not know goes back as is: a worker that knows it
    decides. Each rescue is a ``rescued`` event in the job's history.
    """
    lost = WorkerLostError(
        f"worker {old_worker} stopped sending heartbeats while running this job; "
        f"rescued by {rescuer}"
    )
    if task is not None and rescues >= task.max_rescues:
        lost = WorkerLostError(
            f"worker {old_worker} stopped sending heartbeats while running this job, which "
            f"had lost its worker {rescues} time(s) before: over the task's max_rescues of "
            f"{task.max_rescues}, so it may be what kills its workers; rescued by {rescuer}"
        )
        return Outcome(Status.FAILED, error=dumps(error_record(lost, with_traceback=False)))
    return Outcome(Status.TODO, error=dumps(error_record(lost, with_traceback=False)), retry_in=0.0)


def _decide(
    task: Task[Any] | None,
    job: ClaimedJob,
    result: Any,
    exc: BaseException | None,
    abort_reason: str | None,
) -> Outcome:
    """:func:`decide`, which never raises: a retry policy or a result that breaks the
    decision fails the attempt instead of leaving its job ``doing``."""
    try:
        return decide(task, job, result=result, exc=exc, abort_reason=abort_reason)
    except Exception as broken:
        return Outcome(Status.FAILED, error=dumps(error_record(broken)))


def decide(
    task: Task[Any] | None,
    job: ClaimedJob,
    *,
    result: Any = None,
    exc: BaseException | None = None,
    abort_reason: str | None = None,
) -> Outcome:
    """The outcome of an attempt: pure, so both kinds of task share it (and tests reach it).

    A job whose abort was requested ends ``aborted`` even if its task ignored the request and
    returned. A timeout is a failure that follows the retry policy. A shutdown puts the job
    back to ``todo`` (its attempt stays counted).
    """
    if result is None and exc is None and abort_reason is None:
        limit = task.app.result_max_bytes if task is not None else None
        if limit is None or limit >= len("null"):
            return _SUCCEEDED_NONE
    if abort_reason == "shutdown":
        err = error_record(exc or RuntimeError("worker shut down"), with_traceback=False)
        return Outcome(Status.TODO, error=dumps(err), retry_in=0.0)
    if abort_reason == "requested":
        err = {"type": "Aborted", "message": "the job was aborted on request"}
        return Outcome(Status.ABORTED, error=dumps(err))
    if abort_reason == "timeout":
        seconds = task.timeout if task is not None else None
        exc = JobTimeoutError(f"the job ran past its timeout of {seconds} s")
    if exc is None:
        # A result that cannot be stored fails the job at once: running it again would not
        # change the result, so the retry policy does not apply.
        try:
            encoded = "null" if result is None else dumps(result)
            unstorable = unstorable_json(encoded)
        except Exception as ser:  # TypeError, ValueError, RecursionError, a hostile __iter__
            bad = TypeError(f"the task's return value is not JSON-serializable: {ser!r}")
            return Outcome(Status.FAILED, error=dumps(error_record(bad, with_traceback=False)))
        if unstorable is not None:
            bad = TypeError(f"the task's return value cannot be stored: {unstorable}")
            return Outcome(Status.FAILED, error=dumps(error_record(bad, with_traceback=False)))
        limit = task.app.result_max_bytes if task is not None else None
        if limit is not None and len(encoded) > limit:
            big = ResultTooLarge(
                f"the task's result is {len(encoded):,} bytes of JSON, over the app's "
                f"result_max_bytes of {limit:,}: store large data elsewhere and return a key"
            )
            return Outcome(Status.FAILED, error=dumps(error_record(big, with_traceback=False)))
        return Outcome(Status.SUCCEEDED, result=encoded)
    err_json = dumps(error_record(exc))
    if task is not None:
        delay = task.retry.delay(job.attempts, exc)
        if delay is not None:
            return Outcome(Status.TODO, error=err_json, retry_in=delay)
    return Outcome(Status.FAILED, error=err_json)


_NOT_RUN = ClaimedJob(0, "", "", {}, 0, 0, None)
_DECIDED = object()  # the outcome is already known (a transactional task's failure)


@dataclass(frozen=True, slots=True)
class _Committed:
    """A transactional task succeeded and its job's success was committed with its writes."""

    outcome: Outcome


class _NotCommitted(Exception):
    """Rolls a transactional task's writes back; ``outcome`` is still to be written (None: the
    job is no longer this worker's)."""

    def __init__(self, outcome: Outcome | None) -> None:
        self.outcome = outcome


#: Claims a worker keeps in flight at most (each on a connection of its own): two let the
#: server run one while the worker runs the other's jobs (async burn-down at batch 20: +6-10 %).
CLAIMS_IN_FLIGHT = 2


@dataclass(frozen=True, slots=True)
class _InFlight:
    # The oldest claim is a bare coroutine, awaited by the fetch loop itself: it is sent at
    # once, not a loop turn later as a task's first step would be (0.05 ms of an idle
    # worker's pickup). A claim sent behind it is a task, so both are out at the same time.
    task: Awaitable[list[ClaimedJob] | None]
    asked: int
    writes: int  # completion writes done when it was sent


@dataclass(eq=False)
class _Running:
    job: ClaimedJob
    ctx: JobContext
    task: Task[Any] | None
    future: asyncio.Task[None] | None = None


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
        if delete_jobs not in _DELETE_STATUSES:
            raise ConfigurationError("delete_jobs must be 'never', 'successful' or 'always'")
        # Jobs ending so are deleted instead of kept (their history stays in job_events).
        self._delete_statuses = _DELETE_STATUSES[delete_jobs]
        self.startup_hooks = list(startup_hooks)
        self.shutdown_hooks = list(shutdown_hooks)
        self.wait = wait
        self.install_signal_handlers = install_signal_handlers
        self.worker_id = worker_id or _new_worker_id()
        self.stats = WorkerStats()
        #: Resources the startup hooks open, shared by the tasks (``ctx.state``).
        self.state = state if state is not None else State()
        # Run the periodic scheduler too (not while draining: it would keep adding jobs).
        self.periodic = periodic and wait and bool(app.periodic_tasks)
        self._s = app.statements
        self._running: dict[int, _Running] = {}
        self._buffer: dict[int, ClaimedJob] = {}  # claimed, not started yet (in claim order)
        self._outcomes = statements.Outcomes.empty()
        self._threads: ThreadRunner | None = None
        self._connector: AsyncConnector | None = None
        # Claims and completions have connections of their own, so claims and a completion
        # write are in flight at the same time: up to CLAIMS_IN_FLIGHT claims (one per
        # connection, each opened on first use) and one write.
        self._claimers: list[DedicatedConnection] = []
        self._free_claimers: list[DedicatedConnection] = []
        self._last_full = False  # the last claim came back full: more may be waiting
        self._completer: DedicatedConnection | None = None
        # The fetch loop sleeps on one event, rung by whatever may give it work: a NOTIFY of
        # new jobs (heeded only while it has free slots), a job that ended or outcomes written
        # (``changed``), a stop. One future per sleep, no helper tasks: the path from a
        # NOTIFY to the claim is a single wake-up.
        self._bell = asyncio.Event()
        self._new_jobs = False  # a NOTIFY announced new jobs since the last claim
        self._changed = False  # a job finished or outcomes were written since the loop looked
        self._wants_jobs = False  # asleep with free slots: a NOTIFY rings the bell
        # When the earliest job scheduled ahead becomes due (loop time): an idle worker wakes
        # then, not at its next poll. Lowered by NOTIFYs of jobs deferred ahead and by this
        # worker's own retries; looked up again after each timed wake-up (``_timed``).
        self._wake_at: float | None = None
        self._timed = True  # the next idle moment asks the database when a job is due next
        self._rescheduled = False  # the wake-up moved earlier while the loop slept
        self._stopping = asyncio.Event()
        self._flush = asyncio.Event()  # outcomes wait to be written
        self._write_lock = asyncio.Lock()
        self._writes = 0  # completion writes done so far
        self._hurry = asyncio.Event()  # a second signal: stop waiting for running jobs
        self._claim_delays = backoff_delays()
        self._reconcile = False  # a claim failed: release claimed jobs this worker lost track of
        self._unclaimable = False  # a claim failed on a job's data: fail the rows that break it
        # Fleet-wide limits: the tasks' own (from code), the queues' (read from the database).
        self._task_limits = {
            bucket_key("task", t.name): t.limit
            for t in app.tasks.values()
            if t.limit.concurrency is not None or t.limit.rate is not None
        }
        self._keycaps = {
            t.name: t.key_concurrency for t in app.tasks.values() if t.key_concurrency is not None
        }
        self._queue_limits: dict[str, Limit] = {}

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
        connector = self._connector = self.app.async_connector()
        # Once, at start: missing tables or a pending pre revision refuse (with the command
        # to run); a newer schema only warns (a rolling upgrade, see revisions.require_schema).
        # pgtq.revisions needs no Alembic: importing it cost a fresh worker 0.4 s.
        schema = await connector.run_in_transaction(
            lambda conn: revisions.schema_status(conn, self.app.schema)
        )
        refusal = schema.error()
        if isinstance(refusal, SchemaNotMigrated):  # missing, or behind: SchemaTooOld
            raise refusal
        if refusal is not None:
            logger.warning("%s", schema.message, extra={"worker": self.worker_id})
        if any(not t.is_async for t in self.app.tasks.values()):
            loop = asyncio.get_running_loop()
            self._threads = ThreadRunner(self.concurrency, loop, name="pgtq-job")
        await self._register()
        await self._refresh_queue_limits()
        self._claimers = [
            await connector.dedicated(session=self._claim_session(), jsonb_text=True)
            for _ in range(CLAIMS_IN_FLIGHT)
        ]
        self._free_claimers = list(self._claimers)
        self._completer = await connector.dedicated()
        background: list[asyncio.Task[None]] = []
        logger.info("worker %s started", self.worker_id, extra={"worker": self.worker_id})
        try:
            await _run_hooks(self.startup_hooks, self.state)
            await self._rescue()  # jobs a crashed worker left: before claiming anything
            background = [
                asyncio.create_task(self._complete_loop(), name="pgtq-completer"),
                asyncio.create_task(self._abort_poll_loop(), name="pgtq-abort-poller"),
                asyncio.create_task(self._heartbeat_loop(), name="pgtq-heartbeat"),
                asyncio.create_task(self._listen_loop(), name="pgtq-listener"),
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
                await self._fetch_loop()
            except asyncio.CancelledError:
                # Cancelling run_worker_async is a graceful shutdown, then the cancel goes on.
                self._stopping.set()
                await self._shutdown(background)
                raise
            await self._shutdown(background)
        finally:
            for bg in background:
                bg.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for conn in (*self._claimers, self._completer):
                if conn is not None:
                    await conn.close()
            if self._running:
                self._linger(list(self._running.values()))
            else:
                with contextlib.suppress(Exception):
                    await connector.run(statements.unregister_worker(self._s, self.worker_id))
            with contextlib.suppress(Exception):
                await _run_hooks(self.shutdown_hooks, self.state)
            if self._threads is not None:
                self._threads.shutdown()
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

    def _claim_session(self) -> tuple[str, ...]:
        """Claims commit without waiting for the WAL flush (about 0.4 ms a claim here). Safe:
        the completion that follows is flushed, and with it the claim before it; a claim lost
        in a server crash puts its job back to ``todo``, and the guarded completion of the lost
        attempt writes nothing: at least once, as always. Visibility is immediate either way.
        Not behind PgBouncer in transaction mode (``prepared_statements=False``), where a
        session setting would leak to other clients."""
        if not self.app.prepared_statements:
            return ()
        return ("SET synchronous_commit = off",)

    def stop(self) -> None:
        """Stop claiming; running jobs get ``shutdown_graceful_timeout`` to finish."""
        self._stopping.set()
        self._bell.set()

    async def _listen_loop(self) -> None:
        """LISTEN, and LISTEN again after the connection is lost (polling covers the gap)."""
        assert self._connector is not None
        delays = backoff_delays()
        while True:
            try:
                listener = await self._connector.listen(
                    [self._s.channel, self._s.abort_channel], self._on_notify
                )
            except Exception as exc:
                delay = next(delays)
                logger.warning("LISTEN failed (%s); polling, retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            delays = backoff_delays()
            self._timed = True  # jobs may have been deferred ahead while nobody listened
            self._announce_new_jobs()  # or due ones
            try:
                await listener.lost.wait()
                logger.warning("the LISTEN connection was lost; reconnecting")
            finally:
                await listener.close()

    def _announce_new_jobs(self) -> None:
        self._new_jobs = True
        if self._wants_jobs:
            self._bell.set()

    def _note_due(self, seconds: float) -> None:
        """A job becomes due in ``seconds``: wake up then at the latest."""
        at = asyncio.get_running_loop().time() + max(0.0, seconds)
        if self._wake_at is None or at < self._wake_at:
            self._wake_at = at
            if self._wants_jobs:  # asleep with free slots: sleep again, until then
                self._rescheduled = True
                self._bell.set()

    async def _look_ahead(self) -> None:
        """Ask the database when the earliest job scheduled ahead becomes due."""
        assert self._connector is not None
        self._timed = False
        try:
            due_in = await self._connector.run(statements.next_due_in(self._s, self.queues))
        except Exception as exc:
            logger.debug("looking up the next due job failed: %s", first_line(exc))
            return
        if due_in is not None:
            self._note_due(due_in)

    def _mark_changed(self) -> None:
        self._changed = True
        self._bell.set()

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == self._s.channel:
            queue, due_in = statements.parse_announcement(payload)
            if self.queues is None or queue in self.queues:
                if due_in is None:
                    self._announce_new_jobs()
                else:
                    self._note_due(due_in)
        elif channel == self._s.abort_channel:
            with contextlib.suppress(ValueError):
                self._request_abort(int(payload), "requested")

    # -- fetching -------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        """Claim while there is room, and sleep until there may be work.

        While full batches come back (jobs are waiting and the worker keeps up), a second
        claim goes out before the first returns, on a connection of its own: the server runs
        one claim while this loop runs the other's jobs. Claims are settled oldest first.
        """
        inflight: deque[_InFlight] = deque()
        try:
            while not self._stopping.is_set():
                self._changed = False
                if self._reconcile and not inflight and not await self._release_unknown():
                    continue
                if self._unclaimable and not inflight:
                    await self._fail_unclaimable()
                self._start_buffered()
                if not self._reconcile:  # no new claim until the lost ones are given back
                    self._send_claims(inflight)
                settled: _InFlight | None = None
                got: list[ClaimedJob] = []
                if inflight:
                    settled = inflight.popleft()
                    claimed = await settled.task
                    if claimed is None:
                        continue  # the claim failed and was waited out: try again
                    got = claimed
                    self._last_full = len(got) == settled.asked
                    for job in got:
                        self._buffer[job.id] = job
                    self._start_buffered()
                    if got:
                        # Let the jobs just started take their first step (quick ones end
                        # in it) before the room for the next claim is counted.
                        await asyncio.sleep(0)
                    if self._last_full or inflight:
                        continue  # there may be more waiting, or a claim is still out
                # Drained: nothing running or left to write, and no write landed since the
                # last claim went out (it may have made a retry due that the claim missed).
                if (
                    not self.wait
                    and settled is not None
                    and not got
                    and self._drained()
                    and settled.writes == self._writes
                ):
                    return
                if self._timed and self._room() > 0:
                    await self._look_ahead()
                await self._sleep_until_work(free_slots=self._room() > 0)
                self._last_full = False  # woken: one claim first, more once one comes back full
        finally:
            # Stopping: claims still out are settled; their jobs wait in the buffer, which
            # the shutdown gives back.
            for left in inflight:
                if inspect.iscoroutine(left.task):  # never sent
                    left.task.close()
                    continue
                with contextlib.suppress(BaseException):
                    for job in await left.task or ():
                        self._buffer[job.id] = job

    def _room(self) -> int:
        """How many more jobs this worker may hold (running, buffered or being claimed)."""
        return self.concurrency + self.prefetch - len(self._running) - len(self._buffer)

    def _send_claims(self, inflight: deque[_InFlight]) -> None:
        """Send claims while there is room: one, and a second while full batches come back.

        One at a time under fleet-wide limits (those claims take a lock anyway) and at
        ``concurrency=1``: two claims in flight may run on the server in either order, so a
        job of the later one can outrank the earlier one's; a serial worker keeps strict
        priority order.
        """
        room = self._room() - sum(c.asked for c in inflight)
        limited = bool(self._task_limits or self._queue_limits or self._keycaps)
        depth = 1 if limited or self.concurrency == 1 else len(self._claimers)
        while room > 0 and len(inflight) < depth and (not inflight or self._last_full):
            asked = _claim_size(room, self.batch_size)
            self._new_jobs = False
            coro = self._claim_on(asked)
            claim = asyncio.get_running_loop().create_task(coro) if inflight else coro
            inflight.append(_InFlight(claim, asked, self._writes))
            room -= asked

    async def _claim_on(self, limit: int) -> list[ClaimedJob] | None:
        """A claim on a free claim connection (there is one: at most one claim each)."""
        conn = self._free_claimers.pop()
        try:
            return await self._claim(limit, conn)
        finally:
            self._free_claimers.append(conn)

    def _start_buffered(self) -> None:
        """Run claimed jobs while there are free slots; the rest wait in the buffer."""
        while self._buffer and len(self._running) < self.concurrency:
            job_id = next(iter(self._buffer))
            self._start(self._buffer.pop(job_id))

    def _drained(self) -> bool:
        """Nothing running and every outcome written (a retry due now is then claimable)."""
        return (
            not self._running
            and not self._buffer
            and not self._outcomes
            and not self._write_lock.locked()
        )

    async def _claim(self, limit: int, conn: DedicatedConnection) -> list[ClaimedJob] | None:
        """Claim up to ``limit`` jobs; None when the claim failed (and should be tried again)."""
        query = statements.claim_jobs(self._s, self.worker_id, self.queues, limit)
        try:
            if self._task_limits or self._queue_limits or self._keycaps:
                assert self._connector is not None
                claimed = await self._connector.run_in_transaction(
                    functools.partial(self._claim_under_limits, limit=limit)
                )
            else:
                claimed = await conn.run(query)
            self._claim_delays = backoff_delays()
            return claimed
        except Exception as exc:
            if sqlstate(exc) == "23505" and "jobs_lock_doing_idx" in str(exc):
                # Another worker claimed a job of the same lock at the same instant.
                logger.debug("lock conflict while claiming; claiming again")
                return None
            # The claim may have committed with its reply lost: its jobs are ours and doing,
            # but unknown here. Give back whatever this worker does not know, before the
            # next claim.
            self._reconcile = True
            if is_data_error(exc) or _decoding_error(exc):
                # A row the claim cannot take (written by other means than defer): the
                # fetch loop gives the claimed jobs back, fails that row, and claims again.
                logger.warning("claiming jobs failed on a job's data: %s", first_line(exc))
                self._unclaimable = True
                return None
            delay = next(self._claim_delays)
            logger.warning("claiming jobs failed (%s); retrying in %.1f s", exc, delay)
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait([stop], timeout=delay)
            stop.cancel()
            return None

    def _claim_under_limits(self, conn: Connection, *, limit: int) -> list[ClaimedJob]:
        """The claim when limits apply: one transaction under the limits lock, so the counts
        read here hold until the claimed jobs are ``doing``. Runs on a sync Connection (the
        async connector runs it through SQLAlchemy's greenlet bridge)."""
        s = self._s
        limits = {**self._task_limits, **self._queue_limits}
        execute(conn, statements.limits_lock(s))
        running = execute(
            conn,
            statements.running_counts(
                s,
                [k.removeprefix("task:") for k in limits if k.startswith("task:")],
                [k.removeprefix("queue:") for k in limits if k.startswith("queue:")],
            ),
        )
        rated = [k for k, v in limits.items() if v.rate is not None]
        buckets = execute(conn, statements.read_buckets(s, rated)) if rated else {}
        allow = allowances(limits, running, buckets)
        query = statements.claim_limited(
            s, self.worker_id, self.queues, limit, allow, self._keycaps
        )
        claimed = execute(conn, query)
        if rated and claimed:
            taken = [k for job in claimed for k in (f"task:{job.task_name}", f"queue:{job.queue}")]
            execute(conn, statements.write_buckets(s, charges(limits, buckets, taken)))
        return claimed

    async def _refresh_queue_limits(self) -> None:
        """Queue limits live in the database (``app.queues.set_limits``): read them again."""
        assert self._connector is not None
        found = await self._connector.run(statements.queue_limits(self._s))
        self._queue_limits = {
            bucket_key("queue", name): Limit(concurrency=cap, rate=rate)
            for name, (cap, rate) in found.items()
        }

    async def _fail_unclaimable(self) -> None:
        """Fail the waiting jobs no claim can take, so one bad row never stops every claim
        of every worker; when there are none, the claim failed for another reason: wait."""
        assert self._connector is not None
        self._unclaimable = False
        try:
            failed = await self._connector.run(
                statements.fail_unclaimable_jobs(self._s, self.queues)
            )
        except Exception as exc:
            logger.warning("looking for jobs no claim can take failed: %s", first_line(exc))
            failed = []
        if failed:
            logger.error(
                "failed %s job(s) that no claim can take (written by other means than defer): %s",
                len(failed),
                ", ".join(map(str, failed)),
                extra={"worker": self.worker_id},
            )
            return
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([stop], timeout=next(self._claim_delays))
        stop.cancel()

    async def _release_unknown(self) -> bool:
        """Release this worker's ``doing`` jobs it neither runs, holds, nor has outcomes of
        (written or not): a lost claim reply's jobs. False when it could not be done yet."""
        assert self._connector is not None
        async with self._write_lock:  # no outcome write in flight: every known id is here
            known = {*self._running, *self._buffer, *self._outcomes.ids}
            try:
                released = await self._connector.run(
                    statements.release_unknown_jobs(self._s, self.worker_id, known)
                )
            except Exception as exc:
                logger.warning("could not release unknown claimed jobs yet: %s", exc)
                stop = asyncio.ensure_future(self._stopping.wait())
                await asyncio.wait([stop], timeout=next(self._claim_delays))
                stop.cancel()
                return False
        self._reconcile = False
        if released:
            logger.warning(
                "released %s job(s) claimed by a claim whose reply was lost",
                len(released),
                extra={"worker": self.worker_id},
            )
        return True

    async def _sleep_until_work(self, *, free_slots: bool) -> None:
        """Wait for a NOTIFY, a free slot, a stop, the next scheduled job's due time, or the
        polling interval."""
        if self._changed or (free_slots and self._new_jobs) or self._stopping.is_set():
            return  # it came while the loop was busy
        loop = asyncio.get_running_loop()
        self._bell.clear()
        self._wants_jobs = free_slots
        try:
            while True:
                timeout, until_due = self.fetch_interval, None
                if free_slots and self._wake_at is not None:
                    until_due = self._wake_at - loop.time()
                    if until_due <= 0:
                        self._wake_at, self._timed = None, True
                        return
                    timeout = min(timeout, until_due)
                try:
                    async with asyncio.timeout(timeout):
                        await self._bell.wait()
                except TimeoutError:
                    if until_due is not None and until_due <= timeout:
                        self._wake_at = None
                    self._timed = True  # the polling interval, or a job's due time: look
                    return
                rescheduled, self._rescheduled = self._rescheduled, False
                woken = self._changed or self._new_jobs or self._stopping.is_set()
                if not rescheduled or woken:
                    return
                self._bell.clear()  # only the wake-up moved: sleep again, until then
        finally:
            self._wants_jobs = False

    # -- running jobs ---------------------------------------------------------------------------

    def _start(self, job: ClaimedJob) -> None:
        ctx = JobContext.for_job(job, self.app, self.worker_id, self.state)
        running = _Running(job, ctx, self.app.lookup_task(job.task_name))
        older = self._running.get(job.id)
        if older is not None:
            # An older attempt of this job still runs here: it was rescued from this worker
            # while it was unreachable. Stop it: one attempt at a time, and its outcome is
            # not written (the guard on the attempt refuses it anyway).
            self._stop_attempt(older)
        self._running[job.id] = running
        # The loop's own create_task: asyncio.create_task is a Python wrapper around it.
        loop = asyncio.get_running_loop()
        running.future = loop.create_task(self._run_job(running), name=f"pgtq-job-{job.id}")

    async def _run_job(self, running: _Running) -> None:
        job, ctx, task = running.job, running.ctx, running.task
        # Observers and per-job (DEBUG) lines want the duration; a worker with neither skips
        # the clock. An attempt that did not succeed is logged whatever the level.
        watched = bool(observers.installed()) or logger.isEnabledFor(logging.DEBUG)
        started = time.monotonic() if watched else 0.0
        observed = (
            observers.job_started(job, ctx, waited=job.waited, trace_context=job.trace_context)
            if watched
            else None
        )
        result: Any = None
        exc: BaseException | None = None
        try:
            if task is None:
                exc = UnknownTaskError(
                    f"no task named {job.task_name!r} is registered on this worker's app"
                )
            elif task.is_async:
                if task.transactional:
                    result = await self._call_async_in_transaction(task, ctx, job)
                elif task.timeout is None:
                    result = await call_task(task, ctx, job.args)
                else:
                    result = await self._call_async(task, ctx, job)
            else:
                result = await self._call_sync(task, ctx, job)
        except asyncio.CancelledError:
            if ctx.abort_reason() is None:  # cancelled from outside: treat as shutdown
                ctx.request_abort("shutdown")
        except _NotCommitted as nc:
            if nc.outcome is None:  # the job is no longer ours: nothing to write
                self._forget(running)
                self._mark_changed()
                return
            result, exc = _DECIDED, None
            outcome = nc.outcome
        except BaseException as e:
            # Whatever a task raises is its job's outcome: SystemExit, KeyboardInterrupt or a
            # custom BaseException fail the attempt; they never end the worker (only its own
            # signals do) and never leave the job ``doing``.
            exc = e
        if isinstance(result, _Committed):
            outcome = result.outcome  # written with the task's own transaction
            if self._forget(running):
                self._count(outcome)
                self._mark_changed()
        else:
            if result is not _DECIDED:
                outcome = _decide(task, job, result, exc, ctx.abort_reason())
            self._record(running, outcome)
        if not watched and outcome.status is Status.SUCCEEDED:
            return
        try:
            duration: float | None = None
            if watched:
                duration = time.monotonic() - started
                observers.job_finished(
                    observed, job, ctx, status=outcome.label, duration=duration, error=exc
                )
            self._log_attempt(job, task, outcome, exc, duration)
        except Exception:
            logger.exception("reporting the end of job %s failed", job.id)

    def _log_attempt(
        self,
        job: ClaimedJob,
        task: Task[Any] | None,
        outcome: Outcome,
        exc: BaseException | None,
        duration: float | None,
    ) -> None:
        """A job's line: DEBUG when it succeeded (one per job: a busy worker's INFO log stays
        quiet), INFO when it will run again, WARNING when it failed or was aborted; those
        name the exception and the attempt."""
        level = (
            logging.DEBUG
            if outcome.status is Status.SUCCEEDED
            else logging.INFO
            if outcome.status is Status.TODO
            else logging.WARNING
        )
        if not logger.isEnabledFor(level):
            return
        of = f" of {task.retry.max_attempts}" if task is not None else ""
        extra: dict[str, Any] = {
            "job_id": job.id,
            "task": job.task_name,
            "queue": job.queue,
            "attempt": job.attempts,
            "worker": self.worker_id,
            "status": outcome.label,
        }
        text = f"job {job.id} {job.task_name} {outcome.label} (attempt {job.attempts}{of})"
        if duration is not None:
            extra["duration"] = duration
            text += f" in {duration:.3f} s"
        if exc is not None:
            record = error_record(exc, with_traceback=False)
            extra["error"] = record["type"]
            extra["error_message"] = record["message"]
            message = record["message"].strip().split("\n", 1)[0]
            text += f": {record['type']}: {message}" if message else f": {record['type']}"
        elif outcome.error is not None and outcome.status is not Status.SUCCEEDED:
            text += f": {clip(outcome.error, 500)}"
        if outcome.status is Status.TODO and outcome.retry_in is not None:
            extra["retry_in"] = outcome.retry_in
            text += f"; runs again in {outcome.retry_in:.1f} s"
        logger.log(level, "%s", text, extra=extra)

    async def _call_async(self, task: Task[Any], ctx: JobContext, job: ClaimedJob) -> Any:
        coro = call_task(task, ctx, job.args)
        if task.timeout is None:
            return await coro
        # Not asyncio.timeout: the reason is set before the cancellation is delivered, so a
        # task that catches its CancelledError reads ``ctx.abort_reason() == "timeout"``.
        me = asyncio.current_task()
        assert me is not None

        def time_out() -> None:
            if ctx.request_abort("timeout"):
                me.cancel()

        timer = asyncio.get_running_loop().call_later(task.timeout, time_out)
        try:
            return await coro
        finally:
            timer.cancel()

    async def _call_sync(self, task: Task[Any], ctx: JobContext, job: ClaimedJob) -> Any:
        assert self._threads is not None
        loop = asyncio.get_running_loop()
        timer = (
            loop.call_later(task.timeout, ctx.request_abort, "timeout")
            if task.timeout is not None
            else None
        )
        try:
            # A sync task cannot be interrupted: shield it so a cancel (shutdown) waits for the
            # thread, which sees ctx.should_abort() turn true.
            if task.transactional:
                future = self._threads.submit(self._call_sync_in_transaction, task, ctx, job)
            elif observers.installed():
                # Observers (tracing) keep state in context variables: run the task in a copy
                # of this task's context so its span is the current one in the thread too.
                run = contextvars.copy_context().run
                future = self._threads.submit(run, call_task, task, ctx, job.args)
            else:
                future = self._threads.submit(call_task, task, ctx, job.args)
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

    def _success_query(
        self, task: Task[Any], ctx: JobContext, job: ClaimedJob, result: Any
    ) -> tuple[Outcome, statements.Query[list[int]]]:
        outcome = decide(task, job, result=result, abort_reason=ctx.abort_reason())
        if outcome.status != Status.SUCCEEDED:
            raise _NotCommitted(outcome)  # roll the task's writes back
        single = statements.Outcomes.empty()
        single.add(job.id, outcome.status, outcome.result, attempt=job.attempts)
        return outcome, statements.complete_jobs(
            self._s, self.worker_id, single, self._delete_statuses
        )

    def _call_sync_in_transaction(self, task: Task[Any], ctx: JobContext, job: ClaimedJob) -> Any:
        """In the task's thread."""
        with self.app.sync.transaction() as conn:
            ctx.connection = conn
            result = call_task(task, ctx, job.args)
            outcome, query = self._success_query(task, ctx, job, result)
            if not self.app.sync.run(query, connection=conn):
                raise _NotCommitted(None)  # rescued or aborted meanwhile: roll back
            return _Committed(outcome)

    async def _call_async_in_transaction(
        self, task: Task[Any], ctx: JobContext, job: ClaimedJob
    ) -> Any:
        assert self._connector is not None
        async with self._connector.transaction() as conn:
            ctx.connection = conn
            result = await self._call_async(task, ctx, job)
            outcome, query = self._success_query(task, ctx, job, result)
            if not await self._connector.run(query, connection=conn):
                raise _NotCommitted(None)
            return _Committed(outcome)

    def _forget(self, running: _Running) -> bool:
        """Stop tracking this attempt; False if it was no longer tracked (abandoned, or a newer
        attempt of the same job took its place)."""
        if self._running.get(running.job.id) is not running:
            return False
        del self._running[running.job.id]
        return True

    def _record(self, running: _Running, outcome: Outcome) -> None:
        """Buffer the outcome of an attempt this worker still holds (an abandoned one not)."""
        if self._forget(running):
            self._buffer_outcome(running.job, outcome)

    def _buffer_outcome(self, job: ClaimedJob, outcome: Outcome) -> None:
        self._outcomes.append(
            job.id, job.attempts, outcome.value, outcome.result, outcome.error, outcome.retry_in
        )
        if outcome.retry_in:  # its next attempt is due then: be awake for it
            self._note_due(outcome.retry_in)
        self._count(outcome)
        self._flush.set()
        self._mark_changed()

    def _count(self, outcome: Outcome) -> None:
        self.stats.processed += 1
        self.stats.by_status[outcome.label] += 1

    def _request_abort(self, job_id: int, reason: str) -> None:
        buffered = self._buffer.pop(job_id, None) if reason == "requested" else None
        if buffered is not None:
            self._buffer_outcome(buffered, decide(None, _NOT_RUN, abort_reason=reason))
            return
        running = self._running.get(job_id)
        if running is None or not running.ctx.request_abort(reason):
            return
        if running.task is not None and running.task.is_async and running.future is not None:
            running.future.cancel()

    # -- writing outcomes -----------------------------------------------------------------------

    async def _complete_loop(self) -> None:
        while True:
            await self._flush.wait()
            await self._write_outcomes()

    async def _write_outcomes(self, give_up_after: float | None = None) -> None:
        """Write what is buffered; on failure keep it and try again (nothing is dropped).

        The write is guarded: a job rescued by another worker meanwhile is left alone. With
        ``give_up_after`` (shutdown), stop trying after that many seconds: the jobs stay
        ``doing`` under this worker's id and are rescued once its heartbeat is stale.
        """
        assert self._completer is not None
        delays = backoff_delays(first=0.05)
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        async with self._write_lock:
            while self._outcomes:
                self._flush.clear()
                batch, self._outcomes = self._outcomes, statements.Outcomes.empty()
                query = self._complete_query(batch)
                try:
                    try:
                        await self._completer.run(query)
                    except Exception as exc:
                        if not is_data_error(exc):
                            raise
                        await self._write_each(batch)  # find the outcome that cannot be written
                    self._writes += 1
                except asyncio.CancelledError:
                    self._merge_back(batch)
                    raise
                except Exception as exc:
                    self._merge_back(batch)
                    if deadline is not None and time.monotonic() >= deadline:
                        logger.error(
                            "could not write %s outcomes before shutting down (%s); their "
                            "jobs will be rescued",
                            len(self._outcomes),
                            exc,
                        )
                        return
                    delay = next(delays)
                    logger.warning(
                        "writing %s outcomes failed (%s); retrying in %.2f s",
                        len(batch),
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
        self._mark_changed()

    async def _write_each(self, batch: statements.Outcomes) -> None:
        """Write a batch that PostgreSQL refused one outcome at a time: the outcome it refuses
        alone is replaced by an error record saying so, for that job only (never retried
        forever, never holding the others back). Any other error leaves what is not written
        in ``batch`` and is raised, for the caller to try again."""
        assert self._completer is not None
        while batch:
            single = statements.Outcomes.empty()
            single.append(
                batch.ids[0],
                batch.attempts[0],
                batch.statuses[0],
                batch.results[0],
                batch.errors[0],
                batch.retry_in[0],
            )
            try:
                await self._completer.run(self._complete_query(single))
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                logger.error(
                    "the outcome of job %s cannot be written (%s); it is recorded as failed",
                    single.ids[0],
                    first_line(exc),
                )
                refused = OutcomeNotWritable(
                    f"PostgreSQL refused this attempt's outcome ({single.statuses[0]}): "
                    f"{first_line(exc)}"
                )
                replacement = statements.Outcomes.empty()
                replacement.append(
                    single.ids[0],
                    single.attempts[0],
                    Status.FAILED.value,
                    None,
                    dumps(error_record(refused, with_traceback=False)),
                    None,
                )
                try:
                    await self._completer.run(self._complete_query(replacement))
                except Exception as again:
                    if not is_data_error(again):
                        raise
                    logger.error("job %s is left to the rescue: %s", single.ids[0], again)
            for column in (
                batch.ids,
                batch.attempts,
                batch.statuses,
                batch.results,
                batch.errors,
                batch.retry_in,
            ):
                del column[0]

    def _complete_query(self, outcomes: statements.Outcomes) -> statements.Query[list[int]]:
        return statements.complete_jobs(self._s, self.worker_id, outcomes, self._delete_statuses)

    def _merge_back(self, batch: statements.Outcomes) -> None:
        newer = self._outcomes
        self._outcomes = batch
        for i in range(len(newer)):
            self._outcomes.add(
                newer.ids[i],
                Status(newer.statuses[i]),
                newer.results[i],
                newer.errors[i],
                newer.retry_in[i],
                attempt=newer.attempts[i],
            )

    # -- abort polling and heartbeats -----------------------------------------------------------

    async def _abort_poll_loop(self) -> None:
        assert self._connector is not None
        while True:
            await asyncio.sleep(self.abort_interval)
            if not self._running:
                continue
            try:
                ids = await self._connector.run(
                    statements.abort_requested_ids(self._s, self.worker_id)
                )
            except Exception as exc:
                logger.warning("polling for aborted jobs failed: %s", first_line(exc))
                continue
            for job_id in ids:
                self._request_abort(job_id, "requested")

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

    async def _heartbeat_loop(self) -> None:
        """Beat, and rescue the jobs of workers that stopped beating."""
        assert self._connector is not None
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                if not await self._connector.run(statements.heartbeat(self._s, self.worker_id)):
                    await self._come_back()
                await self._rescue()
                await self._refresh_queue_limits()
            except Exception as exc:
                logger.warning("heartbeat or rescue failed: %s", exc)

    async def _come_back(self) -> None:
        """This worker was declared dead (a long pause, a partition) and its jobs rescued:
        they may be running elsewhere now. Drop every attempt it still holds (nothing of
        theirs is written: their outcomes would be about a job that is no longer ours) and
        live on under a new id."""
        old = self.worker_id
        self.worker_id = _new_worker_id()
        self._buffer.clear()
        for job_id, running in list(self._running.items()):
            del self._running[job_id]
            self._stop_attempt(running)
        logger.warning(
            "worker %s had been declared dead and its jobs rescued; it goes on as %s",
            old,
            self.worker_id,
            extra={"worker": self.worker_id},
        )
        await self._register()

    @staticmethod
    def _stop_attempt(running: _Running) -> None:
        stopped = running.ctx.request_abort("shutdown")
        if stopped and running.task is not None and running.task.is_async and running.future:
            running.future.cancel()

    async def _register(self) -> None:
        assert self._connector is not None
        query = statements.register_worker(
            self._s, self.worker_id, socket.gethostname(), os.getpid(), self.queues
        )
        await self._connector.run(query)

    async def _rescue(self) -> int:
        """Put back the running jobs of dead workers, with their retry policy; the count."""
        assert self._connector is not None
        run = self._connector.run
        dead = await run(statements.forget_dead_workers(self._s, self.rescue_after))
        orphans = await run(statements.orphaned_jobs(self._s))
        if not orphans:
            return 0
        by_worker: dict[str, statements.Outcomes] = {}
        for old_worker, job, rescues in orphans:
            outcome = rescue_outcome(
                self.app.lookup_task(job.task_name), old_worker, self.worker_id, rescues
            )
            outcomes = by_worker.setdefault(old_worker, statements.Outcomes.empty())
            outcomes.add(
                job.id,
                outcome.status,
                outcome.result,
                outcome.error,
                outcome.retry_in,
                attempt=job.attempts,
            )
        rescued = 0
        for old_worker, outcomes in by_worker.items():
            done = await run(statements.complete_jobs(self._s, old_worker, outcomes))
            rescued += len(done)
        if rescued:
            logger.warning(
                "rescued %s job(s) of dead worker(s) %s",
                rescued,
                ", ".join(dead) or "unknown",
                extra={"worker": self.worker_id},
            )
        self.stats.by_status["rescued"] += rescued
        return rescued

    # -- shutdown -------------------------------------------------------------------------------

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        """Stop claiming, give back what never started, let running jobs finish within the
        grace period, abort the rest (they go back to ``todo``), and write every outcome."""
        await self._release_buffered()
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
        await self._write_outcomes(give_up_after=SHUTDOWN_WRITE_TIMEOUT)

    def _linger(self, stuck: list[_Running]) -> None:
        """Keep the worker's heartbeat while attempts that ignored the shutdown still run,
        then give their jobs back and unregister: a daemon thread on the sync connector, so it
        outlives this loop and never keeps the process alive. If the process exits first,
        the heartbeat stops and another worker rescues the jobs ``rescue_after`` later."""
        loop = asyncio.get_running_loop()
        threads = self._threads
        outcomes = statements.Outcomes.empty()
        for running in stuck:
            outcome = decide(running.task, running.job, abort_reason="shutdown")
            outcomes.add(
                running.job.id,
                outcome.status,
                outcome.result,
                outcome.error,
                outcome.retry_in,
                attempt=running.job.attempts,
            )
        worker_id, s, app = self.worker_id, self._s, self.app
        futures = [r.future for r in stuck if r.task is not None and r.task.is_async]

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

    async def _wait_running(self, timeout: float | None) -> None:
        """Until every running job is done, ``timeout`` passes, or a second signal."""
        futures = [r.future for r in self._running.values() if r.future is not None]
        if not futures:
            return
        waiters = {
            asyncio.ensure_future(asyncio.wait(futures)),
            asyncio.ensure_future(self._hurry.wait()),
        }
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()

    async def _release_buffered(self) -> None:
        """Claimed jobs that never started go back to ``todo`` at once, attempt undone."""
        if not self._buffer:
            return
        ids, self._buffer = list(self._buffer), {}
        try:
            conn = self._claimers[0]
            await conn.run(statements.release_jobs(self._s, self.worker_id, ids))
        except Exception:
            # Still ours and ``doing``: a rescue puts them back once this worker is gone.
            logger.exception("releasing %s unstarted jobs failed", len(ids))

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


def _claim_size(room: int, batch_size: int) -> int:
    """A full batch, else the largest power of two that fits: a claim's limit is written into
    its SQL (one plan each), so a worker uses a few claim statements, not one per size."""
    if room >= batch_size:
        return batch_size
    return 1 << (room.bit_length() - 1)


def _decoding_error(exc: BaseException) -> bool:
    """The driver could not decode a claimed row (arguments nested too deep for Python's
    JSON decoder, an integer too long for ``int``): raised in the client, after the claim."""
    causes = (exc, getattr(exc, "orig", None), exc.__cause__)
    return any(isinstance(e, (RecursionError, ValueError)) for e in causes)


def _new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def _run_hooks(hooks: Iterable[Hook], state: object) -> None:
    """Run hooks in order; a hook that takes an argument gets the worker's state."""
    for hook in hooks:
        takes_state = bool(inspect.signature(hook).parameters)
        value = hook(state) if takes_state else hook()
        if isinstance(value, Awaitable):
            await value


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_in_new_loop(app: App, options: dict[str, Any]) -> WorkerStats:
    """``App.run_worker``: the async worker on a loop of its own (uvloop when installed).

    Not ``asyncio.Runner``: its close cancels every task left and waits for each without a
    bound, so one task that swallows its cancellation would keep ``pgtq worker`` alive after
    SIGTERM. Here the loop's leftovers get ``SHUTDOWN_ABORT_GRACE`` and are left behind.
    """

    async def main() -> WorkerStats:
        try:
            return await Worker(app, **options).run()
        finally:
            await app.close_loop_connector()

    loop = _new_event_loop()
    task = loop.create_task(main())
    restore = _cancel_on_sigint(loop, task) if not options.get("install_signal_handlers") else None
    try:
        return loop.run_until_complete(task)
    finally:
        if restore is not None:
            restore()
        _close_loop(loop, SHUTDOWN_ABORT_GRACE)


def _cancel_on_sigint(
    loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]
) -> Callable[[], None] | None:
    """Ctrl-C cancels the worker (a graceful shutdown), as ``asyncio.run`` does, instead of
    raising KeyboardInterrupt inside whichever job runs."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None

    def on_sigint(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(task.cancel)

    signal.signal(signal.SIGINT, on_sigint)

    def restore() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return restore


def _close_loop(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    """Cancel what is left on the loop, wait at most ``grace`` for it, close the loop."""
    try:
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for leftover in left:
            leftover.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=grace))
            stuck = [t for t in left if not t.done()]
            if stuck:
                logger.warning("%s task(s) ignored their cancellation; left behind", len(stuck))
        for finish in (loop.shutdown_asyncgens, loop.shutdown_default_executor):
            loop.run_until_complete(asyncio.wait([loop.create_task(finish())], timeout=grace))
    finally:
        loop.close()
