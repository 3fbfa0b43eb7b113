"""Several worker processes on one database: every job runs exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests import workload
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
async def test_two_worker_processes_run_each_job_exactly_once(
    dsn: str, sql: Any, tmp_path: Path
) -> None:
    app = workload.build(dsn)
    ids = app.get_task("sync_job").defer_many([{"n": i} for i in range(2500)])
    ids += await app.get_task("async_job").defer_many_async([{"n": i} for i in range(2500)])
    await app.close_async()
    outs = [tmp_path / f"runs{i}.txt" for i in range(2)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 (started once, not awaited on)
            [sys.executable, "-m", "tests.workload", dsn, str(out)], env=env, cwd=ROOT
        )
        for out in outs
    ]
    try:
        await eventually(
            lambda: sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'")[0][0] == 5000,
            timeout=120,
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 30) for p in procs]
    assert codes == [0, 0]
    runs: Counter[int] = Counter()
    pids = set()
    for out in outs:
        for line in out.read_text().splitlines():
            job_id, pid = line.split()
            runs[int(job_id)] += 1
            pids.add(pid)
    assert set(runs) == set(ids)
    assert max(runs.values()) == 1
    assert sql("SELECT status, count(*) FROM pgtq.jobs GROUP BY status") == [("succeeded", 5000)]
    assert sql("SELECT count(*) FROM pgtq.jobs WHERE attempts <> 1") == [(0,)]
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]  # both left cleanly
