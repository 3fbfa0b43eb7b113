"""pgtq's log as a command shows it: ``--log-level`` and ``--log-format rich|plain|json``.

Pure formatting over the standard :mod:`logging` module, nothing pgtq-specific to run it:
:func:`handler` builds a handler for a stream, :func:`logging_to` installs it on the ``pgtq``
logger for the duration of a ``with`` block (what ``pgtq worker`` does).

- ``rich``: Rich's coloured columns, for a person at a terminal (the default there);
- ``plain``: one line a record, ``2030-01-31T09:30:00.123+00:00 INFO pgtq.worker: ...``, no
  escape codes (the default when stderr is not a terminal: a file, a pipe, journald);
- ``json``: one JSON object a line for log shippers: ``timestamp``, ``level``, ``logger``,
  ``message``, then the record's ``extra`` fields (a job's ``job_id``, ``task``, ``queue``,
  ``attempt``, ``worker``, ``status``, ``duration``, ``error``...) and ``exception`` (its
  traceback) when there is one.

The level is set on the ``pgtq`` logger itself, so ``logger.isEnabledFor(logging.DEBUG)`` is
false at INFO and the worker builds no per-job record at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, Literal, TextIO, get_args

__all__ = [
    "FORMATS",
    "LEVELS",
    "JsonFormatter",
    "LogFormat",
    "PlainFormatter",
    "default_format",
    "handler",
    "logging_to",
    "parse_level",
]

#: How records are written: Rich columns, plain lines, or JSON lines.
LogFormat = Literal["rich", "plain", "json"]
FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
#: The level names ``--log-level`` takes (any case).
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: The attributes every LogRecord has: whatever else a record carries came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}


def parse_level(name: str | int) -> int:
    """A level number from its name (``info``, ``WARNING``) or number (``20``)."""
    if isinstance(name, int):
        return name
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    if text not in LEVELS:
        raise ValueError(f"unknown log level {name!r}: use one of {', '.join(LEVELS)}")
    level: int = logging.getLevelNamesMapping()[text]
    return level


def default_format(stream: TextIO) -> LogFormat:
    """Rich on a terminal, plain lines otherwise (a file, a pipe, a log collector)."""
    try:
        return "rich" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "plain"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record got from ``extra=``, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


def _timestamp(record: logging.LogRecord) -> str:
    """The record's time, ISO 8601 in UTC with milliseconds."""
    when = datetime.fromtimestamp(record.created, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    """A value ``json.dumps`` writes as strict JSON: NaN and infinities, and objects JSON has
    no type for (a datetime, a UUID, an exception), become their text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    try:
        return str(value)
    except Exception:  # an object whose __str__ fails is named by its type
        return f"<{type(value).__name__}>"


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    """One JSON object a record, on one line: ``timestamp`` (UTC), ``level``, ``logger``,
    ``message``, the ``extra`` fields, then ``exception`` and ``stack`` when present.

    An extra field named like one of those keys is kept under ``extra_NAME``.
    """

    BASE = ("timestamp", "level", "logger", "message", "exception", "stack")

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            line[f"extra_{key}" if key in self.BASE else key] = _jsonable(value)
        exception = _exception_text(self, record)
        if exception:
            line["exception"] = exception
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


class PlainFormatter(logging.Formatter):
    """``2030-01-31T09:30:00.123Z INFO pgtq.worker: message``, the traceback (if any) on the
    lines below; no colour, no escape codes, no wrapping."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        exception = _exception_text(self, record)
        if exception:
            text += "\n" + exception
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def handler(stream: TextIO, log_format: LogFormat | None = None) -> logging.Handler:
    """A handler writing to ``stream`` in ``log_format`` (default: :func:`default_format`)."""
    chosen = log_format or default_format(stream)
    if chosen == "rich":
        from rich.console import Console
        from rich.logging import RichHandler

        return RichHandler(
            console=Console(file=stream), show_path=False, markup=False, rich_tracebacks=False
        )
    if chosen not in FORMATS:
        raise ValueError(f"unknown log format {chosen!r}: use one of {', '.join(FORMATS)}")
    result = logging.StreamHandler(stream)
    result.setFormatter(JsonFormatter() if chosen == "json" else PlainFormatter())
    return result


@contextlib.contextmanager
def logging_to(
    stream: TextIO,
    *,
    level: int | str = logging.INFO,
    log_format: LogFormat | None = None,
    logger_name: str = "pgtq",
) -> Iterator[logging.Handler]:
    """Write the ``pgtq`` logger's records of ``level`` and above to ``stream`` while the block
    runs; the logger's level and handlers are restored after it."""
    installed = handler(stream, log_format)
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(parse_level(level))
    logger.addHandler(installed)
    try:
        yield installed
    finally:
        logger.removeHandler(installed)
        logger.setLevel(previous)
        with contextlib.suppress(Exception):
            installed.flush()
