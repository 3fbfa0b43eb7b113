"""Lost connections: every connection of the worker is killed, again and again, while jobs
drain. The worker reconnects on its own and no job is lost, stuck, or run twice."""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.faults import worker as script
from tests.faults.conftest import Workers, until
from tests.faults.proxy import Proxy

# Every session of the test database but ours, at once; the pids signalled.
TERMINATE_OTHERS = (
    "SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{}') "
    "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
# The sessions of the test database (never another database's on a shared server).
ACTIVITY = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"


def _succeeded(sql: Any) -> int:
    return int(sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'")[0][0])


@pytest.mark.slow
async def test_terminating_every_worker_connection_repeatedly_loses_nothing(
    dsn: str, sql: Any, workers: Workers
) -> None:
    total, kills = 5000, 6
    app = script.build(dsn)
    args = [{"seconds": 0.002}] * (total // 2)
    ids = app.get_task("sleepy").defer_many(args)
    ids += app.get_task("noop_sync").defer_many([{"n": i} for i in range(total - len(ids))])
    app.close()
    # rescue_after far away: a recovery must come from the worker itself, not from a rescue.
    w = workers.start(rescue_after=60.0)

    def sessions() -> set[int]:
        return {r[0] for r in sql(ACTIVITY)}

    def listener_pids() -> set[int]:
        query = ACTIVITY + " AND query LIKE 'LISTEN%%'"
        return {r[0] for r in sql(query)}

    def stuck() -> str:
        rows = sql("SELECT status, count(*) FROM pgtq.jobs GROUP BY status")
        doing = sql("SELECT id, worker_id FROM pgtq.jobs WHERE status = 'doing' LIMIT 10")
        backends = sql(
            "SELECT pid, state, left(query, 60) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return f"status counts {rows}, doing {doing}, sessions {backends}"

    recoveries: list[float] = []
    relistened: list[float] = []
    terminated: list[int] = []
    for k in range(kills):
        # Spread over the first half of the drain, each kill at a further step of progress.
        step = 400 * (k + 1)
        await until(lambda s=step: _succeeded(sql) >= s, timeout=60, what=f"{step} jobs done")
        assert total - _succeeded(sql) > 500, "the drain outran the kills"
        killed_pids = set(sql(TERMINATE_OTHERS)[0][0])
        killed = time.monotonic()
        terminated.append(len(killed_pids))
        await until(lambda p=killed_pids: not p & sessions(), timeout=10, what="the sessions gone")
        # Recovered: jobs finish again, so through connections opened after the kill.
        before = _succeeded(sql)
        await until(
            lambda b=before: _succeeded(sql) > b,
            timeout=20,
            what=lambda k=k: f"progress after kill {k}: {stuck()}\n{workers.diagnose()}",
        )
        recoveries.append(time.monotonic() - killed)
        await until(
            lambda p=killed_pids: listener_pids() - p,
            timeout=15,
            what=f"the listener back after kill {k}",
        )
        relistened.append(time.monotonic() - killed)
        assert w.alive()

    await until(
        lambda: _succeeded(sql) == total,
        timeout=60,
        what=lambda: f"every job succeeded: {stuck()}\n{workers.diagnose()}",
    )
    assert w.alive(), w.log_text()
    w.send(signal.SIGTERM)
    assert await w.exit_code(timeout=15) == 0
    # Each kill hit the worker; connections it had not reopened yet are not there to kill.
    assert min(terminated) >= 1 and max(terminated) >= 3  # claimer, completer, listener
    assert sql("SELECT count(*) FROM pgtq.jobs WHERE attempts <> 1") == [(0,)]
    assert sql("SELECT count(*) FROM pgtq.job_history WHERE type = 'rescued'") == [(0,)]
    ok = Counter(r.job_id for r in w.runs() if r.event == "ok")
    assert set(ok) == set(ids)
    assert max(ok.values()) == 1
    print(
        f"\npg_terminate_backend x{kills} ({terminated} backends each): kill → jobs "
        f"completing again: {', '.join(f'{t:.2f}' for t in recoveries)} s "
        f"(max {max(recoveries):.2f} s); kill → LISTEN again: "
        f"{', '.join(f'{t:.2f}' for t in relistened)} s"
    )


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [5, 60], ids=["one claim", "claims in flight"])
async def test_a_claim_whose_reply_is_lost_does_not_strand_its_jobs(
    dsn: str, sql: Any, workers: Workers, jobs: int
) -> None:
    """The claim commits but its reply never arrives (a connection cut at that instant).

    The worker sees an error and claims again; the jobs it claimed are ``doing`` under its
    own id, and it heartbeats, so no rescue will ever take them. They must still run. With
    60 jobs, full batches come back and the worker keeps two claims out, so the cut can land
    while the other one is in flight: the lost jobs are given back only once every claim out
    is settled (their jobs known by then), and every job runs once.
    """
    proxy = Proxy(make_url(dsn))
    await proxy.start()
    try:
        w = workers.start(proxy.url(), concurrency=5, fetch_job_polling_interval=0.2)
        await until(proxy.claimer_seen.is_set, timeout=20, what="the worker's first claim")
        proxy.arm()
        app = script.build(dsn)
        ids = await app.get_task("noop_async").defer_many_async([{"n": i} for i in range(jobs)])
        await app.close_async()
        await until(proxy.cut.is_set, timeout=10, what="the claim's reply cut")
        # The claim did commit (the jobs were started by the live worker, which never heard
        # of it): the history keeps that whatever the worker does next.
        [(started,)] = sql(
            "SELECT count(DISTINCT job_id) FROM pgtq.job_history WHERE type = 'started'"
        )
        assert started >= min(jobs, 5), "the cut was to land after the claim committed"

        def states() -> list[tuple[Any, ...]]:
            return sql("SELECT id, status, attempts, worker_id FROM pgtq.jobs ORDER BY id")

        await until(
            lambda: all(status == "succeeded" for _, status, _, _ in states()),
            timeout=10,
            what=lambda: f"the claimed jobs run; they are stuck: {states()}\n{w.log_text()}",
        )
        w.send(signal.SIGTERM)
        assert await w.exit_code(timeout=15) == 0
        assert "released" in w.log_text()  # the lost claim's jobs were given back
        ok = Counter(r.job_id for r in w.runs() if r.event == "ok")
        assert set(ok) == set(ids) and max(ok.values()) == 1  # each ran, once
    finally:
        await proxy.close()
