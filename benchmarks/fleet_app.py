"""The app the fleet benchmark's workers load (``pgtq worker benchmarks.fleet_app:app``), and
the process that runs the thundering herd's idle workers.

The app is ``benchmarks.apps:app`` (its no-op tasks ``noop_async`` and ``noop_sync``) with one
more task: ``cpu_sync``, ``k`` rounds of pure-Python arithmetic (the driver calibrates ``k``
to about 2 ms here). Importing this module imports only pgtq, as a user's task module does.

    python -m benchmarks.fleet_app herd DSN WORKERS CONCURRENCY OUT

runs WORKERS independent workers in this process (``app.run_worker_async``, each with its own
worker id, claim connections, completer and LISTEN connection) until SIGTERM, and counts each
worker's claim statements by wrapping ``pgtq.claims.Claims.claim`` (the one method every claim
of an unlimited worker goes through): on SIGTERM it writes ``[[time.time(), asked, got], ...]``
(one entry per claim) as JSON to OUT and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.apps import app

__all__ = ["app", "cpu_sync", "spin"]


def spin(k: int) -> int:
    """``k`` rounds of pure-Python arithmetic: holds the GIL the whole time."""
    x = 0
    for i in range(k):
        x = (x + i * i) % 1_000_003
    return x


@app.task(name="cpu_sync")
def cpu_sync(n: int, k: int) -> None:
    spin(k)


def _count_claims(log: list[list[float]]) -> None:
    """Record every claim statement this process's workers send (time, asked, claimed)."""
    from pgtq.claims import Claims

    original = Claims.claim

    async def claim(self: Claims, limit: int, answer: Any = None) -> Any:
        got = await original(self, limit, answer)
        log.append([time.time(), limit, -1 if got is None else len(got)])
        return got

    Claims.claim = claim  # type: ignore[method-assign]


async def _herd(dsn: str, workers: int, concurrency: int, out: str) -> None:
    log: list[list[float]] = []
    _count_claims(log)
    app.use_dsn(dsn)
    ids = [f"herd-{os.getpid()}-{i}" for i in range(workers)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = [
        asyncio.create_task(
            app.run_worker_async(
                concurrency=concurrency,
                worker_id=worker_id,
                summary_interval=None,
                periodic=False,
            )
        )
        for worker_id in ids
    ]
    await stop.wait()
    for task in tasks:
        task.cancel()  # documented: cancelling run_worker_async is a graceful stop
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await app.close_async()
    Path(out).write_text(json.dumps(log))  # noqa: ASYNC240 - the loop has nothing else to do


def main(argv: list[str]) -> None:
    if len(argv) != 6 or argv[1] != "herd":
        raise SystemExit("usage: python -m benchmarks.fleet_app herd DSN WORKERS CONCURRENCY OUT")
    dsn, workers, concurrency, out = argv[2:6]
    asyncio.run(_herd(dsn, int(workers), int(concurrency), out))


if __name__ == "__main__":
    main(sys.argv)
