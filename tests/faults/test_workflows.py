"""Workflows under concurrency (issue 24): 4 worker processes and 10,000 jobs in diamonds,
wide fan-ins and a batch; then a worker SIGKILLed mid-workflow. Checked from the database's
history and the workers' own records: no child started before every parent succeeded, every
job (so every callback) started exactly once, nothing lost."""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

import pytest

import pgtq
from tests.faults import worker as script
from tests.faults.conftest import Workers, until

pytestmark = pytest.mark.slow


def _defer_graphs(dsn: str, diamonds: int, fan_ins: int, width: int, task: str) -> list[int]:
    """``diamonds`` times (a → b, c → d) and ``fan_ins`` times (``width`` parents → one callback),
    each kind one workflow inserted in one statement; the callbacks' ids."""
    app = script.build(dsn)
    t = app.get_task(task)
    try:
        diamond = [pgtq.chain(t.s(), pgtq.group(t.s(), t.s()), t.s()) for _ in range(diamonds)]
        handle = pgtq.group(*diamond).defer()
        callbacks = [handle.job_ids[i * 4 + 3] for i in range(diamonds)]
        for _ in range(fan_ins):
            chord = pgtq.group(*(t.s() for _ in range(width))).then(t.s()).defer()
            callbacks.append(chord.leaves[0])
        return callbacks
    finally:
        app.close()


def _open_batch(dsn: str, members: int, task: str) -> pgtq.Batch:
    """A batch of ``members`` jobs deferred one by one, then closed: its on_complete must
    run once, its on_failure never (every member succeeds)."""
    app = script.build(dsn)
    t = app.get_task(task)
    try:
        with app.batch(on_complete=t.s(n=-1), on_failure=t.s(n=-2)) as b:
            for n in range(members):
                b.defer(t.s(n=n))
        return b
    finally:
        app.close()


def _status_counts(sql: Any) -> dict[str, int]:
    return dict(sql("SELECT status, count(*) FROM pgtq.jobs GROUP BY status"))


def _started_before_parents(sql: Any) -> list[Any]:
    """Children whose first start (in the history) is before a parent's success."""
    return sql(
        """
        WITH first_start AS (
            SELECT job_id, min(at) AS at FROM pgtq.job_history
            WHERE type = 'started' GROUP BY job_id
        )
        SELECT e.child_id, e.parent_id, s.at, p.finished_at, p.status
        FROM pgtq.job_dependencies e
        JOIN first_start s ON s.job_id = e.child_id
        JOIN pgtq.jobs p ON p.id = e.parent_id
        WHERE p.status <> 'succeeded' OR s.at < p.finished_at
        """
    )


def _records_before_parents(workers: Workers, sql: Any) -> list[tuple[int, int]]:
    """The same from the workers' records: a child's first ``start`` before the last ``ok``
    of a parent (the run whose outcome was written is the last one)."""
    first_start: dict[int, float] = {}
    last_ok: dict[int, float] = {}
    for run in workers.runs():
        if run.event == "start":
            first_start[run.job_id] = min(run.at, first_start.get(run.job_id, run.at))
        elif run.event == "ok":
            last_ok[run.job_id] = max(run.at, last_ok.get(run.job_id, run.at))
    edges = sql("SELECT parent_id, child_id FROM pgtq.job_dependencies")
    # A child that never started (a batch's on_failure with nothing failed) has nothing to
    # check; a parent that never runs (a batch's record) is checked from the history.
    ran = [(p, c) for p, c in edges if c in first_start and p in last_ok]
    assert len(ran) > len(edges) // 2
    return [(p, c) for p, c in ran if first_start[c] < last_ok[p]]


async def test_four_workers_release_every_child_once_after_its_parents(
    dsn: str, sql: Any, workers: Workers
) -> None:
    diamonds, fan_ins, width = 1400, 4, 999  # 5,600 + 4,000 jobs, and a batch of 400
    began = time.monotonic()
    callbacks = _defer_graphs(dsn, diamonds, fan_ins, width, "noop_async")
    batch = _open_batch(dsn, 397, "noop_async")  # its record, 397 members, 2 callbacks
    total = diamonds * 4 + fan_ins * (width + 1) + 400
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(total,)]
    assert _status_counts(sql) == {
        "todo": diamonds + fan_ins * width + 397,
        "blocked": diamonds * 3 + fan_ins + 2,
        "succeeded": 1,  # the batch's record, closed
    }
    on_complete, on_failure = batch.callbacks
    deferred = time.monotonic() - began
    for _ in range(4):
        workers.start(concurrency=50, batch_size=50)
    ended = {"succeeded": total - 1, "cancelled": 1}  # on_failure: nothing failed
    await until(
        lambda: _status_counts(sql) == ended,
        timeout=90,
        what=lambda: f"every job succeeded (now {_status_counts(sql)})\n{workers.diagnose()}",
    )
    ran = time.monotonic() - began - deferred
    # A worker still starting when the others finished everything would die of the SIGTERM
    # before its handler is installed: stop each once it registered.
    pids = [w.pid for w in workers.started]
    await until(
        lambda: sql("SELECT count(*) FROM pgtq.workers WHERE pid = ANY(%s)", pids) == [(4,)],
        timeout=30,
        what=lambda: f"4 workers registered\n{workers.diagnose()}",
    )
    for w in workers.started:
        w.send(signal.SIGTERM)
    for w in workers.started:
        assert await w.exit_code(timeout=20) == 0

    assert _started_before_parents(sql) == []
    assert _records_before_parents(workers, sql) == []
    starts = Counter(r.job_id for r in workers.runs() if r.event == "start")
    assert len(starts) == total - 2 and set(starts.values()) == {1}, "every job started once"
    assert all(starts[c] == 1 for c in [*callbacks, on_complete]), "every callback ran once"
    assert on_failure not in starts and batch.id not in starts
    assert sql(
        "SELECT count(*) FROM pgtq.jobs WHERE (attempts <> 1 OR pending_parents <> 0) "
        "AND id <> ALL(%s)",
        [batch.id, on_failure],
    ) == [(0,)]
    print(f"\n{total} jobs in workflows: deferred in {deferred:.1f} s, ran in {ran:.1f} s")


async def test_a_sigkilled_worker_mid_workflow_loses_nothing(
    dsn: str, sql: Any, workers: Workers
) -> None:
    """Kill -9 a worker while it holds jobs of diamonds: its jobs are rescued, every job of
    every workflow ends succeeded, and no child started before its parents succeeded."""
    diamonds = 150
    app = script.build(dsn)
    slow = app.get_task("sleepy")
    flows = [
        pgtq.chain(
            slow.s(seconds=0.05),
            pgtq.group(slow.s(seconds=0.05), slow.s(seconds=0.05)),
            slow.s(seconds=0.05),
        )
        for _ in range(diamonds)
    ]
    pgtq.group(*flows).defer()
    app.close()
    total = diamonds * 4
    victim = workers.start(concurrency=20)
    workers.start(concurrency=20)

    def holding() -> bool:
        rows = sql(
            "SELECT count(*) FROM pgtq.jobs j JOIN pgtq.workers w ON w.id = j.worker_id "
            "WHERE j.status = 'doing' AND w.pid = %s AND j.children IS NOT NULL",
            victim.pid,
        )
        succeeded = _status_counts(sql).get("succeeded", 0)
        return rows[0][0] >= 5 and succeeded > 50

    await until(holding, timeout=30, what="the victim holding parents mid-workflow")
    victim.send(signal.SIGKILL)
    assert await victim.exit_code(timeout=10) == -signal.SIGKILL
    workers.start(concurrency=20)
    await until(
        lambda: _status_counts(sql) == {"succeeded": total},
        timeout=60,
        what=lambda: f"every job succeeded (now {_status_counts(sql)})\n{workers.diagnose()}",
    )
    assert sql("SELECT count(*) FROM pgtq.job_history WHERE type = 'rescued'")[0][0] > 0
    assert _started_before_parents(sql) == []
    assert _records_before_parents(workers, sql) == []
    for w in workers.started:
        if w.alive():
            w.send(signal.SIGTERM)
