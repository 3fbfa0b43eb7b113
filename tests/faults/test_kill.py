"""Workers that die (SIGKILL) or freeze (SIGSTOP) while running jobs: their jobs are rescued
by a live worker, with the attempt counted, and every job still ends ``succeeded``."""

from __future__ import annotations

import itertools
import signal
import time
from collections import Counter, defaultdict
from typing import Any

import pytest

from tests.faults import worker as script
from tests.faults.conftest import WorkerProcess, Workers, until


def _status_counts(sql: Any) -> dict[str, int]:
    return dict(sql("SELECT status, count(*) FROM pgtq.jobs GROUP BY status"))


def _worker_id(sql: Any, w: WorkerProcess) -> str | None:
    rows = sql("SELECT id FROM pgtq.workers WHERE pid = %s", w.pid)
    return rows[0][0] if rows else None


def _doing(sql: Any, worker_id: str) -> set[int]:
    rows = sql("SELECT id FROM pgtq.jobs WHERE status = 'doing' AND worker_id = %s", worker_id)
    return {r[0] for r in rows}


async def _freeze_until_rescued(frozen: WorkerProcess, workers: Workers, sql: Any) -> None:
    """SIGSTOP ``frozen`` until it is silent past ``rescue_after``, then let a rescuer of
    another queue rescue its jobs (it rescues at start, claims nothing, and leaves)."""
    frozen.send(signal.SIGSTOP)
    await until(
        lambda: sql(
            "SELECT count(*) FROM pgtq.workers WHERE pid = %s "
            "AND last_heartbeat < now() - interval '1.2 seconds'",
            frozen.pid,
        )[0][0],
        timeout=10,
        what="the frozen worker silent past rescue_after",
    )
    rescuer = workers.start(queues=["elsewhere"], wait=False)
    assert await rescuer.exit_code(timeout=20) == 0


def _running_in(w: WorkerProcess) -> set[int]:
    """Jobs whose handler started in ``w`` and has not ended there (per its record)."""
    open_runs: set[tuple[int, int]] = set()
    for run in w.runs():
        key = (run.job_id, run.attempt)
        if run.event == "start":
            open_runs.add(key)
        else:
            open_runs.discard(key)
    return {job_id for job_id, _ in open_runs}


@pytest.mark.slow
async def test_sigkill_mid_batch_five_times_loses_no_job(
    dsn: str, sql: Any, workers: Workers
) -> None:
    """Kill -9 a worker while it runs a batch, five times, a fresh worker started each time.

    Each kill lands while the database shows ``doing`` jobs of that worker and its handlers
    are mid-run. The victims (its ``doing`` jobs) must be put back by the next worker within
    ``rescue_after`` + a heartbeat or so; in the end every job is ``succeeded``, each victim
    with at least two attempts.
    """
    total, seconds = 1000, 0.25  # 20 slots of 0.25 s: 80 jobs/s, enough left for five kills
    app = script.build(dsn)
    ids = app.get_task("sleepy").defer_many([{"seconds": seconds}] * total)
    app.close()

    victims: dict[int, set[int]] = {}  # kill round → the victim's doing jobs at the kill
    running_at_kill: list[int] = []
    recoveries: list[float] = []
    current = workers.start()
    for round_ in range(5):
        await until(lambda w=current: _worker_id(sql, w), timeout=20, what="worker registered")
        worker_id = _worker_id(sql, current)
        assert worker_id is not None

        def mid_batch(w: WorkerProcess = current, wid: str = worker_id) -> bool:
            return len(_running_in(w)) >= 5 and len(_doing(sql, wid)) >= 5

        await until(mid_batch, timeout=20, what=f"round {round_}: worker mid-batch")
        current.send(signal.SIGKILL)
        killed = time.monotonic()
        assert await current.exit_code(timeout=10) == -signal.SIGKILL
        # Dead now: what it held cannot change until a live worker rescues it.
        held = _doing(sql, worker_id)
        running = _running_in(current)
        assert running, "the kill was to land while handlers ran"
        assert running <= held, "a job running in the dead worker must still be doing"
        victims[round_] = held
        running_at_kill.append(len(running))
        assert _status_counts(sql).get("todo", 0) > 100, "jobs ran out before the fifth kill"

        # A fresh worker (the last one wider, to drain the rest quickly) rescues them.
        current = workers.start(concurrency=100 if round_ == 4 else 20)
        await until(
            lambda wid=worker_id: not _doing(sql, wid),
            timeout=15,
            what=f"round {round_}: the dead worker's jobs rescued",
        )
        recoveries.append(time.monotonic() - killed)
        rows = sql("SELECT status, worker_id FROM pgtq.jobs WHERE id = ANY(%s)", list(held))
        assert all(status in ("todo", "doing", "succeeded") for status, _ in rows)
        assert all(wid != worker_id for _, wid in rows)

    await until(
        lambda: _status_counts(sql) == {"succeeded": total},
        timeout=30,
        what=lambda: f"every job succeeded (now {_status_counts(sql)})\n{workers.diagnose()}",
    )
    current.send(signal.SIGTERM)
    assert await current.exit_code(timeout=15) == 0

    all_victims = set().union(*victims.values())
    attempts = dict(sql("SELECT id, attempts FROM pgtq.jobs"))
    assert set(attempts) == set(ids)
    assert min(attempts[j] for j in all_victims) >= 2
    assert all(attempts[j] == 1 for j in set(ids) - all_victims)
    rescued = {
        r[0] for r in sql("SELECT DISTINCT job_id FROM pgtq.job_history WHERE type = 'rescued'")
    }
    assert rescued == all_victims
    # Handler side: every job ran to the end at least once; twice only if it was a victim
    # (it may have finished in the killed worker before its outcome was written).
    ok = Counter(r.job_id for r in workers.runs() if r.event == "ok")
    assert set(ok) == set(ids)
    assert {j for j, n in ok.items() if n > 1} <= all_victims
    print(
        f"\nSIGKILL x5: victims per kill {[len(v) for v in victims.values()]} "
        f"(handlers mid-run at each kill: {running_at_kill}); "
        f"kill → all victims back in todo/doing "
        f"by another worker: {', '.join(f'{t:.2f}' for t in recoveries)} s "
        f"(max {max(recoveries):.2f} s, heartbeat_interval 0.2 s, rescue_after 1.0 s)"
    )


@pytest.mark.slow
async def test_a_paused_worker_starts_none_of_the_jobs_it_held_once_declared_dead(
    dsn: str, sql: Any, workers: Workers
) -> None:
    """A worker frozen past ``rescue_after`` while it holds claimed jobs (prefetched, not
    started) has them rescued. When it thaws, its lease has run out: it must not start them
    (another worker may run them by now) before a beat tells it whether it was declared dead.
    Without the lease, the job that ended as it thawed freed a slot, and a held job started
    under the dead id: its run was written nowhere and ran again (the doubled run the fault
    suite once saw on a loaded machine)."""
    app = script.build(dsn)
    first = app.get_task("sleepy").defer(seconds=0.3)
    held = app.get_task("sleepy").defer_many([{"seconds": 0.0}] * 4)
    app.close()
    frozen = workers.start(concurrency=1, prefetch=4, batch_size=5)
    await until(lambda: _running_in(frozen) == {first}, timeout=20, what="the first job running")
    frozen_id = _worker_id(sql, frozen)
    assert frozen_id is not None
    await until(lambda: _doing(sql, frozen_id) == {first, *held}, timeout=10, what="4 held")
    await _freeze_until_rescued(frozen, workers, sql)  # the first job's 0.3 s run ends
    assert _status_counts(sql) == {"todo": 5}
    frozen.send(signal.SIGCONT)
    await until(
        lambda: _status_counts(sql) == {"succeeded": 5},
        timeout=20,
        what=lambda: f"the 5 jobs succeeded (now {_status_counts(sql)}): {workers.diagnose()}",
    )
    frozen.send(signal.SIGTERM)
    assert await frozen.exit_code(timeout=15) == 0
    starts = Counter(r.job_id for r in frozen.runs() if r.event == "start")
    assert {job_id: starts[job_id] for job_id in held} == dict.fromkeys(held, 1), (
        f"held jobs started under the dead id: {frozen.runs()}"
    )
    # Each held job ran once, as the attempt claimed after the worker registered again.
    attempts = dict(sql("SELECT id, attempts FROM pgtq.jobs WHERE id = ANY(%s)", held))
    assert attempts == dict.fromkeys(held, 2)


@pytest.mark.slow
async def test_a_paused_worker_declared_dead_never_runs_a_job_twice_at_once(
    dsn: str, sql: Any, workers: Workers
) -> None:
    """A worker frozen (SIGSTOP) past ``rescue_after`` has its jobs rescued; when it thaws
    it registers again (worker.py: "be alive again") and claims again. Its old, still
    running attempts must not overlap the new ones: a job's attempts never run at the same
    time, and a job is not ``succeeded`` while an attempt of it still runs.
    """
    app = script.build(dsn)
    ids = app.get_task("sleepy").defer_many([{"seconds": 5.0}] * 3)
    app.close()
    frozen = workers.start(concurrency=10, fetch_job_polling_interval=0.2)
    await until(lambda: len(_running_in(frozen)) == 3, timeout=20, what="3 jobs running")
    await _freeze_until_rescued(frozen, workers, sql)
    assert _status_counts(sql) == {"todo": 3}
    frozen.send(signal.SIGCONT)
    await until(
        lambda: _status_counts(sql) == {"succeeded": 3},
        timeout=20,
        what=f"the 3 jobs succeeded (now {_status_counts(sql)})",
    )
    done_at = time.time()
    frozen.send(signal.SIGTERM)
    assert await frozen.exit_code(timeout=15) == 0

    spans: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    starts: dict[tuple[int, int], float] = {}
    for run in frozen.runs():
        if run.event == "start":
            starts[run.job_id, run.attempt] = run.at
        else:
            begun = starts.pop((run.job_id, run.attempt))
            spans[run.job_id].append((begun, run.at, run.attempt))
    for (job_id, attempt), begun in starts.items():  # never ended: ran until the exit
        spans[job_id].append((begun, float("inf"), attempt))
    overlaps = []
    for job_id in ids:
        runs = sorted(spans[job_id])
        for (_, end, a1), (begin, _, a2) in itertools.pairwise(runs):
            if begin < end:
                overlaps.append((job_id, a1, a2))
    still_running = sorted(
        job_id for job_id in ids for (_, end, _) in spans[job_id] if end > done_at
    )
    if overlaps:
        job_id = overlaps[0][0]
        history = sql(
            "SELECT type, attempt, worker_id FROM pgtq.job_history WHERE job_id = %s "
            "ORDER BY at, rank, seq",
            job_id,
        )
        lines = [r for r in frozen.runs() if r.job_id == job_id]
        pytest.fail(
            f"attempts of one job ran at the same time (job, attempt, attempt): {overlaps}; "
            f"job {job_id}: history {history}, handler record {lines}, "
            f"status succeeded at {done_at:.3f}"
        )
    assert not still_running, f"jobs succeeded while an attempt still ran: {still_running}"
