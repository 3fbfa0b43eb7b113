"""An embedded PostgreSQL for local work, with nothing to install but ``pgtq[embedded]``.

It is used only where no DSN is configured, and never silently: ``pgtq demo``, ``pgtq migrate
--embedded`` (which creates it), the other commands once it exists (each says so on stderr,
:func:`notice`), and ``pgtq.App.embedded()`` in a user's own script or tests. The server is
started with the ``pgserver`` package in a directory of its own (``./.pgtq`` by default) and
outlives the process that started it, so the next command reuses it instead of paying for
``initdb`` and a start again: :func:`status` tells whether one runs, :func:`stop_embedded`
ends it (``pgtq embedded status|stop``).
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgtq.app import DSN_ENV
from pgtq.errors import ConfigurationError, DatabaseUnreachable, PgtqError

DEFAULT_PATH = "./.pgtq"

INSTALL_HINT = (
    "pip install 'pgtq[embedded]' for an embedded PostgreSQL, "
    f"or set {DSN_ENV} (or pass --dsn) to use your own server"
)

#: How long :func:`stop_embedded` waits for the server to finish its shutdown.
STOP_TIMEOUT = 30.0

#: pgserver's role and database (trust authentication: no password).
_USER = "postgres"


class EmbeddedNotStopped(PgtqError):
    """The embedded server was asked to stop and still runs after :data:`STOP_TIMEOUT`."""


def notice(path: str | os.PathLike[str] = DEFAULT_PATH) -> str:
    """The line a command prints when it uses the embedded server: never a silent fallback."""
    return f"using the embedded PostgreSQL in {path}: set {DSN_ENV} to use your own"


def _import_pgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns on import when XDG_RUNTIME_DIR is unset: noise for a user.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise ConfigurationError(
            f"no database configured and the embedded PostgreSQL is not installed: {INSTALL_HINT}"
        ) from None
    return pgserver


def _directory(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def is_initialized(path: str | os.PathLike[str] = DEFAULT_PATH) -> bool:
    """Whether an embedded database already lives in ``path`` (so using it creates nothing)."""
    return (_directory(path) / "PG_VERSION").exists()


@dataclass(frozen=True)
class EmbeddedStatus:
    """The embedded server in one directory, read from its files (nothing is started)."""

    path: Path
    #: A database lives there (``initdb`` ran), running or not.
    initialized: bool
    #: The postmaster's process id while it runs.
    pid: int | None
    #: Its URL while it runs (a unix socket by absolute path).
    dsn: str | None

    @property
    def running(self) -> bool:
        return self.pid is not None


def status(path: str | os.PathLike[str] = DEFAULT_PATH) -> EmbeddedStatus:
    """Whether an embedded server lives in ``path`` and runs, with its pid and URL."""
    directory = _directory(path)
    postmaster = _running_postmaster(directory)
    return EmbeddedStatus(
        path=directory,
        initialized=is_initialized(directory),
        pid=postmaster.pid if postmaster else None,
        dsn=postmaster.dsn if postmaster else None,
    )


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    dsn: str


def _running_postmaster(directory: Path) -> _Postmaster | None:
    """The server running on ``directory``, from its ``postmaster.pid`` (None: none runs).

    The file's lines are PostgreSQL's: pid, data directory, start time, port, socket
    directory, listen address, shared memory, status. A file left by a killed server names
    a pid that is gone, or that another program has since: neither counts as running.
    """
    try:
        lines = (directory / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    if not _is_postgres(pid):
        return None
    return _Postmaster(pid, _dsn_from(lines, directory))


def _dsn_from(lines: list[str], directory: Path) -> str:
    """The server's URL: its unix socket by absolute path, so it works from any directory."""
    field = [line.strip() for line in lines] + [""] * 8
    port, socket_dir, address = field[3], field[4], field[5]
    if socket_dir:
        host = socket_dir if os.path.isabs(socket_dir) else str((directory / socket_dir).resolve())
        return f"postgresql://{_USER}:@/{_USER}?host={host}"
    return f"postgresql://{_USER}:@{address or '127.0.0.1'}:{port or 5432}/{_USER}"


def _is_postgres(pid: int) -> bool:
    """Whether ``pid`` is a live PostgreSQL process (not a stale pid reused by another)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, run by another user (pgserver runs PostgreSQL as its own user as root)
    if not Path("/proc").is_dir():  # no procfs to ask what the process is (macOS)
        return True
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return name in ("postgres", "postmaster")


def embedded_dsn(path: str | os.PathLike[str] = DEFAULT_PATH) -> str:
    """Start (or reuse) the embedded PostgreSQL kept in ``path`` and return its URL.

    The URL points at a unix socket by absolute path, so it stays valid from any working
    directory: ``postgresql://postgres:@/postgres?host=/abs/path``. The server keeps running
    when this process exits (:func:`stop_embedded` ends it).
    """
    pgserver = _import_pgserver()
    directory = _directory(path)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The class, not get_server(): that one caches a handle per directory, which
            # would still name a server stopped since.
            pgserver.PostgresServer(directory, cleanup_mode=None)
    except Exception as exc:
        raise DatabaseUnreachable(
            f"could not start the embedded PostgreSQL in {directory}: "
            f"{type(exc).__name__}: {exc} (its log is {directory / 'log'})"
        ) from exc
    postmaster = _running_postmaster(directory)
    if postmaster is None:
        raise DatabaseUnreachable(
            f"the embedded PostgreSQL in {directory} stopped as soon as it started: "
            f"see its log {directory / 'log'}"
        )
    return postmaster.dsn


def stop_embedded(
    path: str | os.PathLike[str] = DEFAULT_PATH, *, timeout: float = STOP_TIMEOUT
) -> bool:
    """Stop the embedded PostgreSQL kept in ``path``; False when none was running there.

    PostgreSQL's fast shutdown (what ``pg_ctl stop`` sends): open sessions are disconnected
    and their transactions rolled back, committed data is safe. Returns once the server is
    gone; raises :class:`EmbeddedNotStopped` if it still runs after ``timeout`` seconds.
    """
    directory = _directory(path)
    postmaster = _running_postmaster(directory)
    if postmaster is None:
        return False
    try:
        os.kill(postmaster.pid, signal.SIGINT)
    except ProcessLookupError:
        return True  # it ended meanwhile
    deadline = time.monotonic() + timeout
    while _running_postmaster(directory) is not None:
        if time.monotonic() > deadline:
            raise EmbeddedNotStopped(
                f"the embedded PostgreSQL in {directory} (pid {postmaster.pid}) still runs "
                f"{timeout:.0f} s after it was asked to stop: see its log {directory / 'log'}"
            )
        time.sleep(0.05)
    return True
