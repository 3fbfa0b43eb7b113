"""The ``pgtq`` command never shows a traceback for an expected failure.

An unreachable database, a schema it cannot use, bad input, any pgtq error and any database
error reaching the command: each is exactly one line ``Error: ...`` on stderr and exit code 1.
Only an unexpected exception shows its traceback, and only with ``--debug``/``PGTQ_DEBUG=1``.
Most cases run in-process (CliRunner); the ones about what a terminal shows run ``python -m
pgtq`` in a process of its own.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL
from typer.testing import CliRunner, Result

from pgtq import migrations
from pgtq.cli import cli
from tests.conftest import libpq
from tests.test_cli import (
    APP,
    SQL,
    UNREACHABLE,
    fresh_app_modules,  # noqa: F401 - autouse: each run imports the sample apps anew
    run_pgtq,
)

HEAD = sorted(migrations.heads())[0]
BIGINT_OVERFLOW = str(2**63)


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env={"PGTQ_DSN": None, **(env or {})})


def one_error(result: Result | str, *fragments: str) -> str:
    """The one ``Error:`` line of stderr (nothing else there), with every fragment in it."""
    stderr = result if isinstance(result, str) else result.stderr
    if not isinstance(result, str):
        assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    (line,) = lines
    assert line.startswith("Error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


# -- the database -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "list"],
        ["jobs", "show", "1"],
        ["jobs", "cancel", "1"],
        ["queues", "list"],
        ["queues", "pause", "q"],
        ["stats"],
        ["migrate", "--check"],
        ["defer", APP, "add", '{"a": 1, "b": 2}'],
    ],
    ids=lambda args: "-".join(a for a in args if ":" not in a and "{" not in a),
)
def test_an_unreachable_database(args: list[str]) -> None:
    one_error(invoke(*args, "--dsn", UNREACHABLE), "cannot connect", "127.0.0.1:1")


def test_an_invalid_database_url() -> None:
    one_error(invoke("jobs", "list", "--dsn", "not a url"), "invalid database URL")


@pytest.fixture
def broken_schema(make_database: Callable[[], URL]) -> tuple[str, Callable[[str], None]]:
    """A schema ``broken`` recorded at this pgtq's head whose ``jobs`` table is not pgtq's:
    every query on it fails in PostgreSQL, past the schema check."""
    url = make_database()
    conn = psycopg.connect(libpq(url), autocommit=True)
    conn.execute("CREATE SCHEMA broken")
    conn.execute("CREATE TABLE broken.alembic_version (version_num varchar(32) PRIMARY KEY)")
    conn.execute("INSERT INTO broken.alembic_version VALUES (%s)", (HEAD,))
    conn.execute("CREATE TABLE broken.jobs (id bigint)")

    def stamp(revision: str) -> None:
        conn.execute("UPDATE broken.alembic_version SET version_num = %s", (revision,))

    return url.render_as_string(hide_password=False), stamp


def test_a_database_error_is_one_line_naming_the_statement(
    broken_schema: tuple[str, Callable[[str], None]],
) -> None:
    dsn, _ = broken_schema
    line = one_error(invoke("jobs", "list", "--schema", "broken", "--dsn", dsn))
    assert line.startswith("Error: database error in SELECT broken.jobs: "), line
    assert "does not exist" in line


def test_a_database_error_on_a_newer_schema_says_this_pgtq_is_older(
    broken_schema: tuple[str, Callable[[str], None]],
) -> None:
    dsn, stamp = broken_schema
    stamp("pgtq_9999")
    result = invoke("jobs", "show", "1", "--schema", "broken", "--dsn", dsn)
    assert result.exit_code == 1
    warning, error = result.stderr.splitlines()
    assert warning.startswith("Warning: the schema in 'broken' is at pgtq_9999, newer than")
    assert error.startswith("Error: database error in SELECT broken.jobs: ")
    assert error.endswith("this pgtq is older than the schema; upgrade pgtq)")
    assert "Traceback" not in result.output


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (['{"a": "x\\u0000y", "b": 2}'], "the value at a holds a NUL character"),
        (['{"a\\u0000": 1, "b": 2}'], "holds a NUL character"),
        (['{"a": [1, {"c": "\\ud800"}], "b": 2}'], "the value at a[1].c holds a lone surrogate"),
        (['{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"], "nested too deeply"),
        (['{"a": 1, "b": 2}', "--priority", "2147483648"], "--priority: must be between"),
        (['{"a": 1, "b": 2}', "--priority", "-2147483649"], "--priority: must be between"),
        (['{"a": 1, "b": 2}', "--in", "nan"], "--in: must be a finite number of seconds"),
        (['{"a": 1, "b": 2}', "--in", "inf"], "--in: must be a finite number of seconds"),
        (['{"a": 1, "b": 2}', "--in", "1e20"], "--in: 1e+20 seconds is too far away"),
        (['{"a": 1, "b": 2}', "--at", "0001-01-01T00:00"], "--at"),
        (['{"a": 1, "b": 2}', "--at", "tomorrow"], "not an ISO 8601 date and time"),
    ],
    ids=[
        "nul-value", "nul-key", "surrogate", "deep", "priority-high", "priority-low", "in-nan",
        "in-inf", "in-huge", "at-min", "at-text",
    ],
)  # fmt: skip
def test_defer_refuses_bad_input_before_writing(
    dsn: str, sql: SQL, args: list[str], fragment: str
) -> None:
    one_error(invoke("defer", APP, "add", *args, "--dsn", dsn), fragment)
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["jobs", "show", BIGINT_OVERFLOW], f"{BIGINT_OVERFLOW} is not a job id"),
        (["jobs", "abort", BIGINT_OVERFLOW], "is not a job id"),
        (["jobs", "retry", BIGINT_OVERFLOW], "is not a job id"),
        (["jobs", "cancel", BIGINT_OVERFLOW], "is not a job id"),
        (["jobs", "show", "--", "-1"], "-1 is not a job id"),
        (["jobs", "list", "--after", BIGINT_OVERFLOW], "--after: a job id between"),
        (["jobs", "list", "--limit", str(10**20)], "--limit: at most"),
    ],
)
def test_numbers_out_of_range_are_refused(dsn: str, args: list[str], fragment: str) -> None:
    if "--" in args:  # options go before the end of options
        cut = args.index("--")
        args = [*args[:cut], "--dsn", dsn, *args[cut:]]
    else:
        args = [*args, "--dsn", dsn]
    one_error(invoke(*args), fragment)


def test_a_pgtq_error_is_one_line(dsn: str) -> None:
    one_error(invoke("defer", APP, "nope", "--dsn", dsn), "nope")


# -- what a terminal shows ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["defer", APP, "add", '{"a": 1, "b": 2}', "--priority", "2147483648"],
        ["defer", APP, "add", '{"a": 1, "b": 2}', "--in", "nan"],
        ["defer", APP, "add", json.dumps({"a": "\x00", "b": 2})],
        ["defer", APP, "add", '{"a": ' + "[" * 20_000 + "]" * 20_000 + ', "b": 2}'],
        ["jobs", "show", BIGINT_OVERFLOW],
    ],
    ids=["priority", "in-nan", "nul", "deep", "job-id"],
)
def test_a_real_process_prints_one_line_and_exits_1(dsn: str, args: list[str]) -> None:
    proc = run_pgtq(*args, dsn=dsn)
    assert proc.returncode == 1, proc.stderr
    one_error(proc.stderr)


# -- unexpected exceptions ----------------------------------------------------------------------

FACTORY = """
def make_app():
    raise RuntimeError("the factory fell over")
"""


@pytest.fixture
def failing_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "failing_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("failing_factory", None)


def test_an_unexpected_exception_is_one_line_naming_its_type(
    dsn: str, failing_factory: Path
) -> None:
    line = one_error(invoke("worker", "failing_factory:make_app", "--one-shot", "--dsn", dsn))
    assert line == (
        "Error: unexpected RuntimeError: the factory fell over "
        "(run with --debug or PGTQ_DEBUG=1 for the traceback)"
    )


@pytest.mark.parametrize("switch", ["--debug", "-v", "PGTQ_DEBUG=1"])
def test_debug_shows_the_traceback(
    dsn: str, failing_factory: Path, switch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["worker", "failing_factory:make_app", "--one-shot"]
    if switch.startswith("-"):
        args.insert(0, switch)
    else:
        monkeypatch.setenv("PGTQ_DEBUG", "1")
    proc = run_pgtq(*args, dsn=dsn, cwd=failing_factory)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert "RuntimeError: the factory fell over" in proc.stderr
