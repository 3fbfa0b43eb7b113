"""What every library adapter provides, and the recorder its no-op handlers call.

An adapter wraps one library's *public* API: install its schema the documented way, enqueue
(one job, a list of jobs, from async code and from a plain thread), and run one worker until
told to stop. It never times anything: the measuring frame (``benchmarks.frame``) does, the
same way for every library. An adapter imports its library lazily, so the driver can list
and skip adapters whose library is not installed.
"""

from __future__ import annotations

import array
import asyncio
import importlib.metadata
import importlib.util
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, ClassVar, Literal, Protocol

Kind = Literal["async", "sync"]
Fetch = Callable[[str], tuple[Any, ...]]

ASYNC_TASK = "noop_async"
SYNC_TASK = "noop_sync"
#: The scheduled-lateness figures' task: async, no-op, 1 s backoff between two attempts.
SCHED_TASK = "sched_noop"


def task_name(kind: Kind) -> str:
    return ASYNC_TASK if kind == "async" else SYNC_TASK


class Recorder:
    """Counts which jobs (by their argument ``n``) a worker's handler ran.

    ``done`` is set once every one of the ``expect`` jobs has run at least once. Counts are
    one byte per job (saturating at 255) so that recording a million jobs costs a megabyte,
    not the worker's memory figure. With ``timestamps``, the handler's start time
    (``time.time()``) of each job's first run is kept too (for the pickup latency).
    """

    def __init__(
        self, expect: int, loop: asyncio.AbstractEventLoop, *, timestamps: bool = False
    ) -> None:
        self.expect = expect
        self.counts = bytearray(expect)
        self.distinct = 0
        self.total = 0
        self.out_of_range: list[int] = []
        self.starts: array.array[float] | None = (
            array.array("d", bytes(8 * expect)) if timestamps else None
        )
        self.first_at: float | None = None  # time.perf_counter() of the first run
        # time.perf_counter() each time another tenth of the jobs has run (progress over time)
        self.tenths: list[float] = []
        self._step = max(1, expect // 10)
        self._next_tenth = self._step
        self.done = asyncio.Event()
        self._loop = loop
        self._lock = threading.Lock()

    def _count(self, n: int) -> bool:
        """Count one run of job ``n``; True when this run completed the set."""
        now = time.time() if self.starts is not None else 0.0
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.total += 1
        if not 0 <= n < self.expect:
            self.out_of_range.append(n)
            return False
        seen = self.counts[n]
        if seen < 255:
            self.counts[n] = seen + 1
        if seen:
            return False
        if self.starts is not None:
            self.starts[n] = now
        self.distinct += 1
        if self.distinct >= self._next_tenth:
            self.tenths.append(time.perf_counter())
            self._next_tenth += self._step
        return self.distinct == self.expect

    def record(self, n: int) -> None:
        """Called by an async handler, on the worker's event loop."""
        if self._count(n):
            self.done.set()

    def record_from_thread(self, n: int) -> None:
        """Called by a sync handler, in whatever thread the library runs it."""
        with self._lock:
            complete = self._count(n)
        if complete:
            self._loop.call_soon_threadsafe(self.done.set)

    def problems(self, limit: int = 10) -> list[str]:
        lost = [n for n, c in enumerate(self.counts) if c == 0]
        dup = [n for n, c in enumerate(self.counts) if c > 1]
        out = []
        if lost:
            out.append(f"{len(lost)} job(s) never ran in the handler (n = {lost[:limit]} ...)")
        if dup:
            out.append(f"{len(dup)} job(s) ran more than once in the handler (n = {dup[:limit]})")
        if self.out_of_range:
            out.append(f"the handler ran unexpected jobs: n = {self.out_of_range[:limit]}")
        return out


async def until_stopped(worker: asyncio.Future[Any], stop: asyncio.Event) -> None:
    """Wait until ``stop`` is set or the worker ends by itself (then the caller stops it)."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([worker, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()


class StartRecorder:
    """When each run of each job started (``time.time()`` in the handler), for the
    scheduled-lateness figures, and which runs must fail.

    ``start(n, scheduled)`` is called first thing by the handler, with the job's scheduled
    instant as the library handed it to the handler (epoch seconds), when it does; it
    returns True when this run must fail: the first run of every job ``n < fail_below``
    (the retry figure). ``done`` is set once ``expect`` distinct jobs have had a run that
    did not fail.
    """

    def __init__(self, expect: int, fail_below: int = 0) -> None:
        self.expect = expect
        self.fail_below = fail_below
        self.runs: dict[int, list[tuple[float, float | None]]] = {}
        self.succeeded: set[int] = set()
        self.done = asyncio.Event()

    def start(self, n: int, scheduled: float | None = None) -> bool:
        now = time.time()
        runs = self.runs.setdefault(n, [])
        runs.append((now, scheduled))
        fail = n < self.fail_below and len(runs) == 1
        if not fail:
            self.succeeded.add(n)
            if len(self.succeeded) >= self.expect:
                self.done.set()
        return fail


class ScheduleEnqueuer(Protocol):
    async def defer(self, n: int, delay: float | None) -> None:
        """Defer one job of ``SCHED_TASK``: due in ``delay`` seconds, or now (None)."""


class AsyncEnqueuer(Protocol):
    async def batch(self, ns: Sequence[int]) -> None: ...

    async def single(self, n: int) -> None: ...


class SyncEnqueuer(Protocol):
    def single(self, n: int) -> None: ...


class Adapter(ABC):
    """One library, through its public API."""

    name: ClassVar[str]  # as given to --only
    title: ClassVar[str]  # as shown in the table
    module: ClassVar[str]  # what must be importable
    distributions: ClassVar[tuple[str, ...]]  # whose versions are recorded
    jobs_table: ClassVar[str]  # VACUUMed by the driver
    remaining_sql: ClassVar[str]  # jobs not finished yet (0 when the burn-down is done)
    total_sql: ClassVar[str]  # jobs enqueued so far
    preload: ClassVar[tuple[str, ...]]  # modules a worker process imports before the clock
    supports_sync_tasks: ClassVar[bool] = True
    #: The scheduled-lateness figures: (n, scheduled epoch, started epoch) per job, read
    #: from the library's own tables after the run (the started time of the last attempt,
    #: the scheduled time of that attempt). None: the library keeps no start time, and
    #: lateness is the handler's start minus the scheduled time the library handed it.
    lateness_sql: ClassVar[str | None] = None
    lateness_source: ClassVar[str] = ""  # what the lateness is measured from (recorded)

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    @classmethod
    def versions(cls) -> dict[str, str]:
        found = {}
        for dist in cls.distributions:
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[dist] = "not installed"
        return found

    @classmethod
    def import_all(cls) -> None:
        """Import what the worker will use (its driver too), as a worker process does at start.

        The burn-down clock starts after this: import time is not queue throughput.
        """
        for module in cls.preload:
            importlib.import_module(module)

    @abstractmethod
    async def install(self, dsn: str) -> None:
        """Create the library's tables in an empty database, the documented way."""

    @abstractmethod
    def async_enqueuer(self, dsn: str, kind: Kind) -> AbstractAsyncContextManager[AsyncEnqueuer]:
        """Open what async code uses to enqueue jobs of the no-op task ``kind``."""

    @abstractmethod
    def sync_enqueuer(self, dsn: str) -> AbstractContextManager[SyncEnqueuer]:
        """Open what a plain thread uses to enqueue one job at a time (async no-op task)."""

    @abstractmethod
    async def run_worker(
        self, dsn: str, *, kind: Kind, batch: int, recorder: Recorder, stop: asyncio.Event
    ) -> None:
        """Run one worker on the running loop, handling ``kind`` no-op jobs, until ``stop``.

        The handler calls ``recorder.record(n)`` (async) or ``recorder.record_from_thread(n)``
        (sync) with the job's argument. Returns after a graceful shutdown.
        """

    @classmethod
    @abstractmethod
    def worker_settings(cls, kind: Kind, batch: int) -> dict[str, Any]:
        """The worker options used for a burn-down at ``batch`` (recorded in the results)."""

    @classmethod
    @abstractmethod
    def verify(cls, fetch: Fetch, expect: int) -> list[str]:
        """Problems seen in the database after a burn-down of ``expect`` jobs (empty: all fine).

        ``fetch(sql)`` returns the first row of a query. Every job must be finished, as a
        success, exactly once.
        """

    def schedule_enqueuer(self, dsn: str) -> AbstractAsyncContextManager[ScheduleEnqueuer]:
        """Open what defers ``SCHED_TASK`` jobs, scheduled ahead or due now."""
        raise NotImplementedError(f"{self.name}: no scheduled jobs")

    async def run_schedule_worker(
        self, dsn: str, *, recorder: StartRecorder, stop: asyncio.Event
    ) -> None:
        """Run one worker with the library's DEFAULT settings until ``stop``.

        Its ``SCHED_TASK`` handler calls ``recorder.start(n, scheduled)`` first and raises
        when that returns True; the task retries once after 1 s (no jitter).
        """
        raise NotImplementedError(f"{self.name}: no scheduled jobs")

    @classmethod
    def schedule_settings(cls) -> dict[str, Any]:
        """The worker and retry settings of the scheduled-lateness figures (recorded)."""
        return {}
