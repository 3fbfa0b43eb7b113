"""A worker process for the fault tests: ``python -m tests.faults.worker DSN RECORD OPTIONS``.

OPTIONS is a JSON object of ``run_worker`` options (``queues`` included). Every task writes
what it does to RECORD, one line per step, so a test sees what ran where and when, even after
the process was killed::

    <job id> <attempt> <pid> <start|ok|fail|abort|cancelled> <wall-clock time>

Each line goes out in one write, flushed at once: a killed process leaves whole lines only
(a reader may still catch the last one half-written, and skips it).

SIGUSR1 makes the process dump its threads' and asyncio tasks' stacks to its log.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, NamedTuple

import pgtq

#: Every task retries at once, many times: a fault must never make a job fail for good.
RETRY = pgtq.Retry(max_attempts=10, base=0, jitter=0)


class Run(NamedTuple):
    """One line of a record."""

    job_id: int
    attempt: int
    pid: int
    event: str
    at: float


def read_records(paths: list[Path]) -> list[Run]:
    runs = []
    for path in paths:
        if not path.exists():
            continue
        # Only whole lines: the process may be writing the last one right now.
        for line in path.read_text().split("\n")[:-1]:
            job_id, attempt, pid, event, at = line.split()
            runs.append(Run(int(job_id), int(attempt), int(pid), event, float(at)))
    return runs


def build(dsn: str, out: IO[str] | None = None) -> pgtq.App:
    app = pgtq.App(dsn)
    lock = threading.Lock()
    pid = os.getpid()

    def record(ctx: pgtq.JobContext, event: str) -> None:
        if out is not None:
            with lock:
                out.write(f"{ctx.job_id} {ctx.attempt} {pid} {event} {time.time():.6f}\n")
                out.flush()

    # Killed again and again at the head of the queue by the kill tests: never failed for it.
    @app.task(retry=RETRY, max_rescues=100)
    async def sleepy(ctx: pgtq.JobContext, seconds: float) -> None:
        """An async job that takes a while: ``cancelled`` is recorded if it is cancelled."""
        record(ctx, "start")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            record(ctx, "cancelled")
            raise
        record(ctx, "ok")

    @app.task(retry=RETRY)
    def cooperative(ctx: pgtq.JobContext, seconds: float) -> None:
        """A sync job that polls ``should_abort()`` and stops when told (recording ``abort``)."""
        record(ctx, "start")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ctx.should_abort():
                record(ctx, "abort")
                return
            time.sleep(0.005)
        record(ctx, "ok")

    @app.task(retry=RETRY)
    def noop_sync(ctx: pgtq.JobContext, n: int = 0) -> int:
        record(ctx, "start")
        record(ctx, "ok")
        return n

    @app.task(retry=RETRY)
    async def noop_async(ctx: pgtq.JobContext, n: int = 0) -> int:
        record(ctx, "start")
        record(ctx, "ok")
        return n

    @app.task(retry=RETRY)
    def flaky_sync(ctx: pgtq.JobContext, n: int = 0) -> int:
        """Fails its first attempt."""
        record(ctx, "start")
        if ctx.attempt == 1:
            record(ctx, "fail")
            raise RuntimeError("first attempt fails")
        record(ctx, "ok")
        return n

    @app.task(retry=RETRY)
    async def flaky_async(ctx: pgtq.JobContext, n: int = 0) -> int:
        record(ctx, "start")
        if ctx.attempt == 1:
            record(ctx, "fail")
            raise RuntimeError("first attempt fails")
        record(ctx, "ok")
        return n

    @app.task()
    def poison_sync(ctx: pgtq.JobContext, kind: str) -> Any:
        """Hostile task code: returns or raises what ``kind`` names (see ``poison``)."""
        record(ctx, "start")
        return poison(kind)

    @app.task()
    async def poison_async(ctx: pgtq.JobContext, kind: str) -> Any:
        record(ctx, "start")
        return poison(kind)

    @app.task()  # no retry policy: a lost worker still runs it again
    def fragile_sync(ctx: pgtq.JobContext, seconds: float) -> None:
        record(ctx, "start")
        time.sleep(seconds if ctx.attempt == 1 else 0.0)
        record(ctx, "ok")

    @app.task(max_rescues=1)
    def crasher(ctx: pgtq.JobContext) -> None:
        """Kills its own worker process, every time: a crash loop that max_rescues ends."""
        record(ctx, "start")
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(retry=RETRY)
    def stubborn_sync(ctx: pgtq.JobContext, seconds: float) -> None:
        """A sync job that ignores ``should_abort()``: its first attempt runs its ``seconds``
        whatever, a later one a moment."""
        record(ctx, "start")
        time.sleep(seconds if ctx.attempt == 1 else 0.05)
        record(ctx, "ok")

    @app.task(retry=RETRY)
    async def stubborn_async(ctx: pgtq.JobContext, seconds: float) -> None:
        """An async job that swallows every cancellation until its ``seconds`` are up (its
        first attempt; a later one takes a moment)."""
        record(ctx, "start")
        deadline = time.monotonic() + (seconds if ctx.attempt == 1 else 0.05)
        while time.monotonic() < deadline:
            try:
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            except asyncio.CancelledError:
                record(ctx, "cancelled")
        record(ctx, "ok")

    return app


class CustomBase(BaseException):
    """Not an Exception: what a task should never raise, and may."""


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ itself fails")


def poison(kind: str) -> Any:
    """What each kind of hostile task does; the poison tests defer one job of each."""
    if kind == "return_nul":
        return "a\x00b"
    if kind == "return_surrogate":
        return {"text": "\ud800"}
    if kind == "return_object":
        return object()
    if kind == "return_deep":
        deep: list[Any] = []
        for _ in range(100_000):
            deep = [deep]
        return deep
    if kind == "raise_nul":
        raise ValueError("bad\x00byte")
    if kind == "raise_surrogate":
        raise ValueError("bad \ud800 surrogate")
    if kind == "raise_huge":
        raise ValueError("x" * 10_000_000)
    if kind == "system_exit":
        raise SystemExit(3)
    if kind == "keyboard_interrupt":
        raise KeyboardInterrupt
    if kind == "custom_base":
        raise CustomBase("custom")
    if kind == "bad_str":
        raise BadStr
    raise AssertionError(f"unknown poison {kind!r}")


def _dump_stacks(signum: int, frame: Any) -> None:
    """SIGUSR1: write every thread's stack and every asyncio task's to the log (a test that
    sees a worker stall asks for this before failing)."""
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    for task in asyncio.all_tasks(loop):
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    dsn, record_path, options_json = argv
    signal.signal(signal.SIGUSR1, _dump_stacks)
    options: dict[str, Any] = json.loads(options_json)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    with open(record_path, "a", buffering=1) as fh:
        stats = build(dsn, fh).run_worker(install_signal_handlers=True, **options)
    print(json.dumps({"processed": stats.processed, "by_status": dict(stats.by_status)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
