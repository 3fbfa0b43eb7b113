"""The jobs a worker holds: claimed and waiting for a slot, or running as attempts.

This is the fetcher's :class:`pgtq.fetcher.Holder`: it tells the room left, starts held jobs
while slots are free, and settles each attempt as it ends (its outcome to the completer, the
fetcher told that there may be room or a retry due). It is also where an abort request or a
shutdown reaches the attempts.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from pgtq.jobs import JobContext
from pgtq.model import ClaimedJob
from pgtq.outcomes import Outcome, aborted_on_request, frees_jobs
from pgtq.runner import Attempt, Ended, JobRunner

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.completer import Completer
    from pgtq.fetcher import Fetcher


class Attempts:
    """Held jobs and running attempts of one worker (at most ``concurrency`` running)."""

    def __init__(
        self,
        app: App,
        *,
        concurrency: int,
        prefetch: int,
        worker_id: Callable[[], str],
        state: object,
        completer: Completer,
        count: Callable[[Outcome], None],
    ) -> None:
        self._app = app
        self.concurrency = concurrency
        self._prefetch = prefetch  # jobs claimed ahead of free slots
        self._worker_id = worker_id
        self._state = state
        self._completer = completer
        self._report_progress = completer.set_progress  # ctx.set_progress hands it there
        self._count = count
        self.running: dict[int, Attempt] = {}
        self.held: dict[int, ClaimedJob] = {}  # claimed, not started yet (in claim order)
        self.runner: JobRunner | None = None  # set when the run starts
        self.fetcher: Fetcher | None = None  # told when an attempt ends
        #: No other worker can have declared this one dead (the heartbeat's lease).
        self.leased: Callable[[], bool] = lambda: True

    # -- the fetcher's Holder -----------------------------------------------------------------

    def room(self) -> int:
        """How many more jobs may be held (running, held back or being claimed)."""
        return self.concurrency + self._prefetch - len(self.running) - len(self.held)

    def hold(self, jobs: Iterable[ClaimedJob]) -> None:
        for job in jobs:
            self.held[job.id] = job

    def idle(self) -> bool:
        """Nothing running or held, and every outcome written."""
        return not self.running and not self.held and self._completer.idle

    def start(self) -> None:
        """Run held jobs while there are free slots; the rest wait. None starts while the
        worker's lease is out (see :mod:`pgtq.heartbeat`): after a long pause its jobs may have
        been rescued and be running elsewhere; the beat that finds out drops them or
        renews the lease (and calls :meth:`changed`)."""
        if not self.held or len(self.running) >= self.concurrency or not self.leased():
            return
        while self.held and len(self.running) < self.concurrency:
            job_id = next(iter(self.held))
            self._start(self.held.pop(job_id))

    def ids(self) -> Iterator[int]:
        """The jobs held or running."""
        yield from self.running
        yield from self.held

    # -- attempts -----------------------------------------------------------------------------

    def _start(self, job: ClaimedJob) -> None:
        assert self.runner is not None
        ctx = JobContext.for_job(
            job, self._app, self._worker_id(), self._state, self._report_progress
        )
        attempt = Attempt(job, ctx, self._app.lookup_task(job.task_name))
        older = self.running.get(job.id)
        if older is not None:
            # An older attempt of this job still runs here: it was rescued from this worker
            # while it was unreachable. Stop it: one attempt at a time, and its outcome is
            # not written (the guard on the attempt refuses it anyway).
            older.stop("shutdown")
        self.running[job.id] = attempt
        run = self.runner.run(attempt, functools.partial(self._settle, attempt))
        # The loop's own create_task: asyncio.create_task is a Python wrapper around it.
        loop = asyncio.get_running_loop()
        attempt.future = loop.create_task(run, name=f"pgtq-job-{job.id}")

    def _settle(self, attempt: Attempt, ended: Ended | None) -> None:
        """An attempt ended: write its outcome, unless it is written already, or the attempt
        was abandoned (the worker was declared dead, or a newer attempt took its place)."""
        if self.running.get(attempt.job.id) is attempt:
            del self.running[attempt.job.id]
            if ended is not None and not ended.written:
                self.write(attempt.job, ended.outcome)
                return
            if ended is not None:
                self._count(ended.outcome)
                # Written with the attempt (in the task's transaction): may free jobs now.
                self.changed(claimable=frees_jobs(attempt.job, ended.outcome))
                return
        self.changed()

    def write(self, job: ClaimedJob, outcome: Outcome) -> None:
        """Hand an outcome to the completer, and count it."""
        self._completer.add(job, outcome)
        if outcome.retry_in and self.fetcher is not None:
            self.fetcher.due_in(outcome.retry_in)  # its next attempt is due then: be awake
        self._count(outcome)
        self.changed()

    def changed(self, *, claimable: bool = False) -> None:
        """Something ended: tell the fetch loop (``claimable``: see ``Fetcher.changed``)."""
        if self.fetcher is not None:
            self.fetcher.changed(claimable=claimable)

    def request_abort(self, job_id: int, reason: str) -> None:
        """Stop a running attempt; a held job aborted on request ends without running."""
        held = self.held.pop(job_id, None) if reason == "requested" else None
        if held is not None:
            self.write(held, aborted_on_request())
            return
        attempt = self.running.get(job_id)
        if attempt is not None:
            attempt.stop(reason)

    def drop(self) -> None:
        """Forget every held job and stop every attempt, writing nothing of theirs (the jobs
        are no longer this worker's)."""
        self.held.clear()
        for job_id, attempt in list(self.running.items()):
            del self.running[job_id]
            attempt.stop("shutdown")

    def take_held(self) -> list[int]:
        """The held jobs' ids, no longer held (to be given back)."""
        ids, self.held = list(self.held), {}
        return ids

    async def wait(self, timeout: float | None, hurry: asyncio.Event) -> None:
        """Until every running attempt is done, ``timeout`` passes, or ``hurry`` is set."""
        futures = [a.future for a in self.running.values() if a.future is not None]
        if not futures:
            return
        waiters = {
            asyncio.ensure_future(asyncio.wait(futures)),
            asyncio.ensure_future(hurry.wait()),
        }
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
