"""A quick measure of pgtq's hot paths (the full peer benchmark is its own piece of work).

    python benchmarks/quick.py [--dsn postgresql://postgres@127.0.0.1/postgres] [--jobs 20000]
                               [--history on|off|both]

Creates a fresh database, migrates it, and prints jobs/s for: single ``defer`` from a thread,
single ``defer_async`` awaited one by one, ``defer_many_async`` by 1,000, and the burn-down of
``--jobs`` no-op async and sync jobs by one worker. Drops the database at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import psycopg
from sqlalchemy.engine import make_url

import pgtq


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--singles", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--history",
        choices=["on", "off", "both"],
        default="on",
        help="job history (job_events) on, off, or both (each burn-down twice: its cost)",
    )
    args = parser.parse_args()
    server = make_url(args.dsn)
    name = f"pgtq_bench_{uuid.uuid4().hex[:8]}"
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        run(server.set(database=name).render_as_string(hide_password=False), args)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def run(dsn: str, args: argparse.Namespace) -> None:
    app = pgtq.App(dsn)
    app.migrate()

    @app.task
    async def noop_async(n: int) -> None:
        return None

    @app.task
    def noop_sync(n: int) -> None:
        return None

    def report(label: str, count: int, seconds: float) -> None:
        print(f"{label:<42} {count / seconds:>10,.0f} jobs/s  ({count} in {seconds:.2f} s)")

    started = time.perf_counter()
    for i in range(args.singles):
        noop_sync.defer(n=i)
    report("defer (sync, one by one)", args.singles, time.perf_counter() - started)

    async def singles_async() -> None:
        started = time.perf_counter()
        for i in range(args.singles):
            await noop_async.defer_async(n=i)
        report("defer_async (one by one)", args.singles, time.perf_counter() - started)
        await app.close_loop_connector()

    asyncio.run(singles_async())
    app.run_worker(wait=False, install_signal_handlers=False)  # drain the singles

    settings = {"on": [True], "off": [False], "both": [True, False]}[args.history]
    for history, task in [(h, t) for h in settings for t in (noop_async, noop_sync)]:
        app.jobs.set_history(history)

        async def enqueue(task: pgtq.Task[None] = task) -> float:
            started = time.perf_counter()
            for start in range(0, args.jobs, 1000):
                await task.defer_many_async([{"n": i} for i in range(start, start + 1000)])
            seconds = time.perf_counter() - started
            await app.close_loop_connector()
            return seconds

        seconds = asyncio.run(enqueue())
        report(
            f"defer_many_async by 1000, history {'on' if history else 'off'}", args.jobs, seconds
        )
        stats = app.run_worker(
            wait=False, concurrency=args.concurrency, install_signal_handlers=False
        )
        assert stats.by_status["succeeded"] == args.jobs, stats
        label = f"burn-down {task.name}, history {'on' if history else 'off'}"
        report(label, args.jobs, stats.elapsed)
    app.jobs.set_history(True)
    app.close()


if __name__ == "__main__":
    main()
