"""Probes behind the figures: where a claim's and a pickup's time goes (not a benchmark).

    python -m benchmarks.probes claim  [--dsn URL]   # the claim statement, bare asyncpg
    python -m benchmarks.probes pickup [--dsn URL]   # an idle worker's pickup, step by step
    python -m benchmarks.probes enqueue [--dsn URL]  # a single enqueue: statement, NOTIFY, pgtq
    python -m benchmarks.probes window [--dsn URL]   # a handler's return → its outcome stored

``claim`` times pgtq's compiled claim statement (batch 20) in a tight asyncpg loop on a
40,000-job table: its limit written in the SQL (what pgtq runs) against a ``LIMIT $n``
parameter (what it ran before), and with outcomes written on a second connection meanwhile,
as the worker does. ``pickup`` runs a worker in a child process and defers 150 jobs 20 ms
apart from this one; it splits each job's pickup into the enqueue call, the NOTIFY reaching
the worker, the claim, and the handler's start. ``enqueue`` times single inserts one by one,
bare asyncpg: pgtq's insert statement (it notifies itself), the same without its NOTIFY, with
the insert trigger of pgtq_0001-0005 instead, and ``task.defer_async`` on top, so the cost
of the NOTIFY path and of pgtq's own Python show apart. ``window`` measures the at-least-once
window: from a handler's return to its job's ``finished_at`` (the completion write), during a
burn-down (outcomes batched behind a busy completer) and for jobs deferred one by one to an
idle worker; a worker killed inside that window runs the job again after a rescue. Each run
uses a fresh database, dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import time
import uuid
from typing import Any

import asyncpg
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

import pgtq
from pgtq import statements
from pgtq.claims import Claims
from pgtq.eventloop import new_event_loop
from pgtq.listener import Listener

DSN = os.environ.get("PGTQ_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _with_db(dsn: str, name: str) -> str:
    return make_url(dsn).set(database=name).render_as_string(hide_password=False)


def _sql(query: statements.Query[Any]) -> str:
    return str(query.statement.compile(dialect=postgresql.asyncpg.dialect()))


async def _fill(conn: Any, jobs: int) -> None:
    await conn.execute("DELETE FROM pgtq.jobs")  # not TRUNCATE: the other connection's
    # prepared statements may hold a lock on the table
    await conn.execute(
        "INSERT INTO pgtq.jobs (task_name, args) SELECT 'noop', jsonb_build_object('n', g)"
        " FROM generate_series(1, $1) g",
        jobs,
    )
    await conn.execute("VACUUM ANALYZE pgtq.jobs")


async def claim(dsn: str, *, rounds: int = 3, claims: int = 1_000) -> None:
    s = statements.statements_for("pgtq")
    literal = _sql(statements.claim_jobs(s, "probe", None, 20))
    parameter = literal.replace("LIMIT 20 ", "LIMIT $4::INTEGER ")
    assert parameter != literal, "the claim's SQL changed: update this probe"
    complete = _sql(statements.complete_jobs(s, "probe", statements.Outcomes.empty()))
    conn, completer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    await conn.execute("SET synchronous_commit = off")  # as the worker's claim connection
    await conn.execute(
        "INSERT INTO pgtq.workers (id, hostname, pid) VALUES ('probe', 'probe', 0)"
        " ON CONFLICT DO NOTHING"
    )
    cases: list[tuple[str, str, tuple[Any, ...], bool]] = [
        ("limit in the SQL", literal, (1, "probe", 1), False),
        ("limit as a parameter", parameter, (1, "probe", 1, 20), False),
        ("limit in the SQL, completions beside", literal, (1, "probe", 1), True),
    ]
    write = await completer.prepare(complete)
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, sql, args, completing in cases:
            await _fill(conn, 40_000)
            prepared = await conn.prepare(sql)
            done: list[int] = []

            async def write_outcomes(ids: list[int]) -> None:
                n = len(ids)
                await write.fetch(ids, [1] * n, ["succeeded"] * n, ["null"] * n, [None] * n,
                                  [None] * n, "probe")  # fmt: skip

            writing: asyncio.Task[None] | None = None
            spent = 0.0
            for _ in range(claims):
                start = time.perf_counter()
                rows = await prepared.fetch(*args)
                spent += time.perf_counter() - start
                done += [row[0] for row in rows]
                if completing and (writing is None or writing.done()):
                    writing = asyncio.create_task(write_outcomes(done))
                    done = []
            if writing is not None:
                await writing
            times.setdefault(name, []).append(spent / claims * 1_000)
    for name, values in times.items():
        print(f"{name:40s} {statistics.median(values):.3f} ms a claim of 20 (median of {rounds})")
    await conn.close()
    await completer.close()


async def enqueue(dsn: str, *, rounds: int = 3, calls: int = 1_500) -> None:
    app = pgtq.App(dsn)
    task = app.task(name="noop")(_noop)
    plain = task.configure()
    query = statements.insert_jobs(app.statements, plain.encode([{"n": 1}]))
    sql, args = app.async_connector().driver_sql.positional(query)
    # The statement without its NOTIFY: the insert alone, as its CTE holds it.
    bare = sql[sql.index("(INSERT") + 1 : sql.index("RETURNING pgtq.jobs.id") + 22]
    assert bare.startswith("INSERT") and "pg_notify" in sql, "the insert changed: update me"
    # The old trigger lives on a second schema's jobs table, made once (creating and dropping
    # it between calls would make every prepared insert plan again).
    old = pgtq.App(dsn, schema="probe_trigger")
    await old.migrate_async()
    await old.close_async()
    conn = await asyncpg.connect(dsn)
    await conn.execute(_old_trigger_sql("probe_trigger"))
    triggered = bare.replace("pgtq.jobs", "probe_trigger.jobs")
    await task.defer_async(n=0)  # warm-up: the fast path's connection is open

    def statement(sql: str) -> Any:
        # The NOTIFY's payload has parameters of its own, after the insert's: pass those the
        # statement refers to ($1 .. its highest).
        used = max(int(n) for n in re.findall(r"\$(\d+)", sql))
        return lambda: conn.fetch(sql, *args[:used])

    cases: list[tuple[str, Any]] = [
        ("pgtq's insert (notifies itself)", statement(sql)),
        ("the insert without its NOTIFY", statement(bare)),
        ("the insert + the old insert trigger", statement(triggered)),
        ("task.defer_async (pgtq's insert)", lambda: task.defer_async(n=1)),
    ]
    # Interleaved in blocks of 50 calls, so the machine's drift spreads over every case.
    blocks = max(1, rounds * calls // 50)
    spent = dict.fromkeys((name for name, _ in cases), 0.0)
    for _ in range(blocks):
        for name, call in cases:
            start = time.perf_counter()
            for _ in range(50):
                await call()
            spent[name] += time.perf_counter() - start
    for name, seconds in spent.items():
        print(f"{name:40s} {seconds / (blocks * 50) * 1e6:6.0f} us a call "
              f"({blocks * 50:,} calls, interleaved)")  # fmt: skip
    await conn.close()
    await app.close_async()


def _old_trigger_sql(schema: str) -> str:
    """The insert trigger pgtq_0001 created and pgtq_0006 dropped, from that revision's own
    text (its downgrade recreates it): for the comparison only."""
    import importlib.util

    from pgtq import migrations

    path = next(migrations.VERSIONS_DIR.glob("pgtq_0006_*.py"))
    spec = importlib.util.spec_from_file_location("pgtq_0006", path)
    assert spec is not None and spec.loader is not None
    revision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(revision)
    quoted = f'"{schema}"'
    return f"{revision.FUNCTION.format(schema=quoted)};{revision.TRIGGER.format(schema=quoted)}"


def _worker(dsn: str) -> None:
    """The child: a worker that records when each NOTIFY, claim and handler start happened."""
    notified: list[float] = []
    claims: list[tuple[float, float]] = []
    starts: dict[int, float] = {}
    on_notify, claim_jobs = Listener.on_notify, Claims.claim

    def recorded_notify(self: Any, channel: str, payload: str) -> None:
        notified.append(time.time())
        on_notify(self, channel, payload)

    async def recorded_claim(self: Any, limit: int, answer: Any = None) -> Any:
        start = time.time()
        got = await claim_jobs(self, limit, answer)
        if got:
            claims.append((start, time.time()))
        return got

    Listener.on_notify = recorded_notify  # type: ignore[method-assign]
    Claims.claim = recorded_claim  # type: ignore[method-assign]
    app = pgtq.App(dsn)

    @app.task(name="noop")
    async def noop(n: int) -> None:
        starts.setdefault(n, time.time())

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        run = asyncio.create_task(app.run_worker_async(concurrency=20, batch_size=20))
        await asyncio.sleep(0.5)
        print("ready", flush=True)
        await stop.wait()
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)

    # The loop run_worker uses (uvloop when installed).
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main())
    print(json.dumps({"notified": notified, "claims": claims, "starts": starts}), flush=True)


async def pickup(dsn: str, jobs: int = 150) -> None:
    app = pgtq.App(dsn)
    noop = app.task(name="noop")(_noop)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.probes", "worker", "--dsn", dsn,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None
    try:
        ready = await asyncio.wait_for(child.stdout.readline(), 60)
        if ready.strip() != b"ready":
            raise SystemExit("the worker did not start")
        await noop.defer_async(n=-1)
        await asyncio.sleep(0.5)
        sent: list[tuple[float, float]] = []
        for n in range(jobs):
            before = time.time()
            await noop.defer_async(n=n)
            sent.append((before, time.time()))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
    finally:
        child.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(child.communicate(), 30)
        await app.close_async()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    starts = {int(k): v for k, v in seen["starts"].items()}
    steps: dict[str, list[float]] = {}
    for n, (before, after) in enumerate(sent):
        heard = min((t for t in seen["notified"] if t >= before), default=None)
        claimed = min((c for c in seen["claims"] if heard and c[0] >= heard), default=None)
        if heard is None or claimed is None or n not in starts:
            continue
        for name, value in (
            ("enqueue call (defer_async)", after - before),
            ("enqueue returned → NOTIFY heard", heard - after),
            ("NOTIFY heard → claim sent", claimed[0] - heard),
            ("claim", claimed[1] - claimed[0]),
            ("claim returned → handler", starts[n] - claimed[1]),
            ("pickup (enqueue call → handler)", starts[n] - before),
        ):
            steps.setdefault(name, []).append(value * 1000)
    for name, values in steps.items():
        values.sort()
        p90 = values[int(len(values) * 0.9)]
        print(f"{name:34s} p50 {statistics.median(values):.3f} ms  p90 {p90:.3f} ms")


async def window(dsn: str, *, jobs: int = 20_000, trickle: int = 100) -> None:
    """From each handler's return (``time.time()`` in the task) to its ``finished_at``."""
    app = pgtq.App(dsn)
    returned: dict[int, float] = {}

    @app.task(name="mark")
    async def mark(n: int) -> None:
        returned[n] = time.time()

    async def windows(first: int, count: int) -> list[float]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT (args->>'n')::int AS n, extract(epoch FROM finished_at)::float8 AS at"
                " FROM pgtq.jobs WHERE (args->>'n')::int >= $1 AND (args->>'n')::int < $2",
                first,
                first + count,
            )
        finally:
            await conn.close()
        return sorted((r["at"] - returned[r["n"]]) * 1000 for r in rows)

    def show(name: str, values: list[float]) -> None:
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(
            f"{name:38s} p50 {statistics.median(values):.2f} ms  p99 {p99:.2f} ms  "
            f"max {values[-1]:.2f} ms  ({len(values)} jobs)"
        )

    try:
        await mark.defer_many_async([{"n": n} for n in range(jobs)])
        await app.run_worker_async(wait=False, concurrency=100)
        show("burn-down (concurrency 100)", await windows(0, jobs))
        run = asyncio.create_task(app.run_worker_async(concurrency=10))
        await asyncio.sleep(0.5)
        for n in range(jobs, jobs + trickle):
            await mark.defer_async(n=n)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        show("one by one, idle worker", await windows(jobs, trickle))
    finally:
        await app.close_async()


async def _noop(n: int) -> None:
    """The probes' task (the worker child registers its own under the same name)."""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probes", description=__doc__)
    parser.add_argument("probe", choices=["claim", "pickup", "enqueue", "window", "worker"])
    parser.add_argument("--dsn", default=DSN, help="a server URL whose user may create databases")
    parser.add_argument("--small", action="store_true", help="a few seconds (the smoke test)")
    args = parser.parse_args()
    if args.probe == "worker":  # internal: the child of ``pickup`` (its --dsn is the database)
        _worker(args.dsn)
        return
    name = f"pgtq_probe_{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        admin = await asyncpg.connect(args.dsn)
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            dsn = _with_db(args.dsn, name)
            app = pgtq.App(dsn)
            await app.migrate_async()
            await app.close_async()
            if args.probe == "claim":
                await (claim(dsn, rounds=1, claims=100) if args.small else claim(dsn))
            elif args.probe == "enqueue":
                await (enqueue(dsn, rounds=1, calls=50) if args.small else enqueue(dsn))
            elif args.probe == "window":
                await (window(dsn, jobs=500, trickle=10) if args.small else window(dsn))
            else:
                await pickup(dsn, jobs=20 if args.small else 150)
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            await admin.close()

    asyncio.run(run())


if __name__ == "__main__":
    main()
