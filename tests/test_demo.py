"""``pgtq demo`` and the embedded PostgreSQL it falls back to."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

import pgtq
from pgtq import embedded
from pgtq.cli import cli
from pgtq.demo import QUEUE, demo_app, run_demo

ROOT = Path(__file__).resolve().parent.parent


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
    assert summary.by_status == {"succeeded": 59, "aborted": 1}
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


# -- the embedded server (starts a real one: slow) -------------------------------------------


@pytest.fixture
def embedded_dir() -> Iterator[Path]:
    """A working directory whose ./.pgtq server is stopped and removed at the end.

    Not under pytest's tmp_path: as root, pgserver runs PostgreSQL as another user, and any
    pytest session starting meanwhile makes /tmp/pytest-of-root private again (mode 0700),
    which locks that user out of its own data directory.
    """
    pytest.importorskip("pgserver")
    directory = Path(tempfile.mkdtemp(prefix="pgtq-test-embedded-"))
    try:
        yield directory
    finally:
        embedded.stop_embedded(directory / ".pgtq")
        shutil.rmtree(directory, ignore_errors=True)


def _demo_process(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGTQ_DSN"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pgtq", "demo", "--jobs", "40"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_demo_on_the_embedded_server_twice(embedded_dir: Path) -> None:
    first = _demo_process(embedded_dir)
    assert first.returncode == 0, first.stderr
    assert "40/40" in first.stdout
    assert (embedded_dir / ".pgtq" / "PG_VERSION").exists()
    second = _demo_process(embedded_dir)  # reuses ./.pgtq: the server is still running
    assert second.returncode == 0, second.stderr
    assert "40/40" in second.stdout
    assert "Traceback" not in first.stderr + second.stderr


@pytest.mark.slow
def test_embedded_dsn_is_absolute_and_reused(
    embedded_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(embedded_dir)
    first = embedded.embedded_dsn()
    host = make_url(first).query["host"]
    assert isinstance(host, str) and os.path.isabs(host)
    assert embedded.is_initialized()
    assert embedded.embedded_dsn(embedded_dir / ".pgtq") == first
    app = pgtq.App(first)
    try:
        app.migrate()
        assert app.jobs.counts() == {}
    finally:
        app.close()
