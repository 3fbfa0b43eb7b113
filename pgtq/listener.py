"""What a worker hears: NOTIFYs of new jobs (now, or due in n seconds) for the fetcher (by
turns when they name their jobs, :mod:`pgtq.turns`), and abort requests for the attempts, by
LISTEN, with polling for aborts as the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from pgtq import statements
from pgtq.connectors import first_line
from pgtq.retry import backoff_delays
from pgtq.turns import Answer, Roster, whose_turn

if TYPE_CHECKING:
    from pgtq.attempts import Attempts
    from pgtq.fetcher import Fetcher
    from pgtq.scope import WorkerScope

logger = logging.getLogger("pgtq.worker")


class Listener:
    """Turns NOTIFYs and abort requests into claims and stopped attempts."""

    def __init__(
        self,
        scope: WorkerScope,
        fetcher: Fetcher,
        attempts: Attempts,
        *,
        abort_interval: float,
    ) -> None:
        self._scope = scope
        self._s = scope.app.statements
        self._fetcher = fetcher
        #: The registered workers, refreshed at each heartbeat: whose turn an announcement is.
        self.roster: Roster = ()
        self._passing: dict[str, asyncio.Task[None]] = {}  # pass-ons in flight, by queue
        self._attempts = attempts
        self._abort_interval = abort_interval

    async def listen(self) -> None:
        """LISTEN, and LISTEN again after the connection is lost (polling covers the gap).
        Not at all with ``App(listen_dsn=False)``: the fetcher's polling finds new jobs and
        :meth:`poll_aborts` the abort requests."""
        if not self._scope.app.listens:
            logger.info(
                "not listening (listen_dsn=False): new jobs are found by polling",
                extra={"worker": self._scope.worker_id()},
            )
            return
        s, delays = self._s, backoff_delays()
        while True:
            try:
                listener = await self._scope.connector.listen(
                    [s.channel, s.abort_channel], self.on_notify
                )
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

    def on_notify(self, channel: str, payload: str) -> None:
        if channel == self._s.channel:
            heard = statements.parse_announcement(payload)
            queues = self._scope.queues
            if queues is None or heard.queue in queues:
                if heard.due_in is not None:
                    self._fetcher.due_in(heard.due_in)
                elif heard.first is not None:
                    self._heard_named(heard.queue, heard.first, heard.jobs)
                else:
                    self._fetcher.announce()
        elif channel == self._s.abort_channel:
            with contextlib.suppress(ValueError):
                self._attempts.request_abort(int(payload), "requested")

    async def read_roster(self) -> None:
        """Read the registered workers (at start and at each heartbeat): whose turn a named
        announcement is. Not for a worker that does not listen."""
        if self._scope.app.listens:
            roster = await self._scope.connector.run(statements.roster(self._s))
            self.roster = roster

    def _heard_named(self, queue: str, first: int, jobs: int) -> None:
        """Jobs named by their insert: claim if it is this worker's turn (or everyone's); a
        worker whose turn it is but has no room passes it on to every other worker."""
        me = self._scope.worker_id()
        turn = whose_turn(self.roster, me, queue, first)
        if turn is None:
            self._fetcher.announce()
        elif turn == me and not self._fetcher.answer(Answer(jobs, queue)):
            self._pass_on(queue)

    def _pass_on(self, queue: str) -> None:
        """Announce ``queue`` again, bare: every idle worker claims. Each pass-on wakes every
        listener (a NOTIFY, like the insert's): one at a time per queue, so a busy worker
        whose turns come faster than a round trip sends one for them all."""
        if queue in self._passing:
            return

        async def announce() -> None:
            try:
                await self._scope.connector.run(statements.announce(self._s, queue))
            except Exception as exc:  # polling finds the jobs
                logger.debug("passing on a turn failed: %s", first_line(exc))
            finally:
                del self._passing[queue]

        self._passing[queue] = asyncio.create_task(announce())

    async def poll_aborts(self) -> None:
        """Every ``abort_interval``, while jobs run: the abort requests LISTEN may have missed."""
        worker_id: Callable[[], str] = self._scope.worker_id
        while True:
            await asyncio.sleep(self._abort_interval)
            if not self._attempts.running:
                continue
            try:
                ids = await self._scope.connector.run(
                    statements.abort_requested_ids(self._s, worker_id())
                )
            except Exception as exc:
                logger.warning("polling for aborted jobs failed: %s", first_line(exc))
                continue
            for job_id in ids:
                self._attempts.request_abort(job_id, "requested")
