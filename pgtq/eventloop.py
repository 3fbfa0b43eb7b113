"""The event loop a worker runs on when it has to make one (``App.run_worker``, ``pgtq
worker``): uvloop when installed, and a close that never waits forever for a task."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger("pgtq.worker")

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_on_new_loop(main: Coroutine[Any, Any, T], *, grace: float, cancel_on_sigint: bool) -> T:
    """Run ``main`` on a new loop; Ctrl-C cancels it when ``cancel_on_sigint``.

    Not ``asyncio.Runner``: its close cancels every task left and waits for each without a
    bound, so one task that swallows its cancellation would keep ``pgtq worker`` alive after
    SIGTERM. Here the loop's leftovers get ``grace`` seconds and are left behind.
    """
    loop = new_event_loop()
    task = loop.create_task(main)
    restore = _cancel_on_sigint(loop, task) if cancel_on_sigint else None
    try:
        return loop.run_until_complete(task)
    finally:
        if restore is not None:
            restore()
        _close_loop(loop, grace)


def _cancel_on_sigint(
    loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]
) -> Callable[[], None] | None:
    """Ctrl-C cancels the worker (a graceful shutdown), as ``asyncio.run`` does, instead of
    raising KeyboardInterrupt inside whichever job runs."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None

    def on_sigint(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(task.cancel)

    signal.signal(signal.SIGINT, on_sigint)

    def restore() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return restore


def _close_loop(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    """Cancel what is left on the loop, wait at most ``grace`` for it, close the loop."""
    try:
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for leftover in left:
            leftover.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=grace))
            stuck = [t for t in left if not t.done()]
            if stuck:
                logger.warning("%s task(s) ignored their cancellation; left behind", len(stuck))
        for finish in (loop.shutdown_asyncgens, loop.shutdown_default_executor):
            loop.run_until_complete(asyncio.wait([loop.create_task(finish())], timeout=grace))
    finally:
        loop.close()


def add_stop_signals(
    stop: Callable[[], None], hurry: Callable[[], None]
) -> list[Callable[[], object]]:
    """SIGTERM/SIGINT stop the worker on the running loop (main thread only): the first
    gracefully, the next ones at once. The functions that remove the handlers."""
    if threading.current_thread() is not threading.main_thread():
        return []
    loop = asyncio.get_running_loop()
    count = 0

    def on_signal() -> None:
        nonlocal count
        count += 1
        if count == 1:
            logger.info("stopping: waiting for running jobs (signal again to stop now)")
            stop()
        else:
            logger.info("stopping now: running jobs go back to the queue")
            stop()
            hurry()

    removers: list[Callable[[], object]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
        removers.append(functools.partial(loop.remove_signal_handler, sig))
    return removers
