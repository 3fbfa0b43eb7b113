"""The fetch loop without a database: a fake source of claims, a fake holder of jobs.

What the loop decides on its own: how much to claim, how many claims are out at once, when
it is drained (without ``wait``), when it sleeps and what wakes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import pytest

from pgtq.fetcher import Fetcher, claim_size
from pgtq.model import ClaimedJob
from pgtq.turns import Answer

pytestmark = pytest.mark.unit


def job(n: int) -> ClaimedJob:
    return ClaimedJob(n, "t", "default", {}, 1, 0, None)


class Queue:
    """A source: jobs waiting in order; each claim takes what it asks for."""

    def __init__(self, jobs: int, *, depth: int = 2, fail_first: int = 0) -> None:
        self.waiting = [job(n) for n in range(jobs)]
        self.depth = depth
        self.recovering = False
        self.asked: list[int] = []
        self.out = 0
        self.most_out = 0
        self.fail = fail_first
        self.recoveries = 0
        self.gate: asyncio.Event | None = None  # set: claims wait for it
        self.answers: list[Answer | None] = []

    async def claim(self, limit: int, answer: Answer | None = None) -> list[ClaimedJob] | None:
        self.asked.append(limit)
        self.answers.append(answer)
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if self.fail:
                self.fail -= 1
                self.recovering = True
                return None
            taken, self.waiting = self.waiting[:limit], self.waiting[limit:]
            return taken
        finally:
            self.out -= 1

    async def recover(self) -> bool:
        self.recoveries += 1
        self.recovering = False
        return True

    async def next_due_in(self) -> float | None:
        return None


class Slots:
    """A holder whose jobs end as soon as they start (or stay running while ``hold_on``)."""

    def __init__(self, concurrency: int, prefetch: int) -> None:
        self.concurrency, self.prefetch = concurrency, prefetch
        self.held: list[ClaimedJob] = []
        self.running: list[ClaimedJob] = []
        self.done: list[int] = []
        self.hold_on = False
        self.fetcher: Fetcher | None = None

    def room(self) -> int:
        return self.concurrency + self.prefetch - len(self.running) - len(self.held)

    def hold(self, jobs: Iterable[ClaimedJob]) -> None:
        self.held.extend(jobs)

    def start(self) -> None:
        while self.held and len(self.running) < self.concurrency:
            started = self.held.pop(0)
            if self.hold_on:
                self.running.append(started)
            else:  # it ended: the worker tells the fetcher, as after each job
                self.done.append(started.id)
                assert self.fetcher is not None
                self.fetcher.changed()

    def idle(self) -> bool:
        return not self.running and not self.held

    def finish_all(self) -> None:
        self.done += [j.id for j in self.running]
        self.running.clear()
        assert self.fetcher is not None
        self.fetcher.changed()


def fetcher(source: Queue, holder: Slots, *, wait: bool = False, batch: int = 10) -> Fetcher:
    f = Fetcher(
        source,
        holder,
        batch_size=batch,
        fetch_interval=3600.0,  # never the reason a test goes on
        wait=wait,
        stopping=asyncio.Event(),
    )
    holder.fetcher = f
    return f


async def test_drains_every_job_once_then_returns() -> None:
    source, holder = Queue(95), Slots(concurrency=10, prefetch=10)
    await asyncio.wait_for(fetcher(source, holder).run(), 5)
    assert holder.done == list(range(95))
    assert all(asked <= 10 for asked in source.asked)


async def test_two_claims_are_out_while_full_batches_come_back() -> None:
    source, holder = Queue(200), Slots(concurrency=10, prefetch=10)
    await asyncio.wait_for(fetcher(source, holder).run(), 5)
    assert source.most_out == 2


async def test_one_claim_at_a_time_when_the_source_says_so() -> None:
    source, holder = Queue(200, depth=1), Slots(concurrency=10, prefetch=10)
    await asyncio.wait_for(fetcher(source, holder).run(), 5)
    assert source.most_out == 1 and holder.done == list(range(200))


async def test_never_claims_more_than_the_room() -> None:
    source, holder = Queue(50), Slots(concurrency=4, prefetch=2)
    holder.hold_on = True  # jobs stay running: the room shrinks
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await _until(lambda: len(holder.running) + len(holder.held) >= 6)
    await asyncio.sleep(0.01)
    assert len(holder.running) + len(holder.held) == 6  # concurrency + prefetch, no more
    assert sum(source.asked) == 6
    await _stop(f, run)


async def test_not_drained_while_a_job_runs_even_if_a_claim_comes_back_empty() -> None:
    """A claim sent while a job still ran may miss the retry its outcome makes due."""
    source, holder = Queue(1), Slots(concurrency=2, prefetch=0)
    holder.hold_on = True
    f = fetcher(source, holder)
    run = asyncio.create_task(f.run())
    await _until(lambda: bool(holder.running))
    claims = len(source.asked)
    f.announce()  # a claim goes out while the job runs, and comes back empty
    await _until(lambda: len(source.asked) > claims and not source.out)
    await asyncio.sleep(0.01)
    assert not run.done()  # it sleeps: a job runs
    source.waiting.append(job(7))  # "a retry", due once the running job ended
    holder.hold_on = False
    holder.finish_all()  # the job ends (outcome written): the fetcher is told
    await asyncio.wait_for(run, 5)
    assert holder.done == [0, 7]


async def test_a_failed_claim_is_recovered_before_the_next() -> None:
    source, holder = Queue(30, fail_first=1), Slots(concurrency=10, prefetch=0)
    await asyncio.wait_for(fetcher(source, holder).run(), 5)
    assert source.recoveries == 1 and holder.done == list(range(30))


async def test_asleep_it_wakes_for_a_notify_only_with_room() -> None:
    source, holder = Queue(0), Slots(concurrency=1, prefetch=0)
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await asyncio.sleep(0.01)
    claims = len(source.asked)
    source.waiting.append(job(1))
    f.announce()
    for _ in range(100):
        if holder.done:
            break
        await asyncio.sleep(0.001)
    assert holder.done == [1] and len(source.asked) > claims
    await _stop(f, run)


async def test_a_job_due_soon_wakes_it_before_the_polling_interval() -> None:
    source, holder = Queue(0), Slots(concurrency=1, prefetch=0)
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await asyncio.sleep(0.01)
    source.waiting.append(job(3))
    f.due_in(0.05)  # the polling interval is an hour
    await _until(lambda: holder.done == [3])
    await _stop(f, run)


async def test_stopping_settles_the_claims_still_out_and_holds_their_jobs() -> None:
    source, holder = Queue(20), Slots(concurrency=5, prefetch=5)
    holder.hold_on = True
    source.gate = asyncio.Event()
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await asyncio.sleep(0.01)
    assert source.out == 1
    run.cancel()  # a cancelled worker: the claim out is settled, its jobs held
    await asyncio.sleep(0)
    source.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert [j.id for j in holder.running + holder.held] == list(range(10))


async def test_an_idle_worker_claims_once_per_job_it_is_woken_for() -> None:
    """A job that ends frees a slot, nothing more: no claim after it unless something says
    jobs may wait (a NOTIFY, a full claim, outcomes that freed jobs). It was three claims a
    job: one for the job, one when it ended, one when its outcome was written."""
    source, holder = Queue(0), Slots(concurrency=4, prefetch=4)
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await _until(lambda: source.asked == [8] and not source.out)  # the start's claim
    for n in range(5):
        source.waiting.append(job(n))
        f.announce()
        await _until(lambda n=n: holder.done == list(range(n + 1)))  # type: ignore[misc]
        f.changed()  # its outcome written: it freed nothing
    await asyncio.sleep(0.01)  # (a claim would be sent at once: give it the chance)
    assert len(source.asked) == 1 + 5
    await _stop(f, run)


async def test_outcomes_that_free_jobs_ring_a_claim() -> None:
    """A lock released or a job back to waiting: the jobs behind it are claimable without
    any NOTIFY, so the worker claims."""
    source, holder = Queue(0), Slots(concurrency=1, prefetch=0)
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await _until(lambda: len(source.asked) == 1 and not source.out)
    source.waiting.append(job(9))  # claimable now, announced by nobody
    f.changed(claimable=True)
    await _until(lambda: holder.done == [9])
    await _stop(f, run)


async def test_a_backlog_is_claimed_again_as_running_jobs_end() -> None:
    """A full claim means more may wait: each freed slot is worth a claim, across sleeps."""
    source, holder = Queue(9), Slots(concurrency=2, prefetch=0)
    holder.hold_on = True
    f = fetcher(source, holder, wait=True, batch=2)
    run = asyncio.create_task(f.run())
    for _ in range(5):
        await _until(lambda: bool(holder.running) and not source.out)
        await asyncio.sleep(0)
        holder.finish_all()
    await _until(lambda: holder.done == list(range(9)))
    await _stop(f, run)


async def test_the_claim_that_answers_a_turn_carries_the_answer() -> None:
    """Its turn (pgtq.turns): the next claim tells the others; later claims do not."""
    source, holder = Queue(0), Slots(concurrency=2, prefetch=0)
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await _until(lambda: len(source.asked) == 1 and not source.out)  # the start's claim
    source.waiting.append(job(5))
    assert f.answer(Answer(1, "default"))
    await _until(lambda: holder.done == [5])
    assert source.answers == [None, Answer(1, "default")]
    await _stop(f, run)


async def test_a_worker_without_room_lets_its_turn_pass_and_claims_later() -> None:
    """No room: the turn is to be passed on (False), and the worker claims once room frees."""
    source, holder = Queue(1), Slots(concurrency=1, prefetch=0)
    holder.hold_on = True
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await _until(lambda: bool(holder.running) and not source.out)
    source.waiting.append(job(8))
    assert not f.answer(Answer(1, "default"))
    holder.hold_on = False
    holder.finish_all()
    await _until(lambda: holder.done == [0, 8])
    assert not any(source.answers)
    await _stop(f, run)


def test_claim_sizes() -> None:
    assert claim_size(100, 20) == 20
    assert claim_size(19, 20) == 16
    assert claim_size(1, 20) == 1


async def _stop(f: Fetcher, run: asyncio.Task[None]) -> None:
    """Stop a fetcher that waits for work, and see its loop end."""
    f._stopping.set()
    f.stop()
    await asyncio.wait_for(run, 5)


async def _until(check: Callable[[], bool], deadline: float = 5.0) -> None:
    """Poll ``check`` until it holds, failing after ``deadline`` seconds."""
    for _ in range(int(deadline / 0.001)):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def test_a_stopping_worker_lets_its_turn_pass() -> None:
    """It claims no more: the turn goes to the others (False: pass it on)."""
    source, holder = Queue(0), Slots(concurrency=2, prefetch=0)
    f = fetcher(source, holder, wait=True)
    run = asyncio.create_task(f.run())
    await _until(lambda: len(source.asked) == 1 and not source.out)
    f._stopping.set()
    assert not f.answer(Answer(1, "default"))
    await _stop(f, run)
