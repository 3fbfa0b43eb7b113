"""The operations commands: ``jobs list|cancel``, ``queues``, ``stats``, ``migrate --check``,
``defer --at``, ``--json`` and ``worker --metrics-port``."""

from __future__ import annotations

import json
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


def test_jobs_reschedule(dsn: str, sql: SQL) -> None:
    defer(dsn, "add", '{"a": 1, "b": 2}', "--in", "3600")
    defer(dsn, "add", '{"a": 1, "b": 2}')
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = 2")
    result = invoke("jobs", "reschedule", "1", "--in", "0", "--priority", "7", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert "Job 1 rescheduled: due at" in result.stdout and "priority 7" in result.stdout
    assert sql("SELECT scheduled_at <= now(), priority FROM pgtq.jobs WHERE id = 1") == [(True, 7)]
    result = invoke("jobs", "reschedule", "1", "--at", "2040-01-31T09:30", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert sql("SELECT scheduled_at, priority FROM pgtq.jobs WHERE id = 1") == [
        (datetime(2040, 1, 31, 9, 30).astimezone(), 7)
    ]
    for args, fragment in (
        (["2", "--in", "0"], "it runs already"),
        (["9", "--in", "0"], "no job"),
        (["1"], "give --at, --in or --priority"),
        (["1", "--at", "soon"], "ISO 8601"),
        (["1", "--in", "5", "--at", "2040-01-31T09:30"], "not both"),
        (["1", "--priority", str(2**31)], "--priority"),
    ):
        result = invoke("jobs", "reschedule", *args, dsn=dsn)
        assert result.exit_code == 1, (args, result.output)
        assert_one_error_line(result.stderr, fragment)
    assert sql("SELECT status, priority FROM pgtq.jobs ORDER BY id") == [
        ("todo", 7),
        ("doing", 0),
    ]


def test_jobs_fail(dsn: str, sql: SQL) -> None:
    defer(dsn, "add", '{"a": 1, "b": 2}')
    defer(dsn, "add", '{"a": 1, "b": 2}')
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = 2")
    result = invoke("jobs", "fail", "1", "--reason", "bad input file", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert "Job 1 failed: bad input file" in result.stdout
    assert sql("SELECT status, error FROM pgtq.jobs WHERE id = 1") == [
        ("failed", {"type": "Failed", "message": "bad input file"})
    ]
    for args, fragment in (
        (["1", "--reason", "x"], "failed, not waiting"),
        (["2", "--reason", "x"], "pgtq jobs abort 2"),
        (["9", "--reason", "x"], "no job"),
        (["2", "--reason", ""], "must say why"),
    ):
        result = invoke("jobs", "fail", *args, dsn=dsn)
        assert result.exit_code == 1, (args, result.output)
        assert_one_error_line(result.stderr, fragment)
    result = invoke("jobs", "fail", "2", dsn=dsn)
    assert result.exit_code == 2 and "--reason" in result.output  # required
    assert sql("SELECT status FROM pgtq.jobs ORDER BY id") == [("failed",), ("doing",)]


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


# -- --json -------------------------------------------------------------------------------------


def as_json(dsn: str, *args: str) -> Any:
    """Run ``pgtq ARGS --json``: stdout is one JSON document, nothing else."""
    result = invoke(*args, "--json", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)


def test_defer_json_prints_the_bare_id(dsn: str) -> None:
    assert as_json(dsn, "defer", APP, "add", '{"a": 1, "b": 2}') == 1
    result = invoke("defer", APP, "add", '{"a": 1, "b": 2}', "--json", dsn=dsn)
    assert result.stdout == "2\n"
    result = invoke("defer", APP, "greet", '{"name": "Ada"}', dsn=dsn)  # without: as before
    assert result.stdout == "Deferred greet as job 3 on queue 'greetings'\n"


def test_jobs_list_and_show_json(dsn: str, sql: SQL) -> None:
    defer(dsn, "add", '{"a": 1, "b": 2}')
    defer(dsn, "greet", '{"name": "[bold]Ada[/] \u00e9"}')  # no Rich markup read, no escape
    sql(
        "UPDATE pgtq.jobs SET status = 'failed', finished_at = now(), attempts = 1, "
        """error = '{"type": "ValueError", "message": "no", "traceback": "Traceback..."}' """
        "WHERE id = 1"
    )
    jobs = as_json(dsn, "jobs", "list")
    assert [(j["id"], j["status"], j["task_name"]) for j in jobs] == [
        (2, "todo", "greet"),
        (1, "failed", "add"),
    ]
    assert jobs[0]["args"] == {"name": "[bold]Ada[/] \u00e9"}
    assert jobs[0]["queue"] == "greetings" and jobs[0]["finished_at"] is None
    datetime.fromisoformat(jobs[0]["created_at"])
    assert as_json(dsn, "jobs", "list", "--status", "failed", "-n", "1") == [jobs[1]]
    assert as_json(dsn, "jobs", "list", "--queue", "nothing") == []
    job = as_json(dsn, "jobs", "show", "1")
    assert job == jobs[1]
    assert job["error"] == {"type": "ValueError", "message": "no", "traceback": "Traceback..."}
    assert datetime.fromisoformat(job["finished_at"]).tzinfo is not None
    result = invoke("jobs", "show", "9", "--json", dsn=dsn)
    assert result.exit_code == 1 and result.stdout == ""
    assert_one_error_line(result.stderr, "no job with id 9")


def test_queues_list_json(dsn: str) -> None:
    assert as_json(dsn, "queues", "list") == []
    defer(dsn, "greet", '{"name": "Ada"}')
    assert invoke("queues", "pause", "greetings", dsn=dsn).exit_code == 0
    [queue] = as_json(dsn, "queues", "list")
    assert (queue["name"], queue["paused"]) == ("greetings", True)
    datetime.fromisoformat(queue["paused_at"])


def test_stats_json(dsn: str, sql: SQL) -> None:
    defer(dsn, "add", '{"a": 1, "b": 2}')
    defer(dsn, "greet", '{"name": "Ada"}')
    sql("UPDATE pgtq.jobs SET status = 'succeeded', finished_at = now() WHERE id = 1")
    sql("INSERT INTO pgtq.workers (id, hostname, pid, queues) VALUES ('w1', 'h', 7, '{a,b}')")
    stats = as_json(dsn, "stats")
    queues = {q["name"]: q for q in stats["queues"]}
    assert queues["greetings"]["counts"] == {
        "todo": 1,
        "doing": 0,
        "failed": 0,
        "aborted": 0,
        "cancelled": 0,
    }
    assert queues["greetings"]["rate"] is None and not queues["greetings"]["paused"]
    assert queues["default"]["rate"] == pytest.approx(1 / stats["window"])
    assert stats["rates"] == [
        {"queue": "default", "task": "add", "per_second": queues["default"]["rate"]}
    ]
    [w] = stats["workers"]
    assert (w["id"], w["hostname"], w["pid"], w["queues"], w["alive"]) == (
        "w1",
        "h",
        7,
        ["a", "b"],
        True,
    )
    assert w["running"] == [] and w["heartbeat_age"] < 30
    result = invoke("stats", "--json", "--watch", dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "--json", "--watch")


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
        [(worker_id,)] = sql("SELECT id FROM pgtq.workers")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
            health = json.loads(r.read())
        assert (health["status"], health["worker"]) == ("ok", worker_id)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"metrics on http://127.0.0.1:{port}/metrics" in stderr


# -- periodic ---------------------------------------------------------------------------------

SCHEDULED = "tests.apps.scheduled:app"


def test_periodic_pause_resume_run_now_and_list(dsn: str, sql: SQL) -> None:
    listing = invoke("periodic", "list", SCHEDULED, dsn=dsn)
    assert listing.exit_code == 0, listing.output
    for fragment in ("report (eu)", "report (us)", "Europe/Paris", "0 9 * * *", "*/5 * * * *"):
        assert fragment in listing.stdout, listing.stdout
    assert listing.stdout.count("active") == 3
    paused = invoke("periodic", "pause", SCHEDULED, "report", "--id", "eu", dsn=dsn)
    assert paused.exit_code == 0, paused.output
    assert "Periodic task 'report' ('eu') paused" in paused.stdout
    again = invoke("periodic", "pause", SCHEDULED, "report", "--id", "eu", dsn=dsn)
    assert "was already paused" in again.stdout
    assert sql("SELECT task_name, periodic_id, paused FROM pgtq.periodic_schedules") == [
        ("report", "eu", True)
    ]
    assert "paused since" in invoke("periodic", "list", SCHEDULED, dsn=dsn).stdout
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]  # pausing defers nothing

    ran = invoke("periodic", "run-now", SCHEDULED, "report", "--id", "eu", dsn=dsn)
    assert ran.exit_code == 0, ran.output
    [(job_id, queue, args)] = sql("SELECT id, queue, args FROM pgtq.jobs")
    assert f"as job {job_id} on queue 'reports'" in ran.stdout
    assert queue == "reports" and args["region"] == "eu"
    assert as_json(dsn, "periodic", "run-now", SCHEDULED, "tick") == job_id + 1
    [report_us, report_eu, tick] = as_json(dsn, "periodic", "list", SCHEDULED)
    assert report_eu["run_now_job_id"] == job_id and tick["run_now_job_id"] == job_id + 1
    assert report_us["run_now_job_id"] is None

    resumed = invoke("periodic", "resume", SCHEDULED, "report", "--id", "eu", dsn=dsn)
    assert "Periodic task 'report' ('eu') resumed" in resumed.stdout
    assert "was not paused" in invoke("periodic", "resume", SCHEDULED, "tick", dsn=dsn).stdout


def test_periodic_list_json(dsn: str) -> None:
    assert invoke("periodic", "pause", SCHEDULED, "tick", dsn=dsn).exit_code == 0
    us, eu, tick = as_json(dsn, "periodic", "list", SCHEDULED)
    assert (us["task_name"], us["periodic_id"], us["timezone"]) == (
        "report",
        "us",
        "America/New_York",
    )
    assert (eu["periodic_id"], eu["kwargs"], eu["paused"]) == ("eu", {"region": "eu"}, False)
    assert tick["paused"] and tick["paused_at"] and tick["cron"] == "*/5 * * * *"
    assert len(tick["next_ticks"]) == 3
    first = datetime.fromisoformat(tick["next_ticks"][0])
    assert first.minute % 5 == 0 and first.second == 0 and first > datetime.now(UTC)
    assert tick["last_tick"] is None and tick["run_now_job_id"] is None


def test_periodic_commands_refuse_an_unknown_schedule(dsn: str, sql: SQL) -> None:
    for command in ("pause", "resume", "run-now"):
        result = invoke("periodic", command, SCHEDULED, "report", "--id", "asia", dsn=dsn)
        assert result.exit_code == 1
        assert_one_error_line(result.stderr, "'report' ('asia')", "periodic task 'report' ('eu')")
    result = invoke("periodic", "pause", SCHEDULED, "nightly", dsn=dsn)
    assert_one_error_line(result.stderr, "'nightly'")
    assert sql("SELECT count(*) FROM pgtq.periodic_schedules") == [(0,)]
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]
