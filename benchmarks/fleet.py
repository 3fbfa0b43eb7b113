"""The fleet benchmark (issue 20): many worker processes, and many idle workers, on one database.

    python -m benchmarks.run --fleet                       # 100,000 jobs, 1-16 processes, herd, CPU
    python -m benchmarks.run --fleet --jobs 2000 --processes 1,2 --herd-workers 4 --herd-jobs 3

Three groups of figures (``--figures throughput,herd,cpu``), one round each, written like the
peer benchmark's (one JSON line per figure in ``benchmarks/results/<timestamp>.jsonl``, the
table next to it as ``.md``):

``throughput``
    For each N in ``--processes``: a fresh database with ``--jobs`` async no-op jobs queued
    (then ``VACUUM ANALYZE``), the queue paused; N ``pgtq worker benchmarks.fleet_app:app
    --concurrency 16`` processes (the environment's console script, as users run it) are
    started, and once every one has registered and LISTENs, the queue is resumed (its NOTIFY
    wakes them all at once: the start barrier). Jobs/s = jobs / (last ``finished_at`` - first
    ``started_at``), read off the rows: first claim to drained table. The workers are then
    stopped by SIGTERM (not ``--one-shot``: a one-shot worker that starts before the barrier
    opens sees nothing due and exits). Goal: the rate at 16 processes ≥ 90 % of the best.
``herd``
    ``--herd-workers`` idle workers on one queue: ``--herd-processes`` processes of
    ``python -m benchmarks.fleet_app herd`` each running its share as independent
    ``app.run_worker_async`` workers (own worker id, claim connections, completer, LISTEN).
    Once all are registered and listening: one warm-up job, an idle pause (``--herd-idle``:
    the idle claim rate and CPU), then ``--herd-jobs`` jobs deferred one at a time, each once
    the previous has finished. Pickup latency: the job's ``started_at`` (set by the claim)
    minus the driver's ``time.time()`` just before ``defer``. Claims per job: the claim
    statements all the workers sent between the first defer and shortly after the last job
    finished (counted in the workers by wrapping ``Claims.claim``; cross-checked with
    ``pg_stat_statements`` when the server has it loaded, as the private server does).
    Database CPU per job: utime + stime (``/proc/<pid>/stat``) of the benchmark database's
    backends over the same window (the driver's own backends excluded). Goal: <= 2 claims
    per job.
``cpu``
    A sync task doing ~2 ms of pure-Python work (``k`` calibrated here), ``--cpu-jobs`` of
    them, drained like ``throughput`` by 1 and by 2 separate ``pgtq worker`` processes, and
    by ``pgtq worker --processes 1`` and ``--processes 2`` when the command has that option.
    Goal: 2 processes >= 1.7 times 1.

By default the figures run on a **private PostgreSQL** started for the run (``initdb`` in a
temporary directory, run as the ``postgres`` user when this runs as root, a free port,
``max_connections`` from ``--max-connections``, ``pg_stat_statements`` loaded, ``fsync`` and
``synchronous_commit`` on, autovacuum off as on the shared server), stopped and deleted at the
end: 100 idle workers hold ~400 connections, more than a default server allows, and a shared
server's other users must not be starved of theirs. ``--dsn URL`` uses that server instead.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import pwd
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import psycopg

from benchmarks import run as bench

APP = "benchmarks.fleet_app:app"
QUEUE = "default"
FILL_CHUNK = 5000
THROUGHPUT_GOAL = 0.9
CLAIMS_GOAL = 2.0
CPU_GOAL = 1.7
HERD_GAP = 0.02  # between one herd job's end and the next defer
HERD_SETTLE = 0.3  # after the last herd job: late claims of the herd still count
POLL = 0.002  # the herd driver's poll of its job's row
DRAIN_POLL = 0.05  # the throughput driver's poll of the unfinished count
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    unit: str


def figures(args: argparse.Namespace) -> dict[str, Figure]:
    jobs, conc = f"{args.jobs:,}", args.concurrency
    found = {
        f"throughput_p{n}": Figure(
            f"throughput_p{n}",
            f"drain {jobs} async no-op jobs, {n} x `pgtq worker -c {conc}`",
            "jobs/s",
        )
        for n in args.processes
    }
    for w in args.herd_workers:
        herd = f"{w} idle worker{'s' if w > 1 else ''}, {args.herd_jobs} jobs one at a time"
        prefix = herd_key(w)
        for key, title, unit in (
            ("latency_p50", "pickup latency p50", "ms"),
            ("latency_p95", "pickup latency p95", "ms"),
            ("claims_per_job", "claim statements per job", "claims"),
            ("db_cpu_per_job", "database CPU per job", "ms"),
            ("worker_cpu_per_job", "worker processes' CPU per job", "ms"),
        ):
            found[f"{prefix}_{key}"] = Figure(f"{prefix}_{key}", f"{title}, {herd}", unit)
    cpu = f"{args.cpu_jobs:,} sync jobs of ~{args.cpu_ms:g} ms pure Python"
    for n in (1, 2):
        found[f"cpu_separate_p{n}"] = Figure(
            f"cpu_separate_p{n}", f"{cpu}, {n} x `pgtq worker -c {conc}`", "jobs/s"
        )
        found[f"cpu_processes_p{n}"] = Figure(
            f"cpu_processes_p{n}", f"{cpu}, `pgtq worker --processes {n} -c {conc}`", "jobs/s"
        )
    return found


# -- a private server ----------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise SystemExit(f"{name} not found: install PostgreSQL's server binaries, or pass --dsn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_server(max_connections: int, **settings: str) -> Iterator[str]:
    """A PostgreSQL of this run's own (see the module's docstring); its URL. ``settings``
    override the server's settings below (``autovacuum="on"``, say)."""
    tmp = Path(tempfile.mkdtemp(prefix="pgtq-fleet-pg-"))
    data, port = tmp / "data", _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as postgres
        user = pwd.getpwnam("postgres")
        os.chown(tmp, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    options = {
        "port": port,
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(tmp),
        "max_connections": max_connections,
        "shared_preload_libraries": "pg_stat_statements",
        "autovacuum": "off",
        "fsync": "on",
        "synchronous_commit": "on",
        "shared_buffers": "128MB",
        **settings,
    }
    opts = " ".join(f"-c {k}={v}" for k, v in options.items())
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    initdb = [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"]
    done = subprocess.run([*as_user, *initdb], check=False, **quiet)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise SystemExit(f"initdb failed: {done.stderr.strip()[-2000:]}")
    pg_ctl = [_pg_bin("pg_ctl"), "-D", str(data)]
    log_file = str(tmp / "server.log")
    start = [*pg_ctl, "-o", opts, "-l", log_file, "-w", "-t", "60", "start"]
    done = subprocess.run([*as_user, *start], check=False, **quiet)  # type: ignore[call-overload]
    if done.returncode != 0:
        text = Path(log_file).read_text(errors="replace")[-2000:] if Path(log_file).exists() else ""
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"the private PostgreSQL did not start: {done.stderr.strip()}\n{text}")
    bench.log(
        f"  private PostgreSQL on 127.0.0.1:{port} ({data}), max_connections {max_connections}"
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM: clean up still
        try:
            subprocess.run(
                [*as_user, *pg_ctl, "-m", "fast", "-w", "-t", "60", "stop"], check=False, **quiet
            )  # type: ignore[call-overload]
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGTERM, previous)


# -- what the processes cost ---------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime of each process that still exists (Linux; {} elsewhere)."""
    got = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            got[pid] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return got


def spent_ms(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU milliseconds spent between two samples, by the processes in both."""
    ticks = sum(after[p] - before[p] for p in before.keys() & after.keys())
    return ticks * 1000 / TICK


# -- the run -------------------------------------------------------------------------------


@dataclass
class Fleet:
    args: argparse.Namespace
    server: bench.Server
    workdir: Path
    out: IO[str]
    header: dict[str, Any]
    figure: dict[str, Figure]
    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    # -- results ---------------------------------------------------------------------------

    def emit(self, key: str, value: float, settings: dict[str, Any], extra: dict[str, Any]) -> None:
        fig = self.figure[key]
        record = {
            "run": self.header["run"],
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "library": "pgtq",
            "figure": f"fleet_{key}",
            "title": fig.title,
            "round": 1,
            "value": value,
            "unit": fig.unit,
            "settings": settings,
            "versions": {**self.header["versions"], "pgtq_source": bench.pgtq_source_hash()},
            "host": self.header["host"],
            "extra": {
                **extra,
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "other_active_backends": self.server.others_active(),
            },
        }
        self.records.append(record)
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()
        bench.log(f"  {key:<26} {value:,.2f} {fig.unit}")

    def attempt(self, what: str, fn: Any, *args: Any) -> None:
        started = time.monotonic()
        try:
            self.server.ensure()
            fn(*args)
        except (bench.BenchFailure, psycopg.Error, OSError, subprocess.SubprocessError) as exc:
            message = f"{what}: {type(exc).__name__}: {exc}"
            self.failures.append(message)
            bench.log(f"  FAILED: {message}")
            error = {"run": self.header["run"], "figure": f"fleet_{what}", "error": str(exc)}
            self.out.write(json.dumps(error) + "\n")
            self.out.flush()
        bench.log(f"    ({what}: {time.monotonic() - started:.1f} s)")

    # -- helpers ---------------------------------------------------------------------------

    def limit(self, jobs: int) -> float:
        return bench.phase_timeout(jobs, self.args.timeout_scale)

    def database(self) -> contextlib.AbstractContextManager[str]:
        return self.server.database()

    @contextlib.contextmanager
    def app_on(self, name: str) -> Iterator[Any]:
        """The fleet app pointed at a database, from this driver (defer, pause, resume)."""
        from benchmarks.fleet_app import app

        app.use_dsn(self.server.dsn(name))
        try:
            yield app
        finally:
            app.close()

    def prepare(self, name: str, task: str, arguments: list[dict[str, Any]]) -> None:
        """Migrate, queue the jobs (untimed), VACUUM ANALYZE, pause the queue."""
        with self.app_on(name) as app:
            app.migrate()
            for start in range(0, len(arguments), FILL_CHUNK):
                app.tasks[task].defer_many(arguments[start : start + FILL_CHUNK])
            app.queues.pause(QUEUE)
        with self.server.connect(name, statement_timeout=900) as conn:
            conn.execute("VACUUM (ANALYZE) pgtq.jobs")

    def spawn(self, command: list[str], tag: str) -> tuple[subprocess.Popen[str], Path]:
        err = self.workdir / f"{tag}-{uuid.uuid4().hex[:8]}.err"
        with open(err, "w") as f:
            proc = subprocess.Popen(
                command,
                cwd=bench.ROOT,
                env=bench.child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=f,
                text=True,
            )
        return proc, err

    def wait_listening(
        self,
        conn: psycopg.Connection[Any],
        workers: int,
        started: list[tuple[subprocess.Popen[str], Path]],
    ) -> dict[str, int]:
        """Until ``workers`` workers are registered and as many LISTEN connections are open."""
        deadline = time.monotonic() + STARTUP_TIMEOUT * float(self.args.timeout_scale)
        while True:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM pgtq.workers),"
                " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                "  AND query LIKE 'LISTEN%%' AND query NOT LIKE '%%pgtq_herd_taken%%'),"
                " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                "  AND pid <> pg_backend_pid())"
            ).fetchone()
            assert row is not None
            registered, listening, backends = (int(v) for v in row)
            if registered >= workers and listening >= workers:
                return {"registered": registered, "listening": listening, "backends": backends}
            dead = [(p.returncode, err) for p, err in started if p.poll() is not None]
            late = time.monotonic() > deadline
            if dead or late:
                err = dead[0][1] if dead else started[-1][1]
                tail = err.read_text(errors="replace").strip().splitlines()[-12:]
                why = f"a worker process exited ({dead[0][0]})" if dead else "timed out"
                raise bench.BenchFailure(
                    f"{why}: {registered} of {workers} workers registered, {listening} listening;"
                    f" stderr of {err.name}:\n    " + "\n    ".join(tail)
                )
            time.sleep(0.05)

    def stop(self, procs: list[subprocess.Popen[str]], errs: list[Path]) -> list[int | None]:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        codes: list[int | None] = []
        for p, err in zip(procs, errs, strict=True):
            try:
                codes.append(p.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(None)
                tail = err.read_text(errors="replace").strip().splitlines()[-10:]
                raise bench.BenchFailure(
                    "a worker did not stop within 60 s of SIGTERM:\n    " + "\n    ".join(tail)
                ) from None
        return codes

    def drain(
        self,
        task: str,
        arguments: list[dict[str, Any]],
        command: list[str],
        procs: int,
        workers: int,
        tag: str,
    ) -> dict[str, Any]:
        """Queue, start ``procs`` processes of ``command`` (``<dsn>`` replaced), open the
        barrier, wait for the drained table, stop them; what the rows say."""
        jobs = len(arguments)
        with self.database() as name:
            dsn = self.server.dsn(name)
            t0 = time.monotonic()
            self.prepare(name, task, arguments)
            t1 = time.monotonic()
            real = [dsn if c == "<dsn>" else c for c in command]
            started: list[tuple[subprocess.Popen[str], Path]] = []
            try:
                with self.server.connect(name) as conn:
                    for i in range(procs):
                        started.append(self.spawn(real, f"{tag}-{i}"))
                    popen = [p for p, _ in started]
                    seen = self.wait_listening(conn, workers, started)
                    t2 = time.monotonic()
                    with self.app_on(name) as app:
                        opened = time.time()
                        app.queues.resume(QUEUE)  # its NOTIFY wakes every worker at once
                    deadline = time.monotonic() + self.limit(jobs)
                    while True:
                        row = conn.execute(
                            "SELECT count(*) FROM pgtq.jobs WHERE status IN ('todo', 'doing')"
                        ).fetchone()
                        if row is not None and row[0] == 0:
                            break
                        dead = [p.returncode for p in popen if p.poll() is not None]
                        if dead or time.monotonic() > deadline:
                            why = f"exited ({dead})" if dead else "timed out"
                            raise bench.BenchFailure(f"{tag}: worker {why}, {row} unfinished")
                        time.sleep(DRAIN_POLL)
                    seen_drained = time.time()
                    t3 = time.monotonic()
                    codes = self.stop(popen, [e for _, e in started])
                    t4 = time.monotonic()
                    span = conn.execute(
                        "SELECT extract(epoch FROM min(started_at))::float8,"
                        " extract(epoch FROM max(finished_at))::float8 FROM pgtq.jobs"
                    ).fetchone()
                    shares = [
                        int(r[0])
                        for r in conn.execute(
                            "SELECT count(*) FROM pgtq.jobs GROUP BY worker_id ORDER BY 1 DESC"
                        ).fetchall()
                    ]

                    def fetch(sql: str) -> tuple[Any, ...]:
                        got = conn.execute(sql).fetchone()
                        assert got is not None
                        return tuple(got)

                    from benchmarks.libs import get

                    problems = get("pgtq").verify(fetch, jobs)
                    bench.check_integrity(tag, 1, problems)
            finally:
                for p, _ in started:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
        assert span is not None
        first, last = span
        return {
            "elapsed_s": last - first,
            "barrier_to_first_claim_s": round(first - opened, 4),
            "barrier_to_drained_seen_s": round(seen_drained - opened, 4),
            "jobs_per_worker": shares,
            "exit_codes": codes,
            "at_start": seen,
            # driver-side seconds: queue and migrate, start-up until all listen, run, stop
            "phases_s": [round(b - a, 2) for a, b in itertools.pairwise((t0, t1, t2, t3, t4))],
        }

    # -- the figures -----------------------------------------------------------------------

    def worker_command(self, *extra: str) -> list[str]:
        conc = ["--concurrency", str(self.args.concurrency)]
        return [*bench.pgtq_command(), "worker", APP, *conc, *extra, "--dsn", "<dsn>"]

    def throughput(self, n: int) -> None:
        arguments = [{"n": i} for i in range(self.args.jobs)]
        command = self.worker_command()
        got = self.drain("noop_async", arguments, command, n, n, f"throughput_p{n}")
        settings = {
            "jobs": self.args.jobs,
            "processes": n,
            "concurrency": self.args.concurrency,
            "path": "pgtq worker (console script), one process each",
            "command": shlex.join(["pgtq", *command[len(bench.pgtq_command()) :]]),
            "measured": "rows: last finished_at - first started_at",
        }
        self.emit(f"throughput_p{n}", self.args.jobs / got["elapsed_s"], settings, got)

    def cpu(self, n: int, way: str) -> None:
        k = self.calibrated_k()
        arguments = [{"n": i, "k": k} for i in range(self.args.cpu_jobs)]
        if way == "separate":
            command, procs = self.worker_command(), n
        else:
            command, procs = self.worker_command("--processes", str(n)), 1
        got = self.drain("cpu_sync", arguments, command, procs, n, f"cpu_{way}_p{n}")
        settings = {
            "jobs": self.args.cpu_jobs,
            "processes": n,
            "concurrency": self.args.concurrency,
            "k": k,
            "path": f"{n} separate `pgtq worker` processes"
            if way == "separate"
            else f"`pgtq worker --processes {n}` (one supervisor)",
            "command": shlex.join(["pgtq", *command[len(bench.pgtq_command()) :]]),
        }
        got["calibrated_ms"] = self._calibrated_ms
        self.emit(f"cpu_{way}_p{n}", self.args.cpu_jobs / got["elapsed_s"], settings, got)

    _k: int | None = None
    _calibrated_ms: float = 0.0

    def calibrated_k(self) -> int:
        """Rounds of :func:`benchmarks.fleet_app.spin` that take ``--cpu-ms`` here (the best of
        several timings, so a busy moment does not shrink the work)."""
        if self._k is None:
            from benchmarks.fleet_app import spin

            probe = 20_000
            best = min(_timed(spin, probe) for _ in range(15))
            self._k = max(1, round(probe * self.args.cpu_ms / 1000 / best))
            self._calibrated_ms = round(min(_timed(spin, self._k) for _ in range(5)) * 1000, 3)
        return self._k

    def herd(self, workers: int) -> None:
        a = self.args
        procs = min(a.herd_processes, workers)
        per = -(-workers // procs)
        counts = [min(per, workers - i * per) for i in range(procs)]
        counts = [c for c in counts if c > 0]
        with self.database() as name:
            dsn = self.server.dsn(name)
            with self.app_on(name) as app:
                app.migrate()
            with self.server.connect(name) as conn:
                pgss = self.stat_statements(conn)
                logs = [self.workdir / f"herd-{i}.json" for i in range(len(counts))]
                started: list[tuple[subprocess.Popen[str], Path]] = []
                try:
                    for i, count in enumerate(counts):
                        command = [sys.executable, "-m", "benchmarks.fleet_app", "herd", dsn]
                        command += [str(count), str(a.concurrency), str(logs[i])]
                        started.append(self.spawn(command, f"herd-{i}"))
                    popen = [p for p, _ in started]
                    seen = self.wait_listening(conn, workers, started)
                    result = self.herd_jobs(name, conn, popen, pgss)
                    self.stop(popen, [e for _, e in started])
                finally:
                    for p, _ in started:
                        if p.poll() is None:
                            p.kill()
                            p.wait()
                claims = [c for log in logs for c in json.loads(log.read_text())]
        window = (result["window"][0], result["window"][1])
        idle = (result["idle"][0], result["idle"][1])
        inside = [c for c in claims if window[0] <= c[0] <= window[1]]
        idle_claims = [c for c in claims if idle[0] <= c[0] <= idle[1]]
        jobs = a.herd_jobs
        idle_rate = len(idle_claims) / (idle[1] - idle[0])
        latencies = sorted(result["latencies_ms"])
        settings = {
            "jobs": jobs,
            "workers": workers,
            "processes": len(counts),
            "workers_per_process": counts,
            "concurrency": a.concurrency,
            "path": "app.run_worker_async, several independent workers per process"
            " (python -m benchmarks.fleet_app herd)",
            "gap_s": HERD_GAP,
        }
        extra = {
            "at_start": seen,
            "window_s": round(window[1] - window[0], 3),
            "claims": len(inside),
            "claims_that_got_a_job": sum(1 for c in inside if c[2] > 0),
            "claims_empty": sum(1 for c in inside if c[2] == 0),
            "claims_failed": sum(1 for c in inside if c[2] < 0),
            "idle_claims_per_s": round(idle_rate, 2),
            "idle_claims_in_window_est": round(idle_rate * (window[1] - window[0]), 1),
            "pg_stat_statements_claims": result["pgss_claims"],
            "db_cpu_ms": result["db_cpu_ms"],
            "db_cpu_ms_driver": result["db_cpu_ms_driver"],
            "db_cpu_idle_ms_per_s": result["db_cpu_idle_ms_per_s"],
            "worker_cpu_ms": result["worker_cpu_ms"],
            "latency_min_ms": latencies[0],
            "latency_max_ms": latencies[-1],
            "latency_mean_ms": statistics.fmean(latencies),
        }
        per_job = {
            "latency_p50": bench.percentile(latencies, 50),
            "latency_p95": bench.percentile(latencies, 95),
            "claims_per_job": len(inside) / jobs,
            "db_cpu_per_job": None if result["db_cpu_ms"] is None else result["db_cpu_ms"] / jobs,
            "worker_cpu_per_job": None
            if result["worker_cpu_ms"] is None
            else result["worker_cpu_ms"] / jobs,
        }
        for key, value in per_job.items():
            if value is not None:
                self.emit(f"{herd_key(workers)}_{key}", value, settings, extra)

    def stat_statements(self, conn: psycopg.Connection[Any]) -> bool:
        """pg_stat_statements in this database, when the server has it loaded."""
        row = conn.execute("SHOW shared_preload_libraries").fetchone()
        if not row or "pg_stat_statements" not in str(row[0]):
            return False
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return True

    def backends(self, conn: psycopg.Connection[Any], exclude: set[int]) -> list[int]:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        ).fetchall()
        return [int(r[0]) for r in rows if int(r[0]) not in exclude]

    def herd_jobs(
        self,
        name: str,
        conn: psycopg.Connection[Any],
        procs: list[subprocess.Popen[str]],
        pgss: bool,
    ) -> dict[str, Any]:
        """Warm up, measure the idle rate, then the jobs one at a time."""
        a = self.args
        deadline = time.monotonic() + self.limit(a.herd_jobs) + a.herd_jobs * 5
        with self.app_on(name) as app:
            task = app.tasks["noop_async"]

            def run_one(n: int) -> float:
                before = time.time()
                (job_id,) = task.defer_many([{"n": n}])
                while True:
                    row = conn.execute(
                        "SELECT status, extract(epoch FROM started_at)::float8"
                        " FROM pgtq.jobs WHERE id = %s",
                        (job_id,),
                    ).fetchone()
                    if row is not None and row[0] == "succeeded":
                        return (float(row[1]) - before) * 1000
                    if time.monotonic() > deadline:
                        raise bench.BenchFailure(f"herd job {n} not done: {row}")
                    if any(p.poll() is not None for p in procs):
                        raise bench.BenchFailure("a herd process exited")
                    time.sleep(POLL)

            run_one(-1)  # warm-up: every worker has claimed once, connections are warm
            time.sleep(0.5)
            mine = {int(r[0]) for r in conn.execute("SELECT pg_backend_pid()").fetchall()}
            driver = self.driver_backends(conn, mine)
            workers = self.backends(conn, driver)
            idle_from, cpu0 = time.time(), cpu_ticks(workers)
            time.sleep(a.herd_idle)
            idle_to, cpu1 = time.time(), cpu_ticks(workers)
            if pgss:
                conn.execute("SELECT pg_stat_statements_reset()")
            driver = self.driver_backends(conn, mine)
            workers = self.backends(conn, driver)
            db0, drv0 = cpu_ticks(workers), cpu_ticks(sorted(driver))
            procs0 = cpu_ticks([p.pid for p in procs])
            start = time.time()
            latencies = []
            for n in range(a.herd_jobs):
                latencies.append(run_one(n))
                time.sleep(HERD_GAP)
            time.sleep(HERD_SETTLE)
            end = time.time()
            db1, drv1 = cpu_ticks(workers), cpu_ticks(sorted(driver))
            procs1 = cpu_ticks([p.pid for p in procs])
        pgss_claims = None
        if pgss:
            row = conn.execute(
                "SELECT coalesce(sum(calls), 0)::int FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid AND d.datname = current_database()"
                " WHERE s.query LIKE 'WITH candidates AS%%'"
            ).fetchone()
            pgss_claims = int(row[0]) if row else None
        on_host = bool(db0)
        return {
            "latencies_ms": latencies,
            "window": (start, end),
            "idle": (idle_from, idle_to),
            "pgss_claims": pgss_claims,
            "db_cpu_ms": spent_ms(db0, db1) if on_host else None,
            "db_cpu_ms_driver": spent_ms(drv0, drv1) if on_host else None,
            "db_cpu_idle_ms_per_s": round(spent_ms(cpu0, cpu1) / (idle_to - idle_from), 2)
            if on_host
            else None,
            "worker_cpu_ms": spent_ms(procs0, procs1) if procs0 else None,
        }

    def driver_backends(self, conn: psycopg.Connection[Any], mine: set[int]) -> set[int]:
        """This driver's own backends: its polling session, and its app's (found by the
        client ports of this process's sockets)."""
        inodes = _my_socket_inodes()
        ports = set()
        with contextlib.suppress(OSError):
            for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[9] in inodes:
                    ports.add(int(parts[1].split(":")[1], 16))
        rows = conn.execute(
            "SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database()"
        ).fetchall()
        return mine | {int(pid) for pid, port in rows if port is not None and port in ports}

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> None:
        groups = self.args.figures
        if "throughput" in groups:
            for n in self.args.processes:
                self.attempt(f"throughput_p{n}", self.throughput, n)
        if "herd" in groups:
            for w in self.args.herd_workers:
                self.attempt(herd_key(w), self.herd, w)
        if "cpu" in groups:
            ways = [w for w in self.args.cpu_ways if w == "separate"]
            if "processes" in self.args.cpu_ways:
                if "--processes" in (bench.ROOT / "pgtq" / "cli.py").read_text():
                    ways.append("processes")
                else:
                    bench.log("  `pgtq worker --processes` does not exist: separate processes only")
            for way in ways:
                for n in (1, 2):
                    self.attempt(f"cpu_{way}_p{n}", self.cpu, n, way)


def herd_key(workers: int) -> str:
    return f"herd_w{workers}"


def _my_socket_inodes() -> set[str]:
    """The inodes of this process's sockets (Linux)."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    found.add(target[8:-1])
    return found


def _timed(fn: Any, arg: int) -> float:
    began = time.perf_counter()
    fn(arg)
    return time.perf_counter() - began


# -- the table -----------------------------------------------------------------------------


def markdown_table(records: list[dict[str, Any]]) -> str:
    lines = ["| figure | unit | pgtq |", "|---|---|---:|"]
    values: dict[str, float] = {}
    for r in records:
        if "value" not in r:
            continue
        key = r["figure"].removeprefix("fleet_")
        values[key] = r["value"]
        shown = f"{r['value']:,.0f}" if r["unit"] == "jobs/s" else f"{r['value']:,.2f}"
        lines.append(f"| {r['title']} | {r['unit']} | {shown} |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes(records, values)) + "\n"


def notes(records: list[dict[str, Any]], values: dict[str, float]) -> list[str]:
    found: list[str] = []
    rates = {int(k.removeprefix("throughput_p")): v for k, v in values.items() if "throughput" in k}
    if rates:
        best_n = max(rates, key=lambda n: rates[n])
        top = max(rates)
        ratio = rates[top] / rates[best_n]
        target = "meets" if ratio >= THROUGHPUT_GOAL else "misses"
        found.append(
            f"throughput: best {rates[best_n]:,.0f} jobs/s at {best_n} process(es); at {top}:"
            f" {ratio:.2f} of the best ({target} the ≥ {THROUGHPUT_GOAL} goal)"
        )
    herds = [k.removesuffix("_claims_per_job") for k in values if k.endswith("_claims_per_job")]
    for prefix in herds:
        claims = values[f"{prefix}_claims_per_job"]
        target = "meets" if claims <= CLAIMS_GOAL else "misses"
        extra = next(
            r["extra"] for r in records if r.get("figure") == f"fleet_{prefix}_claims_per_job"
        )
        what = prefix.removeprefix("herd_w")
        found.append(
            f"herd of {what}: {claims:.1f} claims per job ({target} the ≤ {CLAIMS_GOAL:g} goal);"
            f" {extra['claims_that_got_a_job']} of {extra['claims']} claims got a job;"
            f" pg_stat_statements counted {extra['pg_stat_statements_claims']}; idle:"
            f" {extra['idle_claims_per_s']} claims/s, database CPU"
            f" {extra['db_cpu_idle_ms_per_s']} ms/s"
        )
    for way in ("separate", "processes"):
        one, two = values.get(f"cpu_{way}_p1"), values.get(f"cpu_{way}_p2")
        if one and two:
            target = "meets" if two / one >= CPU_GOAL else "misses"
            found.append(
                f"CPU-bound, {way}: 2 / 1 processes = {two / one:.2f} ({target} the"
                f" ≥ {CPU_GOAL} goal)"
            )
    found.append("one round; a 2-core machine shared with other work: see loadavg_1m")
    return found


# -- the command line ----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run --fleet", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--fleet", action="store_true", help="(this mode)")
    p.add_argument("--dsn", help="use this server (default: a private one started for the run)")
    p.add_argument("--max-connections", type=int, default=1000, help="the private server's")
    p.add_argument("--jobs", type=int, default=100_000, help="backlog of the throughput figure")
    p.add_argument("--processes", default="1,2,4,8,16", help="worker processes to try")
    p.add_argument("--concurrency", type=int, default=16, help="per worker")
    p.add_argument("--herd-workers", default="1,100", help="herd sizes to try (a baseline first)")
    p.add_argument("--herd-processes", type=int, default=10)
    p.add_argument("--herd-jobs", type=int, default=50)
    p.add_argument(
        "--herd-idle",
        type=float,
        default=6.0,
        help="seconds of the idle pause (the idle claim rate, CPU): over the 5 s polling",
    )
    p.add_argument("--cpu-jobs", type=int, default=2000)
    p.add_argument("--cpu-ms", type=float, default=2.0, help="pure-Python work per CPU job")
    p.add_argument(
        "--cpu-ways",
        default="separate,processes",
        help="separate `pgtq worker` processes, `pgtq worker --processes N` (when it exists)",
    )
    p.add_argument("--figures", default="throughput,herd,cpu")
    p.add_argument("--timeout-scale", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=bench.RESULTS)
    p.add_argument("--no-snapshot", dest="snapshot", action="store_false")
    args = p.parse_args(argv)
    args.processes = [int(n) for n in args.processes.split(",") if n.strip()]
    args.herd_workers = [int(n) for n in args.herd_workers.split(",") if n.strip()]
    args.cpu_ways = [w.strip() for w in args.cpu_ways.split(",") if w.strip()]
    if set(args.cpu_ways) - {"separate", "processes"}:
        p.error("--cpu-ways: separate, processes")
    args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    unknown = set(args.figures) - {"throughput", "herd", "cpu"}
    if unknown:
        p.error(f"unknown figure group(s): {', '.join(sorted(unknown))}")
    args.out = (Path(os.environ.get(bench.CWD_ENV) or os.getcwd()) / args.out).resolve()
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.snapshot and not os.environ.get(bench.ORIGIN_ENV) and (bench.ROOT / "pgtq").is_dir():
        return bench.snapshot(argv)
    # SIGTERM (a `timeout`, CI) unwinds like Ctrl-C: the worker processes are killed and the
    # private server is stopped and deleted by the finally blocks, not left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        url = args.dsn or stack.enter_context(private_server(args.max_connections))
        return measure(args, argv, url)
    return 1  # unreachable


def measure(args: argparse.Namespace, argv: list[str], url: str) -> int:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = uuid.uuid4().hex[:8]
    command = "python -m benchmarks.run " + shlex.join(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}-fleet.jsonl"
    server = bench.Server(url, run_id)
    started = time.monotonic()
    bench.warm_bytecode()
    try:
        header = {
            "run": {
                "id": run_id,
                "command": command,
                "mode": "fleet",
                "server": "given (--dsn)" if args.dsn else "private",
                "pgtq_commit": bench.git_describe(),
            },
            "versions": {**bench.loop_versions(), "python": platform.python_version()},
            "host": {**bench.host_info(), "postgres": server.info()},
        }
        bench.log(f"{command}\n  results: {path}")
        with tempfile.TemporaryDirectory(prefix="pgtq-fleet-") as tmp, open(path, "w") as out:
            fleet = Fleet(args, server, Path(tmp), out, header, figures(args))
            fleet.run()
    finally:
        server.close()
    minutes = (time.monotonic() - started) / 60
    table = markdown_table(fleet.records)
    print(table)
    path.with_suffix(".md").write_text(f"`{command}` ({minutes:.1f} min)\n\n{table}")
    bench.log(f"\n{len(fleet.records)} measurements in {minutes:.1f} min: {path}")
    if fleet.failures:
        bench.log(f"\n{len(fleet.failures)} FAILED measurement(s):")
        for failure in fleet.failures:
            bench.log(f"  - {failure}")
        return 1
    return 0
