"""``pgtq worker --processes N``: the restart policy (pure), the supervisor's loop over trivial
processes, and real worker processes under it: draining, SIGTERM, Ctrl-C, a child killed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import pgtq
from pgtq.cli import cli
from pgtq.errors import ConfigurationError
from pgtq.supervisor import Done, GiveUp, Restart, RestartPolicy, Supervisor, child_args
from tests.apps import supervised
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.supervised:app"
SQL = Callable[..., list[tuple[Any, ...]]]
#: Generous: two Python processes start on a busy 2-core machine.
DEADLINE = 40.0

# -- the restart policy (pure) ----------------------------------------------------------------

POLICY = RestartPolicy(first_delay=0.5, factor=2.0, max_delay=4.0, reset_after=30, give_up_after=6)


@pytest.mark.unit
def test_restart_delays_double_up_to_the_cap() -> None:
    assert [POLICY.delay(streak) for streak in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


@pytest.mark.unit
def test_a_child_that_exits_0_is_not_restarted() -> None:
    assert POLICY.decide(0, lived=0.1, streak=0) == Done(failed=False)
    assert POLICY.decide(0, lived=3600, streak=3) == Done(failed=False)


@pytest.mark.unit
@pytest.mark.parametrize("code", [1, 2, -signal.SIGKILL, -signal.SIGSEGV])
def test_a_child_that_dies_is_restarted_later_each_time_in_a_row(code: int) -> None:
    first = POLICY.decide(code, lived=1.0, streak=0)
    assert first == Restart(delay=0.5, streak=1)
    second = POLICY.decide(code, lived=1.0, streak=first.streak)
    assert second == Restart(delay=1.0, streak=2)


@pytest.mark.unit
def test_a_child_that_lived_a_while_starts_a_new_streak() -> None:
    assert POLICY.decide(1, lived=30.0, streak=4) == Restart(delay=0.5, streak=1)
    assert POLICY.decide(1, lived=29.9, streak=4) == Restart(delay=4.0, streak=5)


@pytest.mark.unit
def test_quick_failures_in_a_row_give_up() -> None:
    assert POLICY.decide(1, lived=0.2, streak=5) == GiveUp(streak=6)
    assert POLICY.decide(1, lived=31, streak=5) == Restart(delay=0.5, streak=1)


@pytest.mark.unit
def test_while_stopping_nothing_is_restarted() -> None:
    term = frozenset({int(signal.SIGTERM)})
    assert POLICY.decide(0, 5.0, 0, term) == Done(failed=False)
    # Sent SIGTERM before it had a handler: it stopped as asked.
    assert POLICY.decide(-signal.SIGTERM, 0.1, 0, term) == Done(failed=False)
    assert POLICY.decide(1, 5.0, 0, term) == Done(failed=True)
    assert POLICY.decide(-signal.SIGKILL, 5.0, 0, term) == Done(failed=True)
    both = frozenset({int(signal.SIGTERM), int(signal.SIGINT)})
    assert POLICY.decide(-signal.SIGINT, 0.1, 0, both) == Done(failed=False)


@pytest.mark.unit
def test_child_args_drop_processes_only_before_the_factory_arguments() -> None:
    args = ["-v", "worker", "m:app", "--processes", "4", "-c", "2", "--", "--processes", "9"]
    assert child_args(args, 1) == ["-v", "worker", "m:app", "-c", "2", "--", "--processes", "9"]
    assert child_args(["worker", "m:app", "--processes=4"], 2) == ["worker", "m:app"]


@pytest.mark.unit
def test_child_args_give_each_child_its_own_name_and_metrics_port() -> None:
    args = ["worker", "m:app", "--name", "w", "--processes", "2", "--metrics-port", "9400"]
    base = ["worker", "m:app", "--name", "w", "--metrics-port", "9400"]
    assert child_args(args, 2, name="w", metrics_port=9400) == [
        *base,
        *("--name", "w-2", "--metrics-port", "9401"),
    ]
    restarted = child_args(args, 2, 3, name="w", metrics_port=0)
    assert restarted[-4:] == ["--name", "w-2.3", "--metrics-port", "0"]
    with_factory = child_args([*args, "--", "x"], 1, name="w")
    assert with_factory[-4:] == ["--name", "w-1", "--", "x"]


@pytest.mark.unit
def test_child_args_refuse_arguments_without_the_flag() -> None:
    # Called from Python (not the command line): sys.argv is not the command's.
    with pytest.raises(ConfigurationError, match="--processes"):
        child_args(["worker", "m:app"], 1)


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_the_command_refuses_fewer_than_one_process(bad: str) -> None:
    result = CliRunner().invoke(cli, ["worker", APP, "--processes", bad])
    assert result.exit_code == 2, result.output
    assert "--processes" in result.output


@pytest.mark.unit
def test_processes_called_from_python_says_to_use_the_command_line() -> None:
    # In-process (CliRunner), sys.argv is not the command's: no child could be started.
    result = CliRunner().invoke(cli, ["worker", APP, "--processes", "2"])
    assert result.exit_code == 1, result.output
    assert "use it from the command line" in result.output


# -- the supervisor's loop, over trivial processes (no database) ------------------------------

FAST = RestartPolicy(first_delay=0.01, max_delay=0.05, reset_after=30, give_up_after=4)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.unit
def test_supervisor_restarts_a_failed_child_and_exits_0_once_all_ended() -> None:
    started: list[tuple[int, int]] = []

    def command(index: int, generation: int) -> list[str]:
        started.append((index, generation))
        # Child 2 fails twice, then succeeds.
        fail = index == 2 and generation < 2
        return python(f"raise SystemExit({3 if fail else 0})")

    assert Supervisor(command, 2, FAST).run() == 0
    assert sorted(started) == [(1, 0), (2, 0), (2, 1), (2, 2)]


@pytest.mark.unit
def test_supervisor_gives_up_on_a_child_failing_at_once_and_exits_1() -> None:
    started: list[int] = []

    def command(index: int, generation: int) -> list[str]:
        started.append(index)
        if index == 1:
            return python("raise SystemExit(3)")
        return python("import time; time.sleep(60)")  # stopped by the supervisor's SIGTERM

    assert Supervisor(command, 2, FAST).run() == 1
    assert started.count(1) == FAST.give_up_after
    assert started.count(2) == 1


@pytest.mark.unit
def test_supervisor_refuses_fewer_than_one_process() -> None:
    with pytest.raises(ConfigurationError, match="at least 1"):
        Supervisor(lambda i, g: python("pass"), 0)


# -- real worker processes ------------------------------------------------------------------


@pytest.fixture
async def app(dsn: str) -> AsyncIterator[pgtq.App]:
    """The children's app (tests.apps.supervised), pointed at the test database to defer."""
    with supervised.app.pointed_at(schema="pgtq", dsn=dsn) as pointed:
        yield pointed
        await pointed.close_async()


@pytest.fixture
def supervisor(dsn: str, tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    started: list[Supervised] = []

    def start(*args: str, new_session: bool = False) -> Supervised:
        proc = Supervised(dsn, tmp_path, args, new_session=new_session)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


class Supervised:
    """``python -m pgtq worker tests.apps.supervised:app --processes 2 ARGS``; stderr to a
    file the test reads as it goes."""

    def __init__(self, dsn: str, tmp: Path, args: tuple[str, ...], *, new_session: bool) -> None:
        self.log = tmp / "stderr.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGTQ_")}
        env.update(PYTHONPATH=str(ROOT), PGTQ_DSN=dsn, PGTQ_LOG_FORMAT="plain")
        command = [sys.executable, "-m", "pgtq", "worker", APP, "--processes", "2", *args]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stderr=err, start_new_session=new_session
            )

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def lines(self, fragment: str) -> list[str]:
        return [line for line in self.stderr.splitlines() if fragment in line]

    async def exit_code(self, timeout: float = DEADLINE) -> int:
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the supervisor did not exit in {timeout} s:\n{self.stderr}"
            ) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def child_pids(sql: SQL) -> set[int]:
    return {pid for (pid,) in sql("SELECT pid FROM pgtq.workers")}


async def both_holding(sql: SQL, proc: Supervised, count: int = 2) -> list[tuple[Any, ...]]:
    """Wait until ``count`` jobs run, each in a worker of its own (-c 1: one job each)."""

    def holding() -> bool:
        assert proc.proc.poll() is None, proc.stderr
        rows = sql("SELECT DISTINCT worker_id FROM pgtq.jobs WHERE status = 'doing'")
        return len(rows) == count

    await eventually(holding, timeout=DEADLINE)
    return sql("SELECT id, worker_id FROM pgtq.jobs WHERE status = 'doing' ORDER BY id")


SINGLE = ("--concurrency", "1", "--prefetch", "0")  # a worker holds one job at a time


@pytest.mark.slow
async def test_processes_2_one_shot_drains_a_backlog_in_both_children(
    app: pgtq.App, sql: SQL, supervisor: Callable[..., Supervised], tmp_path: Path
) -> None:
    meet = tmp_path / "meet"
    meet.mkdir()
    # Each child holds one `meet` job until the other has one too: both must claim.
    await (
        app.get_task("meet")
        .configure(priority=10)
        .defer_many_async([{"rendezvous": str(meet), "expected": 2}] * 2)
    )
    await app.get_task("pid").defer_many_async([{}] * 300)
    proc = supervisor("--one-shot", *SINGLE)
    assert await proc.exit_code() == 0, proc.stderr
    assert sql("SELECT status, count(*) FROM pgtq.jobs GROUP BY status") == [("succeeded", 302)]
    met = sql("SELECT worker_id, result FROM pgtq.jobs WHERE task_name = 'meet'")
    assert len({worker for worker, _ in met}) == 2, met
    assert len({pid for _, pid in met}) == 2
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]  # both left cleanly
    assert len(proc.lines("worker process 1 started")) == 1, proc.stderr
    assert len(proc.lines("worker process 2 started")) == 1, proc.stderr
    assert len(proc.lines("exited with status 0")) == 2, proc.stderr
    assert "restart" not in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
async def test_a_stop_signal_stops_both_children_gracefully(
    app: pgtq.App, sql: SQL, supervisor: Callable[..., Supervised], tmp_path: Path, how: str
) -> None:
    gate = tmp_path / "gate"
    await app.get_task("hold").defer_many_async([{"gate": str(gate)}] * 2)
    # ctrl-c: SIGINT to the supervisor's whole process group, as a terminal sends it.
    proc = supervisor(*SINGLE, new_session=how == "ctrl-c")
    await both_holding(sql, proc)
    if how == "ctrl-c":
        os.killpg(proc.proc.pid, signal.SIGINT)
    else:
        proc.proc.send_signal(signal.SIGTERM)
    # Each child heard one signal (two would mean "stop now") and waits for its job.
    await eventually(lambda: len(proc.lines("waiting for running jobs")) == 2, timeout=DEADLINE)
    assert proc.proc.poll() is None
    assert await app.get_task("pid").defer_async() > 0  # not claimed: they stopped claiming
    gate.touch()
    assert await proc.exit_code() == 0, proc.stderr
    assert proc.lines("stopping now") == [], proc.stderr
    statuses = sql("SELECT task_name, status FROM pgtq.jobs ORDER BY id")
    assert statuses == [("hold", "succeeded"), ("hold", "succeeded"), ("pid", "todo")]
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]
    assert "restart" not in proc.stderr


@pytest.mark.slow
async def test_a_killed_child_is_restarted_and_its_job_rescued(
    app: pgtq.App, sql: SQL, supervisor: Callable[..., Supervised], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    await app.get_task("hold").defer_many_async([{"gate": str(gate)}] * 2)
    proc = supervisor(*SINGLE, "--heartbeat-interval", "0.3", "--rescue-after", "3")
    (job, worker), _ = await both_holding(sql, proc)
    [(victim,)] = sql("SELECT pid FROM pgtq.workers WHERE id = %s", worker)
    before = child_pids(sql)
    os.kill(victim, signal.SIGKILL)
    # A new worker process (a new pid, a new worker id) takes the killed one's place.
    await eventually(lambda: len(child_pids(sql) - before) == 1, timeout=DEADLINE)
    # Its job is rescued as a dead worker's always is, and runs again in a live worker.
    await eventually(
        lambda: (
            sql("SELECT count(*) FROM pgtq.job_events WHERE job_id = %s AND type = 'rescued'", job)
            == [(1,)]
        ),
        timeout=DEADLINE,
    )
    gate.touch()
    await eventually(
        lambda: sql("SELECT status, count(*) FROM pgtq.jobs GROUP BY status") == [("succeeded", 2)],
        timeout=DEADLINE,
    )
    [(rerun_by,)] = sql("SELECT worker_id FROM pgtq.jobs WHERE id = %s", job)
    assert rerun_by != worker
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.exit_code() == 0, proc.stderr
    assert len(proc.lines(f"(pid {victim}) was killed by SIGKILL")) == 1, proc.stderr
    assert len(proc.lines("restarting in")) == 1, proc.stderr
    assert len(proc.lines("restarted (pid")) == 1, proc.stderr
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]


def socket_ports(pid: int) -> set[int]:
    """The local TCP ports of the sockets process ``pid`` holds open (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="reads Linux's /proc")
async def test_each_child_holds_its_own_connections_and_the_supervisor_none(
    sql: SQL, supervisor: Callable[..., Supervised]
) -> None:
    """Nothing is inherited: every backend of the test database is held by exactly one
    process (its client socket found by port among the processes' open sockets), the
    supervisor holds none, and each child an idle worker's own budget
    (docs/howto/connections.md)."""
    from pgtq.claims import CLAIMS_IN_FLIGHT

    proc = supervisor()
    budget = 1 + CLAIMS_IN_FLIGHT + 1 + 1  # LISTEN, claims, completer, the pool's one

    def held() -> dict[int, list[int]]:
        """For each backend's client port, the pids (supervisor and children) holding it."""
        rows = sql(
            "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        owners: dict[int, list[int]] = {port: [] for (port,) in rows}
        for pid in [proc.proc.pid, *child_pids(sql)]:
            with contextlib.suppress(FileNotFoundError):  # a child that just exited
                for port in socket_ports(pid) & owners.keys():
                    owners[port].append(pid)
        return owners

    def settled() -> bool:
        assert proc.proc.poll() is None, proc.stderr
        per_pid = Counter(pid for pids in held().values() for pid in pids)
        return len(child_pids(sql)) == 2 and sorted(per_pid.values()) == [budget, budget]

    await eventually(settled, timeout=DEADLINE)
    owners = held()
    assert all(len(pids) == 1 for pids in owners.values()), owners  # no socket shared
    assert proc.proc.pid not in {pid for pids in owners.values() for pid in pids}
    proc.proc.send_signal(signal.SIGTERM)
    assert await proc.exit_code() == 0, proc.stderr
