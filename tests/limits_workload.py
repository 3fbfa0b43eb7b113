"""Worker processes for the fleet-wide limits test: ``python -m tests.limits_workload DSN``."""

from __future__ import annotations

import asyncio
import sys
import time

import pgtq


def build(dsn: str) -> pgtq.App:
    app = pgtq.App(dsn)

    @app.task(concurrency=3)
    async def capped(n: int) -> None:
        await asyncio.sleep(0.02)

    @app.task(key_concurrency=1)
    def keyed(n: int) -> None:
        time.sleep(0.01)

    @app.task(queue="narrow")
    async def in_narrow_queue(n: int) -> None:
        await asyncio.sleep(0.02)

    @app.task(rate_limit="40/s")
    async def rated(n: int) -> None:
        return None

    return app


if __name__ == "__main__":
    build(sys.argv[1]).run_worker(concurrency=10, fetch_job_polling_interval=0.2)
