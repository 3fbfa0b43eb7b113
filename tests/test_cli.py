"""The ``pgtq`` command: what a user types, what ends up in the database, and how errors read.

Most tests run the command in-process with typer's CliRunner; the ones about what a user sees
in a terminal (one line, no traceback) run ``python -m pgtq`` in a subprocess.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import URL
from typer.testing import CliRunner, Result

from pgtq.cli import cli
from tests.conftest import libpq

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.basic:app"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/x"

SQL = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture(autouse=True)
def fresh_app_modules() -> Iterator[None]:
    """Each in-process run imports the sample apps anew, as each real ``pgtq`` process does."""
    yield
    for name in [m for m in sys.modules if m.startswith("tests.apps.") or m == "myapp"]:
        del sys.modules[name]


def invoke(*args: str, dsn: str | None = None) -> Result:
    """Run ``pgtq ARGS`` in-process; PGTQ_DSN is ``dsn`` (unset when None)."""
    return CliRunner().invoke(cli, list(args), env={"PGTQ_DSN": dsn})


def run_pgtq(
    *args: str, dsn: str | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pgtq ARGS`` as a user would, in a process of its own."""
    env = {k: v for k, v in os.environ.items() if k != "PGTQ_DSN"}
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"
    if dsn is not None:
        env["PGTQ_DSN"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "pgtq", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


# -- defer ----------------------------------------------------------------------------------------


def test_defer_stores_the_job(dsn: str, sql: SQL) -> None:
    result = invoke("defer", APP, "add", '{"a": 1, "b": 2}', dsn=dsn)
    assert result.exit_code == 0, result.output
    assert "job 1" in result.stdout
    assert sql("SELECT task_name, args, status, queue FROM pgtq.jobs") == [
        ("add", {"a": 1, "b": 2}, "todo", "default")
    ]


def test_defer_takes_the_dsn_option_over_the_environment(dsn: str, sql: SQL) -> None:
    result = CliRunner().invoke(
        cli, ["defer", APP, "add", '{"a": 1, "b": 2}', "--dsn", dsn], env={"PGTQ_DSN": UNREACHABLE}
    )
    assert result.exit_code == 0, result.output
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(1,)]


def test_defer_with_job_options(dsn: str, sql: SQL) -> None:
    result = invoke(
        "defer", APP, "greet", '{"name": "Ada"}',
        "--queue", "vip", "--priority", "5", "--lock", "L", "--queueing-lock", "Q", "--in", "60",
        dsn=dsn,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = sql(
        "SELECT queue, priority, lock, queueing_lock, scheduled_at > now() + interval '50 s' "
        "FROM pgtq.jobs"
    )
    assert rows == [("vip", 5, "L", "Q", True)]


def test_defer_with_a_key_and_per_job_options(dsn: str, sql: SQL) -> None:
    """``--tag``, ``--meta``, ``--timeout``, ``--max-attempts`` stored; ``--on-conflict``
    says what a held ``--queueing-lock`` does, and the output says a duplicate is one."""
    args = ("defer", APP, "greet", '{"name": "Ada"}', "--queueing-lock", "Q")
    options = ("--tag", "a", "--tag", "b", "--meta", '{"by": "cli"}', "--timeout", "30")
    first = invoke(*args, *options, "--max-attempts", "2", dsn=dsn)
    assert first.exit_code == 0, first.output
    assert "Deferred greet as job 1 on queue 'greetings'" in first.stdout
    assert sql("SELECT tags, meta, timeout, max_attempts, queueing_lock FROM pgtq.jobs") == [
        (["a", "b"], {"by": "cli"}, 30.0, 2, "Q")
    ]
    skipped = invoke(*args, "--on-conflict", "skip", dsn=dsn)
    assert skipped.exit_code == 0, skipped.output
    assert "Duplicate: job 1 holds queueing lock 'Q' already, kept as it is" in skipped.stdout
    as_json = invoke(*args, "--on-conflict", "skip", "--json", dsn=dsn)
    assert as_json.exit_code == 0 and as_json.stdout.strip() == "1"
    raised = invoke(*args, dsn=dsn)
    assert raised.exit_code == 1
    assert_one_error_line(raised.stderr, "job 1 holds this key")
    replaced = invoke(
        "defer", APP, "greet", '{"name": "Bob"}', "--queueing-lock", "Q", "--on-conflict",
        "replace", dsn=dsn,
    )  # fmt: skip
    assert replaced.exit_code == 0, replaced.output
    assert "job 1 holds queueing lock 'Q' already, its arguments" in replaced.stdout
    period = invoke(
        "defer", APP, "greet", '{"name": "C"}', "--queueing-lock", "P", "--unique-for", "3600",
        dsn=dsn,
    )  # fmt: skip
    assert period.exit_code == 0, period.output
    assert sql("SELECT args->>'name', unique_key LIKE 'P@%%' FROM pgtq.jobs ORDER BY id") == [
        ("Bob", None),
        ("C", True),
    ]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--meta", "[1]"], "--meta: must be a JSON object"),
        (["--meta", "{"], "--meta: not valid JSON"),
        (["--max-attempts", "0"], "max_attempts: must be from 1"),
        (["--timeout", "nan"], "timeout: must be a number of seconds over zero"),
        (["--tag", ""], "tags (tag 0): must not be empty"),
        (["--on-conflict", "skip"], "on_conflict: 'skip' needs a queueing_lock"),
        (["--unique-for", "60"], "unique_for: needs a queueing_lock"),
    ],
)
def test_defer_refuses_bad_job_options_in_one_line(
    dsn: str, sql: SQL, args: list[str], fragment: str
) -> None:
    result = invoke("defer", APP, "greet", '{"name": "Ada"}', *args, dsn=dsn)
    assert result.exit_code != 0
    assert_one_error_line(result.stderr, fragment)
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


def test_defer_unknown_task_lists_the_known_ones_and_writes_nothing(dsn: str, sql: SQL) -> None:
    proc = run_pgtq("defer", APP, "nope", "{}", dsn=dsn)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, "nope", "add, greet")
    assert proc.stdout == ""
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ('{"a": 1', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('"text"', "JSON object"),
        ('{"a": 1}', "missing a required argument: 'b'"),
        ('{"a": 1, "b": 2, "c": 3}', "'c'"),
    ],
)
def test_defer_rejects_bad_arguments_in_one_line(
    dsn: str, sql: SQL, arguments: str, fragment: str
) -> None:
    result = invoke("defer", APP, "add", arguments, dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, fragment)
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


# -- loading the app ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("tests.apps.nothere:app", "cannot import 'tests.apps.nothere'"),
        ("tests.apps.basic", "MODULE:ATTRIBUTE"),
        ("tests.apps.basic:nope", "no attribute 'nope'"),
        ("tests.apps.basic:not_an_app", "not a pgtq.App"),
        ("tests.apps.broken:app", "broken on purpose"),
    ],
)
def test_a_bad_app_path_is_one_clear_line(dsn: str, path: str, fragment: str) -> None:
    result = invoke("worker", path, "--one-shot", dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, fragment)


def test_an_app_in_the_current_directory_is_found(dsn: str, sql: SQL, tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(
        "import pgtq\napp = pgtq.App()\n\n@app.task()\ndef hello(who: str) -> str:\n"
        "    return 'hi ' + who\n"
    )
    proc = run_pgtq("defer", "myapp:app", "hello", '{"who": "you"}', dsn=dsn, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sql("SELECT task_name FROM pgtq.jobs") == [("hello",)]


def test_no_database_anywhere_says_how_to_give_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./.pgtq here
    result = invoke("worker", APP, "--one-shot")
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "--dsn", "PGTQ_DSN")


# -- migrate --------------------------------------------------------------------------------------


def _tables(url: URL, schema: str) -> set[str]:
    with psycopg.connect(libpq(url)) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
    return {name for (name,) in rows}


def test_migrate_a_fresh_database(make_database: Callable[[], URL]) -> None:
    url = make_database()
    dsn = url.render_as_string(hide_password=False)
    result = invoke("migrate", "--dsn", dsn)
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stdout
    assert {"jobs", "workers"} <= _tables(url, "pgtq")
    again = invoke("migrate", "--dsn", dsn)  # already at head: nothing to do, no error
    assert again.exit_code == 0, again.output


def test_migrate_another_schema(make_database: Callable[[], URL]) -> None:
    url = make_database()
    result = invoke("migrate", "--schema", "queue_b", dsn=url.render_as_string(hide_password=False))
    assert result.exit_code == 0, result.output
    assert {"jobs", "workers"} <= _tables(url, "queue_b")
    assert _tables(url, "pgtq") == set()


def test_an_app_given_another_schema_keeps_its_tasks_and_settings(
    make_database: Callable[[], URL],
) -> None:
    """``--app X --schema other``: the app pointed at the other schema, not a bare App with
    the app's URL only (its tasks, so its declared queues, and its settings were lost)."""
    dsn = make_database().render_as_string(hide_password=False)
    assert invoke("migrate", "--app", APP, "--schema", "queue_b", dsn=dsn).exit_code == 0
    result = invoke("queues", "pause", "greetings", "--app", APP, "--schema", "queue_b", dsn=dsn)
    assert result.exit_code == 0, result.output  # a queue the app's tasks declare
    listed = invoke("queues", "list", "--schema", "queue_b", "--json", dsn=dsn)
    assert [q["name"] for q in json.loads(listed.stdout)] == ["greetings"]


def test_migrate_takes_the_database_from_an_app(make_database: Callable[[], URL]) -> None:
    url = make_database()
    result = invoke("migrate", "--app", APP, dsn=url.render_as_string(hide_password=False))
    assert result.exit_code == 0, result.output
    assert "jobs" in _tables(url, "pgtq")


def test_migrate_sql_prints_the_script_without_a_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("migrate", "--sql", "--schema", "other")
    assert result.exit_code == 0, result.output
    assert "CREATE TABLE" in result.stdout
    assert "other" in result.stdout
    assert not (tmp_path / ".pgtq").exists()


# -- errors a user sees -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["migrate", "--dsn", UNREACHABLE],
        ["defer", APP, "add", '{"a": 1, "b": 2}', "--dsn", UNREACHABLE],
        ["worker", APP, "--one-shot", "--dsn", UNREACHABLE],
        ["jobs", "show", "1", "--dsn", UNREACHABLE],
    ],
    ids=["migrate", "defer", "worker", "jobs-show"],
)
def test_an_unreachable_database_is_one_line_naming_host_and_port(args: list[str]) -> None:
    proc = run_pgtq(*args)
    assert proc.returncode == 1
    lines = [line for line in error_lines(proc.stderr) if line.startswith("Error: ")]
    assert len(lines) == 1, proc.stderr
    assert "127.0.0.1:1" in lines[0]
    assert "Traceback" not in proc.stderr


def test_verbose_shows_the_traceback() -> None:
    proc = run_pgtq("-v", "migrate", "--dsn", UNREACHABLE)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert "DatabaseUnreachable" in proc.stderr


def test_worker_on_a_database_never_migrated_says_run_pgtq_migrate(
    make_database: Callable[[], URL],
) -> None:
    dsn = make_database().render_as_string(hide_password=False)
    result = invoke("worker", APP, "--one-shot", "--dsn", dsn)
    assert result.exit_code == 1
    lines = [line for line in error_lines(result.stderr) if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    assert "pgtq migrate" in lines[0]
    assert "Traceback" not in result.output


def test_defer_on_a_database_never_migrated_says_run_pgtq_migrate(
    make_database: Callable[[], URL],
) -> None:
    dsn = make_database().render_as_string(hide_password=False)
    result = invoke("defer", APP, "add", '{"a": 1, "b": 2}', dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "pgtq migrate")


# -- worker ---------------------------------------------------------------------------------------


def test_worker_one_shot_drains_the_due_jobs(dsn: str, sql: SQL) -> None:
    for args in (
        ["add", '{"a": 1, "b": 2}'],
        ["greet", '{"name": "Ada"}'],
        ["add", '{"a": 2, "b": 2}'],
    ):
        assert invoke("defer", APP, *args, dsn=dsn).exit_code == 0
    assert invoke("defer", APP, "add", '{"a": 0, "b": 0}', "--in", "3600", dsn=dsn).exit_code == 0
    result = invoke("worker", APP, "--one-shot", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert "processed 3 job(s)" in result.stderr
    assert sql("SELECT id, status, result FROM pgtq.jobs ORDER BY id") == [
        (1, "succeeded", 3),
        (2, "succeeded", "hello Ada"),
        (3, "succeeded", 4),
        (4, "todo", None),  # not due yet: a one-shot worker leaves it
    ]


def test_worker_takes_only_its_queues(dsn: str, sql: SQL) -> None:
    assert invoke("defer", APP, "add", '{"a": 1, "b": 2}', dsn=dsn).exit_code == 0
    assert invoke("defer", APP, "greet", '{"name": "Ada"}', dsn=dsn).exit_code == 0
    result = invoke("worker", APP, "--one-shot", "--queue", "greetings", "-c", "2", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert sql("SELECT task_name, status FROM pgtq.jobs ORDER BY id") == [
        ("add", "todo"),
        ("greet", "succeeded"),
    ]


NOOP = "tests.apps.noop:app"


def spy_workers(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The options each real Worker is built with (it then runs as usual)."""
    from pgtq.worker import Worker

    built: list[dict[str, Any]] = []
    real_init = Worker.__init__

    @functools.wraps(real_init)
    def init(self: Worker, app: Any, **options: Any) -> None:
        real_init(self, app, **options)
        built.append(options)

    monkeypatch.setattr(Worker, "__init__", init)
    return built


def test_worker_flags_reach_the_worker(dsn: str, sql: SQL, monkeypatch: pytest.MonkeyPatch) -> None:
    built = spy_workers(monkeypatch)
    for args in (["noop"], ["noop"], ["explode", '{"reason": "no"}']):
        assert invoke("defer", NOOP, *args, dsn=dsn).exit_code == 0
    result = invoke(
        "worker", NOOP, "--one-shot", "-q", "default", "-c", "4", "--batch-size", "3",
        "--prefetch", "0", "--fetch-job-polling-interval", "0.5",
        "--abort-job-polling-interval", "0.25", "--shutdown-graceful-timeout", "7",
        "--heartbeat-interval", "0.75", "--rescue-after", "9", "--delete-jobs", "successful",
        "--name", "cli-worker-1", "--no-periodic", "--summary-interval", "0",
        dsn=dsn,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (options,) = built
    assert options == {
        "queues": ["default"],
        "concurrency": 4,
        "batch_size": 3,
        "prefetch": 0,
        "fetch_job_polling_interval": 0.5,
        "abort_job_polling_interval": 0.25,
        "shutdown_graceful_timeout": 7.0,
        "heartbeat_interval": 0.75,
        "rescue_after": 9.0,
        "delete_jobs": "successful",
        "worker_id": "cli-worker-1",
        "periodic": False,
        "summary_interval": None,  # 0: never
        "wait": False,
        "install_signal_handlers": True,
    }
    # In the database: the successful jobs were deleted as they ended, the failed one kept,
    # run by the worker of that name.
    assert sql("SELECT task_name, status, worker_id FROM pgtq.jobs") == [
        ("explode", "failed", "cli-worker-1")
    ]
    assert "cli-worker-1" in result.stderr


def test_worker_flags_not_given_leave_the_app_worker_options(
    dsn: str, sql: SQL, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = spy_workers(monkeypatch)
    assert invoke("defer", NOOP, "noop", dsn=dsn).exit_code == 0
    plain = invoke("worker", "tests.apps.noop:tuned", "--one-shot", dsn=dsn)
    assert plain.exit_code == 0, plain.output
    assert "concurrency 3" in plain.stderr  # the start line tells the effective value
    assert invoke("defer", NOOP, "noop", dsn=dsn).exit_code == 0
    given = invoke(
        "worker", "tests.apps.noop:tuned", "--one-shot", "-c", "6",
        "--shutdown-graceful-timeout", "inf", "--delete-jobs", "always",
        "--summary-interval", "15",
        dsn=dsn,
    )  # fmt: skip
    assert given.exit_code == 0, given.output
    assert "concurrency 6" in given.stderr
    first, second = built
    # Only the flags given are passed: the app's worker_options fill in the rest.
    assert first == {"wait": False, "install_signal_handlers": True, **WORKER_OPTIONS}
    assert second == {
        **first,
        "concurrency": 6,
        "shutdown_graceful_timeout": None,  # inf: no limit
        "delete_jobs": "always",
        "summary_interval": 15.0,
    }
    assert sql("SELECT id, status FROM pgtq.jobs") == [(1, "succeeded")]  # job 2: deleted


#: What tests.apps.noop:tuned sets in app.worker_options.
WORKER_OPTIONS = {"concurrency": 3, "batch_size": 2, "heartbeat_interval": 4.0}


@pytest.mark.parametrize(
    "args",
    [
        ["--heartbeat-interval", "nan"],
        ["--rescue-after", "inf"],
        ["--fetch-job-polling-interval", "0"],
        ["--batch-size", "0"],
        ["--prefetch", "-1"],
        ["--delete-jobs", "sometimes"],
        ["--log-level", "loud"],
    ],
)
def test_worker_refuses_bad_flags_before_starting(dsn: str, args: list[str]) -> None:
    result = invoke("worker", NOOP, "--one-shot", *args, dsn=dsn)
    assert result.exit_code == 2, result.output
    assert args[0] in result.output


def test_worker_process_drains_and_exits(dsn: str, sql: SQL) -> None:
    assert invoke("defer", APP, "add", '{"a": 20, "b": 22}', dsn=dsn).exit_code == 0
    proc = run_pgtq("worker", APP, "--one-shot", "--dsn", dsn)
    assert proc.returncode == 0, proc.stderr
    assert sql("SELECT status, result FROM pgtq.jobs") == [("succeeded", 42)]


def test_worker_runs_until_sigterm_then_exits_cleanly(dsn: str, sql: SQL) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PGTQ_DSN"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgtq", "worker", APP, "--dsn", dsn],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert invoke("defer", APP, "add", '{"a": 1, "b": 1}', dsn=dsn).exit_code == 0
        deadline = time.monotonic() + 20
        while sql("SELECT status FROM pgtq.jobs") != [("succeeded",)]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker did not run the job"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "processed 1 job(s)" in stderr
    assert "Traceback" not in stderr
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]


# -- jobs -----------------------------------------------------------------------------------------


def test_jobs_show(dsn: str) -> None:
    assert invoke("defer", APP, "add", '{"a": 1, "b": 2}', dsn=dsn).exit_code == 0
    result = invoke("jobs", "show", "1", dsn=dsn)
    assert result.exit_code == 0, result.output
    for fragment in ("Job 1", "add", "todo", '{"a": 1, "b": 2}'):
        assert fragment in result.stdout


def test_jobs_show_an_unknown_id(dsn: str) -> None:
    result = invoke("jobs", "show", "999", dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "no job with id 999")


def test_jobs_abort_then_retry(dsn: str, sql: SQL) -> None:
    assert invoke("defer", APP, "add", '{"a": 1, "b": 2}', dsn=dsn).exit_code == 0
    aborted = invoke("jobs", "abort", "1", dsn=dsn)
    assert aborted.exit_code == 0, aborted.output
    assert sql("SELECT status FROM pgtq.jobs") == [("cancelled",)]
    again = invoke("jobs", "abort", "1", dsn=dsn)
    assert again.exit_code == 1
    assert_one_error_line(again.stderr, "already ended")
    retried = invoke("jobs", "retry", "1", dsn=dsn)
    assert retried.exit_code == 0, retried.output
    assert sql("SELECT status FROM pgtq.jobs") == [("todo",)]


# -- the command itself ---------------------------------------------------------------------------


def test_python_dash_m_pgtq() -> None:
    proc = run_pgtq("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("worker", "defer", "migrate", "jobs", "demo"):
        assert command in proc.stdout


def test_version() -> None:
    import pgtq

    result = invoke("--version")
    assert result.exit_code == 0
    assert pgtq.__version__ in result.stdout


def _names(tree: Any) -> set[str]:
    import typer

    commands = {
        info.name or typer.main.get_command_name(info.callback.__name__)
        for info in tree.registered_commands
    }
    return commands | {info.name for info in tree.registered_groups}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["worker", "app:app", "--one-shot"], {"worker"}),
        (["--debug", "-v", "worker", "--help"], {"worker"}),
        (["jobs", "list"], {"jobs"}),
        (["healthcheck"], {"healthcheck"}),
    ],
)
def test_a_run_builds_only_the_command_it_names(args: list[str], expected: set[str]) -> None:
    from pgtq.cli import command_tree

    tree = command_tree(args)
    assert _names(tree) == expected
    assert tree.registered_callback is cli.registered_callback  # --debug, --version stay
    assert {"worker", "jobs", "queues", "migrate"} < _names(cli)  # the whole tree is untouched


@pytest.mark.parametrize("args", [[], ["--help"], ["--version"], ["wroker"]])
def test_no_command_or_an_unknown_one_gets_the_whole_tree(args: list[str]) -> None:
    from pgtq.cli import command_tree

    assert command_tree(args) is cli


def test_the_command_prints_without_importing_rich_until_it_must() -> None:
    """`pgtq worker` logs plain lines to a pipe: importing Rich is start-up it need not pay."""
    code = (
        "import sys, pgtq.cli\n"
        "assert not any(m.startswith('rich') for m in sys.modules), 'rich imported'\n"
        "pgtq.cli.err.print('x')\n"
        "assert 'rich.console' in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_unknown_command_is_typers_error() -> None:
    proc = run_pgtq("wroker")
    assert proc.returncode == 2
    assert "No such command" in proc.stderr
