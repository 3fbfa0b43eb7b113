"""The completer: writes the outcomes of a worker's attempts in batches, on a connection of
its own, so claims and a completion write are in flight at the same time.

Every outcome gathered since the last write goes out in one guarded statement: a job that
is no longer this worker's (rescued meanwhile) is left alone. While other jobs still run, a
write waits up to :data:`GATHER` seconds for a batch's worth: a worker of many in a fleet
finishes jobs one by one, and writing each alone cost the server a statement a job (16
processes drained at 0.6 of 2, bare SQL at 0.8-0.9). A worker with nothing else running
writes at once. A write that fails is kept and
tried again; nothing is dropped. An outcome PostgreSQL refuses fails its own job only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    ) -> None:
        self._s = s
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

    async def run(self) -> None:
        """Write whatever is buffered, whenever something is (gathered first)."""
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
            while self._outcomes:
                self._flush.clear()
                batch, self._outcomes = self._outcomes, statements.Outcomes.empty()
                try:
                    try:
                        await self.connection.run(self._query(batch))
                    except Exception as exc:
                        if not is_data_error(exc):
                            raise
                        await self._write_each(batch)  # find the outcome that cannot be written
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
            await self.connection.run(self._query(single))
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
            await self.connection.run(self._query(replacement))
        except Exception as again:
            if not is_data_error(again):
                raise
            logger.error("job %s is left to the rescue: %s", single.ids[0], again)

    def _query(self, outcomes: statements.Outcomes) -> statements.Query[list[int]]:
        return statements.complete_jobs(self._s, self._worker_id(), outcomes, self._delete_statuses)

    def _merge_back(self, batch: statements.Outcomes) -> None:
        """Put a batch that was not written back in front of what came in meanwhile."""
        for mine, newer in zip(_columns(batch), _columns(self._outcomes), strict=True):
            mine.extend(newer)
        batch.moves.update(self._outcomes.moves)
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
    return statements.Outcomes(ids, attempts, statuses, results, errors, retry_in, moves)
