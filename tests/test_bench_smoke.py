"""The peer benchmark must keep working: a tiny run of every figure (pgtq only), no timings.

The peers (PgQueuer, Procrastinate) are installed by ``nox -s bench`` only; the driver skips
a library that is not importable. The driver creates and drops its own databases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from benchmarks import run as bench
from benchmarks.libs import ADAPTERS

ROOT = Path(__file__).resolve().parent.parent

FIGURES = {
    "burndown_async_b20",
    "burndown_async_b100",
    "burndown_sync_b20",
    "burndown_sync_b100",
    "enqueue_batch",
    "enqueue_single_async",
    "enqueue_single_sync",
    "latency_p50",
    "latency_p99",
    "workflow_chords",
    "workflow_chains",
    "cli_async",  # the workflow group's plain backlog, beside its chords and chains
}


def _bench(
    server_url: URL, out: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--dsn",
        server_url.render_as_string(hide_password=False),
        "--only",
        "pgtq",
        "--rounds",
        "1",
        "--out",
        str(out),
        *args,
    ]
    return subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_tiny_run_writes_a_json_line_per_measurement(server_url: URL, tmp_path: Path) -> None:
    done = _bench(
        server_url,
        tmp_path,
        *("--jobs", "200", "--singles", "50", "--latency-jobs", "10"),
        *("--figures", "burndown,enqueue,latency,workflow"),
    )

    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = tmp_path.glob("*.jsonl")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["figure"] for r in records} == FIGURES
    # Workflows: 2 chords of 99 + 1, 20 chains of 10, drained by `pgtq worker --one-shot`
    # (the run itself checks every edge's order from the rows, and fails otherwise).
    shapes = {r["figure"]: r["settings"] for r in records if r["figure"].startswith("workflow")}
    assert shapes["workflow_chords"]["edges"] == 198
    assert shapes["workflow_chains"]["children"] == 180
    assert "--one-shot" in shapes["workflow_chains"]["command"]
    for record in records:
        assert record["library"] == "pgtq"
        assert record["round"] == 1
        assert record["value"] > 0
        assert record["unit"] in ("jobs/s", "ms")
        assert record["versions"]["pgtq"]
        assert record["host"]["postgres"]["server_version"]
    table = results.with_suffix(".md").read_text()
    assert "pgtq" in table
    assert "pgtq chords / plain burn-down" in table


@pytest.mark.slow
@pytest.mark.parametrize("group", ["cli", "schedule"])
def test_the_cli_and_schedule_figures_run(server_url: URL, tmp_path: Path, group: str) -> None:
    """`pgtq worker --one-shot` beside run_worker; scheduled and retried jobs' lateness."""
    done = _bench(
        server_url,
        tmp_path,
        *("--jobs", "100", "--schedule-jobs", "3", "--figures", group),
    )

    assert done.returncode == 0, done.stderr[-4000:]
    (results,) = tmp_path.glob("*.jsonl")
    records = [json.loads(line) for line in results.read_text().splitlines()]
    expected = {
        "cli": {f"{way}_{kind}" for way in ("cli", "inproc") for kind in ("async", "sync")},
        "schedule": {f"{w}_{p}" for w in ("sched", "retry") for p in ("p50", "p99", "max")},
    }
    assert {r["figure"] for r in records} == expected[group]
    for record in records:
        assert record["value"] > 0
    table = results.with_suffix(".md").read_text()
    note = {"cli": "`pgtq worker --one-shot` / in-process", "schedule": "max lateness of"}
    assert note[group] in table


@pytest.mark.slow
def test_a_run_that_loses_a_job_fails_loudly(server_url: URL, tmp_path: Path) -> None:
    # The worker process pretends its handler never ran job 0 (see benchmarks/child.py).
    done = _bench(
        server_url,
        tmp_path,
        "--jobs",
        "50",
        "--figures",
        "burndown",
        env={"PGTQ_BENCH_FAULT": "lose"},
    )

    assert done.returncode == 1
    assert "LOST OR DUPLICATED JOBS" in done.stderr
    assert "never ran in the handler" in done.stderr


def test_a_library_that_is_not_installed_is_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ADAPTERS["pgqueuer"], "available", classmethod(lambda cls: False))
    monkeypatch.setattr(ADAPTERS["procrastinate"], "available", classmethod(lambda cls: False))

    chosen = bench.choose_libraries(bench.parse_args([]))

    assert [a.name for a in chosen] == ["pgtq"]
    assert "pgqueuer is not installed: skipped" in capsys.readouterr().err


def test_the_table_puts_medians_and_ratios_side_by_side() -> None:
    def record(library: str, figure: str, rnd: int, value: float) -> dict[str, Any]:
        return {
            "library": library,
            "figure": figure,
            "round": rnd,
            "value": value,
            "settings": {"jobs": 1000},
        }

    records = [
        record("pgtq", "burndown_async_b20", 1, 30.0),
        record("pgtq", "burndown_async_b20", 2, 10.0),
        record("pgtq", "burndown_async_b20", 3, 20.0),
        record("pgqueuer", "burndown_async_b20", 1, 10.0),
        record("pgtq", "burndown_sync_b20", 1, 5.0),
    ]

    header, rows, notes = bench.table_rows(records)

    assert header == ["figure", "unit", "pgtq", "PgQueuer", "pgtq / PgQueuer"]
    assert rows[0][2:] == ["20", "10", "2.00"]
    # PgQueuer has no sync tasks: its async figure stands in, marked.
    assert rows[1][2:] == ["5", "10 †", "0.50"]
    assert any(note.startswith("†") for note in notes)


def test_the_workflow_shapes_count_a_short_last_workflow() -> None:
    """250 jobs: two chords of 99 + 1 and one of 49 + 1; 25 chains of 10 (9 edges each)."""
    from benchmarks import workflows

    def shape(kind: workflows.Shape, jobs: int) -> tuple[int, ...]:
        return tuple(workflows.expected(kind, jobs).as_dict().values())

    assert [len(s) for s in workflows.spans(250, 100)] == [100, 100, 50]
    # workflows, edges, children, most parents of a child
    assert shape("chords", 250) == (3, 247, 3, 99)
    assert shape("chains", 250) == (25, 225, 225, 1)
    assert shape("chords", 1) == (1, 0, 0, 0)  # a lone job


def test_the_workflow_notes_divide_by_the_groups_own_plain_run() -> None:
    def record(figure: str, rnd: int, value: float, group: str = "workflow") -> dict[str, Any]:
        settings = {"jobs": 1000, "group": group}
        return {"library": "pgtq", "figure": figure, "round": rnd, "value": value,
                "settings": settings, "extra": {"db_span_s": 1000 / value}}  # fmt: skip

    records = [
        record("cli_async", 1, 100.0),
        record("cli_async", 2, 200.0),
        record("cli_async", 1, 1.0, group="cli"),  # the cli group's: not the baseline
        record("workflow_chords", 1, 50.0),
        record("workflow_chords", 2, 150.0),
    ]

    (note,) = bench.workflow_notes(records)

    assert note.startswith("pgtq chords / plain burn-down")
    assert "0.67 (by round: 0.50, 0.75)" in note
    assert note.endswith("(rows): 0.56")  # 7.5 s plain / 13.3 s chords, the medians


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["claim", "pickup", "enqueue", "window"])
def test_the_probes_run(server_url: URL, probe: str) -> None:
    """benchmarks/probes.py explains the figures (benchmarks/README.md): it must keep working."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.probes", probe, "--small", "--dsn",
         server_url.render_as_string(hide_password=False)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    expected = {
        "claim": "limit as a parameter",
        "pickup": "pickup (enqueue call → handler)",
        "enqueue": "the insert + the old insert trigger",
        "window": "one by one, idle worker",
    }
    assert any(line.startswith(expected[probe]) for line in lines), done.stdout
