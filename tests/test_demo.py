"""``pgtq demo`` (on the embedded PostgreSQL: tests/test_embedded.py)."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

import pgtq
from pgtq import embedded
from pgtq.cli import cli
from pgtq.demo import QUEUE, DemoSummary, demo_app, render_summary, run_demo


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def test_importing_the_demo_registers_nothing() -> None:
    one, two = demo_app("postgresql://localhost/x"), demo_app("postgresql://localhost/x")
    assert set(one.tasks) == set(two.tasks)  # a fresh app each time: no duplicate names
    assert {t.is_async for t in one.tasks.values()} == {True, False}
    assert {t.defaults.queue for t in one.tasks.values()} == {QUEUE}


def test_run_demo_runs_every_job_to_a_final_status(dsn: str, sql: Any) -> None:
    console = quiet()
    summary = run_demo(dsn, jobs=60, console=console)
    assert summary.total == 60
    assert summary.by_status == {"succeeded": 59, "aborted": 1}  # final states: they add up
    assert summary.retried == 1
    assert summary.elapsed < 10
    assert summary.jobs_per_second > 0
    assert sql("SELECT status, count(*) FROM pgtq.jobs GROUP BY status ORDER BY status") == [
        ("aborted", 1),
        ("succeeded", 59),
    ]
    assert sql("SELECT task_name, attempts FROM pgtq.jobs WHERE task_name = 'flaky'") == [
        ("flaky", 2)
    ]
    assert sql("SELECT task_name FROM pgtq.jobs WHERE status = 'aborted'") == [("long_running",)]
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]  # the worker left cleanly
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "jobs/s" in out
    assert "aborted" in out
    assert "Retries: 1 job needed more than one attempt" in out
    assert "embedded" not in out  # a DSN was given: no word about the embedded server


@pytest.mark.unit
def test_the_summary_rows_add_up_to_the_jobs_run_and_retries_are_a_line_apart() -> None:
    summary = DemoSummary(
        total=200,
        by_status={"succeeded": 197, "failed": 1, "aborted": 1, "cancelled": 1},
        retried=3,
        elapsed=2.0,
        database="db",
        aborted_job_id=7,
    )
    console = Console(file=io.StringIO(), width=120)
    console.print(render_summary(summary))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    rows = {
        cells[0]: cells[1]
        for line in out.splitlines()
        if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 2
        and cells[1].isdigit()
    }
    assert rows == {
        "succeeded": "197",
        "failed": "1",
        "aborted": "1",
        "cancelled": "1",
        "total": "200",
    }
    assert "needed a retry" not in out
    assert "Retries: 3 jobs needed more than one attempt" in out


def test_a_second_run_counts_only_its_own_jobs_and_leaves_other_queues_alone(
    dsn: str, sql: Any
) -> None:
    sql("INSERT INTO pgtq.jobs (queue, task_name) VALUES ('emails', 'not_a_demo_task')")
    first = run_demo(dsn, jobs=20, console=quiet())
    second = run_demo(dsn, jobs=20, console=quiet())
    assert first.total == second.total == 20
    assert second.by_status == {"succeeded": 19, "aborted": 1}
    assert second.aborted_job_id != first.aborted_job_id
    assert sql("SELECT queue, status FROM pgtq.jobs WHERE queue <> %s", QUEUE) == [
        ("emails", "todo")
    ]


def test_demo_command_uses_pgtq_dsn(dsn: str, sql: Any) -> None:
    result = CliRunner().invoke(cli, ["demo", "--jobs", "30"], env={"PGTQ_DSN": dsn})
    assert result.exit_code == 0, result.output
    assert "30/30" in result.stdout
    assert "jobs/s" in result.stdout
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(30,)]


def test_demo_on_a_database_never_migrated_migrates_it(make_database: Any) -> None:
    url = make_database()
    summary = run_demo(url.render_as_string(hide_password=False), jobs=10, console=quiet())
    assert summary.by_status == {"succeeded": 9, "aborted": 1}


def test_embedded_without_pgserver_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)  # import pgserver -> ImportError
    with pytest.raises(pgtq.ConfigurationError, match=r"pgtq\[embedded\].*PGTQ_DSN"):
        embedded.embedded_dsn("./never-created")


def test_demo_command_without_pgserver_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "pgserver", None)
    result = CliRunner().invoke(cli, ["demo"], env={"PGTQ_DSN": None})
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert "pip install 'pgtq[embedded]'" in lines[0]
