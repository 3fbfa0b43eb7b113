"""A worker process for multi-process tests: ``python -m tests.workload DSN OUTFILE``.

Every task run appends ``<job id> <pid>`` to OUTFILE, so a test can count runs per job.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import IO

import pgtq


def build(dsn: str, out: IO[str] | None = None) -> pgtq.App:
    app = pgtq.App(dsn)
    lock = threading.Lock()

    def record(job_id: int) -> None:
        if out is not None:
            with lock:
                out.write(f"{job_id} {os.getpid()}\n")
                out.flush()

    @app.task
    def sync_job(ctx: pgtq.JobContext, n: int) -> int:
        record(ctx.job_id)
        return n

    @app.task
    async def async_job(ctx: pgtq.JobContext, n: int) -> int:
        record(ctx.job_id)
        return n

    return app


if __name__ == "__main__":
    with open(sys.argv[2], "a", buffering=1) as fh:
        build(sys.argv[1], fh).run_worker(concurrency=20, fetch_job_polling_interval=0.5)
