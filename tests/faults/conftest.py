"""Fixtures of the fault tests: worker processes, a PostgreSQL server of the test's own, and
waiting on conditions with a deadline (never a bare sleep).

The shared fixtures (``dsn``, ``sql``, ``make_database`` …) come from ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults.worker import Run, read_records

ROOT = Path(__file__).resolve().parents[2]

#: Fast enough for tests, so faults are noticed and recovered from in about a second.
FAST = {
    "concurrency": 20,
    "fetch_job_polling_interval": 0.5,
    "abort_job_polling_interval": 0.2,
    "heartbeat_interval": 0.2,
    "rescue_after": 1.0,
    "shutdown_graceful_timeout": 5.0,
}


async def until(
    check: Callable[[], Any],
    *,
    timeout: float,
    what: str | Callable[[], str],
    every: float = 0.01,
) -> float:
    """Poll ``check`` (sync or async) until it is truthy; the seconds it took.

    Fails with ``what`` (or what it returns, computed then) once ``timeout`` passes. The
    polling is fine-grained (10 ms), so the returned time is a measurement, not a guess.
    """
    begun = time.monotonic()
    while True:
        value = check()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return time.monotonic() - begun
        if time.monotonic() - begun > timeout:
            told = what if isinstance(what, str) else what()
            raise AssertionError(f"not within {timeout} s: {told}")
        await asyncio.sleep(every)


@dataclass
class WorkerProcess:
    """A worker subprocess (``tests/faults/worker.py``), its record and its log."""

    proc: subprocess.Popen[bytes]
    record: Path
    log: Path
    options: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exit_code(self, timeout: float) -> int:
        """Wait for the process to end (failing after ``timeout``); its exit code."""
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} still running {timeout} s later; its log:\n{self.log_text()}"
            ) from None

    def runs(self) -> list[Run]:
        return read_records([self.record])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Workers:
    """Starts worker processes; whatever is still running at the end of the test is killed."""

    dsn: str
    directory: Path
    started: list[WorkerProcess] = field(default_factory=list)

    def start(self, dsn: str | None = None, **options: Any) -> WorkerProcess:
        n = len(self.started)
        record = self.directory / f"record-{n}.txt"
        log = self.directory / f"worker-{n}.log"
        merged = {**FAST, **options}
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.faults.worker",
                    dsn or self.dsn,
                    str(record),
                    json.dumps(merged),
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        worker = WorkerProcess(proc, record, log, merged)
        self.started.append(worker)
        return worker

    def runs(self) -> list[Run]:
        """Every record line of every worker started."""
        return read_records([w.record for w in self.started])

    def logs(self) -> str:
        return "\n".join(f"--- worker {w.pid}:\n{w.log_text()}" for w in self.started)

    def diagnose(self) -> str:
        """The logs, after asking every live worker to dump its threads and asyncio tasks
        (called on a failure, to show where a stalled worker waits)."""
        for w in self.started:
            if w.alive():
                w.send(signal.SIGUSR1)
        time.sleep(1.0)  # only on the way to a failure: give the dumps time to be written
        return self.logs()

    def kill_all(self) -> None:
        for w in self.started:
            if w.alive():
                w.send(signal.SIGCONT)  # a paused one must be able to die
                w.send(signal.SIGKILL)
                w.proc.wait(10)


@pytest.fixture
def workers(dsn: str, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(dsn, tmp_path)
    try:
        yield pool
    finally:
        pool.kill_all()


# -- a PostgreSQL server of the test's own, to restart -----------------------------------------


@dataclass
class OwnServer:
    """A pgserver PostgreSQL in a ``mkdtemp`` directory (pgserver runs it as an OS user of its
    own when we are root: pytest's 0700 ``tmp_path`` would lock that user out)."""

    server: Any
    datadir: Path

    def uri(self, database: str = "postgres") -> str:
        uri: str = self.server.get_uri(database)
        return uri

    def _pg_ctl(self, args: list[str]) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(args, pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        """A fast shutdown: every session is terminated, open transactions roll back."""
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        """Start again on the same data directory and socket."""
        info = self.server.get_postmaster_info()
        args = ["-w", "-o", '-h ""']
        if info.socket_dir is not None:
            args += ["-o", f"-k {info.socket_dir}"]
        self._pg_ctl([*args, "-l", str(self.server.log), "start"])
        # pgserver stops the server it knows by pid at clean-up: tell it the new one.
        from pgserver.utils import PostmasterInfo

        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.server.pgdata)


@pytest.fixture
def own_server() -> Iterator[OwnServer]:
    pgserver = pytest.importorskip("pgserver")
    datadir = Path(tempfile.mkdtemp(prefix="pgtq-faults-pg-"))
    server = pgserver.get_server(datadir, cleanup_mode="stop")
    own = OwnServer(server, datadir)
    try:
        yield own
    finally:
        with contextlib.suppress(Exception):
            own.stop()
        server.cleanup()
        shutil.rmtree(datadir, ignore_errors=True)
