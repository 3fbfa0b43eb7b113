"""pgtq's log on the command line: the formats of :mod:`pgtq.logs` (pure), then what
``pgtq worker --log-format ... --log-level ...`` writes to stderr (a real process, a real
database)."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from pgtq import logs
from pgtq.cli import cli
from tests.test_cli import invoke, run_pgtq

SQL = Callable[..., list[tuple[Any, ...]]]
NOOP = "tests.apps.noop:app"
ANSI = re.compile(r"\x1b\[")
PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ")


@pytest.fixture(autouse=True)
def fresh_app_modules() -> Iterator[None]:
    """Each in-process run imports the sample apps anew, as each real ``pgtq`` process does."""
    yield
    for name in [m for m in sys.modules if m.startswith("tests.apps.")]:
        del sys.modules[name]


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of pgtq's tree, left as it was found (level, handlers)."""
    named = logging.getLogger("pgtq.test_logs")
    yield named
    named.handlers.clear()
    named.setLevel(logging.NOTSET)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line, each parsed on its own (a line that is not JSON fails)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- the formats ----------------------------------------------------------------------------------


def test_json_lines_carry_the_extra_fields(logger: logging.Logger) -> None:
    stream = io.StringIO()
    with logs.logging_to(stream, level="DEBUG", log_format="json"):
        logger.debug("job %s done", 7, extra={"job_id": 7, "task": "add", "duration": 0.25})
        logger.warning("second\nline", extra={"attempt": 2, "queue": "q"})
    first, second = json_lines(stream.getvalue())
    assert first["level"] == "DEBUG"
    assert first["logger"] == "pgtq.test_logs"
    assert first["message"] == "job 7 done"
    assert (first["job_id"], first["task"], first["duration"]) == (7, "add", 0.25)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["timestamp"])
    assert "exception" not in first
    assert second["message"] == "second\nline"  # one line in the stream, escaped in the JSON
    assert (second["level"], second["attempt"], second["queue"]) == ("WARNING", 2, "q")


def test_json_carries_the_exception_text(logger: logging.Logger) -> None:
    stream = io.StringIO()
    with logs.logging_to(stream, log_format="json"):
        try:
            raise ValueError("bad input")
        except ValueError:
            logger.exception("it broke", extra={"job_id": 3})
    (line,) = json_lines(stream.getvalue())
    assert line["level"] == "ERROR"
    assert line["job_id"] == 3
    assert line["exception"].startswith("Traceback")
    assert "ValueError: bad input" in line["exception"]


def test_json_writes_any_extra_value_as_strict_json(logger: logging.Logger) -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    stream = io.StringIO()
    with logs.logging_to(stream, log_format="json"):
        logger.info(
            "odd values",
            extra={
                "nan": float("nan"),
                "inf": float("inf"),
                "obj": Opaque(),
                "nested": {"ids": (1, 2), 3: None},
                "level": "mine",  # named like a key of the record itself
                "text": "é \u2603",
            },
        )
    raw = stream.getvalue()
    (line,) = json.loads("[" + raw.strip() + "]")  # strict: no NaN literal could pass
    assert "NaN" not in raw and "Infinity" not in raw.replace('"inf"', "")
    assert (line["nan"], line["inf"], line["obj"]) == ("nan", "inf", "opaque!")
    assert line["nested"] == {"ids": [1, 2], "3": None}
    assert (line["level"], line["extra_level"]) == ("INFO", "mine")
    assert line["text"] == "é \u2603"


def test_plain_lines_have_no_escape_codes(logger: logging.Logger) -> None:
    stream = io.StringIO()  # not a terminal: plain is the default
    assert logs.default_format(stream) == "plain"
    with logs.logging_to(stream):
        logger.warning("job 1 failed: ValueError: [bold]x[/bold]", extra={"job_id": 1})
        try:
            raise RuntimeError("deep")
        except RuntimeError:
            logger.error("with a traceback", exc_info=True)
    text = stream.getvalue()
    assert not ANSI.search(text), text
    lines = text.splitlines()
    assert PLAIN_LINE.match(lines[0]), lines[0]
    assert lines[0].endswith("WARNING pgtq.test_logs: job 1 failed: ValueError: [bold]x[/bold]")
    assert "RuntimeError: deep" in text


def test_rich_only_on_a_terminal_or_when_asked() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.default_format(Terminal()) == "rich"
    assert logs.default_format(io.StringIO()) == "plain"
    assert type(logs.handler(io.StringIO())).__name__ == "StreamHandler"
    assert type(logs.handler(Terminal())).__name__ == "RichHandler"
    assert type(logs.handler(io.StringIO(), "rich")).__name__ == "RichHandler"
    with pytest.raises(ValueError, match="unknown log format"):
        logs.handler(io.StringIO(), "xml")  # type: ignore[arg-type]


def test_the_level_filters_and_is_restored(logger: logging.Logger) -> None:
    pgtq_logger = logging.getLogger("pgtq")
    before = pgtq_logger.level, list(pgtq_logger.handlers)
    stream = io.StringIO()
    with logs.logging_to(stream, level="warning", log_format="plain"):
        assert not logger.isEnabledFor(logging.INFO)
        logger.info("hidden")
        logger.warning("shown")
    with logs.logging_to(stream, level="INFO", log_format="plain"):
        # What the worker asks before it builds a per-job record: nothing at INFO.
        assert not logger.isEnabledFor(logging.DEBUG)
        assert logger.isEnabledFor(logging.INFO)
    assert (pgtq_logger.level, pgtq_logger.handlers) == before
    assert [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()] == [
        "WARNING pgtq.test_logs: shown"
    ]


@pytest.mark.parametrize(
    ("name", "level"), [("debug", 10), ("INFO", 20), ("Warning", 30), ("40", 40), (50, 50)]
)
def test_parse_level(name: str | int, level: int) -> None:
    assert logs.parse_level(name) == level


def test_parse_level_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        logs.parse_level("LOUD")


# -- pgtq worker ----------------------------------------------------------------------------------


def defer_noops_and_a_failure(dsn: str) -> None:
    for _ in range(3):
        assert invoke("defer", NOOP, "noop", dsn=dsn).exit_code == 0
    failing = invoke("defer", NOOP, "explode", '{"reason": "the disk is on fire"}', dsn=dsn)
    assert failing.exit_code == 0, failing.output


def test_worker_json_lines_parse_and_name_the_failure(dsn: str, sql: SQL) -> None:
    defer_noops_and_a_failure(dsn)
    proc = run_pgtq("worker", NOOP, "--one-shot", "--log-format", "json", dsn=dsn)
    assert proc.returncode == 0, proc.stderr
    lines = json_lines(proc.stderr)  # every line of stderr is a JSON object
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= line.keys(), line
    (failure,) = [line for line in lines if line.get("status") == "failed"]
    (job_id,) = sql("SELECT id FROM pgtq.jobs WHERE task_name = 'explode'")[0]
    assert failure["level"] == "WARNING"
    assert (failure["job_id"], failure["task"], failure["attempt"]) == (job_id, "explode", 1)
    assert failure["error"] == "ValueError"
    assert "ValueError: the disk is on fire" in failure["message"]
    assert "attempt 1" in failure["message"]
    # INFO: no line for each job that succeeded, but the start and the end of the run.
    assert not [line for line in lines if line.get("status") == "succeeded"]
    messages = [line["message"] for line in lines]
    assert any("started" in m for m in messages), messages
    assert any("processed 4 job(s)" in m for m in messages), messages


def test_worker_json_lines_name_a_retry_and_each_attempt(dsn: str) -> None:
    assert invoke("defer", NOOP, "flaky", dsn=dsn).exit_code == 0  # retried once, at once
    proc = run_pgtq("worker", NOOP, "--one-shot", "--log-format", "json", dsn=dsn)
    assert proc.returncode == 0, proc.stderr
    retried, failed = [line for line in json_lines(proc.stderr) if "job_id" in line]
    assert (retried["level"], retried["status"], retried["attempt"]) == ("INFO", "retried", 1)
    assert (failed["level"], failed["status"], failed["attempt"]) == ("WARNING", "failed", 2)
    for line in (retried, failed):
        assert (line["error"], line["error_message"]) == ("RuntimeError", "try again")
        assert f"attempt {line['attempt']} of 2" in line["message"]
        assert "RuntimeError: try again" in line["message"]


def test_worker_debug_level_logs_each_job(dsn: str) -> None:
    defer_noops_and_a_failure(dsn)
    proc = run_pgtq(
        "worker", NOOP, "--one-shot", "--log-format", "json", "--log-level", "debug", dsn=dsn
    )
    assert proc.returncode == 0, proc.stderr
    per_job = [line for line in json_lines(proc.stderr) if "job_id" in line]
    assert sorted(line["status"] for line in per_job) == ["failed"] + ["succeeded"] * 3
    assert all(line["level"] == "DEBUG" for line in per_job if line["status"] == "succeeded")


def test_worker_log_level_warning_keeps_only_the_failure(dsn: str) -> None:
    defer_noops_and_a_failure(dsn)
    proc = run_pgtq("worker", NOOP, "--one-shot", "--log-level", "WARNING", dsn=dsn)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert " WARNING pgtq.worker: " in lines[0]
    assert "ValueError: the disk is on fire" in lines[0]


def test_worker_on_a_pipe_writes_plain_lines(dsn: str) -> None:
    defer_noops_and_a_failure(dsn)
    proc = run_pgtq("worker", NOOP, "--one-shot", dsn=dsn)  # stderr is a pipe
    assert proc.returncode == 0, proc.stderr
    assert not ANSI.search(proc.stderr), proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(PLAIN_LINE.match(line) for line in lines), proc.stderr
    assert any("processed 4 job(s) (failed 1, succeeded 3)" in line for line in lines)


def test_worker_log_options_from_the_environment(dsn: str) -> None:
    defer_noops_and_a_failure(dsn)
    env = {"PGTQ_DSN": dsn, "PGTQ_LOG_FORMAT": "json", "PGTQ_LOG_LEVEL": "error"}
    result: Result = CliRunner().invoke(cli, ["worker", NOOP, "--one-shot"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == ""  # nothing at ERROR


def test_worker_refuses_an_unknown_format(dsn: str) -> None:
    result = invoke("worker", NOOP, "--one-shot", "--log-format", "xml", dsn=dsn)
    assert result.exit_code == 2
    assert "xml" in result.output
