"""The completer without a database: a fake connection that records what is written and
refuses what a test says it refuses.

Nothing is dropped: a failed write is kept (in order, before what came in meanwhile) and
tried again; an outcome PostgreSQL refuses fails its own job only.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pgtq import statements
from pgtq.completer import Completer
from pgtq.model import ClaimedJob, Status
from pgtq.outcomes import Outcome
from pgtq.schema import DEFAULT_SCHEMA

pytestmark = pytest.mark.unit

S = statements.statements_for(DEFAULT_SCHEMA)


class Refused(Exception):
    """What a driver raises for a value PostgreSQL refuses (a data exception, class 22)."""

    sqlstate = "22P05"


class Lost(Exception):
    """A connection error: no SQLSTATE, the write may be tried again."""


class FakeConnection:
    def __init__(self) -> None:
        self.written: list[tuple[int, str]] = []  # (job id, status) in write order
        self.refuse: set[int] = set()  # a batch holding one of these is refused
        self.fail_next = 0  # the next n writes are lost
        self.writes = 0

    async def run(self, query: Any) -> list[int]:
        self.writes += 1
        await asyncio.sleep(0)
        ids, statuses = query.params["ids"], query.params["statuses"]
        if self.fail_next:
            self.fail_next -= 1
            raise Lost("connection lost")
        if self.refuse & set(ids) and not all(s == "failed" for s in statuses):
            raise Refused("unsupported Unicode escape sequence")
        self.written += list(zip(ids, statuses, strict=True))
        return list(ids)

    async def close(self) -> None:
        pass


def job(n: int) -> ClaimedJob:
    return ClaimedJob(n, "t", "default", {}, 1, 0, None)


def completer(conn: FakeConnection) -> tuple[Completer, list[int]]:
    told: list[int] = []
    c = Completer(S, lambda: "w1", (), on_written=lambda frees: told.append(int(frees)))
    c.connection = conn  # type: ignore[assignment]
    return c, told


async def test_writes_what_is_buffered_in_one_statement() -> None:
    conn = FakeConnection()
    c, told = completer(conn)
    for n in range(5):
        c.add(job(n), Outcome(Status.SUCCEEDED, result="null"))
    assert len(c) == 5 and not c.idle
    await c.write(give_up_after=None)
    assert conn.written == [(n, "succeeded") for n in range(5)] and conn.writes == 1
    assert c.idle and told == [0]  # nothing they wrote can have freed another job


@pytest.mark.parametrize(
    ("lock", "outcome", "frees"),
    [
        (None, Outcome(Status.SUCCEEDED, result="null"), 0),
        ("acct-1", Outcome(Status.SUCCEEDED, result="null"), 1),  # its lock's next job
        (None, Outcome(Status.TODO, error="{}", retry_in=0.0), 1),  # a retry, waiting again
    ],
)
async def test_it_says_when_what_it_wrote_may_have_freed_other_jobs(
    lock: str | None, outcome: Outcome, frees: int
) -> None:
    """The fetch loop claims after a write only then (an idle worker: one claim a job)."""
    c, told = completer(FakeConnection())
    c.add(job(1)._replace(lock=lock), outcome)
    c.add(job(2), Outcome(Status.SUCCEEDED, result="null"))
    await c.write(give_up_after=None)
    c.add(job(3), Outcome(Status.SUCCEEDED, result="null"))
    await c.write(give_up_after=None)
    assert told == [frees, 0]


async def test_a_lost_write_is_kept_and_tried_again_in_order() -> None:
    conn = FakeConnection()
    conn.fail_next = 2
    c, _ = completer(conn)
    for n in range(3):
        c.add(job(n), Outcome(Status.SUCCEEDED, result="null"))
    await c.write(give_up_after=None)
    assert [i for i, _ in conn.written] == [0, 1, 2] and conn.writes == 3


async def test_outcomes_added_during_a_failed_write_come_after_the_kept_ones() -> None:
    conn = FakeConnection()
    conn.fail_next = 1
    c, _ = completer(conn)
    c.add(job(1), Outcome(Status.SUCCEEDED, result="null"))

    async def add_late() -> None:
        await asyncio.sleep(0)
        c.add(job(2), Outcome(Status.FAILED, error=json.dumps({"type": "E"})))

    await asyncio.gather(c.write(give_up_after=None), add_late())
    assert conn.written == [(1, "succeeded"), (2, "failed")]


async def test_a_refused_outcome_fails_its_own_job_only() -> None:
    conn = FakeConnection()
    conn.refuse = {2}
    c, _ = completer(conn)
    for n in range(4):
        c.add(job(n), Outcome(Status.SUCCEEDED, result="null"))
    await c.write(give_up_after=None)
    assert conn.written == [(0, "succeeded"), (1, "succeeded"), (2, "failed"), (3, "succeeded")]
    assert c.idle


async def test_a_shutdown_gives_up_after_its_deadline_and_keeps_the_rest() -> None:
    conn = FakeConnection()
    conn.fail_next = 10**6
    c, _ = completer(conn)
    c.add(job(1), Outcome(Status.SUCCEEDED, result="null"))
    await asyncio.wait_for(c.write(give_up_after=0.05), 5)
    assert conn.written == [] and c.ids == [1]  # left to the rescue once the worker is gone


async def test_while_jobs_run_a_write_waits_briefly_for_a_batch() -> None:
    """Outcomes that trickle in while other jobs run go out together (a batch's worth, or
    what came within GATHER); with nothing else running, an outcome goes out at once."""
    conn = FakeConnection()
    running = {"jobs": True}
    c = Completer(
        S, lambda: "w1", (), on_written=lambda frees: None, batch=3, running=lambda: running["jobs"]
    )
    c.connection = conn  # type: ignore[assignment]
    c_run = asyncio.create_task(c.run())
    for n in range(3):
        c.add(job(n), Outcome(Status.SUCCEEDED, result="null"))
        await asyncio.sleep(0)  # the loop looks at each
    await _until(lambda: c.idle)
    assert conn.writes == 1 and len(conn.written) == 3  # one write for the three
    running["jobs"] = False
    c.add(job(9), Outcome(Status.SUCCEEDED, result="null"))
    await _until(lambda: c.idle)
    assert conn.writes == 2
    running["jobs"] = True
    c.add(job(10), Outcome(Status.SUCCEEDED, result="null"))  # alone: out after GATHER
    await _until(lambda: c.idle)
    assert conn.writes == 3
    c_run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await c_run


async def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.001)
