"""The ``pgtq`` command: run workers, defer jobs, migrate, inspect jobs, try the demo.

A face over the public API, nothing more. Every failure of a command becomes one line
``Error: ...`` on stderr and exit code 1, in one place (:class:`_Root`, around every command):
pgtq's errors already say what to do next, a database error is named in a line, and an
unexpected exception is named by its type, so a traceback would only hide the message
(``--debug``/``-v`` or ``PGTQ_DEBUG=1`` shows it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import functools
import importlib
import inspect
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Concatenate, Literal, ParamSpec, cast

import typer
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from typer.core import TyperGroup

from pgtq import logs
from pgtq.app import DSN_ENV, App
from pgtq.connectors import describe
from pgtq.errors import ConfigurationError, JobIsRunning, JobNotFound, PgtqError
from pgtq.jobs import JobSelection, running_progress
from pgtq.model import Job, Status
from pgtq.schema import DEFAULT_SCHEMA

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from pgtq.reports import PeriodicInfo, Stats
    from pgtq.revisions import SchemaStatus

__all__ = ["AppNotFound", "cli", "load_app", "load_object", "main"]

#: Set to 1 to see the traceback of a failure (as ``--debug`` does).
DEBUG_ENV = "PGTQ_DEBUG"


class _Root(TyperGroup):
    """The ``pgtq`` group: every command runs inside :func:`_reporting_errors`, so no
    command can forget it (its subcommands and their parameter callbacks included)."""

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context
        with _reporting_errors():
            return super().invoke(ctx)


cli = typer.Typer(
    name="pgtq",
    help="pgtq: a PostgreSQL task queue.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Root,
)
jobs_cli = typer.Typer(help="Inspect and control jobs.", no_args_is_help=True)
cli.add_typer(jobs_cli, name="jobs")
queues_cli = typer.Typer(help="Pause and resume queues.", no_args_is_help=True)
cli.add_typer(queues_cli, name="queues")
periodic_cli = typer.Typer(
    help="List the periodic schedules; pause, resume or run one now.", no_args_is_help=True
)
cli.add_typer(periodic_cli, name="periodic")


class _Output:
    """A Rich console made at its first use: ``pgtq worker`` never prints through one, and
    importing Rich would add ~50 ms to the start of every command."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, highlight=False)
        return self._console

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)


out = _Output(stderr=False)
err = _Output(stderr=True)


#: When the embedded PostgreSQL is a command's last resort for a database.
Embedded = Literal["always", "if-present"]


class AppNotFound(ConfigurationError):
    """``MODULE:APP`` did not lead to a ``pgtq.App``."""


@dataclass
class _State:
    verbose: bool = False
    #: The schema the command checked (a database error on a newer schema says so).
    schema: SchemaStatus | None = None


_state = _State()


# -- options shared by several commands ----------------------------------------------------------

DsnOption = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar=DSN_ENV,
        show_envvar=True,
        help="Database URL (default: PGTQ_DSN, else the app's own).",
    ),
]
SchemaOption = Annotated[
    str | None, typer.Option("--schema", help="pgtq's PostgreSQL schema (default: pgtq).")
]
AppOption = Annotated[
    str | None,
    typer.Option("--app", metavar="MODULE:APP", help="Take the database and schema from an app."),
]
AppArgument = Annotated[
    str, typer.Argument(metavar="MODULE:APP", help="Where the app is, e.g. myproject.tasks:app.")
]


def _optional_app(help: str) -> Any:
    """The ``[MODULE:APP]`` argument of a command that also runs on ``--dsn`` alone."""
    return typer.Argument(metavar="[MODULE:APP]", help=help)


FactoryArgument = Annotated[
    str,
    typer.Argument(
        metavar="MODULE:APP",
        help="The app, or a factory of it (a callable returning an App, or a context manager "
        "of one, sync or async), e.g. myproject.tasks:app or myproject.tasks:make_app.",
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document on stdout (for scripts) instead of a table."
    ),
]


# -- errors ---------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """One printable line: whitespace runs folded, control characters and lone surrogates
    escaped (a NUL from the user's input must not reach the terminal, a surrogate would not
    even encode)."""
    folded = " ".join(text.split())
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in folded)


def _labelled(label: str, style: str, message: str) -> None:
    from rich.text import Text

    err.print(Text.assemble((label, style), _one_line(message)), soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    _labelled("Error: ", "bold red", message)
    return typer.Exit(code)


def _warn(message: str) -> None:
    _labelled("Warning: ", "bold yellow", message)


def _debugging() -> bool:
    """``--debug``/``-v``, or ``PGTQ_DEBUG=1`` (read here too: a failure may come before the
    root callback ran)."""
    return _state.verbose or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc).strip() or type(exc).__name__
    except Exception:  # an exception whose __str__ fails is named by its type
        text = type(exc).__name__
    return text.splitlines()[0]


_STATEMENT_TARGET = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+([\w.\"]+)", re.IGNORECASE)


def _statement_name(statement: str | None) -> str:
    """``SELECT pgtq.jobs``, ``INSERT INTO pgtq.jobs``: what the failed statement did."""
    words = (statement or "").split()
    if not words:
        return "a statement"
    target = _STATEMENT_TARGET.search(statement or "")
    verb = words[0].upper()
    return f"{verb} {target.group(1).replace(chr(34), '')}" if target else verb


def _database_error(exc: sa_exc.StatementError) -> str:
    """One line naming the statement that failed and why (and a newer schema as the likely
    cause, when the command found one)."""
    what = _statement_name(exc.statement)
    if isinstance(exc, sa_exc.DBAPIError):
        message = f"database error in {what}: {_first_line(exc.orig or exc)}"
    else:  # a value SQLAlchemy or the driver refused before sending it
        orig = exc.orig if exc.orig is not None else exc
        message = f"invalid value for {what}: {type(orig).__name__}: {_first_line(orig)}"
    if _state.schema is not None and _state.schema.state == "ahead":
        message += f" ({_state.schema.message})"
    return message


@contextlib.contextmanager
def _reporting_errors() -> Iterator[None]:
    """Every failure as one line on stderr and exit code 1 (``--debug``: the traceback).

    :class:`_Root` runs every command inside it; typer's own exits and usage errors pass.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except KeyboardInterrupt:
        err.print("Interrupted.")
        raise typer.Exit(130) from None
    except Exception as exc:
        if _debugging():
            raise
        raise _fail(_describe_failure(exc)) from None


def _describe_failure(exc: Exception) -> str:
    if isinstance(exc, PgtqError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, sa_exc.ArgumentError):  # a DSN SQLAlchemy cannot parse
        return f"invalid database URL: {exc}"
    if isinstance(exc, sa_exc.StatementError):
        return _database_error(exc)
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return f"database error: {_first_line(exc)}"
    return (
        f"unexpected {type(exc).__name__}: {_first_line(exc)} "
        f"(run with --debug or {DEBUG_ENV}=1 for the traceback)"
    )


# -- apps and databases ---------------------------------------------------------------------------


def load_app(path: str) -> App:
    """Import ``module:attribute`` (the current directory first on ``sys.path``) as a pgtq App."""
    obj = load_object(path)
    if not isinstance(obj, App):
        if callable(obj):
            raise AppNotFound(
                f"{path!r} is not a pgtq.App but a callable: only `pgtq worker` calls app "
                "factories; point this command at the app itself"
            )
        raise AppNotFound(f"{path!r} is not a pgtq.App (got {type(obj).__name__})")
    return obj


def load_object(path: str) -> Any:
    """Import ``module:attribute`` (the current directory first on ``sys.path``)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise AppNotFound(
            f"{path!r} is not an app path: write MODULE:ATTRIBUTE, e.g. myproject.tasks:app"
        )
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        missing = (exc.name or "") if isinstance(exc, ModuleNotFoundError) else ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise AppNotFound(
                f"cannot import {module_name!r} (from {path!r}): no module named {missing!r} "
                f"in {cwd} or on sys.path"
            ) from exc
        raise AppNotFound(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc} "
            "(run with -v for the traceback)"
        ) from exc
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppNotFound(
                f"module {module_name!r} has no attribute {attribute!r} (from {path!r})"
            ) from None
    return obj


def _has_database(app: App) -> bool:
    try:
        app.url  # noqa: B018 - raises when the app has no DSN and no engine
    except ConfigurationError:
        return False
    return True


def _use_dsn(app: App, dsn: str | URL | None) -> None:
    """Point a loaded app at the database ``--dsn`` / ``PGTQ_DSN`` names (unless it is there)."""
    if dsn and not (_has_database(app) and _same_url(app.url, dsn)):
        app.use_dsn(dsn)  # a DSN that is no URL fails here, showing the expected form


def _same_url(url: URL, dsn: str | URL) -> bool:
    try:
        return url == make_url(dsn)
    except sa_exc.ArgumentError:
        return False


def _embedded_url() -> str:
    """Start (or reuse) the embedded PostgreSQL, saying so on stderr: never a silent fallback."""
    from pgtq import embedded

    dsn = embedded.embedded_dsn()
    err.print(embedded.notice(), soft_wrap=True, markup=False)
    return dsn


@contextlib.contextmanager
def _app_for(
    dsn: str | None,
    app_path: str | None,
    schema: str | None,
    *,
    embedded: Embedded = "if-present",
    check_schema: bool = True,
) -> Iterator[App]:
    """The app a command works on , closed when the block ends;
    its schema checked first (:func:`_require_schema`) unless ``check_schema=False``.

    An app loaded from ``--app`` but given another ``--schema`` is pointed at it for the
    command (``App.pointed_at``): its tasks and settings (prepared statements, listen DSN,
    connection cap) stay its own."""
    app = load_app(app_path) if app_path else App(None, schema=schema or DEFAULT_SCHEMA)
    with contextlib.ExitStack() as stack:
        if schema is not None and schema != app.schema:
            stack.enter_context(app.pointed_at(schema=schema))
        _with_database(app, dsn, app_path, embedded=embedded)
        yield stack.enter_context(_checked(app, check_schema))


@contextlib.contextmanager
def _checked(app: App, check_schema: bool = True) -> Iterator[App]:
    """``app``, its schema checked first (unless ``check_schema=False``), closed after."""
    try:
        if check_schema:
            _require_schema(app)
        yield app
    finally:
        app.close()


P = ParamSpec("P")

#: The options every command on one app's database takes, after its own.
_DATABASE_OPTIONS = (("dsn", DsnOption), ("app_path", AppOption), ("schema", SchemaOption))


def _on_app(command: Callable[Concatenate[App, P], None]) -> Callable[P, None]:
    """A command on one app's database: it takes ``--dsn``, ``--app`` and ``--schema`` after
    its own options, and runs on the app they name (:func:`_app_for`: its schema checked,
    closed after), given as its first argument."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
    common = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)
        for name, option in _DATABASE_OPTIONS
    ]

    call: Callable[..., None] = command

    @functools.wraps(command)
    def run(**options: Any) -> None:
        dsn, app_path, schema = (options.pop(name) for name, _ in _DATABASE_OPTIONS)
        with _app_for(dsn, app_path, schema) as app:
            call(app, **options)

    run.__signature__ = inspect.Signature([*own, *common])  # type: ignore[attr-defined]
    return cast(Callable[P, None], run)


def _existing_job(app: App, job_id: int) -> Job:
    """The job, else JobNotFound naming the database."""
    job = app.jobs.get(job_id)
    if job is None:
        raise JobNotFound(f"no job with id {job_id} at {describe(app.url)}")
    return job


def _require_schema(app: App) -> None:
    """Refuse a schema this pgtq cannot use, with the command to run; warn on a newer one.

    Done before a command touches the jobs, so that "column ... does not exist" is never
    the first thing a user sees (see :func:`pgtq.revisions.require_schema`).
    """
    from pgtq import revisions

    _state.schema = app.sync.run_in_transaction(
        lambda conn: revisions.require_schema(conn, app.schema)
    )
    if _state.schema.state == "ahead":
        _warn(_state.schema.message)


def _with_database(app: App, dsn: str | None, app_path: str | None, *, embedded: Embedded) -> App:
    """Give the app its database: ``--dsn``/``PGTQ_DSN``, else its own, else the embedded one.

    ``embedded`` says when the embedded PostgreSQL is the last resort: ``"always"`` (started
    if need be: ``pgtq migrate --embedded``) or ``"if-present"`` (only when ./.pgtq already
    holds one, as after ``pgtq migrate --embedded`` or ``pgtq demo``).
    """
    from pgtq import embedded as embedded_pg

    _use_dsn(app, dsn)
    if not _has_database(app) and (
        embedded == "always" or (embedded == "if-present" and embedded_pg.is_initialized())
    ):
        _use_dsn(app, _embedded_url())
    if not _has_database(app):
        where = f"{app_path} has no DSN: " if app_path else ""
        raise ConfigurationError(
            f"no database configured: {where}pass --dsn or set {DSN_ENV} "
            "(postgresql://user:password@host:5432/dbname), or run `pgtq migrate --embedded` "
            f"for an embedded PostgreSQL in {embedded_pg.DEFAULT_PATH}"
        )
    return app


@contextlib.contextmanager
def _logging_to_stderr(
    level: str | None = None, log_format: logs.LogFormat | None = None
) -> Iterator[None]:
    """Show pgtq's log (worker start and stop, failures, summaries) on stderr while a command
    runs: at ``level`` (default INFO, DEBUG with ``--debug``), in ``log_format`` (default: Rich
    on a terminal, plain lines otherwise). See :mod:`pgtq.logs`."""
    chosen = level or ("DEBUG" if _state.verbose else "INFO")
    with logs.logging_to(sys.stderr, level=chosen, log_format=log_format):
        yield


# -- commands -------------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        from pgtq import __version__

        out.print(f"pgtq {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(
    verbose: Annotated[
        bool,
        typer.Option(
            "--debug",
            "--verbose",
            "-v",
            envvar=DEBUG_ENV,
            show_envvar=True,
            help="Show the traceback of a failure (else one line: Error: ...) and debug logs.",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """pgtq: a PostgreSQL task queue."""
    _state.verbose = verbose
    _state.schema = None


# -- pgtq worker ----------------------------------------------------------------------------------
# Each of the Worker's options as a flag, declared once. None means "not given": the app's
# ``worker_options``, then the Worker's own default, apply (the defaults named in the help).


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormatChoice(enum.StrEnum):
    RICH = "rich"
    PLAIN = "plain"
    JSON = "json"


class DeleteJobs(enum.StrEnum):
    NEVER = "never"
    SUCCESSFUL = "successful"
    ALWAYS = "always"


def _finite(value: float | None) -> float | None:
    """An interval must be a number of seconds (not nan, not inf)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number of seconds, not {value}")
    return value


QueuesOption = Annotated[
    list[str] | None,
    typer.Option("--queue", "-q", help="A queue to take jobs from (repeat; default: all)."),
]
ConcurrencyOption = Annotated[
    int | None,
    typer.Option("--concurrency", "-c", min=1, help="Jobs run at the same time (default: 10)."),
]
BatchSizeOption = Annotated[
    int | None,
    typer.Option(
        "--batch-size", min=1, help="Jobs claimed per query (default: concurrency, at most 100)."
    ),
]
PrefetchOption = Annotated[
    int | None,
    typer.Option(
        "--prefetch",
        min=0,
        help="Jobs claimed ahead of free slots, so claims overlap running jobs (default: the "
        "batch size; 0: claim only for free slots).",
    ),
]
OneShotOption = Annotated[
    bool, typer.Option("--one-shot", help="Run the jobs that are due, then exit.")
]
ProcessesOption = Annotated[
    int,
    typer.Option(
        "--processes",
        min=1,
        help="Worker processes, each a full worker (own id, heartbeat, connections) under one "
        "supervisor that forwards SIGTERM/SIGINT and restarts one that dies: one per core for "
        "CPU-bound sync tasks (default: 1, this process).",
    ),
]


def _seconds(flag: str, help: str, *, least: float = 0.01, finite: bool = True) -> Any:
    """A worker option taking seconds: at least ``least``, finite unless ``finite`` is False."""
    return typer.Option(flag, min=least, callback=_finite if finite else None, help=help)


FetchIntervalOption = Annotated[
    float | None,
    _seconds(
        "--fetch-job-polling-interval",
        "Seconds between polls when no NOTIFY arrives (default: 5).",
    ),
]
AbortIntervalOption = Annotated[
    float | None,
    _seconds(
        "--abort-job-polling-interval", "Seconds between checks for aborted jobs (default: 1)."
    ),
]
GracefulTimeoutOption = Annotated[
    float | None,
    _seconds(
        "--shutdown-graceful-timeout",
        "On SIGTERM/SIGINT, seconds running jobs get (default: 30; inf: no limit).",
        least=0,
        finite=False,
    ),
]
HeartbeatOption = Annotated[
    float | None,
    _seconds("--heartbeat-interval", "Seconds between the worker's heartbeats (default: 5)."),
]
RescueAfterOption = Annotated[
    float | None,
    _seconds(
        "--rescue-after",
        "Seconds of silence after which a worker is dead and its running jobs are put back by a "
        "live one (default: 30; keep it well above --heartbeat-interval).",
    ),
]
SummaryIntervalOption = Annotated[
    float | None,
    _seconds(
        "--summary-interval",
        "Seconds between the INFO line that sums up the worker's work: jobs/s, failed, running "
        "(default: 60; 0: never).",
        least=0,
    ),
]
DeleteJobsOption = Annotated[
    DeleteJobs | None,
    typer.Option(
        "--delete-jobs",
        help="Delete jobs as they end instead of keeping them: successful ones, or all "
        "(default: never; their history stays in job_events).",
    ),
]
NameOption = Annotated[
    str | None,
    typer.Option(
        "--name",
        help="The worker's id, as the workers table, jobs and logs show it; unique among live "
        "workers (default: host-pid-random).",
    ),
]
PeriodicOption = Annotated[
    bool | None,
    typer.Option(
        "--periodic/--no-periodic",
        help="Run the periodic tasks' scheduler too (default: yes, unless --one-shot).",
        show_default=False,
    ),
]
MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=0,
        max=65535,
        help="Serve Prometheus metrics on this port (needs the prometheus extra).",
    ),
]
MetricsAddrOption = Annotated[
    str, typer.Option("--metrics-addr", help="Address the metrics server listens on.")
]
LogLevelOption = Annotated[
    LogLevel | None,
    typer.Option(
        "--log-level",
        case_sensitive=False,
        envvar="PGTQ_LOG_LEVEL",
        show_envvar=True,
        help="Log records of this level and above (default: INFO; DEBUG with --debug): DEBUG "
        "adds a line per job.",
    ),
]
LogFormatOption = Annotated[
    LogFormatChoice | None,
    typer.Option(
        "--log-format",
        case_sensitive=False,
        envvar="PGTQ_LOG_FORMAT",
        show_envvar=True,
        help="rich (columns, colours), plain (a line a record) or json (an object a line, with "
        "the records' extra fields). Default: rich on a terminal, plain otherwise.",
    ),
]


def _worker_defaults() -> dict[str, Any]:
    """The Worker's own defaults (what a flag not given and not in worker_options means)."""
    import inspect

    from pgtq.worker import Worker

    return {
        name: p.default
        for name, p in inspect.signature(Worker.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@cli.command()
def worker(
    app_path: FactoryArgument,
    factory_args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="-- ARGS",
            help="Arguments for a factory, after --: passed to it as strings.",
            show_default=False,
        ),
    ] = None,
    queue: QueuesOption = None,
    concurrency: ConcurrencyOption = None,
    batch_size: BatchSizeOption = None,
    prefetch: PrefetchOption = None,
    one_shot: OneShotOption = False,
    processes: ProcessesOption = 1,
    fetch_job_polling_interval: FetchIntervalOption = None,
    abort_job_polling_interval: AbortIntervalOption = None,
    shutdown_graceful_timeout: GracefulTimeoutOption = None,
    heartbeat_interval: HeartbeatOption = None,
    rescue_after: RescueAfterOption = None,
    summary_interval: SummaryIntervalOption = None,
    delete_jobs: DeleteJobsOption = None,
    name: NameOption = None,
    periodic: PeriodicOption = None,
    metrics_port: MetricsPortOption = None,
    metrics_addr: MetricsAddrOption = "0.0.0.0",
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
    dsn: DsnOption = None,
) -> None:
    """Run a worker until SIGTERM/SIGINT (or, with --one-shot, until no job is due).

    MODULE:APP may name a factory: a callable returning the app, or a context manager (sync
    or async) yielding it, entered before the worker starts and exited after it stops. The
    arguments after -- are passed to it, e.g. `pgtq worker myapp:make_app -- --env prod`.
    A flag not given leaves the app's worker_options, then the worker's default.
    """
    from pgtq import factories

    factory = load_object(app_path)
    if not isinstance(factory, App) and not callable(factory):
        raise AppNotFound(
            f"{app_path!r} is not a pgtq.App nor a factory of one (got {type(factory).__name__})"
        )
    if processes > 1:  # children run this command again, less --processes (pgtq.supervisor)
        from pgtq import supervisor

        with _logging_to_stderr(
            log_level.value if log_level is not None else None,
            log_format.value if log_format is not None else None,
        ):
            code = supervisor.run_processes(
                processes, sys.argv[1:], name=name, metrics_port=metrics_port
            )
        raise typer.Exit(code)
    given: dict[str, Any] = {
        "queues": list(queue) if queue else None,
        "concurrency": concurrency,
        "batch_size": batch_size,
        "prefetch": prefetch,
        "fetch_job_polling_interval": fetch_job_polling_interval,
        "abort_job_polling_interval": abort_job_polling_interval,
        "heartbeat_interval": heartbeat_interval,
        "rescue_after": rescue_after,
        "delete_jobs": delete_jobs.value if delete_jobs is not None else None,
        "worker_id": name,
        "periodic": periodic,
    }
    options = {key: value for key, value in given.items() if value is not None}
    if summary_interval is not None:  # 0: never, which the worker calls None
        options["summary_interval"] = summary_interval or None
    if shutdown_graceful_timeout is not None:  # inf: no limit, which the worker calls None
        options["shutdown_graceful_timeout"] = (
            None if math.isinf(shutdown_graceful_timeout) else shutdown_graceful_timeout
        )
    log = logging.getLogger("pgtq.cli")
    metrics_servers: list[Any] = []

    def on_open(app: App) -> None:
        _with_database(app, dsn, app_path, embedded="if-present")
        effective = {**_worker_defaults(), **app.worker_options, **options}
        # /healthz: this worker is alive while its heartbeat is younger than what makes the
        # others rescue its jobs (and at least three beats, so one slow beat is not fatal).
        max_age = max(effective["rescue_after"], 3 * effective["heartbeat_interval"])
        metrics_servers.append(_serve_metrics(app, metrics_port, metrics_addr, max_age))
        queues = effective.get("queues")
        log.info(
            "pgtq worker: %s task(s) from %s, queues %s, concurrency %s, database %s",
            len(app.tasks),
            app_path,
            ", ".join(queues) if queues else "all",
            effective.get("concurrency"),
            describe(app.url),
            extra={
                "app": app_path,
                "tasks": len(app.tasks),
                "queues": list(queues) if queues else None,
                "concurrency": effective.get("concurrency"),
                "database": describe(app.url),
            },
        )

    with _logging_to_stderr(
        log_level.value if log_level is not None else None,
        log_format.value if log_format is not None else None,
    ):
        try:
            stats = factories.run_worker(
                factory,
                *(factory_args or ()),
                on_open=on_open,
                wait=not one_shot,
                install_signal_handlers=True,
                **options,
            )
        finally:
            for server in metrics_servers:
                if server is not None:
                    server.shutdown()
        detail = ", ".join(f"{status} {n}" for status, n in sorted(stats.by_status.items()))
        log.info(
            "pgtq worker: processed %s job(s)%s in %.2f s",
            stats.processed,
            f" ({detail})" if detail else "",
            stats.elapsed,
            extra={
                "processed": stats.processed,
                "by_status": dict(stats.by_status),
                "elapsed": stats.elapsed,
            },
        )


def _serve_metrics(app: App, port: int | None, addr: str, max_age: float) -> Any:
    """Start the ``/metrics`` server of ``--metrics-port`` (None without it)."""
    if port is None:
        return None
    try:
        from pgtq import metrics
    except ImportError as exc:
        raise ConfigurationError(f"--metrics-port: {exc}") from None
    try:
        server = metrics.serve(app, port, addr, max_age=max_age)
    except OSError as exc:
        raise ConfigurationError(f"--metrics-port: cannot listen on {addr}:{port}: {exc}") from None
    logging.getLogger("pgtq.cli").info(
        "pgtq worker: metrics on http://%s:%s/metrics",
        addr,
        server.server_port,
        extra={"metrics_addr": addr, "metrics_port": server.server_port},
    )
    return server


class _InvalidJson(PgtqError, ValueError):
    """The ``defer`` arguments are not a JSON object."""


def parse_arguments(text: str) -> dict[str, Any]:
    """The JSON object of keyword arguments given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _InvalidJson(
            f"the task arguments are not valid JSON ({exc}): give an object such as "
            """'{"to": "a@example.com"}'"""
        ) from None
    except RecursionError:
        raise _InvalidJson("the task arguments are nested too deeply to be read") from None
    if not isinstance(value, dict):
        raise _InvalidJson(
            f"the task arguments must be a JSON object of keyword arguments, "
            f"""such as '{{"to": "a@example.com"}}', not a JSON {type(value).__name__}"""
        )
    _check_storable(value)
    return value


def _check_storable(arguments: dict[str, Any]) -> None:
    """Refuse text PostgreSQL cannot store in ``jsonb`` (a NUL, ``\\u0000``; a lone surrogate,
    ``\\ud800``), naming where it is. Iterative: deep input must not overflow the stack."""
    stack: list[tuple[str, Any]] = [("", arguments)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(f"{path}.{key}" if path else key, key, "key")
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(path, value, "value")


def _check_text(path: str, text: str, what: str) -> None:
    if "\x00" in text:
        raise _InvalidJson(
            f"the task arguments: the {what} at {_one_line(path)!s} holds a NUL character "
            "(\\u0000), which PostgreSQL cannot store"
        )
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise _InvalidJson(
            f"the task arguments: the {what} at {_one_line(path)!s} holds a lone surrogate "
            "(\\ud800-\\udfff), which is not valid Unicode text"
        )


def parse_datetime(text: str, flag: str = "--at") -> datetime:
    """``--at``, ``--before``, ``--since``: an ISO 8601 date and time; without an offset it is
    the local time."""
    try:
        value = datetime.fromisoformat(text)
        return value if value.tzinfo is not None else value.astimezone()
    except (ValueError, OverflowError):
        raise _InvalidJson(
            f"{flag} {text!r} is not an ISO 8601 date and time, such as 2030-01-31T09:30 "
            "or 2030-01-31T09:30:00+01:00"
        ) from None


#: PostgreSQL's ``integer`` (priorities) and ``bigint`` (job ids, limits).
INT4 = (-(2**31), 2**31 - 1)
INT8_MAX = 2**63 - 1


class _BadOption(PgtqError, ValueError):
    """A number given on the command line that pgtq cannot use."""


def _checked_priority(priority: int | None) -> int | None:
    if priority is not None and not INT4[0] <= priority <= INT4[1]:
        raise _BadOption(f"--priority: must be between {INT4[0]} and {INT4[1]}, not {priority}")
    return priority


def _checked_seconds(seconds: float | None) -> float | None:
    """``--in``: finite, and a time a datetime can hold."""
    if seconds is None:
        return None
    if not math.isfinite(seconds):
        raise _BadOption(f"--in: must be a finite number of seconds, not {seconds}")
    try:
        datetime.now(UTC) + timedelta(seconds=seconds)
    except OverflowError:
        raise _BadOption(f"--in: {seconds:g} seconds is too far away") from None
    return seconds


def _checked_id(value: int) -> int:
    """``ID``: a job id is a positive PostgreSQL ``bigint``."""
    if not 1 <= value <= INT8_MAX:
        raise _BadOption(f"{value} is not a job id: ids are between 1 and {INT8_MAX}")
    return value


def _checked_after(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= INT8_MAX:
        raise _BadOption(f"--after: a job id between 0 and {INT8_MAX}, not {value}")
    return value


JobIdArgument = Annotated[int, typer.Argument(metavar="ID", callback=_checked_id)]


def _checked_ids(values: list[int] | None) -> list[int] | None:
    return None if values is None else [_checked_id(value) for value in values]


JobIdsArgument = Annotated[
    list[int] | None,
    typer.Argument(
        metavar="[ID]...",
        callback=_checked_ids,
        show_default=False,
        help="Job ids (with filters: those of them the filters select). One id alone: that "
        "job, no question asked.",
    ),
]


def _checked_limit(value: int) -> int:
    if value > INT8_MAX:
        raise _BadOption(f"--limit: at most {INT8_MAX}, not {value}")
    return value


class OnConflictChoice(enum.StrEnum):
    RAISE = "raise"
    SKIP = "skip"
    REPLACE = "replace"


def _parse_meta(text: str | None) -> dict[str, Any] | None:
    """``--meta``: a JSON object (what else it must be, ``configure(meta=)`` checks)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise _InvalidJson(f"--meta: not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise _InvalidJson(f"--meta: must be a JSON object, not a JSON {type(value).__name__}")
    return value


@cli.command()
def defer(
    app_path: AppArgument,
    task_name: Annotated[str, typer.Argument(metavar="TASK", help="The task's name.")],
    arguments: Annotated[
        str, typer.Argument(metavar="JSON", help="""Keyword arguments, e.g. '{"to": "a@x"}'.""")
    ] = "{}",
    queue: Annotated[str | None, typer.Option(help="Queue (default: the task's).")] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first.")] = None,
    lock: Annotated[str | None, typer.Option(help="Jobs sharing it never run together.")] = None,
    queueing_lock: Annotated[
        str | None, typer.Option(help="At most one waiting job with this key.")
    ] = None,
    on_conflict: Annotated[
        OnConflictChoice,
        typer.Option(
            "--on-conflict",
            case_sensitive=False,
            help="With --queueing-lock, when a job holds the key: raise (an error), skip (print "
            "its id) or replace (its arguments, schedule and priority).",
        ),
    ] = OnConflictChoice.RAISE,
    unique_for: Annotated[
        float | None,
        typer.Option(
            "--unique-for",
            metavar="SECONDS",
            help="With --queueing-lock: the key is unique per period of this length, whatever "
            "became of the job (but failed or ended early).",
        ),
    ] = None,
    tags: Annotated[
        list[str] | None,
        typer.Option("--tag", metavar="TAG", help="A label for people and filters (repeatable)."),
    ] = None,
    meta: Annotated[
        str | None,
        typer.Option("--meta", metavar="JSON", help="A JSON object stored with the job."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", metavar="SECONDS", help="This job's own time limit (default: the task's)."
        ),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            "--max-attempts", help="This job's own attempt budget (default: the task's retry)."
        ),
    ] = None,
    schedule_in: Annotated[
        float | None, typer.Option("--in", metavar="SECONDS", help="Run no sooner than this.")
    ] = None,
    schedule_at: Annotated[
        str | None,
        typer.Option(
            "--at",
            metavar="DATETIME",
            help="Run no sooner than this ISO 8601 time (local time unless it has an offset).",
        ),
    ] = None,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
) -> None:
    """Defer one job of a task and print its id, and whether it is that of a job holding
    its --queueing-lock already (--json: just the id, a JSON number)."""
    app = load_app(app_path)
    task = app.get_task(task_name)
    kwargs = parse_arguments(arguments)
    deferrer = task.configure(
        queue=queue,
        priority=_checked_priority(priority),
        lock=lock,
        queueing_lock=queueing_lock,
        on_conflict=on_conflict.value,
        unique_for=unique_for,
        schedule_in=_checked_seconds(schedule_in),
        schedule_at=parse_datetime(schedule_at) if schedule_at is not None else None,
        tags=tags or None,
        meta=_parse_meta(meta),
        timeout=timeout,
        max_attempts=max_attempts,
    )
    # Validates the arguments before any connection is made.
    deferrer.encode([kwargs])
    with _checked(_with_database(app, dsn, app_path, embedded="if-present")):
        if queue is not None:
            _warn_unknown_queue(app, deferrer.options.queue)
        job_id = deferrer.defer_many([kwargs])[0]
    if as_json:
        _print_json(int(job_id))
        return
    if getattr(job_id, "duplicate", False):
        done = (
            "its arguments, schedule and priority replaced"
            if on_conflict is OnConflictChoice.REPLACE
            else "kept as it is"
        )
        out.print(
            f"Duplicate: job {job_id} holds queueing lock {queueing_lock!r} already, {done} "
            f"(no new job of {task.name})",
            soft_wrap=True,
        )
        return
    out.print(
        f"Deferred {task.name} as job {job_id} on queue {deferrer.options.queue!r}",
        soft_wrap=True,
    )


def _warn_unknown_queue(app: App, name: str) -> None:
    """``defer --queue`` of a queue pgtq does not know stays allowed (a queue to come), but a
    typo would leave the job waiting forever: say so."""
    from pgtq.queues import describe_known

    if name in app.queues.declared():
        return
    known = app.queues.known()
    if name not in known:
        _warn(
            f"queue {name!r} is unknown: no task declares it and no job is in it "
            f"({describe_known(known)}); the job waits until a worker takes it: "
            f"pgtq worker MODULE:APP -q {name}"
        )


@cli.command()
def migrate(
    dsn: DsnOption = None,
    schema: SchemaOption = None,
    app_path: AppOption = None,
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the SQL instead of running it.")
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Change nothing; exit 1 unless the schema is at the head (with --pre: unless "
            "the pre revisions are applied).",
        ),
    ] = False,
    pre: Annotated[
        bool,
        typer.Option(
            "--pre",
            help="Rolling upgrade, before the new release starts: only the pending revisions "
            "that are safe while workers of the previous release run.",
        ),
    ] = False,
    post: Annotated[
        bool,
        typer.Option(
            "--post",
            help="Rolling upgrade, once no worker of the previous release runs: the rest.",
        ),
    ] = False,
    use_embedded: Annotated[
        bool,
        typer.Option(
            "--embedded",
            help="Use the embedded PostgreSQL in ./.pgtq (the embedded extra), created and "
            "started if need be, instead of a DSN.",
        ),
    ] = False,
) -> None:
    """Create or upgrade pgtq's tables to the newest revision.

    A rolling upgrade runs `pgtq migrate --pre` before the new release starts and
    `pgtq migrate --post` once the previous release's workers are gone; plain `pgtq migrate`
    does both. With no --dsn, PGTQ_DSN or --app DSN, it works on the embedded PostgreSQL in
    ./.pgtq when one is there, and creates one only with --embedded.
    """
    from pgtq import migrations

    if use_embedded and dsn:
        raise _fail(
            f"--embedded and a DSN (--dsn or {DSN_ENV}): give one; unset {DSN_ENV} to use the "
            "embedded PostgreSQL"
        )
    if use_embedded and app_path and _has_database(load_app(app_path)):
        raise _fail(f"--embedded, but {app_path} has a DSN of its own: drop --embedded or --app")
    if pre and post:
        raise _fail("give --pre or --post, not both (neither: both phases)")
    phase: migrations.Phase | None = "pre" if pre else "post" if post else None
    if check:
        if post:
            raise _fail("--check takes --pre (pre revisions applied?) or nothing (at head?)")
        with _app_for(dsn, app_path, schema, check_schema=False) as app:
            _check_migrations(app, pre_only=pre)
        return
    if sql:
        if phase is not None:
            raise _fail("--sql prints the whole upgrade from an empty schema: it takes no phase")
        target_schema = schema or (load_app(app_path).schema if app_path else DEFAULT_SCHEMA)
        typer.echo(migrations.sql(target_schema))
        return
    embedded: Embedded = "always" if use_embedded else "if-present"
    with _app_for(dsn, app_path, schema, embedded=embedded, check_schema=False) as app:
        applied = app.migrate(phase=phase)
        left = app.sync.run_in_transaction(lambda conn: migrations.pending(conn, app.schema))
    where = f"pgtq schema {app.schema!r} at {describe(app.url)}"
    done = f"applied {', '.join(applied)}" if applied else "nothing to apply"
    if not left:
        out.print(f"{where} is up to date ({done})", soft_wrap=True)
    else:
        waiting = ", ".join(f"{rev} ({kind})" for rev, kind in left)
        out.print(
            f"{where}: {done}; still pending: {waiting}. Run `pgtq migrate --post` once no "
            "worker of the previous release runs",
            soft_wrap=True,
        )


class NotAtHead(PgtqError):
    """``pgtq migrate --check``: the schema is behind (or ahead of) this pgtq's revisions."""


def _check_migrations(app: App, *, pre_only: bool = False) -> None:
    from pgtq import migrations

    found, left = app.sync.run_in_transaction(
        lambda conn: (migrations.current(conn, app.schema), migrations.pending(conn, app.schema))
    )
    heads = migrations.heads()
    where = f"pgtq schema {app.schema!r} at {describe(app.url)}"
    if pre_only:
        # The pre phase is done when the first pending revision (if any) is a post one.
        if left and left[0][1] == "pre":
            waiting = ", ".join(rev for rev, kind in left if kind == "pre")
            raise NotAtHead(f"{where}: pre revisions pending ({waiting}): run `pgtq migrate --pre`")
        post_left = ", ".join(rev for rev, _ in left)
        out.print(
            f"{where} has its pre revisions"
            + (f" (post pending: {post_left})" if post_left else ", and is at head"),
            soft_wrap=True,
        )
        return
    if found != heads:
        at = f"is at {', '.join(sorted(found))}" if found else "is not migrated (no revision)"
        raise NotAtHead(
            f"{where} {at}, this pgtq needs {', '.join(sorted(heads))}: run `pgtq migrate`"
        )
    out.print(f"{where} is at head ({', '.join(sorted(heads))})", soft_wrap=True)


@cli.command()
def demo(
    jobs: Annotated[int, typer.Option("--jobs", "-n", min=3, help="How many jobs to run.")] = 200,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="Leave the embedded PostgreSQL running if the demo started it."
        ),
    ] = False,
    dsn: DsnOption = None,
) -> None:
    """Defer and run sample jobs: on PGTQ_DSN, or on the embedded PostgreSQL in ./.pgtq
    (stopped at the end if the demo started it)."""
    from pgtq.demo import run_demo

    run_demo(dsn or None, jobs=jobs, console=out.console, stderr=err.console, keep=keep)


# -- pgtq embedded ... ----------------------------------------------------------------------------

embedded_cli = typer.Typer(
    help="The embedded PostgreSQL in ./.pgtq (the embedded extra): status, stop.",
    no_args_is_help=True,
)
cli.add_typer(embedded_cli, name="embedded")

EmbeddedPathOption = Annotated[
    str | None,
    typer.Option(
        "--path", metavar="DIR", help="The embedded server's data directory (default: ./.pgtq)."
    ),
]


@embedded_cli.command("status")
def embedded_status(path: EmbeddedPathOption = None, as_json: JsonOption = False) -> None:
    """Whether the embedded PostgreSQL runs, where, its DSN and pid (starts nothing)."""
    from pgtq import embedded

    found = embedded.status(path or embedded.DEFAULT_PATH)
    if as_json:
        _print_json(
            {
                "path": str(found.path),
                "initialized": found.initialized,
                "running": found.running,
                "pid": found.pid,
                "dsn": found.dsn,
            }
        )
    elif found.running:
        out.print(
            f"running: the embedded PostgreSQL in {found.path}, pid {found.pid}\n"
            f"dsn: {found.dsn}\nstop it: pgtq embedded stop",
            soft_wrap=True,
            markup=False,
        )
    elif found.initialized:
        out.print(
            f"not running: the embedded PostgreSQL in {found.path} (a command that uses it "
            "starts it)",
            soft_wrap=True,
            markup=False,
        )
    else:
        out.print(
            f"no embedded PostgreSQL in {found.path}: `pgtq migrate --embedded` creates one",
            soft_wrap=True,
            markup=False,
        )


@embedded_cli.command("stop")
def embedded_stop(path: EmbeddedPathOption = None) -> None:
    """Stop the embedded PostgreSQL (its data stays: the next command that uses it restarts it)."""
    from pgtq import embedded

    path = path or embedded.DEFAULT_PATH
    pid = embedded.status(path).pid
    if embedded.stop_embedded(path):
        out.print(f"stopped the embedded PostgreSQL in {path} (pid {pid})", soft_wrap=True)
    else:
        out.print(f"no embedded PostgreSQL running in {path}", soft_wrap=True)


# -- pgtq jobs ... --------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _plain(value: Any) -> Any:
    """``value`` as JSON data: dataclasses as objects, times as ISO 8601 text, statuses as
    their names, a non-finite float as null (JSON has none)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    """``--json``: one document on stdout, no Rich markup nor wrapping."""
    typer.echo(json.dumps(_plain(value), ensure_ascii=False))


def _stats_document(stats: Stats) -> dict[str, Any]:
    """``pgtq stats --json``: queues and workers as lists, rates per (queue, task)."""
    return {
        "window": stats.window,
        "queues": [
            {**_plain(q), "counts": {s.value: n for s, n in q.counts.items()}}
            for q in stats.queues.values()
        ],
        "rates": [
            {"queue": queue, "task": task, "per_second": rate}
            for (queue, task), rate in sorted(stats.rates.items())
        ],
        "workers": [{**_plain(w), "alive": w.is_alive()} for w in stats.workers],
    }


def job_table(job: Job, *, traceback: bool = False) -> Table:
    """A job as a two-column table (field, value)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Job {job.id}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("task", job.task_name),
        ("queue", job.queue),
        ("status", job.status.value + (" (abort requested)" if job.abort_requested else "")),
        ("attempts", job.attempts),
        ("priority", job.priority),
        ("args", _json(job.args)),
        ("scheduled at", job.scheduled_at),
        ("lock", job.lock),
        ("queueing lock", job.queueing_lock),
        ("worker", job.worker_id),
        ("created at", job.created_at),
        ("started at", job.started_at),
        ("finished at", job.finished_at),
        ("tags", ", ".join(job.tags) if job.tags else None),
        ("meta", None if job.meta is None else _json(job.meta)),
        ("progress", _progress_text(job.progress)),
    ]
    if job.result is not None:
        rows.append(("result", _json(job.result)))
    if job.error:
        kind, message = job.error.get("type"), job.error.get("message")
        rows.append(("error", f"{kind}: {message}" if kind else str(message)))
        if traceback and job.error.get("traceback"):
            rows.append(("traceback", str(job.error["traceback"]).rstrip()))
    for name, value in rows:
        if value is not None:
            table.add_row(name, Text(str(value)))
    return table


@jobs_cli.command("show")
@_on_app
def jobs_show(
    app: App,
    job_id: JobIdArgument,
    traceback: Annotated[
        bool, typer.Option("--traceback", help="Show the stored traceback of a failure.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Show one job (--json: every field, the error's traceback included)."""
    job = _existing_job(app, job_id)
    if as_json:
        _print_json(job)
        return
    out.print(job_table(job, traceback=traceback))
    if job.workflow_id is not None:
        from rich.text import Text

        edges = app.jobs.dependencies(job.id)
        out.print(Text(f"workflow {job.workflow_id}"))
        for kind, label in (("parent", "parents"), ("child", "children")):
            mine = [d for d in edges if d.kind == kind]
            if mine:
                out.print(Text(f"{label}:"))
                for d in mine:
                    policy = "" if d.on_parent_failure == "cancel" else f" [{d.on_parent_failure}]"
                    out.print(Text(f"  {d.id} {d.task_name} {d.status.value}{policy}"))


# Which jobs: the filters of `jobs list` and of the controls (retry, cancel, abort, delete),
# each declared once, read into one JobSelection by _selection.
QueueFilter = Annotated[str | None, typer.Option("--queue", "-q", help="Only this queue.")]
StatusFilter = Annotated[
    list[str] | None,
    typer.Option("--status", "-s", help="Only this status (repeat for several)."),
]
TaskFilter = Annotated[str | None, typer.Option("--task", "-t", help="Only this task.")]
LockFilter = Annotated[str | None, typer.Option("--lock", help="Only jobs with this lock.")]
TagFilter = Annotated[
    list[str] | None,
    typer.Option("--tag", metavar="TAG", help="Only jobs having this tag (repeat: all of them)."),
]
SearchFilter = Annotated[
    str | None,
    typer.Option(
        "--search", help="Only jobs whose arguments, as JSON text, contain this (any case)."
    ),
]
BeforeFilter = Annotated[
    str | None,
    typer.Option(
        "--before",
        metavar="TIME",
        help="Only jobs created before this ISO 8601 time (local without an offset).",
    ),
]
SinceFilter = Annotated[
    str | None,
    typer.Option(
        "--since",
        metavar="TIME",
        help="Only jobs created at or after this ISO 8601 time (local without an offset).",
    ),
]


def _selection(
    *,
    ids: list[int] | None = None,
    queue: str | None,
    status: list[str] | None,
    task: str | None,
    lock: str | None,
    tag: list[str] | None,
    search: str | None,
    before: str | None,
    since: str | None,
) -> JobSelection:
    """The filters given on the command line (those not given left out), checked by
    ``app.jobs`` as any caller's are."""
    given: dict[str, Any] = {
        "ids": ids or None,
        "queue": queue,
        "status": status or None,
        "task": task,
        "lock": lock,
        "tags": tag or None,
        "search": search,
        "before": None if before is None else parse_datetime(before, "--before"),
        "since": None if since is None else parse_datetime(since, "--since"),
    }
    return cast(JobSelection, {name: value for name, value in given.items() if value is not None})


@jobs_cli.command("list")
@_on_app
def jobs_list(
    app: App,
    queue: QueueFilter = None,
    status: StatusFilter = None,
    task: TaskFilter = None,
    lock: LockFilter = None,
    tag: TagFilter = None,
    search: SearchFilter = None,
    before: BeforeFilter = None,
    since: SinceFilter = None,
    limit: Annotated[
        int,
        typer.Option("--limit", "-n", min=1, callback=_checked_limit, help="At most this many."),
    ] = 20,
    after: Annotated[
        int | None,
        typer.Option(metavar="ID", callback=_checked_after, help="The page after this job id."),
    ] = None,
    oldest_first: Annotated[
        bool, typer.Option("--oldest-first", help="Oldest jobs first (default: newest).")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first, as a table (page with --after; --json: an array of jobs)."""
    selection = _selection(
        queue=queue,
        status=status,
        task=task,
        lock=lock,
        tag=tag,
        search=search,
        before=before,
        since=since,
    )
    jobs = app.jobs.list(**selection, limit=limit, after=after, newest_first=not oldest_first)
    if as_json:
        _print_json(jobs)
        return
    out.print(jobs_table(jobs))
    if len(jobs) == limit:
        out.print(f"[dim]More: --after {jobs[-1].id}[/]", soft_wrap=True)


_STATUS_STYLES = {
    Status.TODO: "cyan",
    Status.DOING: "blue",
    Status.SUCCEEDED: "green",
    Status.FAILED: "red",
    Status.ABORTED: "yellow",
    Status.CANCELLED: "yellow",
    Status.BLOCKED: "dim",
}


def _when(value: datetime | None) -> str:
    """Local time; the date only when it is not today."""
    if value is None:
        return ""
    local = value.astimezone()
    today = datetime.now(local.tzinfo).date()
    return local.strftime("%H:%M:%S" if local.date() == today else "%Y-%m-%d %H:%M")


def _progress_text(record: Any) -> str | None:
    """A progress record (``ctx.set_progress``) as ``40% message``."""
    if not isinstance(record, dict) or not isinstance(record.get("fraction"), int | float):
        return None
    message = record.get("message")
    return f"{record['fraction']:.0%}" + (f" {message}" if isinstance(message, str) else "")


def jobs_table(jobs: list[Job]) -> Table:
    """Jobs as rows: what ``pgtq jobs list`` prints."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=False)
    table.add_column("id", justify="right", style="bold", no_wrap=True)
    table.add_column("task", no_wrap=True)
    table.add_column("queue", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("try", justify="right", no_wrap=True)
    table.add_column("args", overflow="fold")
    table.add_column("since", no_wrap=True)
    for job in jobs:
        status = Text(job.status.value, style=_STATUS_STYLES.get(job.status, ""))
        progress = running_progress(job)
        if progress is not None:
            status.append(f" {progress[0]:.0%}")
        if job.abort_requested:
            status.append(" (abort requested)")
        task = Text(job.task_name)
        if job.tags:
            task.append(" " + " ".join(f"#{tag}" for tag in job.tags), style="dim")
        table.add_row(
            str(job.id),
            task,
            job.queue,
            status,
            str(job.attempts),
            Text(_json(job.args)),
            _when(job.finished_at or job.started_at or job.created_at),
        )
    if not jobs:
        table.add_row("", Text("no job matches", style="dim"), "", "", "", "", "")
    return table


# -- the controls: one job by id, or every job the filters select ---------------------------


def _abort_one(app: App, job_id: int) -> None:
    status = app.jobs.abort(job_id)
    if status is None:
        ended = _existing_job(app, job_id).status.value
        raise PgtqError(f"job {job_id} already ended ({ended}): nothing to abort")
    what = "cancelled" if status is Status.CANCELLED else "asked to stop (running)"
    out.print(f"Job {job_id} {what}")


def _retry_one(app: App, job_id: int) -> None:
    if not app.jobs.retry(job_id):
        raise PgtqError(
            f"job {job_id} is {_existing_job(app, job_id).status.value}: only failed, aborted "
            "or cancelled jobs can be retried"
        )
    out.print(f"Job {job_id} is waiting again")


def _cancel_one(app: App, job_id: int) -> None:
    if not app.jobs.cancel(job_id):
        job = _existing_job(app, job_id)
        hint = ": use `pgtq jobs abort` to stop it" if job.status is Status.DOING else ""
        raise PgtqError(f"job {job_id} is {job.status.value}, not waiting{hint}")
    out.print(f"Job {job_id} cancelled")


def _delete_one(app: App, job_id: int) -> None:
    if not app.jobs.delete_many(ids=[job_id]):
        job = _existing_job(app, job_id)  # JobNotFound, else it is running
        raise PgtqError(f"job {job_id} is {job.status.value}: abort it (`pgtq jobs abort`) first")
    out.print(f"Job {job_id} deleted")


@dataclass(frozen=True)
class _Control:
    """A control as the command line shows it."""

    one: Callable[[App, int], None]
    past: str  # "retried": what became of the jobs
    help: str


_CONTROLS: dict[str, _Control] = {
    "retry": _Control(
        _retry_one, "retried", "Put failed, aborted or cancelled jobs back in their queue."
    ),
    "cancel": _Control(
        _cancel_one, "cancelled", "Cancel waiting jobs (running ones are stopped with `abort`)."
    ),
    "abort": _Control(_abort_one, "aborted", "Cancel waiting jobs, and ask running ones to stop."),
    "delete": _Control(
        _delete_one, "deleted", "Delete waiting or ended jobs and their history (never running)."
    ),
}

#: How many of the jobs a control would change it shows before asking.
PREVIEW_ROWS = 10

AllFlag = Annotated[
    bool,
    typer.Option("--all", help="With no ID nor filter: every job the command acts on."),
]
YesFlag = Annotated[
    bool, typer.Option("--yes", "-y", help="Act without showing the jobs and asking first.")
]
DryRunFlag = Annotated[
    bool, typer.Option("--dry-run", help="Show the jobs it would change, and change nothing.")
]


def _control_command(action: str) -> None:
    """``pgtq jobs ACTION``: one job by id (as before), or every job the ids and filters
    select, shown and confirmed first (``--yes``: not asked)."""
    control = _CONTROLS[action]

    def command(
        app: App,
        ids: JobIdsArgument = None,
        queue: QueueFilter = None,
        status: StatusFilter = None,
        task: TaskFilter = None,
        lock: LockFilter = None,
        tag: TagFilter = None,
        search: SearchFilter = None,
        before: BeforeFilter = None,
        since: SinceFilter = None,
        every: AllFlag = False,
        yes: YesFlag = False,
        dry_run: DryRunFlag = False,
        as_json: JsonOption = False,
    ) -> None:
        selection = _selection(
            ids=ids,
            queue=queue,
            status=status,
            task=task,
            lock=lock,
            tag=tag,
            search=search,
            before=before,
            since=since,
        )
        if ids and len(ids) == 1 and len(selection) == 1 and not (every or dry_run or as_json):
            control.one(app, ids[0])  # one job: its own messages, as always
            return
        if not selection and not every:
            raise _fail(
                f"which jobs? Give job ids or a filter (--status, --task, --queue, --before, "
                f"...), or --all for every job `{action}` acts on"
            )
        _control(app, action, selection, every=every, yes=yes, dry_run=dry_run, as_json=as_json)

    command.__name__ = f"jobs_{action}"
    command.__doc__ = control.help
    jobs_cli.command(action)(_on_app(command))


def _control(
    app: App,
    action: str,
    selection: JobSelection,
    *,
    every: bool,
    yes: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Show the jobs ``action`` would change, ask, then change at most those (one that
    changed meanwhile is skipped by the statement's own WHERE); with ``--yes``, one statement."""
    run = getattr(app.jobs, f"{action}_many")
    control = _CONTROLS[action]
    if yes and not dry_run:
        done: list[int] = run(all=every, **selection)
        _report(action, done, as_json)
        return
    would: list[int] = run(all=every, dry_run=True, **selection)
    shown = err if as_json else out  # --json: stdout holds the one document
    if would:
        shown.print(f"{len(would)} job(s) to {action}:")
        first = app.jobs.list(ids=would[:PREVIEW_ROWS], limit=PREVIEW_ROWS)
        shown.print(jobs_table(first))
        if len(would) > PREVIEW_ROWS:
            shown.print(f"… and {len(would) - PREVIEW_ROWS} more")
    if dry_run or not would:
        if as_json:
            _print_json(would)
        elif not would:
            out.print(f"No job to {action}")
        return
    if not typer.confirm(f"{action.capitalize()} these {len(would)} job(s)?", err=as_json):
        raise _fail(f"not confirmed: no job {control.past}")
    # The jobs shown (among the command's own ids, if any), still matching the filters.
    _report(action, run(**{**selection, "ids": would}), as_json)


def _report(action: str, done: list[int], as_json: bool) -> None:
    if as_json:
        _print_json(done)
    else:
        out.print(f"{len(done)} job(s) {_CONTROLS[action].past}")


for _action in _CONTROLS:
    _control_command(_action)


# -- one waiting job, by id: reschedule, fail ---------------------------------------------------

AtOption = Annotated[
    str | None,
    typer.Option(
        "--at",
        metavar="DATETIME",
        help="Run no sooner than this ISO 8601 time (local time unless it has an offset).",
    ),
]
InOption = Annotated[
    float | None,
    typer.Option("--in", metavar="SECONDS", help="Run no sooner than this from now (0: now)."),
]
PriorityOption = Annotated[int | None, typer.Option("--priority", help="Higher runs first.")]
ReasonOption = Annotated[
    str, typer.Option("--reason", help="Why: stored as the job's error message.")
]


@jobs_cli.command("reschedule")
@_on_app
def jobs_reschedule(
    app: App,
    job_id: JobIdArgument,
    at: AtOption = None,
    in_: InOption = None,
    priority: PriorityOption = None,
) -> None:
    """Move a waiting job to another time (--at or --in) and/or priority."""
    if at is None and in_ is None and priority is None:
        raise _fail("give --at, --in or --priority: nothing would change")
    moved = app.jobs.reschedule(
        job_id,
        at=None if at is None else parse_datetime(at),
        in_=_checked_seconds(in_),
        priority=_checked_priority(priority),
    )
    job = _existing_job(app, job_id)
    if not moved:
        hint = ": it runs already" if job.status is Status.DOING else ""
        raise PgtqError(
            f"job {job_id} is {job.status.value}, not waiting{hint}: only a waiting job can be "
            "rescheduled"
        )
    when = "now" if job.scheduled_at is None else f"at {job.scheduled_at.isoformat()}"
    out.print(f"Job {job_id} rescheduled: due {when}, priority {job.priority}")


@jobs_cli.command("fail")
@_on_app
def jobs_fail(app: App, job_id: JobIdArgument, reason: ReasonOption) -> None:
    """End a waiting job failed now, without running it and without retry."""
    try:
        failed = app.jobs.fail(job_id, reason)
    except JobIsRunning:
        raise PgtqError(
            f"job {job_id} is running: fail acts on waiting jobs only; stop it with "
            f"`pgtq jobs abort {job_id}`"
        ) from None
    if not failed:
        job = _existing_job(app, job_id)
        raise PgtqError(f"job {job_id} is {job.status.value}, not waiting: nothing to fail")
    out.print(f"Job {job_id} failed: {reason}")


# -- pgtq queues ... ------------------------------------------------------------------------------

QueueArgument = Annotated[str, typer.Argument(metavar="QUEUE", help="The queue's name.")]


@queues_cli.command("pause")
@_on_app
def queues_pause(
    app: App,
    name: QueueArgument,
    create: Annotated[
        bool,
        typer.Option(
            "--create",
            help="Pause a queue pgtq does not know yet (no task declares it, no job is in it).",
        ),
    ] = False,
) -> None:
    """Stop workers from taking the queue's jobs (running ones finish). An unknown queue (a
    typo?) is refused unless --create."""
    if not create:
        _require_known_queue(app, name)
    changed = app.queues.pause(name)
    out.print(f"Queue {name!r} " + ("paused" if changed else "was already paused"))


@queues_cli.command("resume")
@_on_app
def queues_resume(app: App, name: QueueArgument) -> None:
    """Let workers take the queue's jobs again."""
    changed = app.queues.resume(name)
    out.print(f"Queue {name!r} " + ("resumed" if changed else "was not paused"))


def _require_known_queue(app: App, name: str) -> None:
    """A queue no task declares and the database does not know is a typo until --create."""
    from pgtq.queues import describe_known

    known = app.queues.known()
    if name not in known:
        hint = "" if app.tasks else " (--app MODULE:APP adds its tasks' queues)"
        raise _fail(
            f"unknown queue {name!r}: no task declares it and no job is in it; "
            f"{describe_known(known)}{hint}; pass --create to pause it anyway"
        )


@queues_cli.command("list")
@_on_app
def queues_list(app: App, as_json: JsonOption = False) -> None:
    """Every known queue (declared by the app's tasks, or in the database), idle ones too,
    with its waiting, running and failed jobs."""
    queues = app.queues.stats().queues.values()
    since = {q.name: q.paused_at for q in app.queues.list()}
    if as_json:
        _print_json(
            [
                {
                    "name": q.name,
                    "paused": q.paused,
                    "paused_at": since.get(q.name),
                    "counts": {s.value: n for s, n in q.counts.items()},
                }
                for q in queues
            ]
        )
        return
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("queue", style="bold")
    table.add_column("state")
    for column in ("waiting", "doing", "failed"):
        table.add_column(column, justify="right")
    table.add_column("paused since")
    for q in queues:
        state = Text("paused", style="yellow") if q.paused else Text("active", style="green")
        counts = (str(q.waiting), str(q.doing), str(q.failed))
        table.add_row(q.name, state, *counts, _when(since.get(q.name)))
    if not queues:
        table.add_row(Text("no queue", style="dim"), "", "", "", "", "")
    out.print(table)


# -- pgtq periodic ... ----------------------------------------------------------------------------
# Schedules are declared in code: every command takes the app (MODULE:APP), like `pgtq defer`.

TaskArgument = Annotated[
    str, typer.Argument(metavar="TASK", help="The periodic task's name (or an alias).")
]
PeriodicIdOption = Annotated[
    str,
    typer.Option(
        "--id",
        metavar="PERIODIC_ID",
        help="Which schedule of the task: its periodic_id (default: the one without).",
    ),
]


def _schedule_name(app: App, task_name: str, periodic_id: str) -> str:
    """``periodic task 'report' ('eu')``, the schedule checked first (UnknownSchedule)."""
    from pgtq.cron import describe as describe_schedule

    schedule = app.periodic.get(task_name, periodic_id=periodic_id)
    return describe_schedule(schedule.name, schedule.periodic_id)


@periodic_cli.command("list")
def periodic_list(
    app_path: AppArgument,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
) -> None:
    """The app's schedules: cron, state, next tick, last tick, last run now."""
    with _app_for(dsn, app_path, schema) as app:
        schedules = app.periodic.list()
    if as_json:
        _print_json(schedules)
        return
    out.print(periodic_table(schedules))


def periodic_table(schedules: list[PeriodicInfo]) -> Table:
    """Schedules as rows: what ``pgtq periodic list`` prints (``--json`` has every field)."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("schedule", style="bold")
    table.add_column("cron")
    table.add_column("state")
    table.add_column("next tick")
    table.add_column("last tick / run now")
    for p in schedules:
        name = p.task_name + (f" ({p.periodic_id})" if p.periodic_id else "")
        cron = p.cron + ("" if p.timezone == "UTC" else f" {p.timezone}")
        state = Text("paused", style="yellow") if p.paused else Text("active", style="green")
        if p.paused and p.paused_at is not None:
            state.append(f" since {_when(p.paused_at)}")
        last = [f"{_when(p.last_tick)} (job {p.last_job_id})"] if p.last_tick else []
        if p.run_now_at is not None:
            last.append(f"run now {_when(p.run_now_at)} (job {p.run_now_job_id})")
        next_tick = _when(p.next_tick) or "none within 9 years"
        table.add_row(Text(name), Text(cron), state, next_tick, "\n".join(last))
    if not schedules:
        table.add_row(Text("no periodic task: @app.periodic(cron=...)", style="dim"), *[""] * 4)
    return table


@periodic_cli.command("pause")
def periodic_pause(
    app_path: AppArgument,
    task_name: TaskArgument,
    periodic_id: PeriodicIdOption = "",
    dsn: DsnOption = None,
    schema: SchemaOption = None,
) -> None:
    """Stop every scheduler from deferring the schedule's ticks (until `periodic resume`)."""
    _steer(
        (dsn, app_path, schema, task_name, periodic_id),
        "pause",
        "paused: its ticks are not deferred until it is resumed",
        "was already paused",
    )


@periodic_cli.command("resume")
def periodic_resume(
    app_path: AppArgument,
    task_name: TaskArgument,
    periodic_id: PeriodicIdOption = "",
    dsn: DsnOption = None,
    schema: SchemaOption = None,
) -> None:
    """Defer the schedule's ticks again, from now on (the ticks it missed are not deferred)."""
    _steer(
        (dsn, app_path, schema, task_name, periodic_id),
        "resume",
        "resumed (the ticks it missed while paused are not deferred)",
        "was not paused",
    )


def _steer(
    where: tuple[str | None, str, str | None, str, str], action: str, done: str, unchanged: str
) -> None:
    """``periodic pause|resume``: ``app.periodic.<action>`` on the schedule, and what it did."""
    dsn, app_path, schema, task_name, periodic_id = where
    with _app_for(dsn, app_path, schema) as app:
        name = _schedule_name(app, task_name, periodic_id)
        changed = getattr(app.periodic, action)(task_name, periodic_id=periodic_id)
    out.print(f"{name[0].upper()}{name[1:]} {done if changed else unchanged}")


@periodic_cli.command("run-now")
def periodic_run_now(
    app_path: AppArgument,
    task_name: TaskArgument,
    periodic_id: PeriodicIdOption = "",
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
) -> None:
    """Defer one job of the schedule now, paused or not (--json: just its id); the scheduled
    ticks go on as before."""
    with _app_for(dsn, app_path, schema) as app:
        name = _schedule_name(app, task_name, periodic_id)
        queue = app.periodic.get(task_name, periodic_id=periodic_id).task.defaults.queue
        job_id = app.periodic.run_now(task_name, periodic_id=periodic_id)
    if as_json:
        _print_json(job_id)
        return
    out.print(f"Deferred {name} now as job {job_id} on queue {queue!r}", soft_wrap=True)


# -- pgtq stats -----------------------------------------------------------------------------------


@cli.command()
def stats(
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="A live dashboard, redrawn until Ctrl+C.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between redraws with --watch.")
    ] = 1.0,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    app_path: AppOption = None,
    schema: SchemaOption = None,
) -> None:
    """Queues (waiting, doing, failed, oldest wait, jobs/s) and live workers."""
    from pgtq import dashboard

    if as_json and watch:
        raise _fail("--json prints one snapshot: give --json or --watch, not both")
    with _app_for(dsn, app_path, schema) as app:  # a bad DSN or schema fails here, as one line
        title = f"pgtq  ·  {describe(app.url)}  ·  schema {app.schema}"
        first = app.queues.stats()  # every known queue, idle ones too
        if as_json:
            _print_json(_stats_document(first))
            return
        if not watch:
            out.print(dashboard.render(first, title=title))
            return
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is how a dashboard ends
            dashboard.watch(app.queues.stats, console=out.console, title=title, interval=interval)


# -- pgtq healthcheck -----------------------------------------------------------------------------


def _checked_max_age(value: float) -> float:
    if not value > 0:  # NaN too
        raise _BadOption(f"--max-age: a positive number of seconds, not {value}")
    return value


@cli.command()
def healthcheck(
    app_path: Annotated[
        str | None,
        _optional_app("Take the database and schema from this app (without it: --dsn's database)."),
    ] = None,
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            "-q",
            help="A queue that needs a live worker (repeat; default: any worker will do). A "
            "worker started without --queue serves every queue.",
        ),
    ] = None,
    max_age: Annotated[
        float,
        typer.Option(
            "--max-age",
            metavar="SECONDS",
            callback=_checked_max_age,
            help="A worker is live if it beat within this many seconds (workers beat every 5 s; "
            "peers declare one silent for 30 s dead).",
        ),
    ] = 30.0,
    as_json: JsonOption = False,
    dsn: DsnOption = None,
    schema: SchemaOption = None,
) -> None:
    """Exit 0 when the database answers, pgtq's schema is usable and a worker (of each
    --queue) beat within --max-age seconds; else exit 1 with one line naming the failed check.

    For liveness and readiness probes: `pgtq healthcheck myapp.tasks:app -q emails`.
    """
    from pgtq import health

    with _app_for(dsn, app_path, schema, check_schema=False) as app:
        verdict = health.check(app, queue or None, max_age, describe_error=_describe_failure)
    if as_json:
        _print_json(verdict.as_dict())
        if not verdict.healthy:
            raise typer.Exit(1)
        return
    if not verdict.healthy:
        raise _fail(f"healthcheck failed ({verdict.failed}): {verdict.message}")
    out.print(verdict.message, soft_wrap=True, markup=False)


# -- pgtq web -------------------------------------------------------------------------------------


@cli.command()
def web(
    app_path: Annotated[
        str | None,
        _optional_app(
            "The app whose jobs and periodic tasks to show (without it: --dsn's database)."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on (not loopback: needs --auth or --read-only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show everything, change nothing (no action).")
    ] = False,
    auth: Annotated[
        str | None,
        typer.Option(
            metavar="USER:PASSWORD",
            envvar="PGTQ_WEB_AUTH",
            show_envvar=True,
            help="Require HTTP basic auth with these credentials.",
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="A host name or address users reach the dashboard by (repeatable; *.example.com "
            "for subdomains, * for any): other Host headers get 400. Loopback names and --host "
            "are always allowed; needed with --host 0.0.0.0.",
        ),
    ] = None,
    root_path: Annotated[
        str, typer.Option(help="The URL prefix a reverse proxy serves the dashboard under.")
    ] = "",
    dsn: DsnOption = None,
    schema: SchemaOption = None,
) -> None:
    """Serve the web dashboard (the "web" extra): queues, jobs, workers, periodic tasks, and the
    actions retry, abort, cancel, pause and resume.

    Write actions on an address other than loopback need --auth (or PGTQ_WEB_AUTH), or
    --read-only: pgtq refuses to start otherwise. Requests are answered only for the loopback
    names, --host and each --allowed-host (the Host header: DNS rebinding); on every address
    (--host 0.0.0.0) --allowed-host is required.
    """
    try:
        import uvicorn

        from pgtq.web import security, server
    except ImportError as exc:
        raise ConfigurationError(
            f"pgtq web needs the web extra ({exc}): pip install 'pgtq[web]'"
        ) from None
    if auth is None and os.environ.get(security.AUTH_ENV) == "":
        # click reads an empty variable as unset: an empty secret must not mean "no auth".
        raise ConfigurationError(
            f"{security.AUTH_ENV} is set but empty: give USER:PASSWORD, or unset it"
        )
    credentials = security.parse_credentials(auth) if auth is not None else None
    # Before touching the database: an exposed server must not start at all.
    site = server.Site(host, port, read_only, credentials, root_path, tuple(allowed_host or ()))
    server.check_port(host, port)  # a busy port: one line, before the banner
    with _app_for(dsn, app_path, schema) as app:
        app.jobs.stats()  # a bad DSN or a missing schema fails here, as one line
        config = site.uvicorn_config(app)
        shown = f"[{host}]" if ":" in host else host
        err.print(
            f"pgtq web: http://{shown}:{port}{root_path}/ "
            f"({'read-only' if read_only else 'with actions'}, "
            f"{'basic auth' if credentials else 'no auth'}, "
            f"hosts {', '.join(site.allowed_hosts)}), database {describe(app.url)}",
            soft_wrap=True,
        )
        uvicorn.Server(config).run()


def main() -> None:
    """The ``pgtq`` console script."""
    command_tree(sys.argv[1:])(prog_name="pgtq")


def command_tree(args: list[str]) -> typer.Typer:
    """:data:`cli` with only the command ``args`` name, when they name one.

    Typer builds every command's parameters at each start (~60 ms for all of them, a tenth
    of ``pgtq worker``'s start) though a run needs one. The root's own options are flags, so
    the first argument that is not an option is the command. No command, or one that is not
    known, gets the whole tree: help and "No such command" stay typer's own.
    """
    name = next((arg for arg in args if not arg.startswith("-")), None)
    commands = [
        info
        for info in cli.registered_commands
        if info.callback is not None
        and (info.name or typer.main.get_command_name(info.callback.__name__)) == name
    ]
    groups = [info for info in cli.registered_groups if info.name == name]
    if not commands and not groups:
        return cli
    tree = copy.copy(cli)
    tree.registered_commands, tree.registered_groups = commands, groups
    return tree
