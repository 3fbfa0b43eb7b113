"""The embedded PostgreSQL: never a silent fallback, a status, a stop, and ``App.embedded()``.

The tests that need a server share one per module (``server_dir``: started once, stopped and
removed at the end); each starts it again if a test before stopped it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

import pgtq
from pgtq import embedded
from pgtq.cli import cli
from pgtq.demo import run_demo

ROOT = Path(__file__).resolve().parent.parent
NOTICE = "using the embedded PostgreSQL in ./.pgtq: set PGTQ_DSN to use your own"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"PGTQ_DSN": None})


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def text(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined, no-any-return]


# -- no server needed ------------------------------------------------------------------------


@pytest.mark.unit
def test_notice_is_the_documented_line() -> None:
    assert embedded.notice() == NOTICE


@pytest.mark.unit
def test_status_of_a_directory_with_no_server(tmp_path: Path) -> None:
    found = embedded.status(tmp_path / ".pgtq")
    assert (found.initialized, found.running, found.pid, found.dsn) == (False, False, None, None)
    assert found.path == (tmp_path / ".pgtq").resolve()
    assert embedded.stop_embedded(tmp_path / ".pgtq") is False


@pytest.mark.unit
def test_a_stale_postmaster_pid_is_not_a_running_server(tmp_path: Path) -> None:
    """A killed server leaves postmaster.pid behind, its pid gone or reused by another program:
    here this test's own process, which stop must not signal."""
    data = tmp_path / ".pgtq"
    data.mkdir()
    (data / "PG_VERSION").write_text("16\n")
    (data / "postmaster.pid").write_text(f"{os.getpid()}\n{data}\n0\n5432\n{data}\n\n0 0\nready\n")
    found = embedded.status(data)
    assert found.initialized and not found.running
    assert embedded.stop_embedded(data) is False  # and this process is still alive to check


@pytest.mark.unit
@pytest.mark.parametrize(
    "command", [["migrate"], ["jobs", "list"], ["worker", "first_hour_app:app"]]
)
def test_no_dsn_and_no_embedded_server_is_an_error_saying_how_to_give_one(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    if command[0] == "worker":
        (tmp_path / "first_hour_app.py").write_text("import pgtq\napp = pgtq.App()\n")
    result = invoke(*command)
    assert result.exit_code == 1
    [line] = lines(result.stderr)
    assert "no database configured" in line
    assert "--dsn" in line and "PGTQ_DSN" in line and "postgresql://" in line
    assert "pgtq migrate --embedded" in line
    assert not (tmp_path / ".pgtq").exists()  # nothing created behind the user's back


@pytest.mark.unit
def test_migrate_embedded_and_a_dsn_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("migrate", "--embedded", "--dsn", "postgresql://localhost/x")
    assert result.exit_code == 1
    [line] = lines(result.stderr)
    assert "--embedded and a DSN" in line
    assert not (tmp_path / ".pgtq").exists()


@pytest.mark.unit
def test_status_command_with_no_server_says_how_to_make_one(tmp_path: Path) -> None:
    result = invoke("embedded", "status", "--path", str(tmp_path / ".pgtq"))
    assert result.exit_code == 0
    assert "no embedded PostgreSQL in" in result.stdout
    assert "pgtq migrate --embedded" in result.stdout
    stopped = invoke("embedded", "stop", "--path", str(tmp_path / ".pgtq"))
    assert stopped.exit_code == 0
    assert "no embedded PostgreSQL running" in stopped.stdout


@pytest.mark.unit
def test_an_app_with_no_database_names_app_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGTQ_DSN", raising=False)
    with pytest.raises(pgtq.ConfigurationError, match=r"pgtq\.App\.embedded\(\)"):
        pgtq.App().url  # noqa: B018


@pytest.mark.unit
def test_app_embedded_refuses_a_database_of_its_own() -> None:
    with pytest.raises(pgtq.ConfigurationError, match="drop dsn"):
        pgtq.App.embedded(dsn="postgresql://localhost/x")


# -- one embedded server for the module (slow: it starts a real one) ---------------------------


@pytest.fixture(scope="module")
def server_dir() -> Iterator[Path]:
    """A directory whose ./.pgtq holds the module's server, stopped and removed at the end.

    Not under pytest's tmp_path: as root, pgserver runs PostgreSQL as another user, and any
    pytest session starting meanwhile makes /tmp/pytest-of-root private again (mode 0700),
    which locks that user out of its own data directory.
    """
    pytest.importorskip("pgserver")
    directory = Path(tempfile.mkdtemp(prefix="pgtq-test-embedded-"))
    try:
        embedded.embedded_dsn(directory / ".pgtq")
        yield directory
    finally:
        embedded.stop_embedded(directory / ".pgtq")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def running(server_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The module's server, running, in the working directory; no PGTQ_DSN."""
    embedded.embedded_dsn(server_dir / ".pgtq")
    monkeypatch.chdir(server_dir)
    monkeypatch.delenv("PGTQ_DSN", raising=False)
    return server_dir


@pytest.fixture
def stopped(running: Path) -> Path:
    """The module's server, stopped (its data kept), in the working directory."""
    assert embedded.stop_embedded(running / ".pgtq")
    return running


@pytest.mark.slow
def test_status_shows_the_running_server(running: Path) -> None:
    found = embedded.status()
    assert found.running and found.initialized
    assert isinstance(found.pid, int)
    assert found.dsn == embedded.embedded_dsn()  # reused, same URL
    host = make_url(found.dsn).query["host"]
    assert isinstance(host, str) and os.path.isabs(host)  # valid from any directory
    result = invoke("embedded", "status", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "path": str(running.resolve() / ".pgtq"),
        "initialized": True,
        "running": True,
        "pid": found.pid,
        "dsn": found.dsn,
    }
    shown = invoke("embedded", "status").stdout
    assert f"pid {found.pid}" in shown and found.dsn in shown and "pgtq embedded stop" in shown


@pytest.mark.slow
def test_commands_use_an_existing_embedded_server_and_say_so(running: Path) -> None:
    migrated = invoke("migrate")
    assert migrated.exit_code == 0, migrated.stderr
    assert lines(migrated.stderr) == [NOTICE]
    listed = invoke("jobs", "list")
    assert listed.exit_code == 0, listed.stderr
    assert lines(listed.stderr) == [NOTICE]


@pytest.mark.slow
def test_app_embedded_starts_migrates_and_runs_a_job(stopped: Path) -> None:
    app = pgtq.App.embedded()  # ./.pgtq, stopped: started again
    try:

        @app.task()
        def add(a: int, b: int) -> int:
            return a + b

        job_id = add.defer(a=1, b=2)
        app.run_worker(wait=False, install_signal_handlers=False)
        assert app.jobs.wait(job_id, timeout=10) == 3
        assert app.url == make_url(embedded.status().dsn or "")
    finally:
        app.close()
    again = pgtq.App.embedded(stopped / ".pgtq", schema="pgtq_other")  # a schema to migrate
    try:
        assert again.jobs.counts() == {}
        assert again.url == app.url
    finally:
        again.close()


@pytest.mark.slow
def test_stop_command_stops_it_and_the_next_command_starts_it_again(running: Path) -> None:
    pid = embedded.status().pid
    result = invoke("embedded", "stop")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"stopped the embedded PostgreSQL in ./.pgtq (pid {pid})"
    assert not embedded.status().running
    assert "not running" in invoke("embedded", "status").stdout
    assert "no embedded PostgreSQL running" in invoke("embedded", "stop").stdout
    migrated = invoke("migrate")  # it exists: the command starts it, and says so
    assert migrated.exit_code == 0, migrated.stderr
    assert lines(migrated.stderr) == [NOTICE]
    assert embedded.status().running


@pytest.mark.slow
def test_the_demo_stops_the_server_it_started(stopped: Path) -> None:
    console, stderr = quiet(), quiet()
    summary = run_demo(jobs=10, console=console, stderr=stderr)
    assert sum(summary.by_status.values()) == summary.total == 10
    assert lines(text(stderr)) == [NOTICE]
    assert "Stopped the embedded PostgreSQL in ./.pgtq" in text(console)
    assert not embedded.status().running
    run_demo(jobs=10, console=quiet(), stderr=quiet(), keep=True)
    assert embedded.status().running


@pytest.mark.slow
def test_the_demo_leaves_a_server_that_was_running_running(running: Path) -> None:
    console = quiet()
    run_demo(jobs=10, console=console, stderr=quiet())
    assert embedded.status().running
    assert "keeps running: `pgtq embedded stop` stops it" in text(console)


def _demo_process(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGTQ_DSN"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pgtq", "demo", "--jobs", "20", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_pgtq_demo_keep_leaves_the_server_running_after_the_process(stopped: Path) -> None:
    kept = _demo_process(stopped, "--keep")
    assert kept.returncode == 0, kept.stderr
    assert "20/20" in kept.stdout
    assert lines(kept.stderr) == [NOTICE]
    assert embedded.status().running  # outlived the process that started it
    again = _demo_process(stopped)  # it was running: it stays running
    assert again.returncode == 0, again.stderr
    assert embedded.status().running


def _quickstart_script(name: str) -> str:
    """The ``python`` block of docs/quickstart.md whose first line is ``# NAME``."""
    page = (ROOT / "docs" / "quickstart.md").read_text()
    for block in page.split("```python\n")[1:]:
        code = block.split("```", 1)[0]
        if code.startswith(f"# {name}\n"):
            return code
    raise AssertionError(f"docs/quickstart.md has no python block starting with '# {name}'")


@pytest.mark.slow
def test_the_quickstart_first_script_runs_as_is(running: Path) -> None:
    (running / "first.py").write_text(_quickstart_script("first.py"))
    env = {k: v for k, v in os.environ.items() if k != "PGTQ_DSN"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "first.py"],
        cwd=running,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
    assert embedded.status().running  # the script leaves the server running, as it says
