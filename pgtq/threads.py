"""The threads that run sync tasks for a worker's event loop.

``loop.run_in_executor`` costs, per call, a ``concurrent.futures.Future`` (with its
``Condition``), the executor's work item and semaphore, a chain of callbacks into an asyncio
future, and one cross-thread wake-up of the loop. With a thousand no-op jobs a second that
is most of a sync worker's CPU (its GIL, shared with the loop). Here a call is one queue
put; results go back in batches: a thread finishing a call while others' results wait to be
delivered adds its own to them, and the loop is woken once for all of them.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

_Call = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class ThreadRunner:
    """Up to ``size`` threads, started as calls need them (like ``ThreadPoolExecutor``).

    Threads are daemons: a sync task that never returns does not keep the process alive
    once the worker has given its job back.
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop, *, name: str) -> None:
        self._size = size
        self._loop = loop
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._results: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        self._threads: list[threading.Thread] = []
        self._waiting = 0  # calls handed over and not yet taken by a thread
        self._idle = 0  # threads waiting for a call
        self._busy = 0  # calls running now
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a thread; the returned future is set on the loop."""
        if self._closed:
            raise RuntimeError("the worker's threads are shut down")
        future = self._loop.create_future()
        with self._lock:
            self._waiting += 1
            start = self._waiting > self._idle and len(self._threads) < self._size
            if start:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
        if start:
            thread.start()
        self._calls.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            call = self._calls.get()
            with self._lock:
                self._idle -= 1
                self._waiting -= 1
                self._busy += call is not None
            if call is None:
                return
            future, fn, args = call
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the loop, raised where it is awaited
                error = exc
            with self._lock:
                self._busy -= 1
                self._results.append((future, result, error))
                wake = len(self._results) == 1  # else a wake-up is already on its way
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody waits for this any more
                    return

    def _deliver(self) -> None:
        """On the loop: set every result that came back since the last delivery."""
        with self._lock:
            results, self._results = self._results, deque()
        for future, result, error in results:
            if future.cancelled():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    @property
    def busy(self) -> int:
        """Calls running now (after ``shutdown``: the ones that did not return)."""
        return self._busy

    def shutdown(self) -> None:
        """Threads end once their current call returns; calls not started are dropped."""
        self._closed = True
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call[0].cancel()
        for _ in self._threads:
            self._calls.put(None)
