"""The fetch loop: claim while there is room, then sleep until there may be work.

It knows no SQL: it asks a :class:`Source` for claims (``pgtq.claims.Claims`` in a worker, a
fake in the tests) and hands what comes back to the :class:`Holder` that runs jobs. Claims
in flight are asyncio Tasks, settled oldest first. While full batches come back (jobs are
waiting and the worker keeps up), a second claim goes out before the first returns, on a
connection of its own: the server runs one claim while the worker runs the other's jobs.

It sleeps on one event, rung by whatever may give it work: a NOTIFY of new jobs (heeded only
while it has room), a job that ended or outcomes written, a stop. An idle worker also wakes
when the earliest job scheduled ahead becomes due, and at the polling interval.

It claims only when a claim may find work: at its start, after a NOTIFY, while claims come
back full, when written outcomes may have made jobs claimable (a job with a lock ended, a
job went back to waiting, or fleet-wide limits), at a timed wake-up, and (without ``wait``)
once idle, to see that nothing is left. A job that merely ended frees a slot for the jobs it
holds: it is not a reason to ask the server again. So an idle worker sends one claim per job
it is woken for, not three.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pgtq.model import ClaimedJob
from pgtq.turns import Answer

logger = logging.getLogger("pgtq.worker")


class Source(Protocol):
    """Where claims come from."""

    @property
    def depth(self) -> int:
        """How many claims may be out at once now."""

    @property
    def recovering(self) -> bool:
        """A claim failed: no new claim until :meth:`recover` has run with none out."""

    async def claim(self, limit: int, answer: Answer | None = None) -> list[ClaimedJob] | None:
        """Claim up to ``limit`` jobs; None when the claim failed (and was waited out).
        ``answer``: the announcements it answers, for the other workers (:mod:`pgtq.turns`)."""

    async def recover(self) -> bool:
        """Clean up after a failed claim; False when that could not be done yet."""

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest job scheduled ahead is due (None: there is none)."""


class Holder(Protocol):
    """What runs the claimed jobs."""

    def room(self) -> int:
        """How many more jobs may be held (running, held back, or being claimed)."""

    def hold(self, jobs: Iterable[ClaimedJob]) -> None:
        """Take claimed jobs, in claim order, without starting them."""

    def start(self) -> None:
        """Start held jobs while there are free slots."""

    def idle(self) -> bool:
        """Nothing running, held or waiting to be written: a claim sent now sees every job
        this worker could still make due (a retry)."""


@dataclass(frozen=True, slots=True)
class _Claim:
    task: asyncio.Task[list[ClaimedJob] | None]
    asked: int
    idle: bool  # sent while the worker was idle: if it comes back empty, nothing is due


def claim_size(room: int, batch_size: int) -> int:
    """A full batch, else the largest power of two that fits: a claim's limit is written into
    its SQL (one plan each), so a worker uses a few claim statements, not one per size."""
    if room >= batch_size:
        return batch_size
    return 1 << (room.bit_length() - 1)


class Fetcher:
    """Claims jobs for one worker until it stops (or, without ``wait``, until drained)."""

    def __init__(
        self,
        source: Source,
        holder: Holder,
        *,
        batch_size: int,
        fetch_interval: float,
        wait: bool,
        stopping: asyncio.Event,
    ) -> None:
        self._source = source
        self._holder = holder
        self._batch_size = batch_size
        self._fetch_interval = fetch_interval
        self._wait = wait
        self._stopping = stopping
        self._inflight: deque[_Claim] = deque()
        self._last_full = False  # the last claim came back full: more may be waiting
        # The same, kept across sleeps (``_last_full`` is reset on waking: one claim first):
        # a slot freed while a backlog waits is worth a claim.
        self._backlog = False
        self._bell = asyncio.Event()
        # A claim may find work: a NOTIFY announced jobs, written outcomes may have made some
        # claimable, or a timed wake-up; cleared by each claim sent.
        self._worth_claiming = True
        self._changed = False  # a job finished or outcomes were written since the loop looked
        self._wants_jobs = False  # asleep with room: a NOTIFY rings the bell
        # When the earliest job scheduled ahead becomes due (loop time): an idle worker wakes
        # then, not at its next poll. Lowered by NOTIFYs of jobs deferred ahead and by this
        # worker's own retries; looked up again after each timed wake-up (``_timed``).
        self._wake_at: float | None = None
        self._timed = True  # the next idle moment asks when a job is due next
        self._rescheduled = False  # the wake-up moved earlier while the loop slept
        # Announcements it is this worker's turn to answer: the next claim carries them.
        self._answer: Answer | None = None

    # -- what rings the bell ----------------------------------------------------------------

    def announce(self) -> None:
        """New jobs are due (a NOTIFY): claim if there is room."""
        self._worth_claiming = True
        if self._wants_jobs:
            self._bell.set()

    def answer(self, answer: Answer) -> bool:
        """It is this worker's turn to claim announced jobs (:mod:`pgtq.turns`): claim, with
        what the claim needs to call the others if more wait. False: no room, or stopping
        (it claims no more): the turn is to be passed on (a worker without room still claims
        once it has some, as for any NOTIFY)."""
        self.announce()
        if self._room() <= 0 or self._stopping.is_set():
            return False
        self._answer = answer if self._answer is None else self._answer.merge(answer)
        return True

    def due_in(self, seconds: float) -> None:
        """A job becomes due in ``seconds``: be awake then at the latest."""
        at = asyncio.get_running_loop().time() + max(0.0, seconds)
        if self._wake_at is None or at < self._wake_at:
            self._wake_at = at
            if self._wants_jobs:  # asleep with room: sleep again, until then
                self._rescheduled = True
                self._bell.set()

    def look_again(self) -> None:
        """Jobs may have been deferred unheard (LISTEN was down): ask when the next is due,
        and claim."""
        self._timed = True
        self.announce()

    def changed(self, *, claimable: bool = False) -> None:
        """A job ended or outcomes were written: there may be room for held jobs.
        ``claimable``: the outcomes written may have made jobs claimable (a lock released, a
        job back to waiting, a limit's slot freed): claim again."""
        self._changed = True
        if claimable:
            self._worth_claiming = True
        self._bell.set()

    def stop(self) -> None:
        self._bell.set()

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._changed = False
                recover = self._source.recovering and not self._inflight
                if recover and not await self._source.recover():
                    continue
                self._holder.start()
                if not self._source.recovering:  # no new claim until the lost ones are back
                    self._send()
                settled: _Claim | None = None
                got: list[ClaimedJob] = []
                if self._inflight:
                    settled = self._inflight[0]
                    # Shielded: a cancelled worker settles the claim in ``finally`` instead
                    # of losing the jobs it claimed.
                    claimed = await asyncio.shield(settled.task)
                    self._inflight.popleft()
                    if claimed is None:
                        self._worth_claiming = True
                        continue  # the claim failed and was waited out: try again
                    got = claimed
                    self._last_full = self._backlog = len(got) == settled.asked
                    self._holder.hold(got)
                    self._holder.start()
                    if got:
                        # Let the jobs just started take their first step (quick ones end
                        # in it) before the room for the next claim is counted.
                        await asyncio.sleep(0)
                    if self._last_full or self._inflight:
                        continue  # there may be more waiting, or a claim is still out
                if self._drained(settled, got):
                    return
                room = self._holder.room() > 0
                if self._timed and room:
                    await self._look_ahead()
                await self._sleep_until_work(room=room)
                self._last_full = False  # woken: one claim first, more once one comes back full
        finally:
            # Stopping: claims still out are settled; their jobs are held, for the shutdown
            # to give back.
            for left in self._inflight:
                with contextlib.suppress(BaseException):
                    self._holder.hold(await left.task or ())
            self._inflight.clear()

    def _drained(self, settled: _Claim | None, got: list[ClaimedJob]) -> bool:
        """Without ``wait``: a claim sent while the worker was idle found nothing, and the
        worker is still idle. Idle then, no outcome of this worker could have made a job
        due that the claim missed."""
        return (
            not self._wait
            and settled is not None
            and settled.idle
            and not got
            and self._holder.idle()
        )

    def _send(self) -> None:
        """Send claims while there is room and one may find work: one, and more while full
        batches come back (up to the source's depth: one under fleet-wide limits and for a
        serial worker, which keeps strict priority order)."""
        checking_drained = not self._wait and not self._inflight and self._holder.idle()
        if not (self._worth_claiming or self._backlog or checking_drained):
            return
        room = self._room()
        depth = self._source.depth
        loop = asyncio.get_running_loop()
        while room > 0 and len(self._inflight) < depth and (not self._inflight or self._last_full):
            asked = claim_size(room, self._batch_size)
            self._worth_claiming = False
            idle = self._holder.idle()
            answer, self._answer = self._answer, None
            claim = loop.create_task(self._source.claim(asked, answer))
            self._inflight.append(_Claim(claim, asked, idle))
            room -= asked

    def _room(self) -> int:
        """Slots for jobs not yet asked for by a claim in flight."""
        return self._holder.room() - sum(c.asked for c in self._inflight)

    async def _look_ahead(self) -> None:
        """Ask when the earliest job scheduled ahead becomes due."""
        self._timed = False
        try:
            due_in = await self._source.next_due_in()
        except Exception as exc:
            logger.debug("looking up the next due job failed: %s", exc)
            return
        if due_in is not None:
            self.due_in(due_in)

    async def _sleep_until_work(self, *, room: bool) -> None:
        """Wait for a NOTIFY, a free slot, a stop, the next scheduled job's due time, or the
        polling interval."""
        if self._changed or (room and self._worth_claiming) or self._stopping.is_set():
            return  # it came while the loop was busy
        loop = asyncio.get_running_loop()
        self._bell.clear()
        self._wants_jobs = room
        try:
            while True:
                timeout, until_due = self._fetch_interval, None
                if room and self._wake_at is not None:
                    until_due = self._wake_at - loop.time()
                    if until_due <= 0:
                        self._wake_at, self._timed = None, True
                        self._worth_claiming = True
                        return
                    timeout = min(timeout, until_due)
                try:
                    async with asyncio.timeout(timeout):
                        await self._bell.wait()
                except TimeoutError:
                    if until_due is not None and until_due <= timeout:
                        self._wake_at = None
                    self._timed = True  # the polling interval, or a job's due time: look
                    self._worth_claiming = True
                    return
                rescheduled, self._rescheduled = self._rescheduled, False
                woken = self._changed or self._worth_claiming or self._stopping.is_set()
                if not rescheduled or woken:
                    return
                self._bell.clear()  # only the wake-up moved: sleep again, until then
        finally:
            self._wants_jobs = False
