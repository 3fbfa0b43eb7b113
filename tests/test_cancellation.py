"""Cancellation you can reason about: what docs/composition.md promises, step by step.

An async task is cancelled at its next ``await`` when its job is aborted; a critical section
wrapped in ``asyncio.shield`` still completes, and the task sees the cancellation right after
it. A sync task cannot be interrupted: it checks ``ctx.should_abort()`` between steps and
stops after the step it is in. Threading events order every step: no sleep decides anything.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import pgtq
from tests.conftest import eventually
from tests.sides import Side

WAIT = 10.0  # seconds: only a bound for a broken test, never a step of one


async def wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, WAIT), "the task never got there"


async def test_an_async_task_finishes_its_shielded_section_then_sees_the_abort(
    side: Side, app: pgtq.App
) -> None:
    steps: list[str] = []
    in_section = threading.Event()
    cancel_seen = threading.Event()
    may_finish = threading.Event()

    async def critical_section() -> None:
        steps.append("section started")
        in_section.set()
        await asyncio.to_thread(may_finish.wait, WAIT)  # e.g. a payment call and its record
        steps.append("section done")

    @app.task
    async def transfer(ctx: pgtq.JobContext) -> str:
        section = asyncio.ensure_future(critical_section())
        try:
            await asyncio.shield(section)
        except asyncio.CancelledError:
            steps.append(f"cancelled during the section ({ctx.abort_reason()})")
            cancel_seen.set()
            await section  # the section runs to its end ...
            raise  # ... then the task stops, as cancelled
        steps.append("after the section")  # never reached: the abort came first
        return "done"

    job_id = await side.defer(transfer)
    worker = asyncio.create_task(side.run_worker(app, wait=False, abort_job_polling_interval=0.05))
    await wait_for(in_section)
    assert await side.abort(app, job_id) == pgtq.Status.DOING
    await wait_for(cancel_seen)
    assert steps == ["section started", "cancelled during the section (requested)"]
    job = await side.get(app, job_id)
    assert job is not None and job.status == pgtq.Status.DOING  # still running its section
    may_finish.set()
    stats = await asyncio.wait_for(worker, WAIT)
    assert steps == [
        "section started",
        "cancelled during the section (requested)",
        "section done",
    ]
    with pytest.raises(pgtq.JobFailed, match="aborted"):
        await side.wait(app, job_id)
    assert stats.by_status["aborted"] == 1


async def test_a_sync_task_stops_after_the_current_step(side: Side, app: pgtq.App) -> None:
    steps: list[str] = []
    contexts: list[pgtq.JobContext[Any]] = []
    in_step_one = threading.Event()
    may_finish_step_one = threading.Event()

    @app.task
    def import_rows(ctx: pgtq.JobContext) -> int:
        contexts.append(ctx)
        done = 0
        for step in range(5):
            if ctx.should_abort():
                steps.append(f"stopped before step {step} ({ctx.abort_reason()})")
                return done
            steps.append(f"step {step}")
            if step == 1:
                in_step_one.set()
                may_finish_step_one.wait(WAIT)
            done += 1
        return done

    job_id = await side.defer(import_rows)
    worker = asyncio.create_task(side.run_worker(app, wait=False, abort_job_polling_interval=0.05))
    await wait_for(in_step_one)
    assert await side.abort(app, job_id) == pgtq.Status.DOING
    [ctx] = contexts
    await eventually(ctx.should_abort)  # the worker passed the request on to the task
    may_finish_step_one.set()
    stats = await asyncio.wait_for(worker, WAIT)
    assert steps == ["step 0", "step 1", "stopped before step 2 (requested)"]
    with pytest.raises(pgtq.JobFailed, match="aborted"):
        await side.wait(app, job_id)
    assert stats.by_status["aborted"] == 1
