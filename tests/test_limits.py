"""Fleet-wide limits, enforced in the claim itself: three worker processes never exceed them.

The proof is exact: every start and end is in ``job_events`` (written by the database), so
the greatest number of jobs running at once can be computed by a sweep over them, not only
sampled. A sampler polls the database as well, as a second witness.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pgtq
from pgtq.limits import Limit, allowances, charges, parse_rate
from tests import limits_workload
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parent.parent


def test_parse_rate() -> None:
    assert parse_rate("100/s") == 100
    assert parse_rate("30/m") == 0.5
    assert parse_rate(" 36 / hour ") == 0.01
    assert parse_rate(2.5) == 2.5
    assert parse_rate(None) is None
    for bad in ("fast", "10/d", "0/s", -1):
        with pytest.raises(ValueError, match="invalid rate limit"):
            parse_rate(bad)  # type: ignore[arg-type]


def test_allowances_and_charges() -> None:
    limits = {"task:a": Limit(concurrency=3), "queue:q": Limit(rate=10), "task:b": Limit(2, 1)}
    running = {"task:a": 1, "task:b": 2}
    buckets = {"queue:q": (2.5, 0.1)}  # 2.5 tokens, 0.1 s ago: 3.5 now
    assert allowances(limits, running, buckets) == {"task:a": 2, "queue:q": 3, "task:b": 0}
    left = charges(limits, buckets, ["queue:q", "queue:q", "task:a"])
    assert left == {"queue:q": pytest.approx(1.5), "task:b": 1.0}  # a new bucket starts full


def _max_overlap(events: list[tuple[Any, str]]) -> int:
    """Greatest number of attempts running at once, from (time, 'start'|'end') pairs."""
    running = peak = 0
    for _, kind in sorted(events, key=lambda e: (e[0], e[1] == "start")):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


def _overlaps(sql: Any, group: str) -> dict[str, int]:
    rows = sql(
        f"SELECT {group}, e.at, e.type FROM pgtq.job_history e JOIN pgtq.jobs j ON j.id = e.job_id "
        "WHERE e.type <> 'deferred'"
    )
    by_group: dict[str, list[tuple[Any, str]]] = {}
    for key, at, kind in rows:
        by_group.setdefault(key, []).append((at, "start" if kind == "started" else "end"))
    return {key: _max_overlap(events) for key, events in by_group.items()}


@pytest.mark.slow
async def test_three_worker_processes_never_exceed_a_limit(dsn: str, sql: Any) -> None:
    app = limits_workload.build(dsn)
    await app.queues.set_limits_async("narrow", concurrency=2)
    await app.get_task("capped").defer_many_async([{"n": i} for i in range(60)])
    keyed = app.get_task("keyed")
    for key in range(3):
        await keyed.configure(concurrency_key=f"tenant-{key}").defer_many_async(
            [{"n": i} for i in range(15)]
        )
    await app.get_task("in_narrow_queue").defer_many_async([{"n": i} for i in range(40)])
    await app.get_task("rated").defer_many_async([{"n": i} for i in range(100)])
    await app.close_async()

    peaks = {"capped": 0, "narrow": 0, "keyed": 0}

    async def sample() -> None:
        while True:
            [(capped, narrow, keyed_peak)] = sql(
                "SELECT count(*) FILTER (WHERE task_name = 'capped'), "
                "count(*) FILTER (WHERE queue = 'narrow'), "
                "coalesce((SELECT max(n) FROM (SELECT count(*) n FROM pgtq.jobs WHERE "
                "status = 'doing' AND concurrency_key IS NOT NULL GROUP BY concurrency_key) k), 0) "
                "FROM pgtq.jobs WHERE status = 'doing'"
            )
            for name, value in (("capped", capped), ("narrow", narrow), ("keyed", keyed_peak)):
                peaks[name] = max(peaks[name], value)
            await asyncio.sleep(0.005)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 (started once, waited for below)
            [sys.executable, "-m", "tests.limits_workload", dsn], env=env, cwd=ROOT
        )
        for _ in range(3)
    ]
    sampler = asyncio.create_task(sample())
    try:
        await eventually(
            lambda: sql("SELECT count(*) FROM pgtq.jobs WHERE status <> 'succeeded'") == [(0,)],
            timeout=120,
        )
    finally:
        sampler.cancel()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 30) for p in procs]
    assert codes == [0, 0, 0]
    by_task = _overlaps(sql, "j.task_name")
    by_queue = _overlaps(sql, "j.queue")
    by_key = _overlaps(sql, "coalesce(j.concurrency_key, '-')")
    assert peaks["capped"] <= 3, peaks
    assert by_task["capped"] <= 3, by_task
    assert by_queue["narrow"] <= 2 and peaks["narrow"] <= 2
    assert all(by_key[f"tenant-{k}"] == 1 for k in range(3)) and peaks["keyed"] <= 1
    # The limits do not stop the work: each task ran to the end (and went above one at once).
    assert by_task["capped"] >= 2 and by_queue["narrow"] >= 2

    # Rate: a bucket of one second's worth (40), refilled at 40/s: by t seconds after the
    # first start, at most 40 + 40 t jobs may have started.
    starts = [
        row[0]
        for row in sql(
            "SELECT e.at FROM pgtq.job_history e JOIN pgtq.jobs j ON j.id = e.job_id "
            "WHERE j.task_name = 'rated' AND e.type = 'started' ORDER BY e.at"
        )
    ]
    assert len(starts) == 100
    first = starts[0]
    for i, at in enumerate(starts):
        assert i + 1 <= 40 + 40 * (at - first).total_seconds() + 1e-6, (i, at - first)


async def test_task_concurrency_in_process(side: Any, app: pgtq.App) -> None:
    """Two workers of one app share a task cap of 1: the task never runs twice at once."""
    running = 0
    peak = 0

    @app.task(concurrency=1)
    async def single() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    await side.defer_many(single, [{} for _ in range(10)])
    await asyncio.gather(
        app.run_worker_async(wait=False, concurrency=5),
        app.run_worker_async(wait=False, concurrency=5),
    )
    assert peak == 1
    statuses = {row.status for row in [await side.get(app, i) for i in range(1, 11)] if row}
    assert statuses == {pgtq.Status.SUCCEEDED}
