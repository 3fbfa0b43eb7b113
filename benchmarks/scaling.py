"""What one primary does as the table grows (docs/scaling.md, issue 20, item 5).

``python -m benchmarks.scaling [--backlog 1000000] [--small 20000] [--dsn URL]``

On a private PostgreSQL started for the run (:func:`benchmarks.fleet.private_server`, with
autovacuum switched back on at its default cadence: nothing of the shared server's is
measured), or on ``--dsn``'s server (a database of the run's own; WAL and CPU figures then
include whatever else that server does). Path measured: ``app.run_worker_async`` in this
process (async no-op jobs, concurrency and batch 100), jobs deferred with ``defer_many_async``
1,000 per call. It reports, for a ``--small`` backlog and for a ``--backlog`` one:

- the enqueue rate, and the burn-down rate (whole drain; for the big backlog also each tenth of
  it, to show a slowdown as dead rows pile up, and the ratio to the small backlog's rate: the
  goal is ≥ 90 %);
- WAL bytes per job (enqueue, and claim + completion), from ``pg_current_wal_lsn()``;
- the server's CPU per job in the drain (every server process's utime + stime, from /proc,
  on a private server only);
- the autovacuum and autoanalyze runs on the jobs table during the drain, and its dead rows at
  the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import pgtq
from benchmarks.fleet import TICK, private_server

BATCH = 1000


@dataclass
class Drain:
    """One backlog, deferred then burnt down."""

    jobs: int
    enqueue_per_s: float = 0.0
    drain_per_s: float = 0.0
    wal_enqueue_per_job: float = 0.0
    wal_drain_per_job: float = 0.0
    server_cpu_us_per_job: float | None = None
    tenths_per_s: list[float] = field(default_factory=list)
    autovacuums: int = 0
    autoanalyzes: int = 0
    dead_rows_at_end: int = 0


class Counter:
    """What the no-op task counts: jobs run, and when each tenth of the backlog was done."""

    def __init__(self, total: int) -> None:
        self.done = 0
        self.step = max(1, total // 10)
        self.marks: list[float] = []

    def tick(self) -> None:
        self.done += 1
        if self.done % self.step == 0:
            self.marks.append(time.perf_counter())


@contextlib.contextmanager
def database(server_dsn: str) -> Iterator[str]:
    """A database of this run's own on the server, dropped at the end."""
    name = f"pgtq_scaling_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server_dsn.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postmaster_pid(conn: psycopg.Connection[Any]) -> int:
    """The server's main process (the first line of postmaster.pid, read by the server)."""
    text = conn.execute("SELECT pg_read_file('postmaster.pid')").fetchone()[0]  # type: ignore[index]
    return int(text.split()[0])


def server_cpu_ticks(postmaster: int) -> int:
    """CPU ticks of the whole server so far: the postmaster's own and those of its children,
    the exited ones (its cutime + cstime, once reaped) and the live ones (connections of a
    drain open and close while it runs)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid, ppid = int(stat.parent.name), int(fields[1])
            if pid == postmaster:
                total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            elif ppid == postmaster:
                total += int(fields[11]) + int(fields[12])
    return total


def wal_lsn(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])  # type: ignore[index]


def vacuum_counts(conn: psycopg.Connection[Any]) -> tuple[int, int, int]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT autovacuum_count, autoanalyze_count, n_dead_tup FROM pg_stat_user_tables "
        "WHERE schemaname = 'pgtq' AND relname = 'jobs'"
    ).fetchone()
    return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)


async def run_one(dsn: str, jobs: int, *, private: bool) -> Drain:
    app = pgtq.App(dsn)
    app.migrate()
    counter = Counter(jobs)

    @app.task(name="noop")
    async def noop() -> None:
        counter.tick()

    result = Drain(jobs)
    with psycopg.connect(dsn, autocommit=True) as probe:
        lsn = wal_lsn(probe)
        started = time.perf_counter()
        for first in range(0, jobs, BATCH):
            await noop.defer_many_async([{}] * min(BATCH, jobs - first))
        result.enqueue_per_s = jobs / (time.perf_counter() - started)
        result.wal_enqueue_per_job = (wal_lsn(probe) - lsn) / jobs
        vacuums, analyzes, _ = vacuum_counts(probe)
        lsn = wal_lsn(probe)
        postmaster = postmaster_pid(probe) if private else 0
        ticks = server_cpu_ticks(postmaster) if private else 0
        started = time.perf_counter()
        await app.run_worker_async(concurrency=100, batch_size=100, wait=False)
        ended = time.perf_counter()
        if private:
            await asyncio.sleep(0.5)  # the drain's connections exit and are reaped
            spent = server_cpu_ticks(postmaster) - ticks
            result.server_cpu_us_per_job = spent * 1e6 / TICK / jobs
        result.drain_per_s = counter.done / (ended - started)
        result.wal_drain_per_job = (wal_lsn(probe) - lsn) / jobs
        marks = [started, *counter.marks]
        result.tenths_per_s = [round(counter.step / (b - a)) for a, b in itertools.pairwise(marks)]
        await asyncio.sleep(1.5)  # the statistics reach pg_stat_* within a second or so
        now = vacuum_counts(probe)
        result.autovacuums = now[0] - vacuums
        result.autoanalyzes = now[1] - analyzes
        result.dead_rows_at_end = now[2]
    await app.close_async()
    return result


def report(small: Drain, big: Drain) -> str:
    ratio = big.drain_per_s / small.drain_per_s
    lines = [
        "| figure | small backlog | big backlog |",
        "|---|---:|---:|",
        f"| jobs | {small.jobs:,} | {big.jobs:,} |",
        f"| enqueue (defer_many_async, 1,000 a call), jobs/s | {small.enqueue_per_s:,.0f} | "
        f"{big.enqueue_per_s:,.0f} |",
        f"| burn-down (run_worker_async, concurrency 100), jobs/s | {small.drain_per_s:,.0f} | "
        f"{big.drain_per_s:,.0f} ({ratio:.0%} of the small) |",
        f"| WAL bytes per job, enqueue | {small.wal_enqueue_per_job:,.0f} | "
        f"{big.wal_enqueue_per_job:,.0f} |",
        f"| WAL bytes per job, claim + completion | {small.wal_drain_per_job:,.0f} | "
        f"{big.wal_drain_per_job:,.0f} |",
    ]
    if small.server_cpu_us_per_job is not None and big.server_cpu_us_per_job is not None:
        lines.append(
            f"| server CPU per job in the drain, µs | {small.server_cpu_us_per_job:,.0f} | "
            f"{big.server_cpu_us_per_job:,.0f} |"
        )
    lines += [
        f"| autovacuum / autoanalyze runs on jobs in the drain | {small.autovacuums} / "
        f"{small.autoanalyzes} | {big.autovacuums} / {big.autoanalyzes} |",
        f"| dead rows in jobs at the end | {small.dead_rows_at_end:,} | {big.dead_rows_at_end:,} |",
        "",
        "Big backlog, each tenth, jobs/s: " + ", ".join(f"{r:,}" for r in big.tenths_per_s),
    ]
    return "\n".join(lines)


async def measure(server_dsn: str, args: argparse.Namespace, *, private: bool) -> None:
    drains = []
    for jobs in (args.small, args.backlog):
        with database(server_dsn) as dsn:
            drains.append(await run_one(dsn, jobs, private=private))
            print(json.dumps(asdict(drains[-1])), file=sys.stderr, flush=True)
    print(report(*drains))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--backlog", type=int, default=1_000_000, help="the big backlog")
    parser.add_argument("--small", type=int, default=20_000, help="the small backlog")
    parser.add_argument("--dsn", help="a server to use instead of a private one")
    parser.add_argument(
        "--no-autovacuum",
        dest="autovacuum",
        action="store_false",
        help="the private server without autovacuum (default: on, at its default cadence)",
    )
    args = parser.parse_args(argv)
    if args.dsn:
        asyncio.run(measure(args.dsn, args, private=False))
        return
    autovacuum = "on" if args.autovacuum else "off"
    with private_server(max_connections=50, autovacuum=autovacuum) as server_dsn:
        asyncio.run(measure(server_dsn, args, private=True))


if __name__ == "__main__":
    main()
