"""The sync tasks' threads (pgtq/threads.py): results, errors, the thread cap, shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pgtq.threads import ThreadRunner

pytestmark = pytest.mark.unit


async def test_results_and_errors_come_back_on_the_loop() -> None:
    runner = ThreadRunner(4, asyncio.get_running_loop(), name="t")
    try:

        def boom() -> None:
            raise ValueError("bad")

        futures = [
            runner.submit(lambda i=i: (i, threading.current_thread().name)) for i in range(200)
        ]
        results = await asyncio.gather(*futures)
        assert [i for i, _ in results] == list(range(200))
        assert all(name.startswith("t_") for _, name in results)
        with pytest.raises(ValueError, match="bad"):
            await runner.submit(boom)
    finally:
        runner.shutdown()


async def test_no_more_threads_than_its_size_and_all_run_at_once_up_to_it() -> None:
    """Blocking calls run side by side up to the size (a sync task may wait on I/O)."""
    runner = ThreadRunner(3, asyncio.get_running_loop(), name="t")
    together = threading.Barrier(3, timeout=10)  # each round passes only with three at once
    names: set[str] = set()

    def meet() -> None:
        names.add(threading.current_thread().name)
        together.wait()

    try:
        await asyncio.gather(*(runner.submit(meet) for _ in range(9)))
        assert len(names) == 3
    finally:
        runner.shutdown()


async def test_shutdown_drops_calls_not_started_and_refuses_new_ones() -> None:
    runner = ThreadRunner(1, asyncio.get_running_loop(), name="t")
    started, release = threading.Event(), threading.Event()

    def block() -> str:
        started.set()
        release.wait(10)
        return "done"

    running = runner.submit(block)
    waiting = runner.submit(lambda: "never")
    assert await asyncio.to_thread(started.wait, 10)
    runner.shutdown()
    assert waiting.cancelled()
    release.set()
    assert await running == "done"  # the call under way still finishes
    with pytest.raises(RuntimeError, match="shut down"):
        runner.submit(lambda: None)
