"""The messages of issue 19's first hour (item 9), each read as a newcomer meets it:
``pgtq migrate --check`` on an empty database, a DSN without a scheme, ``wait``'s timeout with
no worker running, ``pgtq web`` on a busy port, and ``--help`` without ``<bool>``."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

import pgtq
from pgtq.cli import cli
from tests.sides import Side
from tests.test_cli import assert_one_error_line, invoke, run_pgtq

SQL = Callable[..., list[tuple[Any, ...]]]
FORM = "postgresql://user:password@host:5432/dbname"


# -- pgtq migrate --check ------------------------------------------------------------------------


def test_migrate_check_on_an_empty_database_reads_well(make_database: Callable[[], URL]) -> None:
    dsn = make_database().render_as_string(hide_password=False)
    result = invoke("migrate", "--check", dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "is not migrated", "run `pgtq migrate`")
    assert "is at not" not in result.stderr


# -- a DSN without a scheme ----------------------------------------------------------------------


@pytest.mark.unit
def test_a_dsn_without_a_scheme_shows_the_expected_form() -> None:
    with pytest.raises(pgtq.ConfigurationError, match="use the form " + FORM) as info:
        pgtq.App("admin:s3cret@localhost/mydb")
    assert "s3cret" not in str(info.value) and "admin:***@localhost/mydb" in str(info.value)
    assert isinstance(info.value, sa_exc.ArgumentError)  # what it raised before, still caught
    app = pgtq.App("postgresql://localhost/x")
    with pytest.raises(pgtq.ConfigurationError, match=FORM):
        app.use_dsn("localhost/mydb")


@pytest.mark.unit
def test_the_cli_says_the_expected_form_of_a_dsn_in_one_line() -> None:
    result = invoke("stats", "--dsn", "localhost/mydb")
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "'localhost/mydb'", FORM)


@pytest.mark.unit
def test_a_bad_dsn_over_an_apps_own_shows_the_expected_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dsn_app.py").write_text(
        "import pgtq\napp = pgtq.App('postgresql://localhost/x')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("stats", "--app", "dsn_app:app", "--dsn", "localhost/mydb")
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "'localhost/mydb'", FORM)
    assert "Could not parse" not in result.stderr


# -- wait: JobTimeout ----------------------------------------------------------------------------


async def test_wait_timeout_says_when_no_worker_of_the_queue_is_running(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    @app.task(queue="emails")
    def send() -> None: ...

    job_id = await side.defer(send)
    with pytest.raises(pgtq.JobTimeout) as info:
        await side.wait(app, job_id, timeout=0.05)
    message = str(info.value)
    assert f"job {job_id} did not finish within 0.05 s (status todo, queue 'emails')" in message
    assert "no worker of queue 'emails' beat in the last 30 s; is one running?" in message
    # A live worker of another queue does not count; one of every queue does.
    sql("INSERT INTO pgtq.workers (id, hostname, pid, queues) VALUES ('w1', 'h', 1, '{other}')")
    with pytest.raises(pgtq.JobTimeout, match="no worker of queue 'emails'"):
        await side.wait(app, job_id, timeout=0.05)
    sql("INSERT INTO pgtq.workers (id, hostname, pid, queues) VALUES ('w2', 'h', 2, NULL)")
    with pytest.raises(pgtq.JobTimeout) as info:
        await side.wait(app, job_id, timeout=0.05)
    assert "no worker" not in str(info.value) and "(status todo, queue 'emails')" in str(info.value)


# -- pgtq web on a busy port ---------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process listens on (this test's socket)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_web_on_a_busy_port_fails_in_one_line_before_its_banner(busy_port: int, dsn: str) -> None:
    pytest.importorskip("uvicorn")
    proc = run_pgtq("web", "--port", str(busy_port), "--read-only", dsn=dsn)
    assert proc.returncode == 1, proc.stderr
    assert_one_error_line(proc.stderr, f"cannot listen on 127.0.0.1:{busy_port}", "--port")
    assert "pgtq web: http" not in proc.stderr  # no banner: it never listened


# -- --help --------------------------------------------------------------------------------------


def _commands(command: Any, path: list[str]) -> Iterator[list[str]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, [*path, name])


@pytest.mark.unit
def test_no_help_shows_a_bool_metavar() -> None:
    """typer 0.29 renders ``<bool>`` beside every flag (``--help`` too): pyproject keeps
    typer below 0.29; this fails if a version or a declaration brings it back."""
    paths = list(_commands(typer.main.get_command(cli), []))
    assert ["queues", "pause"] in paths and ["worker"] in paths
    for path in paths:
        result = invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output.lower(), (path, result.output)
