"""A worker's place in the fleet: its row in the workers table, the heartbeat that keeps it
fresh, and the rescue of the jobs of workers that stopped beating.

A worker silent for ``rescue_after`` seconds is dead: any live worker puts its running jobs
back (:func:`pgtq.outcomes.rescue_outcome`). A worker that finds it was declared dead (a long
pause, a partition) drops what it runs and goes on under a new id. Until it knows, its
*lease* tells it whether it may have been: ``rescue_after`` seconds from the sending of its
last acknowledged beat, it starts no held job (they may be running elsewhere by now) and
beats at once to find out. A worker that stopped
while attempts ignored the shutdown keeps beating until they end (:func:`linger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pgtq import statements
from pgtq.outcomes import decide, rescue_outcome
from pgtq.retry import backoff_delays

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.runner import Attempt
    from pgtq.scope import WorkerScope
    from pgtq.threads import ThreadRunner

logger = logging.getLogger("pgtq.worker")


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def _nothing() -> None:
    return None


class Heartbeat:
    """Registers a worker, beats for it, rescues dead workers' jobs."""

    def __init__(
        self,
        scope: WorkerScope,
        *,
        interval: float = 5.0,
        rescue_after: float = 30.0,
        declared_dead: Callable[[], Awaitable[None]] = _nothing,
        every_beat: Callable[[], Awaitable[None]] = _nothing,
        rescued: Callable[[int], None] = lambda count: None,
        renewed: Callable[[], None] = lambda: None,
    ) -> None:
        self._app = scope.app
        self._s = scope.app.statements
        self._connector = scope.connector
        self._worker_id = scope.worker_id
        self._queues = scope.queues
        self.interval = interval
        self._rescue_after = rescue_after
        self._declared_dead = declared_dead  # the worker drops its attempts, takes a new id
        self._every_beat = every_beat  # what else is refreshed at each beat (queue limits)
        self._rescued = rescued  # counts them in the worker's stats
        self._renewed = renewed  # the lease is renewed: held jobs may start
        #: (monotonic) Until then no other worker can have declared this one dead: its last
        #: acknowledged beat was sent less than ``rescue_after`` seconds before.
        self._lease_until = 0.0
        self._beat_now = asyncio.Event()  # the lease ran out: beat without waiting

    def leased(self) -> bool:
        """True while no other worker can have declared this one dead; when not, a beat
        goes out at once (it renews the lease, or finds the worker was declared dead)."""
        if time.monotonic() < self._lease_until:
            return True
        self._beat_now.set()
        return False

    async def register(self) -> None:
        query = statements.register_worker(
            self._s, self._worker_id(), socket.gethostname(), os.getpid(), self._queues
        )
        sent = time.monotonic()
        await self._connector.run(query)
        self._lease_until = sent + self._rescue_after

    async def unregister(self) -> None:
        await self._connector.run(statements.unregister_worker(self._s, self._worker_id()))

    async def run(self) -> None:
        """Beat every ``interval``, and at once when the lease ran out. Nothing else runs in
        this loop: a slow rescue or ANALYZE (:meth:`keep_house`) must not delay a beat, or a
        busy worker is declared dead while it works. A beat that failed is tried again after a
        jittered backoff (capped at ``interval``), however often held jobs ask."""
        delays = backoff_delays(cap=self.interval)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._beat_now.wait()
            asked = self._beat_now.is_set()  # held jobs wait for this beat
            self._beat_now.clear()
            try:
                sent = time.monotonic()
                if await self._connector.run(statements.heartbeat(self._s, self._worker_id())):
                    self._lease_until = sent + self._rescue_after
                else:
                    await self._declared_dead()
                    await self.register()
                    asked = True
                delays = backoff_delays(cap=self.interval)
                if asked:
                    self._renewed()
            except Exception as exc:
                logger.warning("heartbeat failed: %s", exc)
                await asyncio.sleep(next(delays))  # not a spin while the database is away

    async def keep_house(self) -> None:
        """Every ``interval``: rescue the jobs of workers that stopped beating, and refresh
        what the worker reads from the database (``every_beat``)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.rescue()
                await self._every_beat()
            except Exception as exc:
                logger.warning("rescue or refresh failed: %s", exc)

    async def rescue(self) -> int:
        """Put back the running jobs of dead workers (see :func:`rescue_outcome`); the count."""
        run = self._connector.run
        rescuer = self._worker_id()
        dead = await run(statements.forget_dead_workers(self._s, self._rescue_after, rescuer))
        orphans = await run(statements.orphaned_jobs(self._s))
        if not orphans:
            return 0
        by_worker: dict[str, statements.Outcomes] = {}
        for old_worker, job, rescues in orphans:
            outcome = rescue_outcome(
                self._app.lookup_task(job.task_name), old_worker, rescuer, rescues
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
            rest = statements.refused_outcomes(outcomes, done)
            if rest is not None:  # jobs with children: the variant that settles them
                query = statements.complete_jobs(self._s, old_worker, rest, releasing=True)
                done = [*done, *await run(query)]
            rescued += len(done)
        self._rescued(rescued)
        if rescued:
            logger.warning(
                "rescued %s job(s) of dead worker(s) %s",
                rescued,
                ", ".join(dead) or "unknown",
                extra={"worker": rescuer},
            )
        return rescued


def linger(
    app: App,
    worker_id: str,
    stuck: list[Attempt],
    *,
    threads: ThreadRunner | None,
    interval: float,
    check_every: float,
) -> None:
    """Keep a stopped worker's heartbeat while attempts that ignored the shutdown still run,
    then give their jobs back and unregister: a daemon thread on the sync connector, so it
    outlives the worker's loop and never keeps the process alive. If the process exits first,
    the heartbeat stops and another worker rescues the jobs ``rescue_after`` later."""
    loop = asyncio.get_running_loop()
    s = app.statements
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
    futures = [a.future for a in stuck if a.task is not None and a.task.is_async]

    def running_still() -> bool:
        if threads is not None and threads.busy:
            return True
        return not loop.is_closed() and any(f is not None and not f.done() for f in futures)

    def beat_until_they_end() -> None:
        beat = time.monotonic()
        try:
            sync = app.sync  # made here: an app built on an AsyncEngine may have none
            while running_still():
                time.sleep(check_every)
                if time.monotonic() - beat >= interval:
                    beat = time.monotonic()
                    if not sync.run(statements.heartbeat(s, worker_id)):
                        return  # declared dead meanwhile: its jobs were rescued
            done = sync.run(statements.complete_jobs(s, worker_id, outcomes))
            rest = statements.refused_outcomes(outcomes, done)
            if rest is not None:  # jobs with children: the variant that settles them
                sync.run(statements.complete_jobs(s, worker_id, rest, releasing=True))
            sync.run(statements.unregister_worker(s, worker_id))
            logger.info("the jobs that did not stop have ended; given back")
        except Exception as exc:
            logger.warning("lingering for jobs that did not stop failed: %s", exc)

    threading.Thread(target=beat_until_they_end, name="pgtq-linger", daemon=True).start()
