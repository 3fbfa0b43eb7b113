"""Waiters: 1,000 concurrent ``wait``s on 1,000 jobs, polling (before) against listening (after).

    python -m benchmarks.waiters [--dsn URL] [--waiters 1000] [--spread 3] [--rounds 2]
                                 [--modes poll,listen] [--sides async,sync]

What a web app awaiting many jobs (one SSE stream or websocket per request) puts on the
database. Each measurement uses a fresh database (dropped after). The jobs are deferred first
(untimed) by an app that is then closed. The waiters start, then a worker in a child process
(``python -m benchmarks.waiters --worker``, ``concurrency`` = the jobs) runs them: each job
sleeps until its own moment, spread evenly over ``--spread`` seconds, so jobs end all through
the window rather than in one burst. The waiters: ``await app.jobs.wait_async(id)`` each, in
one event loop (``async``), or ``app.jobs.wait(id)`` in one thread each (``sync``).

Modes: ``poll`` is ``App(listen_dsn=False)`` for the waiters' app, so each waiter polls
``get`` with ``wait``'s growing delays (5 ms to 250 ms): the code before issue 22 part 4.
``listen`` is the default app: one LISTEN per side wakes the waiters whose jobs a completion
named. The worker is the same in both (its completions send their NOTIFY in both).

Measured, from the first waiter started to the last one returned:
- ``db_xact_per_s``: the database's transactions per second (``pg_stat_database``
  ``xact_commit + xact_rollback`` of the measurement's database; every connection of the
  window is closed before the second read, so their statistics are flushed). The worker's
  are included, the same in both modes: the difference is the waiters'.
- ``waiter_stmt_per_s``: statements the waiters' app sent (counted in the client, on its
  engines' ``before_cursor_execute``).
- ``wake_ms``: each waiter's return (this machine's clock) minus its job's ``finished_at``
  (the server's, on the same machine): median, p95 and max.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url

import pgtq

DSN = os.environ.get("PGTQ_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
#: The jobs start this long after they are deferred: time for the waiters to register.
LEAD = 3.0


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_db(dsn: str, name: str) -> str:
    return make_url(dsn).set(database=name).render_as_string(hide_password=False)


def make_app(dsn: str, **options: Any) -> pgtq.App:
    app = pgtq.App(dsn, **options)

    @app.task(name="nap")
    async def nap(at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))

    return app


def _xacts(dsn: str) -> int:
    with psycopg.connect(_libpq(dsn), autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _count_statements(app: pgtq.App, engine: Any, counter: list[int]) -> None:
    def count(*_args: Any) -> None:
        counter[0] += 1

    event.listen(engine, "before_cursor_execute", count)


async def _wait_async(app: pgtq.App, ids: list[int], woke: dict[int, float]) -> None:
    async def one(job_id: int) -> None:
        await app.jobs.wait_async(job_id, timeout=120)
        woke[job_id] = time.time()

    await asyncio.gather(*(one(i) for i in ids))


def _wait_sync(app: pgtq.App, ids: list[int], woke: dict[int, float]) -> None:
    def one(job_id: int) -> None:
        app.jobs.wait(job_id, timeout=120)
        woke[job_id] = time.time()

    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        for done in [pool.submit(one, i) for i in ids]:
            done.result()


async def measure(dsn: str, mode: str, side: str, waiters: int, spread: float) -> dict[str, Any]:
    name = f"pgtq_bench_waiters_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(dsn), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(dsn, name)
    try:
        setup = make_app(url)
        await setup.migrate_async()
        start = time.time() + LEAD
        ids = await setup.tasks["nap"].defer_many_async(
            [{"at": start + spread * i / waiters} for i in range(waiters)]
        )
        await setup.close_async()
        before = _xacts(url)
        app = make_app(url, listen_dsn=False) if mode == "poll" else make_app(url)
        counter = [0]
        woke: dict[int, float] = {}
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.waiters", "--worker", url, "--waiters", str(waiters)
        )
        began = time.perf_counter()
        if side == "async":
            _count_statements(app, app.async_connector().engine.sync_engine, counter)
            await _wait_async(app, ids, woke)
        else:
            _count_statements(app, app.sync.engine, counter)
            await asyncio.to_thread(_wait_sync, app, ids, woke)
        elapsed = time.perf_counter() - began
        await app.close_async()
        await asyncio.wait_for(worker.wait(), 120)
        after = _xacts(url)
        with psycopg.connect(_libpq(url), autocommit=True) as conn:
            finished = dict(
                conn.execute(
                    "SELECT id, extract(epoch FROM finished_at)::float8 FROM pgtq.jobs"
                ).fetchall()
            )
        wake = sorted((woke[i] - finished[i]) * 1000 for i in ids)
        return {
            "mode": mode,
            "side": side,
            "waiters": waiters,
            "elapsed_s": round(elapsed, 2),
            "db_xact_per_s": round((after - before) / elapsed, 1),
            "waiter_stmt_per_s": round(counter[0] / elapsed, 1),
            "waiter_stmts": counter[0],
            "wake_ms_median": round(statistics.median(wake), 1),
            "wake_ms_p95": round(wake[int(len(wake) * 0.95) - 1], 1),
            "wake_ms_max": round(wake[-1], 1),
        }
    finally:
        with psycopg.connect(_libpq(dsn), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_worker(url: str, waiters: int) -> None:
    app = make_app(url)
    app.run_worker(concurrency=waiters, wait=False, install_signal_handlers=False)
    app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=DSN)
    parser.add_argument("--waiters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="poll,listen")
    parser.add_argument("--sides", default="async,sync")
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.waiters)
        return
    for _ in range(args.rounds):
        for side in args.sides.split(","):
            for mode in args.modes.split(","):
                result = asyncio.run(measure(args.dsn, mode, side, args.waiters, args.spread))
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
