"""What bare SQL does with N client processes on this machine: the ceiling of ``--fleet``.

    python -m benchmarks.bare_fleet [--processes 1,2,4,8,16] [--jobs 100000] [--batch 16]

No queue library: a table shaped like a job queue's (the partial index of ``../shared/
PERFORMANCE.md``), N processes, each with two asyncpg connections on uvloop that loop "claim a
batch with ``FOR UPDATE SKIP LOCKED``, complete it with one ``UPDATE``" until nothing is left,
as pgtq's claims and completer do. jobs/s over the wall time from a start barrier to the last
process's end. If bare SQL drains slower with 16 processes than with 2, the fleet figure's
"aggregate at 16 ≥ 90 % of the best" is this machine's limit, not the library's.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from typing import Any

import asyncpg
import psycopg

TABLE = """
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    queue text NOT NULL DEFAULT 'default',
    priority int NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'todo',
    args jsonb NOT NULL DEFAULT '{}',
    worker text
);
CREATE INDEX jobs_claim ON jobs (queue, priority DESC, id) WHERE status = 'todo';
"""
CLAIM = """
UPDATE jobs SET status = 'doing', worker = $2 WHERE id IN (
    SELECT id FROM jobs WHERE status = 'todo' AND queue = 'default'
    ORDER BY priority DESC, id LIMIT $1 FOR UPDATE SKIP LOCKED
) RETURNING id
"""
COMPLETE = "UPDATE jobs SET status = 'succeeded' WHERE id = ANY($1::bigint[])"


def _drain(dsn: str, batch: int, start: Any, me: str) -> None:
    import uvloop

    async def loop(conn: asyncpg.Connection) -> None:
        while True:
            ids = [r[0] for r in await conn.fetch(CLAIM, batch, me)]
            if not ids:
                return
            await conn.execute(COMPLETE, ids)

    async def main() -> None:
        conns = [await asyncpg.connect(dsn) for _ in range(2)]
        start.wait()
        await asyncio.gather(*(loop(c) for c in conns))
        for c in conns:
            await c.close()

    uvloop.run(main())


def run(server: str, processes: int, jobs: int, batch: int) -> float:
    name = f"pgtq_bare_fleet_{processes}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    dsn = server.rsplit("/", 1)[0] + "/" + name
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(TABLE)
            conn.execute("INSERT INTO jobs (args) SELECT '{}' FROM generate_series(1, %s)", (jobs,))
            conn.execute("VACUUM ANALYZE jobs")
        start = mp.Event()
        procs = [
            mp.Process(target=_drain, args=(dsn, batch, start, f"p{i}")) for i in range(processes)
        ]
        for p in procs:
            p.start()
        time.sleep(1.0 + 0.1 * processes)  # every process connected
        t0 = time.monotonic()
        start.set()
        for p in procs:
            p.join()
        elapsed = time.monotonic() - t0
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*) FROM jobs WHERE status <> 'succeeded'").fetchone()
            assert row is not None and row[0] == 0, row
        return jobs / elapsed
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--processes", default="1,2,4,8,16")
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    rates = {}
    for n in (int(x) for x in a.processes.split(",")):
        rates[n] = run(a.dsn, n, a.jobs, a.batch)
        print(f"{n:>3} processes: {rates[n]:>9,.0f} jobs/s", flush=True)
    best = max(rates.values())
    print("of the best:", ", ".join(f"{n}: {r / best:.2f}" for n, r in rates.items()))


if __name__ == "__main__":
    main()
