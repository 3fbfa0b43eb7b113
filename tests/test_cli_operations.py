"""The operations commands: ``jobs list|cancel``, ``queues``, ``stats``, ``migrate --check``,
``defer --at`` and ``worker --metrics-port``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import URL

from pgtq.dashboard import NO_DATA
from tests.test_cli import APP, ROOT, UNREACHABLE, assert_one_error_line, invoke, run_pgtq

SQL = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture(autouse=True)
def fresh_app_modules() -> Iterator[None]:
    yield
    for name in [m for m in sys.modules if m.startswith("tests.apps.")]:
        del sys.modules[name]


def defer(dsn: str, *args: str) -> None:
    result = invoke("defer", APP, *args, dsn=dsn)
    assert result.exit_code == 0, result.output


# -- migrate --check ----------------------------------------------------------------------------


def test_migrate_check_fails_until_migrated(make_database: Callable[[], URL]) -> None:
    dsn = make_database().render_as_string(hide_password=False)
    result = invoke("migrate", "--check", dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "not migrated", "pgtq migrate")
    assert invoke("migrate", dsn=dsn).exit_code == 0
    result = invoke("migrate", "--check", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert "at head" in result.stdout


def test_migrate_check_on_an_unreachable_database_is_one_line() -> None:
    proc = run_pgtq("migrate", "--check", "--dsn", UNREACHABLE)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, "127.0.0.1:1")


# -- defer --at ---------------------------------------------------------------------------------


def test_defer_at_a_time(dsn: str, sql: SQL) -> None:
    when = datetime.now(UTC) + timedelta(hours=2)
    defer(dsn, "add", '{"a": 1, "b": 2}', "--at", when.isoformat())
    defer(dsn, "add", '{"a": 1, "b": 2}', "--at", "2030-01-31T09:30")  # local time
    [(first,), (second,)] = sql("SELECT scheduled_at FROM pgtq.jobs ORDER BY id")
    assert abs((first - when).total_seconds()) < 1
    assert second == datetime(2030, 1, 31, 9, 30).astimezone()


def test_defer_at_rejects_a_bad_time(dsn: str, sql: SQL) -> None:
    result = invoke("defer", APP, "add", '{"a": 1, "b": 2}', "--at", "tomorrow", dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "ISO 8601")
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


# -- jobs list / cancel -------------------------------------------------------------------------


def test_jobs_list_filters_and_pages(dsn: str, sql: SQL) -> None:
    for n in range(3):
        defer(dsn, "add", f'{{"a": {n}, "b": 0}}')
    defer(dsn, "greet", '{"name": "Ada"}')
    sql("UPDATE pgtq.jobs SET status = 'failed', finished_at = now() WHERE id = 2")

    def ids(*args: str) -> list[int]:
        result = invoke("jobs", "list", *args, dsn=dsn)
        assert result.exit_code == 0, result.output
        rows = [line.split("│") for line in result.stdout.splitlines() if line.startswith("│")]
        return [int(cells[1]) for cells in rows if cells[1].strip()]

    assert ids() == [4, 3, 2, 1]  # newest first
    assert ids("--oldest-first") == [1, 2, 3, 4]
    assert ids("--queue", "greetings") == [4]
    assert ids("--status", "failed") == [2]
    assert ids("-s", "failed", "-s", "todo", "--task", "add") == [3, 2, 1]
    assert ids("--limit", "2") == [4, 3]
    assert ids("--limit", "2", "--after", "3") == [2, 1]
    assert "--after 3" in invoke("jobs", "list", "-n", "2", dsn=dsn).stdout
    result = invoke("jobs", "list", "--status", "done", dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "unknown status", "succeeded")


def test_jobs_cancel(dsn: str, sql: SQL) -> None:
    defer(dsn, "add", '{"a": 1, "b": 2}')
    defer(dsn, "add", '{"a": 1, "b": 2}')
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = 2")
    result = invoke("jobs", "cancel", "1", dsn=dsn)
    assert result.exit_code == 0 and "Job 1 cancelled" in result.stdout
    for job_id, fragment in (("1", "cancelled, not waiting"), ("2", "jobs abort"), ("9", "no job")):
        result = invoke("jobs", "cancel", job_id, dsn=dsn)
        assert result.exit_code == 1
        assert_one_error_line(result.stderr, fragment)
    assert sql("SELECT status FROM pgtq.jobs ORDER BY id") == [("cancelled",), ("doing",)]


# -- queues -------------------------------------------------------------------------------------


def test_queues_pause_resume_list(dsn: str, sql: SQL) -> None:
    defer(dsn, "greet", '{"name": "Ada"}')
    assert "paused" in invoke("queues", "pause", "greetings", dsn=dsn).stdout
    assert "already paused" in invoke("queues", "pause", "greetings", dsn=dsn).stdout
    listing = invoke("queues", "list", dsn=dsn).stdout
    assert any("greetings" in line and "paused" in line for line in listing.splitlines())
    assert sql("SELECT name, paused FROM pgtq.queues") == [("greetings", True)]
    assert "resumed" in invoke("queues", "resume", "greetings", dsn=dsn).stdout
    assert "was not paused" in invoke("queues", "resume", "greetings", dsn=dsn).stdout


# -- stats --------------------------------------------------------------------------------------


def test_stats_prints_the_queues_once(dsn: str, sql: SQL) -> None:
    defer(dsn, "add", '{"a": 1, "b": 2}')
    defer(dsn, "greet", '{"name": "Ada"}')
    sql("UPDATE pgtq.jobs SET status = 'succeeded', finished_at = now() WHERE id = 1")
    result = invoke("stats", dsn=dsn)
    assert result.exit_code == 0, result.output
    rows = {
        cells[1].strip(): [c.strip() for c in cells[2:-1]]
        for cells in (line.split("│") for line in result.stdout.splitlines())
        if len(cells) > 3
    }
    assert rows["default"][:6] == ["active", "0", "0", "0", NO_DATA, "0.02"]
    assert rows["greetings"][1] == "1"
    assert "Workers (0 live)" in result.stdout


def test_stats_on_an_unreachable_database_is_one_line() -> None:
    proc = run_pgtq("stats", "--dsn", UNREACHABLE)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, "127.0.0.1:1")


# -- worker --metrics-port ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
def test_worker_serves_metrics(dsn: str, sql: SQL) -> None:
    pytest.importorskip("prometheus_client")
    defer(dsn, "greet", '{"name": "Ada"}')
    port = _free_port()
    env = {**os.environ, "PGTQ_DSN": dsn, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgtq", "worker", APP, "--queue", "nothing-here",
         "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        body = ""

        def scrape() -> bool:
            nonlocal body
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                return False
            return "pgtq_stats_up 1.0" in body

        deadline = time.monotonic() + 30
        while not scrape():
            assert time.monotonic() < deadline, f"no metrics within 30 s: {body}"
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        assert 'pgtq_queue_jobs{queue="greetings",status="todo"} 1.0' in body
        assert "pgtq_workers_live" in body
        while sql("SELECT count(*) FROM pgtq.workers") != [(1,)]:  # running: SIGTERM is handled
            assert time.monotonic() < deadline, "the worker never registered"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"metrics on http://127.0.0.1:{port}/metrics" in stderr
