"""The completer: writes the outcomes of a worker's attempts in batches, on a connection of
its own, so claims and a completion write are in flight at the same time.

Every outcome gathered since the last write goes out in one guarded statement: a job that
is no longer this worker's (rescued meanwhile) is left alone. While other jobs still run, a
write waits up to :data:`GATHER` seconds for a batch's worth: a worker of many in a fleet
finishes jobs one by one, and writing each alone cost the server a statement a job (16
processes drained at 0.6 of 2, bare SQL at 0.8-0.9). A worker with nothing else running
writes at once. A write that fails is kept and
tried again; nothing is dropped. An outcome PostgreSQL refuses fails its own job only.

Progress (``ctx.set_progress``) rides along: a task hands its latest record to
:meth:`Completer.set_progress` (any thread, no I/O, the newest per job kept), and the next
write takes what is pending: with the outcomes when there are any (one statement: a finishing
job's last progress in its outcome row, running jobs' in the same statement), else alone at
most :data:`PROGRESS_INTERVAL` after it was reported. A write with no progress pending runs
exactly the statement it runs without progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pgtq import statements
from pgtq.connectors import first_line, is_data_error
from pgtq.model import ClaimedJob, Status, dumps, error_record
from pgtq.outcomes import Outcome, OutcomeNotWritable, frees_jobs
from pgtq.retry import backoff_delays

if TYPE_CHECKING:
    from pgtq.connectors import DedicatedConnection

logger = logging.getLogger("pgtq.worker")

#: How long a write waits for more outcomes while other jobs run (at most; it goes as soon as
#: a batch's worth is buffered or nothing else runs).
GATHER = 0.005

#: Progress reported while no outcome is written goes alone at most this long after it was
#: reported: at most one such write this often per worker, however often its tasks report.
PROGRESS_INTERVAL = 0.5


class Completer:
    """The outcomes waiting to be written, and the loop that writes them."""

    def __init__(
        self,
        s: statements.Statements,
        worker_id: Callable[[], str],
        delete_statuses: tuple[str, ...],
        on_written: Callable[[bool], None],
        *,
        batch: int = 1,
        running: Callable[[], bool] = lambda: False,
        notify: bool = True,
    ) -> None:
        self._s = s
        # Announce the jobs that ended on the done channel (``App(notify_completions=...)``):
        # what ``app.jobs.wait`` and its kin hear instead of polling.
        self._quiet = not notify
        self._batch = batch  # a write waits for this many outcomes while others run
        self._running = running  # other jobs still run: more outcomes are coming
        self._worker_id = worker_id  # a function: a worker declared dead goes on under a new id
        self._delete_statuses = delete_statuses
        # Called once what was buffered is written; True if that may have made other jobs
        # claimable (see :func:`pgtq.outcomes.frees_jobs`).
        self._on_written = on_written
        self._frees = False
        self.connection: DedicatedConnection | None = None
        self._outcomes = statements.Outcomes.empty()
        self._flush = asyncio.Event()  # outcomes wait to be written
        self._enough = asyncio.Event()  # a batch's worth waits: a gathering write goes
        #: Held while a write is out: while it is free, every outcome is in :attr:`ids` or
        #: written.
        self.lock = asyncio.Lock()
        # Progress: job id -> (attempt, record), the newest only; set from the tasks' threads,
        # hence its own lock. ``_progress_woken``: the loop was asked to write it (a timer is
        # pending): the next report need not ask again.
        self._progress: dict[int, tuple[int, dict[str, Any]]] = {}
        self._progress_lock = threading.Lock()
        self._progress_woken = False
        self._progress_wanted = False  # the interval is over: the next write must take it
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._outcomes)

    @property
    def idle(self) -> bool:
        """Nothing waits to be written and no write is out."""
        return not self._outcomes and not self.lock.locked()

    @property
    def ids(self) -> list[int]:
        """The jobs whose outcomes wait to be written."""
        return self._outcomes.ids

    def add(self, job: ClaimedJob, outcome: Outcome) -> None:
        """Buffer an attempt's outcome; the loop writes it with the others."""
        self._outcomes.append(
            job.id, job.attempts, outcome.value, outcome.result, outcome.error, outcome.retry_in
        )
        if outcome.move is not None:  # a retry into another queue or priority (rare)
            self._outcomes.moves[job.id] = outcome.move
        if not self._frees and frees_jobs(job, outcome):
            self._frees = True
        self._flush.set()
        if len(self._outcomes) >= self._batch:
            self._enough.set()

    def set_progress(self, job_id: int, attempt: int, record: dict[str, Any]) -> None:
        """A task's latest progress (``ctx.set_progress``), from any thread: kept until the
        next write, replacing what the job reported before. Wakes the loop at most once per
        :data:`PROGRESS_INTERVAL`, not once a call."""
        with self._progress_lock:
            self._progress[job_id] = (attempt, record)
            if self._progress_woken or self._loop is None:
                return
            self._progress_woken = True
        with contextlib.suppress(RuntimeError):  # the loop closed (a task lingering on)
            self._loop.call_soon_threadsafe(self._progress_later)

    def _progress_later(self) -> None:
        assert self._loop is not None
        self._loop.call_later(PROGRESS_INTERVAL, self._progress_due)

    def _progress_due(self) -> None:
        """The interval is over: write the pending progress (unless a write took it). The
        request stands until a write takes it: a write out now may not (see :meth:`write`)."""
        with self._progress_lock:
            self._progress_woken = False
            self._progress_wanted = bool(self._progress)
        if self._progress_wanted:
            self._flush.set()

    def _take_progress(self, batch: statements.Outcomes) -> statements.Progress | None:
        """The pending progress, no longer pending: a job of ``batch`` gets its record in its
        outcome row (unless it is of another attempt); the others' are returned."""
        with self._progress_lock:
            if not self._progress:
                return None
            taken, self._progress = self._progress, {}
            self._progress_wanted = False
        attempts = dict(zip(batch.ids, batch.attempts, strict=True)) if batch.ids else {}
        running = statements.Progress([], [], [])
        for job_id, (attempt, record) in taken.items():
            if job_id in attempts:
                if attempts[job_id] in (None, attempt):
                    batch.progress[job_id] = json.dumps(record)
                continue
            running.ids.append(job_id)
            running.attempts.append(attempt)
            running.values.append(json.dumps(record))
        return running if running.ids else None

    def _give_back_progress(self, progress: statements.Progress | None) -> None:
        """Progress not written: pending again, unless the job reported newer meanwhile."""
        if progress is None:
            return
        with self._progress_lock:
            for job_id, attempt, value in zip(
                progress.ids, progress.attempts, progress.values, strict=True
            ):
                self._progress.setdefault(job_id, (attempt, json.loads(value)))

    async def run(self) -> None:
        """Write whatever is buffered, whenever something is (gathered first)."""
        self._loop = asyncio.get_running_loop()
        while True:
            await self._flush.wait()
            await self._gather()
            await self.write(give_up_after=None)

    async def _gather(self) -> None:
        """Wait up to :data:`GATHER` for a batch's worth of outcomes, while jobs still run.
        One wake-up, when the batch is there: not one per outcome (that cost the hot path)."""
        if len(self._outcomes) >= self._batch or not self._running():
            return
        self._enough.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GATHER):
                await self._enough.wait()

    async def write(self, give_up_after: float | None) -> None:
        """Write what is buffered; on failure keep it and try again (nothing is dropped).

        With ``give_up_after`` (shutdown), stop trying after that many seconds: the jobs stay
        ``doing`` under this worker's id and are rescued once its heartbeat is stale.
        """
        assert self.connection is not None
        delays = backoff_delays(first=0.05)
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        async with self.lock:
            # Progress is taken once a write (the first round trip): one that keeps coming
            # while outcomes do must not keep this loop going.
            progress: statements.Progress | None = None
            take_progress = bool(self._progress)  # unlocked peek: the rest is under the lock
            # Progress alone frees nothing: the fetch loop is not told (see on_written).
            outcomes = bool(self._outcomes) or not take_progress
            while self._outcomes or take_progress:
                outcomes = outcomes or bool(self._outcomes)
                self._flush.clear()
                batch, self._outcomes = self._outcomes, statements.Outcomes.empty()
                if take_progress:
                    progress, take_progress = self._take_progress(batch), False
                try:
                    try:
                        if batch or progress is not None:
                            await self._complete(batch, progress)
                    except Exception as exc:
                        if not is_data_error(exc):
                            raise
                        # Find the outcome that cannot be written. Running jobs' progress is
                        # dropped (never refused in practice: pgtq encodes it): their next
                        # report writes it again.
                        if progress is not None:
                            logger.warning("progress of jobs %s not written: %s", progress.ids, exc)
                            progress = None
                        await self._write_each(batch)
                except asyncio.CancelledError:
                    self._merge_back(batch)
                    self._give_back_progress(progress)
                    raise
                except Exception as exc:
                    self._merge_back(batch)
                    self._give_back_progress(progress)
                    progress, take_progress = None, True  # taken again by the next try
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
            if self._progress_wanted:  # came due during this write, after it took progress
                self._flush.set()
        if outcomes:
            frees, self._frees = self._frees, False
            self._on_written(frees)

    async def _write_each(self, batch: statements.Outcomes) -> None:
        """Write a batch that PostgreSQL refused one outcome at a time: the outcome it refuses
        alone is replaced by an error record saying so, for that job only (never retried
        forever, never holding the others back). Any other error leaves what is not written
        in ``batch`` and is raised, for the caller to try again."""
        for i in range(len(batch)):
            try:
                await self._write_alone(_rows(batch, i, i + 1))
            except BaseException:
                for column in _columns(batch):
                    del column[:i]
                raise

    async def _write_alone(self, single: statements.Outcomes) -> None:
        assert self.connection is not None
        try:
            await self._complete(single)
            return
        except Exception as exc:
            if not is_data_error(exc):
                raise
            refusal = first_line(exc)
        logger.error(
            "the outcome of job %s cannot be written (%s); it is recorded as failed",
            single.ids[0],
            refusal,
        )
        refused = OutcomeNotWritable(
            f"PostgreSQL refused this attempt's outcome ({single.statuses[0]}): {refusal}"
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
            await self._complete(replacement)
        except Exception as again:
            if not is_data_error(again):
                raise
            logger.error("job %s is left to the rescue: %s", single.ids[0], again)

    async def _complete(
        self, outcomes: statements.Outcomes, progress: statements.Progress | None = None
    ) -> None:
        """Write ``outcomes`` (and running jobs' ``progress``): one statement, and a second
        only for what the first refused (jobs with children: the variant that settles
        them, ``Rare.releasing``). A batch without such jobs pays one length test."""
        assert self.connection is not None
        written = await self.connection.run(self._query(outcomes, progress))
        rest = statements.refused_outcomes(outcomes, written)
        if rest is not None:
            await self.connection.run(self._query(rest, releasing=True))

    def _query(
        self,
        outcomes: statements.Outcomes,
        progress: statements.Progress | None = None,
        *,
        releasing: bool = False,
    ) -> statements.Query[list[int]]:
        if not outcomes and progress is not None:
            return statements.write_progress(self._s, self._worker_id(), progress)
        return statements.complete_jobs(
            self._s,
            self._worker_id(),
            outcomes,
            self._delete_statuses,
            progress,
            self._quiet,
            releasing=releasing,
        )

    def _merge_back(self, batch: statements.Outcomes) -> None:
        """Put a batch that was not written back in front of what came in meanwhile."""
        for mine, newer in zip(_columns(batch), _columns(self._outcomes), strict=True):
            mine.extend(newer)
        batch.moves.update(self._outcomes.moves)
        batch.progress.update(self._outcomes.progress)
        self._outcomes = batch


def _columns(outcomes: statements.Outcomes) -> tuple[list[Any], ...]:
    return (
        outcomes.ids,
        outcomes.attempts,
        outcomes.statuses,
        outcomes.results,
        outcomes.errors,
        outcomes.retry_in,
    )


def _rows(outcomes: statements.Outcomes, start: int, stop: int) -> statements.Outcomes:
    ids, attempts, statuses, results, errors, retry_in = (
        column[start:stop] for column in _columns(outcomes)
    )
    moves = {i: outcomes.moves[i] for i in ids if i in outcomes.moves}
    progress = {i: outcomes.progress[i] for i in ids if i in outcomes.progress}
    return statements.Outcomes(ids, attempts, statuses, results, errors, retry_in, moves, progress)
