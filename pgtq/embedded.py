"""An embedded PostgreSQL for trying pgtq without installing a server (``pgtq[embedded]``).

``pgtq demo`` and ``pgtq migrate`` fall back to it when no DSN is given. The server is started
with the ``pgserver`` package in a directory of its own (``./.pgtq`` by default) and is left
running when the process exits, so the next command reuses it instead of paying for
``initdb`` and a start again.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from pgtq.errors import ConfigurationError, DatabaseUnreachable

DEFAULT_PATH = "./.pgtq"

INSTALL_HINT = (
    "pip install 'pgtq[embedded]' for an embedded PostgreSQL, "
    "or set PGTQ_DSN (or pass --dsn) to use your own server"
)


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


def is_initialized(path: str | os.PathLike[str] = DEFAULT_PATH) -> bool:
    """Whether an embedded database already lives in ``path`` (so using it creates nothing)."""
    return (Path(path).expanduser() / "PG_VERSION").exists()


def embedded_dsn(path: str | os.PathLike[str] = DEFAULT_PATH) -> str:
    """Start (or reuse) the embedded PostgreSQL kept in ``path`` and return its URL.

    The URL points at a unix socket by absolute path, so it stays valid from any working
    directory: ``postgresql://postgres:@/postgres?host=/abs/path``.
    """
    pgserver = _import_pgserver()
    directory = Path(path).expanduser().resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(directory, cleanup_mode=None)
            uri: str = server.get_uri()
    except Exception as exc:
        raise DatabaseUnreachable(
            f"could not start the embedded PostgreSQL in {directory}: "
            f"{type(exc).__name__}: {exc} (its log is {directory / 'log'})"
        ) from exc
    return _absolute_socket(uri, directory)


def _absolute_socket(uri: str, directory: Path) -> str:
    """Make a relative socket directory absolute (pgserver gives absolute ones, but be sure)."""
    url = make_url(uri)
    host = url.query.get("host")
    if isinstance(host, str) and host and not os.path.isabs(host):
        url = url.update_query_dict({"host": str((directory / host).resolve())})
        return url.render_as_string(hide_password=False)
    return uri


def stop_embedded(path: str | os.PathLike[str] = DEFAULT_PATH) -> bool:
    """Stop the embedded PostgreSQL kept in ``path`` unless another process still uses it.

    The server outlives the commands that start it, on purpose; this is how to end it (tests,
    or a user cleaning up). Returns False when no server was running there.
    """
    if not (Path(path).expanduser() / "postmaster.pid").exists():
        return False
    pgserver = _import_pgserver()
    directory = Path(path).expanduser().resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(directory, cleanup_mode="stop")
        server.cleanup_mode = "stop"  # a handle made earlier by embedded_dsn() keeps running
        server.cleanup()
    return True
