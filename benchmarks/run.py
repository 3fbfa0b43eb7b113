"""The peer benchmark's driver: pgtq, PgQueuer and Procrastinate in one measuring frame.

    python -m benchmarks.run --quick            # < 2 minutes
    python -m benchmarks.run                    # full: 20,000 jobs per figure, 3 rounds
    python -m benchmarks.run --big              # 1,000,000 queued jobs vs 20,000 (pgtq)
    nox -s bench -- --quick                     # the same, peers installed by nox

Every measurement gets a fresh database (created here, dropped after) and its own process
(``benchmarks.child``); libraries take turns in a rotating order within each round. One JSON
line per measurement goes to ``benchmarks/results/<timestamp>.jsonl``; at the end the table
of medians (with pgtq / peer ratios) is printed and written next to it as ``.md``. Any lost
or duplicated job, error or timeout makes the run exit non-zero. See benchmarks/README.md
for what each figure times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import random
import selectors
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import psycopg
from sqlalchemy.engine import make_url

from benchmarks.libs import ADAPTERS, get
from benchmarks.libs.base import Adapter, Fetch, Kind

if TYPE_CHECKING:
    from benchmarks.workflows import Shape

ROOT = Path(__file__).resolve().parent.parent
# A run works on a copy of the tree (see snapshot()); ORIGIN is the checkout it came from.
ORIGIN_ENV = "PGTQ_BENCH_ORIGIN"
COMMIT_ENV = "PGTQ_BENCH_COMMIT"
CWD_ENV = "PGTQ_BENCH_CWD"
ORIGIN = Path(os.environ.get(ORIGIN_ENV) or ROOT)
RESULTS = ORIGIN / "benchmarks" / "results"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

CHUNK = 1000  # jobs per batch-enqueue call (figure 3)
PREFILL_CHUNK = 5000  # jobs per call when filling a queue before a burn-down (untimed)
LATENCY_INTERVAL = 0.020
LATENCY_SETTLE = 0.5
LATENCY_BATCH = 20
BATCHES = (20, 100)
READY_TIMEOUT = 60.0
QUIET_IDLE = 0.8  # --quiet-wait: the CPU share that must be idle before a measurement
STOP_GRACE = 90.0  # the child's own graceful-stop wait (60 s) and some
CLI_CONCURRENCY = 100  # `pgtq worker --concurrency` and run_worker(concurrency=...)
SCHEDULE_AHEAD = (0.5, 3.0)  # seconds ahead a scheduled job is due (uniform, seeded)
SCHEDULE_INTERVAL = 0.020  # between two scheduled defers
RETRY_INTERVAL = 0.050  # between two defers of jobs that fail once
SCHEDULE_SETTLE = 0.5
LATENESS_GOAL_MS = 100.0
CLI_GOAL = 0.9
#: The workflow group's three ways, one fresh database each (order rotated by the round).
WORKFLOW_WAYS: list[Shape | Literal["plain"]] = ["chords", "chains", "plain"]


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    unit: str
    better: str  # "higher" or "lower"


FIGURES = [
    Figure(
        "burndown_async_b20", "burn-down of {jobs} async no-op jobs, batch 20", "jobs/s", "higher"
    ),
    Figure(
        "burndown_async_b100", "burn-down of {jobs} async no-op jobs, batch 100", "jobs/s", "higher"
    ),
    Figure(
        "burndown_sync_b20", "burn-down of {jobs} sync no-op jobs, batch 20", "jobs/s", "higher"
    ),
    Figure(
        "burndown_sync_b100", "burn-down of {jobs} sync no-op jobs, batch 100", "jobs/s", "higher"
    ),
    Figure("enqueue_batch", "enqueue {jobs} jobs, 1,000 per call (async)", "jobs/s", "higher"),
    Figure("enqueue_single_async", "enqueue {jobs} jobs one by one, async", "jobs/s", "higher"),
    Figure(
        "enqueue_single_sync",
        "enqueue {jobs} jobs one by one, sync (plain thread)",
        "jobs/s",
        "higher",
    ),
    Figure("latency_p50", "pickup latency of an idle worker, p50 ({jobs} jobs)", "ms", "lower"),
    Figure("latency_p99", "pickup latency of an idle worker, p99 ({jobs} jobs)", "ms", "lower"),
    Figure(
        "cli_async",
        "burn-down of {jobs} async no-op jobs, `pgtq worker --one-shot -c 100` (whole process)",
        "jobs/s",
        "higher",
    ),
    Figure(
        "inproc_async",
        "burn-down of {jobs} async no-op jobs, `app.run_worker(concurrency=100, wait=False)`"
        " (whole process)",
        "jobs/s",
        "higher",
    ),
    Figure(
        "cli_sync",
        "burn-down of {jobs} sync no-op jobs, `pgtq worker --one-shot -c 100` (whole process)",
        "jobs/s",
        "higher",
    ),
    Figure(
        "inproc_sync",
        "burn-down of {jobs} sync no-op jobs, `app.run_worker(concurrency=100, wait=False)`"
        " (whole process)",
        "jobs/s",
        "higher",
    ),
    Figure(
        "workflow_chords",
        "burn-down of {jobs} async no-op jobs as chords of 99 + 1 callback,"
        " `pgtq worker --one-shot -c 100` (whole process)",
        "jobs/s",
        "higher",
    ),
    Figure(
        "workflow_chains",
        "burn-down of {jobs} async no-op jobs as chains of 10,"
        " `pgtq worker --one-shot -c 100` (whole process)",
        "jobs/s",
        "higher",
    ),
    Figure("sched_p50", "lateness of {jobs} jobs scheduled 0.5 to 3 s ahead, p50", "ms", "lower"),
    Figure("sched_p99", "lateness of {jobs} jobs scheduled 0.5 to 3 s ahead, p99", "ms", "lower"),
    Figure("sched_max", "lateness of {jobs} jobs scheduled 0.5 to 3 s ahead, max", "ms", "lower"),
    Figure("retry_p50", "lateness of {jobs} retries after a 1 s backoff, p50", "ms", "lower"),
    Figure("retry_p99", "lateness of {jobs} retries after a 1 s backoff, p99", "ms", "lower"),
    Figure("retry_max", "lateness of {jobs} retries after a 1 s backoff, max", "ms", "lower"),
    Figure("big_burndown_base", "burn-down of {jobs} queued jobs, batch 100", "jobs/s", "higher"),
    Figure("big_burndown_big", "burn-down of {jobs} queued jobs, batch 100", "jobs/s", "higher"),
    Figure("big_peak_rss", "worker peak RSS, {jobs} queued, concurrency 100", "MB", "lower"),
]
FIGURE = {f.key: f for f in FIGURES}
GROUPS = ("burndown", "enqueue", "latency", "cli", "workflow", "schedule")


@dataclass(frozen=True)
class Mode:
    name: str
    jobs: int  # per burn-down
    batch_jobs: int  # batch enqueue (1,000 per call)
    singles: int  # per single-enqueue figure
    latency_jobs: int
    schedule_jobs: int  # per scheduled-lateness figure (and as many retries)


MODES = {
    "quick": Mode(
        "quick", jobs=1_000, batch_jobs=10_000, singles=300, latency_jobs=50, schedule_jobs=30
    ),
    "full": Mode(
        "full", jobs=20_000, batch_jobs=20_000, singles=20_000, latency_jobs=200, schedule_jobs=60
    ),
}


class BenchFailure(Exception):
    """A measurement failed: an error, a timeout, or lost / duplicated jobs."""


# -- the database server -------------------------------------------------------------------


def phase_timeout(jobs: int, scale: float) -> float:
    """A phase's time limit: generous (200 jobs/s and a minute), never unbounded."""
    return (60.0 + jobs / 200.0) * float(scale)


class Server:
    """Creates and drops this run's databases; every statement has a timeout."""

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database for one measurement, dropped after it."""
        name = self.fresh()
        try:
            yield name
        finally:
            self.drop(name)

    def __init__(self, url: str, run_id: str) -> None:
        self.url = make_url(url).set(drivername="postgresql")
        self.run_id = run_id
        self._seq = itertools.count(1)
        self.created: list[str] = []
        self.admin = self.connect(self.url.database or "postgres")

    def ensure(self) -> None:
        """Reconnect the admin session if the server dropped it (e.g. it was restarted)."""
        if self.admin.closed or self.admin.broken:
            self.admin = self.connect(self.url.database or "postgres")

    def dsn(self, database: str) -> str:
        return self.url.set(database=database).render_as_string(hide_password=False)

    def connect(self, database: str, statement_timeout: float = 300) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn(database), autocommit=True, connect_timeout=10)
        conn.execute(f"SET statement_timeout = '{int(statement_timeout * 1000)}ms'")
        return conn

    def fresh(self) -> str:
        name = f"pgtqbench_{self.run_id}_{next(self._seq)}"
        self.admin.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return name

    def drop(self, name: str) -> None:
        try:
            self.ensure()
            self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            return  # still listed: close() tries again
        with contextlib.suppress(ValueError):
            self.created.remove(name)

    def close(self) -> None:
        for name in list(self.created):
            self.drop(name)
        if self.created:
            log(f"could not drop these databases: {', '.join(self.created)}")
        self.admin.close()

    def others_active(self) -> int:
        """Active sessions of other databases: someone else using the server meanwhile."""
        row = self.admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
            " AND pid <> pg_backend_pid() AND datname IS NOT NULL AND datname NOT LIKE %s",
            (f"pgtqbench_{self.run_id}_%",),
        ).fetchone()
        return int(row[0]) if row else 0

    def info(self) -> dict[str, Any]:
        def show(setting: str) -> str:
            row = self.admin.execute(f"SHOW {setting}").fetchone()
            return str(row[0]) if row else "?"

        settings = ("server_version", "fsync", "synchronous_commit", "shared_buffers", "autovacuum")
        return {s: show(s) for s in settings}


# -- child processes -----------------------------------------------------------------------


#: Bytecode for the measured processes, as an installed package has it (pip compiles at
#: install): without it, a process that imports more (the CLI: typer, pydantic, rich) pays
#: compiling on every start, which users do not (PYTHONDONTWRITEBYTECODE may be set here).
PYCACHE = Path(tempfile.gettempdir()) / "pgtq-bench-pycache"


def child_env() -> dict[str, str]:
    """The environment of a measured process: this tree (the snapshot) first on sys.path,
    bytecode cached in :data:`PYCACHE`."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONPYCACHEPREFIX": str(PYCACHE)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def warm_bytecode() -> None:
    """Compile what the whole-process figures import, once, before any is timed."""
    subprocess.run(
        [sys.executable, "-c", "import pgtq.cli, pgtq.worker, pgtq.logs, benchmarks.apps"],
        cwd=ROOT,
        env=child_env(),
        check=True,
    )


def pgtq_command() -> list[str]:
    """The ``pgtq`` command of this environment (its console script), else ``python -m pgtq``."""
    script = Path(sys.executable).parent / "pgtq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pgtq"]


def cli_command(dsn: str) -> list[str]:
    """What users run: ``pgtq worker benchmarks.apps:app --one-shot --concurrency 100``."""
    command = [*pgtq_command(), "worker", "benchmarks.apps:app", "--one-shot"]
    return [*command, "--concurrency", str(CLI_CONCURRENCY), "--dsn", dsn]


def shown_command(command: list[str], dsn: str) -> str:
    """The command as recorded: the program's name only, the DSN left out."""
    shown = [c if c != dsn else "<dsn>" for c in command]
    return shlex.join([Path(shown[0]).name, *shown[1:]])


def row_fetcher(conn: psycopg.Connection[Any]) -> Fetch:
    """The checks' ``fetch``: the one row of a statement, as a tuple."""

    def fetch(sql: str) -> tuple[Any, ...]:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return tuple(row)

    return fetch


class Child:
    """One measured process (``python -m benchmarks.child``)."""

    def __init__(self, spec: dict[str, Any], workdir: Path) -> None:
        tag = uuid.uuid4().hex[:8]
        self.what = f"{spec['lib']} {spec['action']}"
        self.out = workdir / f"{tag}.json"
        self.err_path = workdir / f"{tag}.err"
        spec = {**spec, "out": str(self.out)}
        env = child_env()
        self._err: IO[str] = open(self.err_path, "w+")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.child", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
        )

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self._err.closed:
            self._err.close()

    def stderr_tail(self, lines: int = 15) -> str:
        if not self._err.closed:
            self._err.flush()
        text = self.err_path.read_text(errors="replace").strip().splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def ready(self, timeout: float = READY_TIMEOUT) -> None:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.kill()
                raise BenchFailure(f"{self.what}: not ready within {timeout:.0f} s")
        line = self.proc.stdout.readline().strip()
        if line != "READY":
            self.proc.wait(10)
            raise BenchFailure(f"{self.what}: failed to start\n{self._error()}")

    def go(self, word: str = "GO") -> None:
        """Tell the child to go on (a child that already ended reports in finish())."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()

    def _error(self) -> str:
        message = "no result"
        if self.out.exists():
            with contextlib.suppress(ValueError):
                message = json.loads(self.out.read_text()).get("error", message)
        return f"{message}\n  stderr:\n{self.stderr_tail()}"

    def finish(
        self, timeout: float, every: float = 0, chore: Callable[[], None] | None = None
    ) -> Any:
        """Wait for the process to end (killing it after ``timeout``); its result."""
        deadline = time.monotonic() + timeout
        next_chore = time.monotonic() + every if chore and every else math.inf
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise BenchFailure(
                        f"{self.what}: killed after {timeout:.0f} s"
                        f"\n  stderr:\n{self.stderr_tail()}"
                    )
                try:
                    self.proc.wait(min(left, max(next_chore - time.monotonic(), 0.01)))
                    break
                except subprocess.TimeoutExpired:
                    if chore is not None and time.monotonic() >= next_chore:
                        chore()
                        next_chore = time.monotonic() + every
            if self.proc.returncode != 0:
                raise BenchFailure(f"{self.what}: failed\n  {self._error()}")
            return json.loads(self.out.read_text())
        finally:
            if self.proc.poll() is None:
                self.kill()


# -- the run -------------------------------------------------------------------------------


def host_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "python": platform.python_version(),
    }


def git_describe() -> str:
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ORIGIN,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "pgtq", "alembic", "benchmarks"],
            cwd=ORIGIN,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def pgtq_source_hash() -> str:
    """A short hash of pgtq's sources now: shows if pgtq was edited during a long run."""
    digest = hashlib.sha1(usedforsecurity=False)
    for path in sorted((ROOT / "pgtq").glob("**/*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def loop_versions() -> dict[str, str]:
    try:
        return {"loop": "uvloop", "uvloop": importlib.metadata.version("uvloop")}
    except importlib.metadata.PackageNotFoundError:
        return {"loop": "asyncio"}


@dataclass
class Run:
    args: argparse.Namespace
    mode: Mode
    libs: list[Adapter]
    server: Server
    workdir: Path
    out: IO[str]
    header: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)  # sampled before each measurement

    # -- results ---------------------------------------------------------------------------

    def emit(
        self,
        adapter: Adapter,
        figure: str,
        rnd: int,
        value: float,
        settings: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> None:
        record = {
            "run": self.header["run"],
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "library": adapter.name,
            "figure": figure,
            "title": FIGURE[figure].title.format(jobs=f"{settings.get('jobs', 0):,}"),
            "round": rnd,
            "value": value,
            "unit": FIGURE[figure].unit,
            "settings": settings,
            "versions": {
                **adapter.versions(),
                **self.header["versions"],
                **({"pgtq_source": pgtq_source_hash()} if adapter.name == "pgtq" else {}),
            },
            "host": self.header["host"],
            "extra": {**(extra or {}), **self.context},
        }
        self.records.append(record)
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()
        shown = f"{value:,.0f}" if FIGURE[figure].unit == "jobs/s" else f"{value:,.2f}"
        log(f"  round {rnd} {adapter.name:<13} {figure:<22} {shown} {FIGURE[figure].unit}")

    def fail(self, adapter: Adapter, what: str, rnd: int, exc: BenchFailure) -> None:
        message = f"{adapter.name} {what} (round {rnd}): {exc}"
        self.failures.append(message)
        log(f"  FAILED: {message}")
        record = {
            "run": self.header["run"],
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "library": adapter.name,
            "figure": what,
            "round": rnd,
            "error": str(exc),
        }
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    # -- helpers ---------------------------------------------------------------------------

    def timeout(self, jobs: int) -> float:
        return phase_timeout(jobs, self.args.timeout_scale)

    def database(self) -> contextlib.AbstractContextManager[str]:
        return self.server.database()

    def install(self, adapter: Adapter, name: str) -> None:
        dsn = self.server.dsn(name)
        run_async_with_timeout(adapter.install(dsn), 120, f"{adapter.name} schema install")

    def fill(self, adapter: Adapter, name: str, kind: Kind, jobs: int) -> None:
        """Queue ``jobs`` no-op jobs (untimed), then VACUUM ANALYZE the jobs table."""
        dsn = self.server.dsn(name)

        async def fill() -> None:
            async with adapter.async_enqueuer(dsn, kind) as enq:
                for start in range(0, jobs, PREFILL_CHUNK):
                    await enq.batch(range(start, min(start + PREFILL_CHUNK, jobs)))

        run_async_with_timeout(fill(), self.timeout(jobs), f"{adapter.name} queue fill")
        self.vacuum(name, adapter, analyze=True)

    def vacuum(self, name: str, adapter: Adapter, analyze: bool = False) -> None:
        with self.server.connect(name, statement_timeout=900) as conn:
            conn.execute(f"VACUUM {'(ANALYZE) ' if analyze else ''}{adapter.jobs_table}")

    def verify(self, adapter: Adapter, name: str, expect: int) -> list[str]:
        with self.server.connect(name) as conn:
            return adapter.verify(row_fetcher(conn), expect)

    def spawn(self, adapter: Adapter, spec: dict[str, Any]) -> Child:
        return Child({"lib": adapter.name, **spec}, self.workdir)

    # -- figures ---------------------------------------------------------------------------

    def burndown(
        self,
        adapter: Adapter,
        kind: Kind,
        batch: int,
        jobs: int,
        rnd: int,
        figure: str,
        limit: float | None = None,
    ) -> dict[str, Any]:
        limit = min(self.timeout(jobs), limit or math.inf)
        with self.database() as name:
            child = self.spawn(
                adapter,
                {
                    "action": "burndown",
                    "dsn": self.server.dsn(name),
                    "kind": kind,
                    "batch": batch,
                    "expect": jobs,
                    "prefilled": True,
                    "timeout": limit,
                },
            )
            with child:
                self.install(adapter, name)
                self.fill(adapter, name, kind, jobs)
                child.ready()
                child.go()
                every = self.args.vacuum_every
                result: dict[str, Any] = child.finish(
                    limit + STOP_GRACE, every, lambda: self.vacuum(name, adapter) if every else None
                )
            problems = result["problems"] + self.verify(adapter, name, jobs)
            check_integrity(figure, rnd, problems)
        settings = {
            "jobs": jobs,
            "kind": kind,
            "batch": batch,
            "worker": result["settings"],
            "loop": result["loop"],
            "vacuum_every": self.args.vacuum_every or None,
        }
        extra = {
            "elapsed_s": result["elapsed"],
            "first_job_after_s": result["first_job_after"],
            "handler_done_after_s": result["handler_done_after"],
            "tenths_s": [round(t, 4) for t in result["tenths"]],
            "peak_rss_mb": result["peak_rss_mb"],
            "polls": result["polls"],
        }
        if "warning" in result:
            extra["warning"] = result["warning"]
            log(f"  warning: {adapter.name}: {result['warning']}")
        self.emit(adapter, figure, rnd, jobs / result["elapsed"], settings, extra)
        return result

    def enqueue(self, adapter: Adapter, rnd: int) -> None:
        figures = ["enqueue_batch", "enqueue_single_async", "enqueue_single_sync"]
        jobs, singles = self.mode.batch_jobs, self.mode.singles
        limit = self.timeout(max(jobs, singles))
        with contextlib.ExitStack() as stack:
            names = {f: stack.enter_context(self.database()) for f in figures}
            child = self.spawn(
                adapter,
                {
                    "action": "enqueue",
                    "dsns": {f: self.server.dsn(n) for f, n in names.items()},
                    "jobs": jobs,
                    "chunk": CHUNK,
                    "singles": singles,
                    "timeout": limit,
                },
            )
            with child:
                for name in names.values():
                    self.install(adapter, name)
                child.ready()
                child.go()
                result = child.finish(3 * limit + 30)
            for figure in figures:
                count = jobs if figure == "enqueue_batch" else singles
                warm = CHUNK if figure == "enqueue_batch" else 1
                with self.server.connect(names[figure]) as conn:
                    row = conn.execute(adapter.total_sql).fetchone()
                stored = row[0] if row else 0
                if stored != count + warm:
                    raise BenchFailure(
                        f"LOST OR DUPLICATED JOBS in {figure}, round {rnd}: {stored} jobs stored,"
                        f" expected {count + warm} ({count} timed + {warm} warm-up)"
                    )
        for figure in figures:
            count = jobs if figure == "enqueue_batch" else singles
            seconds = result["seconds"][figure]
            settings = {
                "jobs": count,
                "per_call": CHUNK if figure == "enqueue_batch" else 1,
                "loop": result["loop"],
            }
            self.emit(adapter, figure, rnd, count / seconds, settings, {"elapsed_s": seconds})

    def latency(self, adapter: Adapter, rnd: int) -> None:
        count = self.mode.latency_jobs
        limit = self.timeout(count) + count * LATENCY_INTERVAL
        with self.database() as name:
            dsn = self.server.dsn(name)
            worker = self.spawn(
                adapter,
                {
                    "action": "burndown",
                    "dsn": dsn,
                    "kind": "async",
                    "batch": LATENCY_BATCH,
                    "expect": count + 1,  # and the warm-up job
                    "prefilled": False,
                    "timeout": limit,
                    "timestamps": True,
                },
            )
            with worker:
                enqueuer = self.spawn(
                    adapter,
                    {
                        "action": "latency_enqueue",
                        "dsn": dsn,
                        "count": count,
                        "interval": LATENCY_INTERVAL,
                        "settle": LATENCY_SETTLE,
                        "timeout": limit,
                    },
                )
                with enqueuer:
                    self.install(adapter, name)
                    worker.ready()
                    enqueuer.ready()
                    worker.go()
                    enqueuer.go()
                    sent = enqueuer.finish(limit + 30)
                worker.go("SENT")  # every job is queued: a stalled handler now means lost jobs
                ran = worker.finish(limit + STOP_GRACE)
            problems = ran["problems"] + self.verify(adapter, name, count + 1)
            check_integrity("latency", rnd, problems)
        pairs = zip(ran["starts"], sent["before"], strict=False)
        latencies = sorted((start - before) * 1000 for start, before in pairs)
        settings = {
            "jobs": count,
            "interval_ms": LATENCY_INTERVAL * 1000,
            "batch": LATENCY_BATCH,
            "worker": ran["settings"],
            "loop": ran["loop"],
        }
        extra = {
            "min_ms": latencies[0],
            "max_ms": latencies[-1],
            "mean_ms": statistics.fmean(latencies),
        }
        self.emit(adapter, "latency_p50", rnd, percentile(latencies, 50), settings, extra)
        self.emit(adapter, "latency_p99", rnd, percentile(latencies, 99), settings, extra)

    def big(self, adapter: Adapter, rnd: int) -> None:
        base_jobs, big_jobs = self.args.jobs or 20_000, self.args.big_jobs
        base = self.burndown(adapter, "async", 100, base_jobs, rnd, "big_burndown_base")
        rate = base_jobs / base["elapsed"]
        # The target is 0.9 of the small queue's rate: a run slower than a tenth of it has
        # clearly missed, so it is stopped there rather than after the generic limit.
        limit = 60 + 10 * big_jobs / rate
        try:
            result = self.burndown(
                adapter, "async", 100, big_jobs, rnd, "big_burndown_big", limit=limit
            )
        except BenchFailure as exc:
            raise BenchFailure(
                f"{exc}\n  (the limit was 10 times the time at the {base_jobs:,} rate of"
                f" {rate:,.0f} jobs/s: the 1M / 20k ratio is below 0.1)"
            ) from exc
        settings = {"jobs": big_jobs, "concurrency": 100, "worker": result["settings"]}
        self.emit(adapter, "big_peak_rss", rnd, result["peak_rss_mb"], settings)

    def cli_figure(self, adapter: Adapter, rnd: int, *, kind: Kind) -> None:
        """The burn-down through `pgtq worker --one-shot` and in-process, each a whole process.

        Both ways in one group, on the same backlog size, in an order that alternates with
        the round (each in its own fresh database).
        """
        ways = ["cli", "inproc"] if rnd % 2 else ["inproc", "cli"]
        warm_bytecode()
        for way in ways:
            self.whole_process_burndown(adapter, rnd, kind, way)

    def whole_process_burndown(
        self, adapter: Adapter, rnd: int, kind: Kind, way: str, *, group: str = "cli"
    ) -> None:
        """A prefilled queue drained by one whole process (``way``: ``cli`` the command,
        ``inproc`` its in-process twin); ``group`` says which figure group measured it."""
        figure, jobs = f"{way}_{kind}", self.mode.jobs
        with self.database() as name:
            dsn = self.server.dsn(name)
            self.install(adapter, name)
            self.fill(adapter, name, kind, jobs)
            if way == "cli":
                command = cli_command(dsn)
            else:
                conc = str(CLI_CONCURRENCY)
                command = [sys.executable, "-m", "benchmarks.inprocess", dsn, conc]
            elapsed, out, stderr = self.drain(figure, command, self.timeout(jobs))
            check_integrity(figure, rnd, self.verify(adapter, name, jobs))
            span = self.db_span(name)
        settings = {
            "jobs": jobs,
            "kind": kind,
            "concurrency": CLI_CONCURRENCY,
            "way": way,
            "group": group,
            "command": shown_command(command, dsn),
        }
        extra: dict[str, Any] = {
            "elapsed_s": elapsed,
            # first job's start to last job's end, read off the rows: the burn-down without
            # the process's start-up and exit
            "db_span_s": span,
            "stderr_lines": len(stderr.splitlines()),
            "stderr_bytes": len(stderr.encode()),
        }
        if way == "inproc":
            with contextlib.suppress(ValueError, IndexError):
                extra.update(json.loads(out.strip().splitlines()[-1]))
        self.emit(adapter, figure, rnd, jobs / elapsed, settings, extra)

    def drain(self, figure: str, command: list[str], limit: float) -> tuple[float, str, str]:
        """Run ``command`` to its exit, timed from ``Popen`` (killed after ``limit``): the
        seconds, its stdout and its stderr. A non-zero exit is a failure."""
        err_path = self.workdir / f"{figure}-{uuid.uuid4().hex[:8]}.err"
        with open(err_path, "w") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
            try:
                out, _ = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise BenchFailure(f"{figure}: killed after {limit:.0f} s") from None
            elapsed = time.perf_counter() - started
        stderr = err_path.read_text(errors="replace")
        if proc.returncode != 0:
            tail = "\n".join("    " + line for line in stderr.splitlines()[-15:])
            raise BenchFailure(f"{figure}: exited {proc.returncode}\n  stderr:\n{tail}")
        return elapsed, out, stderr

    def db_span(self, name: str) -> float | None:
        """The first job's ``started_at`` to the last job's ``finished_at``, in seconds."""
        with self.server.connect(name) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8"
                " FROM pgtq.jobs"
            ).fetchone()
        return row[0] if row else None

    def workflow_figure(self, adapter: Adapter, rnd: int) -> None:
        """Chords, chains and the plain backlog of as many jobs, each drained by `pgtq worker
        --one-shot -c 100` as a whole process, each in its own fresh database.

        All three in one group, so the table divides each workflow's rate by the plain one's
        of the same run; the order rotates with the round (each way first once in 3 rounds).
        """
        k = (rnd - 1) % len(WORKFLOW_WAYS)
        warm_bytecode()
        for way in WORKFLOW_WAYS[k:] + WORKFLOW_WAYS[:k]:
            if way == "plain":
                self.whole_process_burndown(adapter, rnd, "async", "cli", group="workflow")
            else:
                self.workflow_burndown(adapter, rnd, way)

    def workflow_burndown(self, adapter: Adapter, rnd: int, shape: Shape) -> None:
        """Workflows of no-op jobs (deferred untimed) drained by `pgtq worker --one-shot`:
        timed as :meth:`whole_process_burndown` times the plain backlog, checked as it is
        and, from the rows, for the order of every edge."""
        from benchmarks import workflows

        figure, jobs = f"workflow_{shape}", self.mode.jobs
        with self.database() as name:
            dsn = self.server.dsn(name)
            self.install(adapter, name)
            self.fill_workflows(name, shape, jobs)
            command = cli_command(dsn)
            elapsed, _, stderr = self.drain(figure, command, self.timeout(jobs))
            with self.server.connect(name) as conn:
                found, facts = workflows.check_drained(row_fetcher(conn), shape, jobs)
            check_integrity(figure, rnd, self.verify(adapter, name, jobs) + found)
            span = self.db_span(name)
        settings = {
            "jobs": jobs,
            "kind": "async",
            "concurrency": CLI_CONCURRENCY,
            "way": "cli",
            "group": "workflow",
            "shape": shape,
            "width": workflows.WIDTH[shape],
            **workflows.expected(shape, jobs).as_dict(),
            "command": shown_command(command, dsn),
        }
        extra: dict[str, Any] = {
            "elapsed_s": elapsed,
            "db_span_s": span,
            **facts,
            "stderr_lines": len(stderr.splitlines()),
            "stderr_bytes": len(stderr.encode()),
        }
        self.emit(adapter, figure, rnd, jobs / elapsed, settings, extra)

    def fill_workflows(self, name: str, shape: Shape, jobs: int) -> None:
        """Defer the workflows with pgtq's public API (untimed), check that the children wait
        (``blocked``), then VACUUM ANALYZE the jobs and their edges."""
        from benchmarks import workflows

        what = f"pgtq workflow fill ({shape})"
        fill = workflows.defer(self.server.dsn(name), shape, jobs)
        run_async_with_timeout(fill, self.timeout(jobs), what)
        with self.server.connect(name, statement_timeout=900) as conn:
            problems = workflows.check_filled(row_fetcher(conn), shape, jobs)
            if problems:
                raise BenchFailure(f"{what}: " + "; ".join(problems))
            conn.execute("VACUUM (ANALYZE) pgtq.jobs, pgtq.job_dependencies")

    def schedule(self, adapter: Adapter, rnd: int, *, retry: bool) -> None:
        """Lateness of jobs scheduled ahead (or of retries after 1 s) on an idle worker."""
        count = self.mode.schedule_jobs
        prefix = "retry" if retry else "sched"
        rng = random.Random(1000 * rnd + count)
        delays = None if retry else [round(rng.uniform(*SCHEDULE_AHEAD), 3) for _ in range(count)]
        interval = RETRY_INTERVAL if retry else SCHEDULE_INTERVAL
        # PgQueuer's idle worker sleeps up to 30 s: the limit allows for it.
        limit = self.timeout(count) + count * interval + SCHEDULE_AHEAD[1] + 30
        with self.database() as name:
            dsn = self.server.dsn(name)
            worker = self.spawn(
                adapter,
                {
                    "action": "schedule_worker",
                    "dsn": dsn,
                    "expect": count + 1,  # and the warm-up job (n = count)
                    "fail_below": count if retry else 0,
                    "timeout": limit,
                },
            )
            with worker:
                enqueuer = self.spawn(
                    adapter,
                    {
                        "action": "schedule_enqueue",
                        "dsn": dsn,
                        "count": count,
                        "interval": interval,
                        "delays": delays,
                        "settle": SCHEDULE_SETTLE,
                        "timeout": limit,
                    },
                )
                with enqueuer:
                    self.install(adapter, name)
                    worker.ready()
                    enqueuer.ready()
                    worker.go()
                    enqueuer.go()
                    sent = enqueuer.finish(limit + 30)
                ran = worker.finish(limit + STOP_GRACE)
            db: dict[int, tuple[float | None, float | None]] = {}
            if adapter.lateness_sql:
                with self.server.connect(name) as conn:
                    for n, at, began in conn.execute(adapter.lateness_sql).fetchall():
                        db[int(n)] = (
                            None if at is None else float(at),
                            None if began is None else float(began),
                        )
        runs = {int(n): r for n, r in ran["runs"].items()}
        problems, late, handler_late, offsets = [], [], [], []
        want = 2 if retry else 1
        for n in range(count):
            mine = runs.get(n, [])
            if len(mine) != want:
                problems.append(f"job {n} ran {len(mine)} time(s), expected {want}")
                continue
            handler_start, handed = mine[-1]
            if adapter.lateness_sql:
                scheduled, began = db.get(n, (None, None))
                if scheduled is None or began is None:
                    problems.append(f"job {n}: no scheduled or started time in the database")
                    continue
                late.append((began - scheduled) * 1000)
            else:
                scheduled = handed
                if scheduled is None:
                    problems.append(f"job {n}: the handler got no scheduled time")
                    continue
                late.append((handler_start - scheduled) * 1000)
            handler_late.append((handler_start - scheduled) * 1000)
            # The schedule the library stored against what was asked for: the defer's own
            # time + the delay (scheduled jobs), the first run's failure + 1 s (retries).
            asked = mine[0][0] + 1.0 if retry else sent["before"][n] + (delays or [])[n]
            offsets.append((scheduled - asked) * 1000)
        check_integrity(prefix, rnd, problems)
        late.sort()
        handler_late.sort()
        settings = {
            "jobs": count,
            "ahead_s": None if retry else list(SCHEDULE_AHEAD),
            "backoff_s": 1.0 if retry else None,
            "interval_ms": interval * 1000,
            "measured": adapter.lateness_source,
            **ran["settings"],
            "loop": ran["loop"],
        }
        extra = {
            "min_ms": late[0],
            "mean_ms": statistics.fmean(late),
            "handler_p50_ms": percentile(handler_late, 50),
            "handler_max_ms": handler_late[-1],
            "schedule_offset_ms": [round(min(offsets), 2), round(max(offsets), 2)],
            "late_over_100ms": sum(1 for v in late if v > LATENESS_GOAL_MS),
        }
        if "warning" in ran:
            extra["warning"] = ran["warning"]
        for pct, key in ((50, "p50"), (99, "p99"), (100, "max")):
            self.emit(adapter, f"{prefix}_{key}", rnd, percentile(late, pct), settings, extra)

    # -- the whole run ---------------------------------------------------------------------

    def wait_for_quiet(self) -> tuple[float, float | None]:
        """With --quiet-wait S: wait (at most S s) until the machine looks idle.

        Idle: no session of another database active on the server, and at least 80 % of
        the CPU time idle over half a second. For shared machines; off by default.
        Returns the seconds waited and the last idle fraction seen.
        """
        if self.args.quiet_wait <= 0:
            return 0.0, None
        started = time.monotonic()
        while True:
            idle = cpu_idle_fraction(0.5)
            quiet = (idle is None or idle >= QUIET_IDLE) and self.server.others_active() == 0
            waited = time.monotonic() - started
            if quiet or waited >= self.args.quiet_wait:
                return waited, None if idle is None else round(idle, 2)

    def order(self, rnd: int, group: int) -> list[Adapter]:
        """Libraries take turns: the order rotates with the round and the figure."""
        k = (rnd + group) % len(self.libs)
        return self.libs[k:] + self.libs[:k]

    def attempt(self, adapter: Adapter, what: str, rnd: int, fn: Callable[[], object]) -> None:
        try:
            self.server.ensure()
        except psycopg.Error as exc:
            self.fail(adapter, what, rnd, BenchFailure(f"the server is unreachable: {exc}"))
            return
        waited, idle = self.wait_for_quiet()
        self.context = {
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "other_active_backends": self.server.others_active(),
            "cpu_idle_before": idle,
            "quiet_wait_s": round(waited, 1),
        }
        started = time.monotonic()
        try:
            fn()
        except BenchFailure as exc:
            self.fail(adapter, what, rnd, exc)
        except psycopg.Error as exc:  # the driver's own SQL (create, fill, verify, drop)
            self.fail(adapter, what, rnd, BenchFailure(f"{type(exc).__name__}: {exc}"))
        log(f"    ({adapter.name} {what}: {time.monotonic() - started:.1f} s)")

    def run(self) -> None:
        # (what, run it for a library and a round, does the library have it)
        Group = tuple[str, Callable[[Adapter, int], object], Callable[[Adapter], bool]]
        groups: list[Group] = []
        always: Callable[[Adapter], bool] = lambda a: True  # noqa: E731
        if self.args.big:
            groups.append(("big", self.big, always))
        else:
            kinds: tuple[Kind, ...] = ("async", "sync")
            if "burndown" in self.args.figures:
                for kind, batch in itertools.product(kinds, BATCHES):
                    figure = f"burndown_{kind}_b{batch}"
                    measure: Callable[[Adapter, int], object] = functools.partial(
                        self.burndown_figure, kind=kind, batch=batch
                    )
                    has = always if kind == "async" else (lambda a: a.supports_sync_tasks)
                    groups.append((figure, measure, has))
            if "enqueue" in self.args.figures:
                groups.append(("enqueue", self.enqueue, always))
            if "latency" in self.args.figures:
                groups.append(("latency", self.latency, always))
            only_pgtq: Callable[[Adapter], bool] = lambda a: a.name == "pgtq"  # noqa: E731
            if "cli" in self.args.figures:
                for kind in kinds:
                    cli = functools.partial(self.cli_figure, kind=kind)
                    groups.append((f"cli_{kind}", cli, only_pgtq))
            if "workflow" in self.args.figures:
                groups.append(("workflow", self.workflow_figure, only_pgtq))
            if "schedule" in self.args.figures:
                for retry in (False, True):
                    sched = functools.partial(self.schedule, retry=retry)
                    groups.append(("retry" if retry else "schedule", sched, always))
        for rnd in range(1, self.args.rounds + 1):
            log(f"round {rnd} of {self.args.rounds}")
            for g, (what, measure, has) in enumerate(groups):
                for adapter in self.order(rnd, g):
                    if has(adapter):
                        self.attempt(adapter, what, rnd, functools.partial(measure, adapter, rnd))

    def burndown_figure(self, adapter: Adapter, rnd: int, *, kind: Kind, batch: int) -> None:
        self.burndown(adapter, kind, batch, self.mode.jobs, rnd, f"burndown_{kind}_b{batch}")


def cpu_idle_fraction(interval: float) -> float | None:
    """The share of all CPUs' time spent idle over ``interval`` seconds (Linux), else None."""

    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, total

    first = sample()
    time.sleep(interval)
    second = sample()
    if first is None or second is None or second[1] == first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1])


def check_integrity(figure: str, rnd: int, problems: list[str]) -> None:
    if problems:
        raise BenchFailure(
            f"LOST OR DUPLICATED JOBS in {figure}, round {rnd}: " + "; ".join(problems)
        )


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def run_async_with_timeout(coro: Any, timeout: float, what: str) -> None:
    async def bounded() -> None:
        try:
            async with asyncio.timeout(timeout):
                await coro
        except TimeoutError:
            raise BenchFailure(f"{what} timed out after {timeout:.0f} s") from None

    try:
        asyncio.run(bounded())
    except BenchFailure:
        raise
    except Exception as exc:
        raise BenchFailure(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the table -----------------------------------------------------------------------------


def medians(records: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, int]]:
    """(figure, library) -> (median over rounds, number of rounds)."""
    values: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if "value" in r:
            values.setdefault((r["figure"], r["library"]), []).append(r["value"])
    return {k: (statistics.median(v), len(v)) for k, v in values.items()}


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "jobs/s":
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and footnotes of the table of medians."""
    med = medians(records)
    libs = [a for a in ADAPTERS if any(r.get("library") == a for r in records)]
    titles = [ADAPTERS[a].title for a in libs]
    peers = [a for a in libs if a != "pgtq"]
    header = ["figure", "unit", *titles] + [f"pgtq / {ADAPTERS[p].title}" for p in peers]
    rows: list[list[str]] = []
    notes: list[str] = []
    rounds = max((r.get("round", 0) for r in records), default=0)
    jobs: dict[str, int] = {}
    for r in records:
        jobs.setdefault(r["figure"], r.get("settings", {}).get("jobs", 0))
    for fig in FIGURES:
        cells: dict[str, float | None] = {}
        marks: dict[str, str] = {}
        for lib in libs:
            got = med.get((fig.key, lib))
            cells[lib] = got[0] if got else None
            if got is None and fig.key.startswith("burndown_sync") and lib == "pgqueuer":
                async_fig = fig.key.replace("sync", "async")
                alt = med.get((async_fig, lib))
                if alt is not None:
                    cells[lib] = alt[0]
                    marks[lib] = " †"
        if all(v is None for v in cells.values()):
            continue
        title = fig.title.format(jobs=f"{jobs.get(fig.key, 0):,}")
        row = [title, fig.unit + (" (lower is better)" if fig.better == "lower" else "")]
        row += [fmt(cells[lib], fig.unit) + marks.get(lib, "") for lib in libs]
        for peer in peers:
            mine, theirs = cells.get("pgtq"), cells.get(peer)
            row.append(f"{mine / theirs:.2f}" if mine and theirs else "n/a")
        rows.append(row)
        if fig.key == "big_burndown_big":
            base, big = med.get(("big_burndown_base", "pgtq")), med.get((fig.key, "pgtq"))
            if base and big:
                ratio = big[0] / base[0]
                target = "meets" if ratio >= 0.9 else "misses"
                sizes = f"{jobs[fig.key]:,} / {jobs['big_burndown_base']:,} queued"
                notes.append(f"pgtq burn-down {sizes}: {ratio:.2f} ({target} the ≥ 0.9 target)")
        if fig.key in ("inproc_async", "inproc_sync"):
            kind = fig.key.removeprefix("inproc_")
            inproc, cli = med.get((fig.key, "pgtq")), med.get((f"cli_{kind}", "pgtq"))
            if inproc and cli:
                ratio = cli[0] / inproc[0]
                target = "meets" if ratio >= CLI_GOAL else "misses"
                spans = {
                    way: [
                        r["extra"]["db_span_s"]
                        for r in records
                        if r.get("figure") == f"{way}_{kind}"
                        and r.get("extra", {}).get("db_span_s")
                    ]
                    for way in ("cli", "inproc")
                }
                span = ""
                if spans["cli"] and spans["inproc"]:
                    inner = statistics.median(spans["inproc"]) / statistics.median(spans["cli"])
                    span = f"; first job's start to last job's end (rows): {inner:.2f}"
                notes.append(
                    f"pgtq {kind} burn-down, `pgtq worker --one-shot` / in-process (whole"
                    f" processes): {ratio:.2f} ({target} the ≥ {CLI_GOAL} target){span}"
                )
        if fig.key in ("sched_max", "retry_max") and cells.get("pgtq") is not None:
            worst = cells["pgtq"] or 0.0
            target = "meets" if worst <= LATENESS_GOAL_MS else "misses"
            what = "scheduled jobs" if fig.key == "sched_max" else "retries"
            notes.append(
                f"pgtq max lateness of {what} {worst:,.1f} ms ({target} the"
                f" ≤ {LATENESS_GOAL_MS:.0f} ms target)"
            )
        if fig.key == "big_peak_rss" and cells.get("pgtq") is not None:
            rss = cells["pgtq"] or 0.0
            target = "meets" if rss <= 100 else "misses"
            notes.append(f"pgtq worker peak RSS {rss:.0f} MB ({target} the ≤ 100 MB target)")
    notes += workflow_notes(records)
    if any(" †" in c for row in rows for c in row):
        notes.append(
            "† PgQueuer 1.6 has no sync entrypoints (a sync one raises TypeError): "
            "its async figure at the same batch size is shown and compared"
        )
    notes.append(f"medians of {rounds} round(s); ratio > 1 means pgtq is higher")
    return header, rows, notes


def workflow_notes(records: list[dict[str, Any]]) -> list[str]:
    """Each workflow's rate over the plain backlog's, drained by the same command in the same
    run (the workflow group's own plain measurements, not the cli group's): on the medians,
    per round, and for the drain alone (first ``started_at`` to last ``finished_at``)."""

    def by_round(figure: str, key: str | None = None) -> dict[int, float]:
        found: dict[int, float] = {}
        for r in records:
            if r.get("figure") != figure or "value" not in r:
                continue
            if r.get("settings", {}).get("group", "workflow") != "workflow":
                continue
            value = r["value"] if key is None else r.get("extra", {}).get(key)
            if value:
                found[r["round"]] = value
        return found

    plain, plain_span = by_round("cli_async"), by_round("cli_async", "db_span_s")
    notes = []
    for shape in ("chords", "chains"):
        mine = by_round(f"workflow_{shape}")
        if not mine or not plain:
            continue
        ratio = statistics.median(mine.values()) / statistics.median(plain.values())
        rounds = ", ".join(f"{mine[r] / plain[r]:.2f}" for r in sorted(mine) if r in plain)
        note = (
            f"pgtq {shape} / plain burn-down, both `pgtq worker --one-shot -c 100` in this run:"
            f" {ratio:.2f} (by round: {rounds})"
        )
        span = by_round(f"workflow_{shape}", "db_span_s")
        if span and plain_span:
            inner = statistics.median(plain_span.values()) / statistics.median(span.values())
            note += f"; first job's start to last job's end (rows): {inner:.2f}"
        notes.append(note)
    return notes


def markdown_table(records: list[dict[str, Any]]) -> str:
    header, rows, notes = table_rows(records)
    right = [i >= 2 for i in range(len(header))]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if r else "---" for r in right) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def print_table(records: list[dict[str, Any]]) -> None:
    header, rows, notes = table_rows(records)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_table(records))
        return
    table = Table(title="medians per figure")
    for i, h in enumerate(header):
        table.add_column(h, justify="right" if i >= 2 else "left")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    for note in notes:
        console.print(f"  {note}")


# -- the command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    p.add_argument("--quick", action="store_true", help="1,000 jobs per figure (< 2 minutes)")
    p.add_argument(
        "--big",
        action="store_true",
        help="only the 1,000,000-queued burn-down vs 20,000, and peak RSS (pgtq)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--dsn",
        default=os.environ.get("PGTQ_BENCH_DSN", DEFAULT_DSN),
        help="a server URL whose user may create databases (default: %(default)s)",
    )
    p.add_argument(
        "--only", help="comma-separated libraries (default: every installed one; with --big: pgtq)"
    )
    p.add_argument("--jobs", type=int, help="jobs per burn-down and batch enqueue")
    p.add_argument("--singles", type=int, help="jobs per single-enqueue figure")
    p.add_argument("--latency-jobs", type=int, help="jobs in the pickup-latency figure")
    p.add_argument(
        "--schedule-jobs", type=int, help="jobs per scheduled-lateness figure (and retries)"
    )
    p.add_argument("--big-jobs", type=int, default=1_000_000)
    p.add_argument(
        "--figures",
        default=",".join(GROUPS),
        help="comma-separated groups: burndown,enqueue,latency,cli,workflow,schedule"
        " (default: all)",
    )
    p.add_argument(
        "--vacuum-every",
        type=float,
        help="VACUUM the jobs table every N s during a burn-down (default: never; 10 with --big)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measurement, wait up to S s for an idle machine (shared machines)",
    )
    p.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every phase's time limit"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument(
        "--no-snapshot",
        dest="snapshot",
        action="store_false",
        help="run the checkout's files directly, not a copy made at the start",
    )
    p.add_argument(
        "--table", type=Path, metavar="JSONL", help="print the table of an earlier run and exit"
    )
    args = p.parse_args(argv)
    args.out = (Path(os.environ.get(CWD_ENV) or os.getcwd()) / args.out).resolve()
    args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    unknown = set(args.figures) - set(GROUPS)
    if unknown:
        p.error(f"unknown figure group(s): {', '.join(sorted(unknown))}")
    if args.vacuum_every is None:
        args.vacuum_every = 10.0 if args.big else 0.0
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def choose_libraries(args: argparse.Namespace) -> list[Adapter]:
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ADAPTERS]
        if unknown:
            known = ", ".join(ADAPTERS)
            raise SystemExit(f"unknown library: {', '.join(unknown)} (known: {known})")
    else:
        names = ["pgtq"] if args.big else list(ADAPTERS)
    chosen = []
    for name in names:
        if ADAPTERS[name].available():
            chosen.append(get(name))
        else:
            log(f"{name} is not installed: skipped (nox -s bench installs the peers)")
    if not chosen:
        raise SystemExit("no library to benchmark")
    return chosen


def snapshot(given: list[str]) -> int:
    """Run this same command on a copy of pgtq/, alembic/ and benchmarks/ made now.

    pgtq may be edited while a long run goes on (or between its rounds): every measurement
    then still runs the code as it was when the run began.
    """
    commit = git_describe()
    with tempfile.TemporaryDirectory(prefix="pgtq-bench-src-") as tmp:
        copy = Path(tmp)
        skip = shutil.ignore_patterns("__pycache__", "results", ".*")
        for name in ("pgtq", "alembic", "benchmarks"):
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, copy / name, ignore=skip)
        # The copy is the cwd, so it comes first on sys.path (before an editable pgtq).
        env = {**os.environ, ORIGIN_ENV: str(ROOT), COMMIT_ENV: commit, CWD_ENV: os.getcwd()}
        command = [sys.executable, "-m", "benchmarks.run", *given]
        try:
            return subprocess.run(command, cwd=copy, env=env, check=False).returncode
        except KeyboardInterrupt:
            return 130


def main(argv: list[str] | None = None) -> int:
    if "--fleet" in (sys.argv[1:] if argv is None else argv):  # issue 20: benchmarks/fleet.py
        from benchmarks import fleet

        return fleet.main(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.table:
        records = [json.loads(line) for line in args.table.read_text().splitlines() if line]
        print_table(records)
        return 0
    given = sys.argv[1:] if argv is None else argv
    if args.snapshot and not os.environ.get(ORIGIN_ENV) and (ROOT / "pgtq").is_dir():
        return snapshot(given)
    mode = MODES["quick" if args.quick else "full"]
    mode = Mode(
        mode.name,
        jobs=args.jobs or mode.jobs,
        batch_jobs=args.jobs or mode.batch_jobs,
        singles=args.singles or mode.singles,
        latency_jobs=args.latency_jobs or mode.latency_jobs,
        schedule_jobs=args.schedule_jobs or mode.schedule_jobs,
    )
    libs = choose_libraries(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = uuid.uuid4().hex[:8]
    command = " ".join(["python -m benchmarks.run", shlex.join(given)]).strip()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}.jsonl"
    server = Server(args.dsn, run_id)
    started = time.monotonic()
    try:
        header = {
            "run": {
                "id": run_id,
                "command": command,
                "mode": "big" if args.big else mode.name,
                "pgtq_commit": git_describe(),
            },
            "versions": {**loop_versions(), "python": platform.python_version()},
            "host": {**host_info(), "postgres": server.info()},
        }
        what = (
            f"{args.big_jobs:,} vs {args.jobs or 20_000:,} queued jobs"
            if args.big
            else f"{mode.name}: {mode.jobs:,} jobs per burn-down, {mode.batch_jobs:,} batch-"
            f"enqueued, {mode.singles:,} single enqueues, {mode.latency_jobs} latency jobs, "
            f"{mode.schedule_jobs} scheduled jobs"
        )
        log(
            f"{command}\n  libraries: {', '.join(a.name for a in libs)}; {what}; "
            f"{args.rounds} round(s)\n  results: {path}"
        )
        with tempfile.TemporaryDirectory(prefix="pgtq-bench-") as tmp, open(path, "w") as out:
            run = Run(args, mode, libs, server, Path(tmp), out, header)
            run.run()
    finally:
        server.close()
    minutes = (time.monotonic() - started) / 60
    print_table(run.records)
    md = path.with_suffix(".md")
    md.write_text(f"`{command}` ({minutes:.1f} min)\n\n{markdown_table(run.records)}")
    log(f"\n{len(run.records)} measurements in {minutes:.1f} min: {path} (table: {md})")
    if run.failures:
        log(f"\n{len(run.failures)} FAILED measurement(s):")
        for failure in run.failures:
            log(f"  - {failure}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
