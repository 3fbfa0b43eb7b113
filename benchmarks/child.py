"""The measuring frame: what runs inside each measured process.

    python -m benchmarks.child '<json spec>'

The driver (``benchmarks.run``) starts one such process per measurement, so every library
is timed in a clean process, by this same code. Actions:

``burndown``
    Import the library and its driver, print ``READY`` and wait for ``GO`` on stdin (the
    driver fills the queue meanwhile), open a monitoring connection. The clock
    (``time.perf_counter``) starts, then the library's worker starts (connecting,
    registering, listening: all of it is timed). The clock stops when the database shows no
    unfinished job: once the handler has run every expected job, this process polls the
    library's "unfinished jobs" count every 2 ms and stops the clock when the poll that
    returns 0 comes back. Then the worker is stopped through the library's documented
    graceful stop (not timed). Reports the elapsed time, what the handler ran (lost /
    duplicated jobs) and the peak RSS. If the handler stalls while the database shows
    nothing unfinished, the missing jobs are reported as lost at once.
``enqueue``
    Batch enqueue (1,000 per call), single async enqueue awaited one by one, and single sync
    enqueue from a plain thread, each into its own fresh database, each after one untimed
    warm-up call.
``latency_enqueue``
    The enqueuer half of the pickup latency: after ``GO``, enqueue one warm-up job and wait
    until it is done (the worker is up), let the worker idle for ``settle`` seconds, then
    enqueue ``count`` jobs ``interval`` seconds apart, recording ``time.time()`` just before
    each enqueue call. The worker half is a ``burndown`` process with timestamps on; its
    handler records ``time.time()`` when each job starts (same machine clock).

``schedule_worker``
    One worker with the library's DEFAULT settings (``Adapter.run_schedule_worker``) whose
    handler records ``time.time()`` at the start of every run, with the scheduled instant the
    library handed it when it does; with ``fail_below`` the first run of those jobs fails
    (the task retries once after 1 s). Ends once every expected job has had a successful run.
``schedule_enqueue``
    After ``GO``: one job due now, wait until it is done (the worker is up), let the worker
    idle for ``settle`` seconds, then defer ``count`` jobs ``interval`` seconds apart, job
    ``n`` due ``delays[n]`` seconds ahead (or now, without ``delays``), and end (the worker
    process ends once every job has run).

Every wait has a timeout. The result (or the error) is written as JSON to ``spec["out"]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar

from benchmarks.libs import get
from benchmarks.libs.base import Adapter, Recorder, StartRecorder

T = TypeVar("T")

POLL_INTERVAL = 0.002
STOP_TIMEOUT = 60.0
FAULT_ENV = "PGTQ_BENCH_FAULT"  # "lose" or "duplicate": proves the checks work (tests)


class BenchError(Exception):
    """A measurement that could not be made (reported to the driver, which fails the run)."""


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Every library runs on the same event loop: uvloop when installed (pgtq's and PgQueuer's
    own choice), else asyncio's."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def loop_name() -> str:
    return "uvloop" if _loop_factory() is not asyncio.new_event_loop else "asyncio"


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM).

    Not ``getrusage().ru_maxrss``: on Linux that survives fork and exec, so a child would
    report its parent's peak when the parent was bigger.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def _connect_monitor(dsn: str) -> Any:
    import psycopg

    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10)


async def _remaining(monitor: Any, sql: str) -> int:
    cur = await monitor.execute(sql)
    row = await cur.fetchone()
    return int(row[0])


async def _wait_until_finished(
    monitor: Any, adapter: Adapter, worker: asyncio.Future[Any] | None = None
) -> int:
    """Poll the unfinished-jobs count until it is 0; returns the number of polls."""
    polls = 0
    while True:
        polls += 1
        if await _remaining(monitor, adapter.remaining_sql) == 0:
            return polls
        if worker is not None and worker.done():
            raise BenchError("the worker stopped before every job was finished")
        await asyncio.sleep(POLL_INTERVAL)


def _wait_for_line(expected: str, event: threading.Event) -> None:
    if sys.stdin.readline().strip() == expected:
        event.set()


def _handshake(proto: IO[str]) -> None:
    proto.write("READY\n")
    proto.flush()
    line = sys.stdin.readline().strip()
    if line != "GO":
        raise BenchError(f"expected GO from the driver, got {line!r}")


class FaultyRecorder(Recorder):
    """A recorder that pretends job 0 was lost (never ran) or ran twice."""

    fault = ""

    def _count(self, n: int) -> bool:
        if n == 0 and self.fault == "lose":
            return False
        if n == 0 and self.fault == "duplicate":
            super()._count(n)
        return super()._count(n)


async def _wait_for_handler(
    recorder: Recorder,
    worker: asyncio.Task[None],
    monitor: Any,
    adapter: Adapter,
    all_queued: threading.Event,
) -> bool:
    """Wait until the handler has run every expected job; True if some were lost instead.

    Lost: the handler made no progress for a second and the database shows no unfinished
    job. Only checked once every job is queued (before the start for a burn-down; when the
    driver says SENT for the latency figure), so it costs nothing while jobs flow.
    """
    handled = asyncio.ensure_future(recorder.done.wait())
    try:
        seen = -1
        while True:
            await asyncio.wait([worker, handled], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if handled.done():
                return False
            if worker.done():
                worker.result()  # raises what the worker raised
                raise BenchError("the worker returned before running every job")
            stalled = all_queued.is_set() and recorder.total == seen
            if stalled and await _remaining(monitor, adapter.remaining_sql) == 0:
                return True
            seen = recorder.total
    finally:
        handled.cancel()


async def burndown(adapter: Adapter, spec: dict[str, Any], proto: IO[str]) -> dict[str, Any]:
    dsn, expect, timeout = spec["dsn"], spec["expect"], spec["timeout"]
    loop = asyncio.get_running_loop()
    fault = os.environ.get(FAULT_ENV, "")
    recorder_type = FaultyRecorder if fault else Recorder
    recorder = recorder_type(expect, loop, timestamps=spec.get("timestamps", False))
    if isinstance(recorder, FaultyRecorder):
        recorder.fault = fault
    stop = asyncio.Event()
    adapter.import_all()
    _handshake(proto)  # the driver fills the queue meanwhile; nothing runs before GO
    monitor = await _connect_monitor(dsn)
    all_queued = threading.Event()
    if spec["prefilled"]:
        all_queued.set()
    else:  # the driver writes SENT once the last job is queued
        threading.Thread(target=_wait_for_line, args=("SENT", all_queued), daemon=True).start()

    started = time.perf_counter()
    worker = asyncio.create_task(
        adapter.run_worker(
            dsn, kind=spec["kind"], batch=spec["batch"], recorder=recorder, stop=stop
        )
    )
    result: dict[str, Any] = {}
    try:
        try:
            async with asyncio.timeout(timeout):
                lost = await _wait_for_handler(recorder, worker, monitor, adapter, all_queued)
                if not lost:
                    handled_at = time.perf_counter()
                    polls = await _wait_until_finished(monitor, adapter, worker)
                    elapsed = time.perf_counter() - started
        except TimeoutError:
            raise BenchError(
                f"timed out after {timeout:.0f} s with {recorder.distinct} of {expect} jobs"
                " run by the handler"
            ) from None
        if not lost:
            result.update(
                elapsed=elapsed,
                first_job_after=(recorder.first_at or started) - started,
                handler_done_after=handled_at - started,
                tenths=[t - started for t in recorder.tenths],
                polls=polls,
            )
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(worker), STOP_TIMEOUT)
        except TimeoutError:
            result["warning"] = f"the worker did not stop within {STOP_TIMEOUT:.0f} s"
            worker.cancel()
        except Exception:
            if "elapsed" in result:
                raise
        await monitor.close()
    result.update(
        handled=recorder.total,
        distinct=recorder.distinct,
        problems=recorder.problems(),
        peak_rss_mb=peak_rss_mb(),
        settings=adapter.worker_settings(spec["kind"], spec["batch"]),
    )
    if recorder.starts is not None:
        result["starts"] = list(recorder.starts)
    return result


async def _timed(what: str, timeout: float, coro: Awaitable[T]) -> T:
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except TimeoutError:
        raise BenchError(f"{what} timed out after {timeout:.0f} s") from None


def enqueue(adapter: Adapter, spec: dict[str, Any], proto: IO[str]) -> dict[str, Any]:
    jobs, chunk, singles, timeout = spec["jobs"], spec["chunk"], spec["singles"], spec["timeout"]
    dsns: dict[str, str] = spec["dsns"]
    seconds: dict[str, float] = {}
    adapter.import_all()
    _handshake(proto)  # the driver prepares the databases meanwhile

    async def batches(dsn: str) -> float:
        async with adapter.async_enqueuer(dsn, "async") as enq:
            await enq.batch(range(jobs, jobs + chunk))  # warm-up, untimed
            started = time.perf_counter()
            for start in range(0, jobs, chunk):
                await enq.batch(range(start, min(start + chunk, jobs)))
            return time.perf_counter() - started

    async def singles_async(dsn: str) -> float:
        async with adapter.async_enqueuer(dsn, "async") as enq:
            await enq.single(singles)  # warm-up, untimed
            started = time.perf_counter()
            for n in range(singles):
                await enq.single(n)
            return time.perf_counter() - started

    def singles_sync(dsn: str, into: dict[str, Any]) -> None:
        try:
            with adapter.sync_enqueuer(dsn) as enq:
                enq.single(singles)  # warm-up, untimed
                started = time.perf_counter()
                for n in range(singles):
                    enq.single(n)
                into["seconds"] = time.perf_counter() - started
        except BaseException as exc:
            into["error"] = "".join(traceback.format_exception(exc))

    if "enqueue_batch" in dsns:
        seconds["enqueue_batch"] = run_async(
            _timed("batch enqueue", timeout, batches(dsns["enqueue_batch"]))
        )
    if "enqueue_single_async" in dsns:
        seconds["enqueue_single_async"] = run_async(
            _timed("single async enqueue", timeout, singles_async(dsns["enqueue_single_async"]))
        )
    if "enqueue_single_sync" in dsns:
        outcome: dict[str, Any] = {}
        thread = threading.Thread(
            target=singles_sync, args=(dsns["enqueue_single_sync"], outcome), daemon=True
        )
        thread.start()  # a plain thread: no event loop in it
        thread.join(timeout)
        if thread.is_alive():
            raise BenchError(f"single sync enqueue timed out after {timeout:.0f} s")
        if "error" in outcome:
            raise BenchError(outcome["error"])
        seconds["enqueue_single_sync"] = outcome["seconds"]
    return {"seconds": seconds}


async def latency_enqueue(adapter: Adapter, spec: dict[str, Any], proto: IO[str]) -> dict[str, Any]:
    dsn, count, interval, timeout = spec["dsn"], spec["count"], spec["interval"], spec["timeout"]
    adapter.import_all()
    _handshake(proto)  # the driver installs the schema meanwhile
    monitor = await _connect_monitor(dsn)
    before: list[float] = []
    try:
        async with adapter.async_enqueuer(dsn, "async") as enq:
            await enq.single(count)  # the warm-up job: the worker is up once it is done
            warm = _wait_until_finished(monitor, adapter)
            await _timed("waiting for the warm-up job", timeout, warm)
            await asyncio.sleep(spec["settle"])  # the worker is idle now
            async with asyncio.timeout(timeout):
                first = time.perf_counter()
                for n in range(count):
                    delay = first + n * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    before.append(time.time())
                    await enq.single(n)
                await _wait_until_finished(monitor, adapter)
    except TimeoutError:
        raise BenchError(f"latency enqueuer timed out after {timeout:.0f} s") from None
    finally:
        await monitor.close()
    return {"before": before}


async def schedule_worker(adapter: Adapter, spec: dict[str, Any], proto: IO[str]) -> dict[str, Any]:
    dsn, timeout = spec["dsn"], spec["timeout"]
    recorder = StartRecorder(spec["expect"], spec.get("fail_below", 0))
    stop = asyncio.Event()
    adapter.import_all()
    _handshake(proto)
    worker = asyncio.create_task(adapter.run_schedule_worker(dsn, recorder=recorder, stop=stop))
    done = asyncio.ensure_future(recorder.done.wait())
    result: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait([worker, done], return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            worker.result()  # raises what the worker raised
            raise BenchError("the worker returned before running every job")
    except TimeoutError:
        raise BenchError(
            f"timed out after {timeout:.0f} s with {len(recorder.succeeded)} of"
            f" {recorder.expect} jobs run"
        ) from None
    finally:
        done.cancel()
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(worker), STOP_TIMEOUT)
        except TimeoutError:
            result["warning"] = f"the worker did not stop within {STOP_TIMEOUT:.0f} s"
            worker.cancel()
    result.update(
        runs={str(n): runs for n, runs in recorder.runs.items()},
        settings=adapter.schedule_settings(),
    )
    return result


async def schedule_enqueue(
    adapter: Adapter, spec: dict[str, Any], proto: IO[str]
) -> dict[str, Any]:
    dsn, count, interval, timeout = spec["dsn"], spec["count"], spec["interval"], spec["timeout"]
    delays: list[float] | None = spec.get("delays")
    adapter.import_all()
    _handshake(proto)  # the driver installs the schema meanwhile
    monitor = await _connect_monitor(dsn)
    before: list[float] = []
    try:
        async with adapter.schedule_enqueuer(dsn) as enq:
            await enq.defer(count, None)  # the warm-up job: the worker is up once it is done
            warm = _wait_until_finished(monitor, adapter)
            await _timed("waiting for the warm-up job", timeout, warm)
            await asyncio.sleep(spec["settle"])  # the worker is idle now
            async with asyncio.timeout(timeout):
                first = time.perf_counter()
                for n in range(count):
                    delay = first + n * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    before.append(time.time())
                    await enq.defer(n, delays[n] if delays is not None else None)
            # No polling here while the jobs wait: the worker process says when all ran.
    except TimeoutError:
        raise BenchError(f"schedule enqueuer timed out after {timeout:.0f} s") from None
    finally:
        await monitor.close()
    return {"before": before}


def main() -> None:
    spec: dict[str, Any] = json.loads(sys.argv[1])
    # The protocol (READY) keeps the real stdout; anything a library prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    out = Path(spec["out"])
    adapter = get(spec["lib"])
    action = spec["action"]
    try:
        if action == "burndown":
            result = run_async(burndown(adapter, spec, proto))
        elif action == "enqueue":
            result = enqueue(adapter, spec, proto)
        elif action == "latency_enqueue":
            result = run_async(latency_enqueue(adapter, spec, proto))
        elif action == "schedule_worker":
            result = run_async(schedule_worker(adapter, spec, proto))
        elif action == "schedule_enqueue":
            result = run_async(schedule_enqueue(adapter, spec, proto))
        else:
            raise BenchError(f"unknown action {action!r}")
    except BaseException as exc:
        message = (
            str(exc) if isinstance(exc, BenchError) else "".join(traceback.format_exception(exc))
        )
        out.write_text(json.dumps({"error": message}))
        sys.stderr.flush()
        os._exit(1)  # a stuck library thread must not keep this process alive
    result["loop"] = loop_name()
    out.write_text(json.dumps(result))
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
