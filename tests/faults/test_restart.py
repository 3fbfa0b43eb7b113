"""PostgreSQL restarts under a running worker (on a server of the test's own): the worker
rides it out, comes back by itself, and no job is lost."""

from __future__ import annotations

import asyncio
import signal
import time

import psycopg
import pytest

import pgtq
from tests.conftest import libpq
from tests.faults import worker as script
from tests.faults.conftest import OwnServer, Workers, until

#: How long the server stays down: long enough for every reconnect of the worker to fail a
#: few times and back off (a fault parameter, not a wait for something to happen).
DOWNTIME = 1.0


@pytest.mark.slow
async def test_a_postgresql_restart_is_ridden_out(own_server: OwnServer, workers: Workers) -> None:
    dsn = own_server.uri("pgtq_restart")
    with psycopg.connect(libpq(own_server.uri()), autocommit=True) as conn:
        conn.execute('CREATE DATABASE "pgtq_restart"')
    app = pgtq.App(dsn)
    app.migrate()
    app.close()

    def counts() -> dict[str, int]:
        with psycopg.connect(libpq(dsn), autocommit=True, connect_timeout=2) as conn:
            rows = conn.execute("SELECT status, count(*) FROM pgtq.jobs GROUP BY status")
            return dict(rows.fetchall())

    deferrer = script.build(dsn)
    sleepy = deferrer.get_task("sleepy")
    before = sleepy.defer_many([{"seconds": 0.05}] * 200)
    deferrer.close()
    # The default polling interval (5 s): a job deferred after the restart is picked up
    # through a listener that reconnected or a claim retried after its backoff.
    w = workers.start(
        dsn,
        concurrency=10,
        fetch_job_polling_interval=5.0,
        heartbeat_interval=0.5,
        rescue_after=30.0,
    )
    await until(
        lambda: counts().get("succeeded", 0) >= 50 and counts().get("doing", 0) > 0,
        timeout=20,
        what="the worker busy",
    )
    stopped = time.monotonic()
    await asyncio.to_thread(own_server.stop)
    down = time.monotonic()
    await asyncio.sleep(DOWNTIME)
    await asyncio.to_thread(own_server.start)
    back = time.monotonic()
    assert w.alive(), w.log_text()

    deferrer = script.build(dsn)
    after = deferrer.get_task("noop_async").defer_many([{"n": i} for i in range(50)])
    deferrer.close()

    def first_done() -> bool:
        with psycopg.connect(libpq(dsn), autocommit=True, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded' AND id = ANY(%s)",
                (after,),
            ).fetchone()
        return bool(row and row[0])

    await until(
        first_done, timeout=10, what=lambda: f"a job after the restart done\n{w.log_text()}"
    )
    first = time.monotonic()
    total = len(before) + len(after)
    await until(
        lambda: counts() == {"succeeded": total},
        timeout=30,
        what=lambda: f"every job succeeded (now {counts()})\n{w.log_text()}",
    )
    w.send(signal.SIGTERM)
    assert await w.exit_code(timeout=15) == 0
    with psycopg.connect(libpq(dsn), autocommit=True) as conn:
        ran_twice = conn.execute("SELECT count(*) FROM pgtq.jobs WHERE attempts <> 1").fetchone()
    print(
        f"\nPostgreSQL restart: stop took {down - stopped:.2f} s, down {DOWNTIME:.1f} s, start "
        f"took {back - down - DOWNTIME:.2f} s; server back → first job deferred after it done: "
        f"{first - back:.2f} s (restart began → that job done: {first - stopped:.2f} s); "
        f"jobs with attempts <> 1: {ran_twice[0] if ran_twice else '?'}"
    )
