"""A real PgBouncer (Debian's ``pgbouncer`` binary) in front of the test server, in
``pool_mode = transaction``: what users put between pgtq and PostgreSQL, and what managed
services' poolers (RDS Proxy, Supavisor, Neon's) behave like.

It runs as a subprocess (no daemon, no unix socket) on a free port, from an ini and an auth
file of its own in a temporary directory; any database of the test server is reachable
through it under the same name. A machine without the binary skips the tests that use it,
saying how to get it (``nox -s tests`` installs Debian's ``pgbouncer`` unless
``PGTQ_NO_SYSTEM_INSTALL`` is set); CI fails them instead.

Fixtures (registered by ``tests/conftest.py``): ``pgbouncer`` (one per test module) and
``bounced_dsn`` (the test's database, its tables emptied, through PgBouncer).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import URL, make_url

from tests.system_packages import without_package

BINARY = "/usr/sbin/pgbouncer"

#: Server connections per (database, user) pair: more than one worker and an app need at
#: once, fewer than the server's max_connections shared with the other test runs.
POOL_SIZE = 8


@dataclass
class PgBouncer:
    """A running PgBouncer: ``url(database)`` reaches that database through it."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    server: URL

    def url(self, database: str) -> URL:
        return URL.create(
            "postgresql",
            username=self.server.username,
            password=self.server.password,
            host="127.0.0.1",
            port=self.port,
            database=database,
        )

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: immediate shutdown
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


#: noxfile.py's opt-out of installing Debian packages system-wide.


def without_pgbouncer(environ: Mapping[str, str]) -> tuple[bool, str]:
    """(fail?, why) where pgbouncer is missing (:func:`tests.system_packages.without_package`)."""
    return without_package("pgbouncer", BINARY, "the PgBouncer tests", environ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _server_address(server: URL) -> tuple[str, int]:
    """Host (or unix-socket directory, from an embedded server's URL) and port."""
    host = server.host or server.query.get("host") or "127.0.0.1"
    if isinstance(host, tuple):
        host = host[0]
    return host, server.port or 5432


def _config(server: URL, port: int, directory: Path, pool_mode: str) -> str:
    host, server_port = _server_address(server)
    user = server.username or "postgres"
    password = f" password={server.password}" if server.password else ""
    lines = [
        "[databases]",
        # Any database, under its own name: the test run's databases come and go.
        f"* = host={host} port={server_port} user={user}{password}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {directory / 'userlist.txt'}",
        f"logfile = {directory / 'pgbouncer.log'}",
        "pidfile =",
        f"pool_mode = {pool_mode}",
        f"default_pool_size = {POOL_SIZE}",
        "max_client_conn = 500",
        # No ignore_startup_parameters: psycopg and asyncpg, as pgtq opens them, need none.
        "server_check_delay = 0",
        "query_wait_timeout = 10",  # a pool held by a leak fails fast, not in 120 s
        f"admin_users = {user}",  # SHOW CONFIG, SHOW POOLS on the "pgbouncer" database
    ]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root: it switches to this user
        lines.append("user = postgres")
    return "\n".join(lines) + "\n"


def start(server: URL, *, pool_mode: str = "transaction", timeout: float = 10.0) -> PgBouncer:
    """Start PgBouncer in front of ``server``; return once it accepts connections (or fail
    with its log after ``timeout`` seconds)."""
    directory = Path(tempfile.mkdtemp(prefix="pgtq-pgbouncer-"))
    directory.chmod(0o755)
    user = server.username or "postgres"
    (directory / "userlist.txt").write_text(f'"{user}" ""\n')
    if os.geteuid() == 0:  # the files must be the unprivileged user's too (log, reloads)
        pw = pwd.getpwnam("postgres")
        os.chown(directory, pw.pw_uid, pw.pw_gid)
    last_error = ""
    for _ in range(3):  # another process may take the free port before PgBouncer binds it
        port = _free_port()
        ini = directory / "pgbouncer.ini"
        ini.write_text(_config(server, port, directory, pool_mode))
        process = subprocess.Popen(
            [BINARY, str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        bouncer = PgBouncer(process, port, directory, server)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            try:
                # A query through it: PgBouncer listens, and reaches the server.
                with psycopg.connect(
                    str(bouncer.url(server.database or "postgres")), connect_timeout=2
                ) as conn:
                    conn.execute("SELECT 1")
                return bouncer
            except psycopg.OperationalError as exc:
                last_error = str(exc)
                time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()
            break
        last_error = bouncer.log()
    log = (directory / "pgbouncer.log").read_text(errors="replace") if directory.exists() else ""
    shutil.rmtree(directory, ignore_errors=True)
    raise RuntimeError(f"PgBouncer did not start within {timeout} s: {last_error}\n{log}")


@pytest.fixture(scope="module")
def pgbouncer(migrated_url: URL) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the test server, for one test module."""
    if not os.access(BINARY, os.X_OK):
        fail, why = without_pgbouncer(os.environ)
        if fail:
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    bouncer = start(migrated_url)
    yield bouncer
    bouncer.stop()


@pytest.fixture
def bounced_dsn(pgbouncer: PgBouncer, dsn: str) -> Iterator[str]:
    """The test's database (tables emptied by ``dsn``), through PgBouncer. PgBouncer's
    warnings and errors during the test are printed at its end: pytest shows them with a
    failure (a pool that waited for a server, a server it could not reach)."""
    database = make_url(dsn).database
    assert database
    seen = len(pgbouncer.log())
    yield pgbouncer.url(database).render_as_string(hide_password=False)
    trouble = [
        line
        for line in pgbouncer.log()[seen:].splitlines()
        if " WARNING " in line or " ERROR " in line or " FATAL " in line
    ]
    if trouble:
        print("PgBouncer's log during the test:\n" + "\n".join(trouble[-30:]))
