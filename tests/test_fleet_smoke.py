"""The fleet benchmark (``python -m benchmarks.run --fleet``, issue 20) must keep producing its
figures: a tiny run of each group on the test server, no timings checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from benchmarks import fleet

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_tiny_fleet_run_produces_every_figure(server_url: URL, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        *("--fleet", "--no-snapshot"),
        *("--dsn", server_url.render_as_string(hide_password=False)),
        *("--jobs", "300", "--processes", "1,2"),
        *(
            "--herd-workers",
            "1,4",
            "--herd-processes",
            "2",
            "--herd-jobs",
            "3",
            "--herd-idle",
            "0.3",
        ),
        *("--cpu-jobs", "30", "--cpu-ms", "1", "--cpu-ways", "separate"),
        *("--out", str(tmp_path)),
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = tmp_path.glob("*-fleet.jsonl")
    records = {r["figure"]: r for r in map(json.loads, results.read_text().splitlines())}
    herd = {"latency_p50", "latency_p95", "claims_per_job", "db_cpu_per_job"}
    expected = {"fleet_throughput_p1", "fleet_throughput_p2", "fleet_cpu_separate_p1"}
    expected |= {"fleet_cpu_separate_p2"} | {f"fleet_herd_w{w}_{h}" for h in herd for w in (4,)}
    assert expected <= set(records), sorted(records)
    for record in records.values():
        assert record["value"] >= 0 if "cpu_per_job" in record["figure"] else record["value"] > 0
        assert record["host"]["postgres"]["server_version"]
    for n in (1, 2):
        extra = records[f"fleet_throughput_p{n}"]["extra"]
        assert extra["at_start"]["registered"] == n  # the barrier waited for every process
        assert sum(extra["jobs_per_worker"]) == 300
        assert extra["barrier_to_first_claim_s"] >= 0  # no job ran before the barrier opened
    for w in (4,):
        claims = records[f"fleet_herd_w{w}_claims_per_job"]["extra"]
        assert claims["at_start"]["listening"] >= w
        assert claims["claims_that_got_a_job"] == 3  # every job was claimed once, and counted
        assert records[f"fleet_herd_w{w}_claims_per_job"]["value"] >= 1
    table = results.with_suffix(".md").read_text()
    for note in ("throughput: best", "herd of 4:", "CPU-bound, separate: 2 / 1 processes"):
        assert note in table


def _record(figure: str, value: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"figure": figure, "title": figure, "unit": "jobs/s", "value": value, "extra": extra}


def test_the_notes_compare_the_largest_fleet_with_the_best() -> None:
    records = [
        _record("fleet_throughput_p1", 1000),
        _record("fleet_throughput_p4", 2000),
        _record("fleet_throughput_p16", 1700),
        _record("fleet_cpu_separate_p1", 400),
        _record("fleet_cpu_separate_p2", 720),
    ]

    table = fleet.markdown_table(records)

    assert "best 2,000 jobs/s at 4 process(es); at 16: 0.85 of the best (misses" in table
    assert "2 / 1 processes = 1.80 (meets the ≥ 1.7 goal)" in table
