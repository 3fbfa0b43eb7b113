"""A rolling upgrade, played with the real previous release.

The previous release is this repository's code just before its newest revision was added,
taken from git history (``git archive``). The test migrates a fresh database with that old
code, starts a worker process of the old code, applies this release's *pre* revisions under
it, runs a worker of this release beside it while both releases defer jobs, stops the old
worker (SIGTERM), applies the *post* revisions, stops the new worker, and checks that every job
ran exactly once and succeeded.

Without git history (a shallow clone, an sdist) the test is skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL

from pgtq import migrations
from tests.conftest import libpq

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0  # seconds: only a bound for a broken test

pytestmark = pytest.mark.slow

# One module for both releases, using only API both have. Each run of a job is recorded with
# the release that ran it, so "exactly once" is checked outside pgtq's own bookkeeping.
APP_MODULE = """
import os
import time

import psycopg

import pgtq

RELEASE = os.environ["ROLLING_RELEASE"]
RUNS_DSN = os.environ["ROLLING_RUNS_DSN"]

app = pgtq.App()


def record(job_id: int, n: int) -> None:
    with psycopg.connect(RUNS_DSN, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO rolling_runs (job_id, n, release) VALUES (%s, %s, %s)",
            (job_id, n, RELEASE),
        )


@app.task()
def sync_job(ctx: pgtq.JobContext, n: int) -> int:
    time.sleep(0.01)
    record(ctx.job_id, n)
    return n


@app.task()
async def async_job(ctx: pgtq.JobContext, n: int) -> int:
    record(ctx.job_id, n)
    return n


# Every worker runs the scheduler: both releases' schedulers race for each tick.
@app.periodic(cron="* * * * * *", max_delay=5)
@app.periodic(cron="* * * * * *", periodic_id="witness", max_delay=5)
@app.task(queue="beats")
def beat(timestamp: int) -> None: ...
"""

DEFER_SCRIPT = """
import sys

from rolling_app import app

start, count = int(sys.argv[1]), int(sys.argv[2])
ids = []
for name in ("sync_job", "async_job"):
    half = [{"n": n} for n in range(start, start + count) if (n % 2 == 0) == (name == "sync_job")]
    ids += app.tasks[name].defer_many(half)
print(len(ids))
"""


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def _previous_release(tmp: Path) -> tuple[Path, str]:
    """Extract the code as it was before this release's newest revision; its schema head."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the previous release comes from git history")
    try:
        _git("rev-parse", "--git-dir")
    except subprocess.CalledProcessError:
        pytest.skip("not a git checkout: the previous release comes from git history")
    script = migrations._script()
    (head,) = migrations.heads()
    newest = Path(script.get_revision(head).path).relative_to(ROOT)  # type: ignore[union-attr]
    # Along main's own line (--first-parent): a revision written on a branch lands with its
    # merge, and the release before it is main just before that merge (with every revision
    # landed meanwhile), not the branch's own parent.
    added = _git(
        "log", "--first-parent", "--diff-filter=A", "--format=%H", "-n1", "--", str(newest)
    )
    previous = f"{added}^" if added else "HEAD"  # an uncommitted newest revision: HEAD is older
    try:
        _git("rev-parse", "--verify", "--quiet", f"{previous}^{{commit}}")
    except subprocess.CalledProcessError:
        pytest.skip(
            f"the commit before {newest} is not in this clone (shallow?): "
            "`git fetch --unshallow` to run the rolling upgrade test"
        )
    tree = tmp / "previous"
    tree.mkdir()
    archive = tmp / "previous.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "-C", str(ROOT), "archive", previous, "pgtq", "alembic"],
            stdout=out,
            check=True,
            timeout=60,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    old_revisions = sorted(p.name for p in (tree / "alembic" / "versions").glob("pgtq_*.py"))
    assert newest.name not in old_revisions
    return tree, "_".join(old_revisions[-1].split("_")[:2])  # pgtq_0003_history.py: pgtq_0003


@dataclass
class Release:
    name: str
    pythonpath: Path
    workdir: Path
    dsn: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGTQ_", "PYTHONPATH"))}
        env.update(
            PYTHONPATH=os.pathsep.join([str(self.pythonpath), str(self.workdir)]),
            PGTQ_DSN=self.dsn,
            ROLLING_RELEASE=self.name,
            ROLLING_RUNS_DSN=libpq(self.dsn),
        )
        return env

    def run(self, *args: str) -> str:
        proc = subprocess.run(
            [sys.executable, *args],
            cwd=self.workdir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, f"{self.name}: {args}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def pgtq_file(self) -> str:
        return self.run("-c", "import pgtq; print(pgtq.__file__)").strip()

    def defer(self, start: int, count: int) -> None:
        assert self.run("defer_jobs.py", str(start), str(count)).strip() == str(count)

    def start_worker(self) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "pgtq", "worker", "rolling_app:app", "--concurrency", "4",
             "--fetch-job-polling-interval", "0.2"],
            cwd=self.workdir,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip


def stop(worker: subprocess.Popen[str]) -> str:
    worker.send_signal(signal.SIGTERM)
    _, stderr = worker.communicate(timeout=TIMEOUT)
    assert worker.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    return stderr


@pytest.fixture
def db(make_database: Callable[[], URL]) -> Iterator[tuple[str, Callable[..., Any]]]:
    url = make_database()
    conn = psycopg.connect(libpq(url), autocommit=True)

    def sql(query: str, *params: Any) -> list[tuple[Any, ...]]:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []

    yield url.render_as_string(hide_password=False), sql
    conn.close()


def test_rolling_upgrade_from_the_previous_release(
    tmp_path: Path, db: tuple[str, Callable[..., list[tuple[Any, ...]]]]
) -> None:
    dsn, sql = db
    old_tree, old_head = _previous_release(tmp_path)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "rolling_app.py").write_text(textwrap.dedent(APP_MODULE))
    (workdir / "defer_jobs.py").write_text(textwrap.dedent(DEFER_SCRIPT))
    old = Release("old", old_tree, workdir, dsn)
    new = Release("new", ROOT, workdir, dsn)
    assert old.pgtq_file().startswith(str(old_tree)), "the old release must import its own pgtq"
    assert new.pgtq_file().startswith(str(ROOT))

    # The previous release, as deployed: its schema, a worker running its code.
    old.run("-m", "pgtq", "migrate")
    engine = sa.create_engine(sa.make_url(dsn).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            assert migrations.current(conn, "pgtq") == {old_head}
            pending = migrations.pending(conn, "pgtq")
        assert pending, "this release adds no revision: nothing to roll out"
        sql("CREATE TABLE rolling_runs (job_id bigint, n int, release text)")
        old_worker = old.start_worker()
        new_worker: subprocess.Popen[str] | None = None
        try:
            old.defer(0, 40)  # batch A: old code defers, the old worker runs them
            wait_until(lambda: sql("SELECT count(*) FROM rolling_runs")[0][0] > 0, old_worker)

            # Pre: while the old worker works. Every pre revision pending is applied.
            with engine.begin() as conn:
                applied = migrations.upgrade(conn, "pgtq", phase="pre")
            # (A release may have none: pgtq_0006's release has only a post revision.)
            assert applied == [rev for rev, phase in pending if phase == "pre"]

            # A blocked job (pgtq_0011, workflows): no worker claims it, the old one
            # included (its claim takes ``status = 'todo'`` only).
            blocked = (
                "INSERT INTO pgtq.jobs (task_name, status, pending_parents) "
                "SELECT 'never_claimed', 'blocked', 1 RETURNING id"
            )
            if "pgtq_0011" in applied:
                [(blocked_id,)] = sql(blocked)

            # Both releases side by side, both deferring.
            new_worker = new.start_worker()
            old.defer(100, 40)  # batch B
            new.defer(200, 40)  # batch C
            wait_until(lambda: all_final(sql) and count_jobs(sql) == 120, old_worker, new_worker)
            if "pgtq_0011" in applied:
                assert sql(
                    "SELECT status, attempts, worker_id FROM pgtq.jobs WHERE id = %s", blocked_id
                ) == [("blocked", 0, None)]

            # Both releases' schedulers ran beside the new table (pgtq_0007): the new one
            # registered its schedules there, and no tick was deferred twice.
            assert sql("SELECT task_name, periodic_id FROM pgtq.periodic_schedules ORDER BY 2") == [
                ("beat", ""),
                ("beat", "witness"),
            ]
            assert sql("SELECT count(*) FROM pgtq.jobs WHERE task_name = 'beat'")[0][0] > 0

            # The old release leaves (SIGTERM, graceful); the new one goes on alone.
            stop(old_worker)
            new.defer(300, 40)  # batch D: only the new worker is left to run it
            wait_until(lambda: all_final(sql) and count_jobs(sql) == 160, new_worker)
            # Now every scheduler reads pgtq_0007's state: a pause holds for the fleet.
            new.run("-m", "pgtq", "periodic", "pause", "rolling_app:app", "beat")
            paused = datetime.now(UTC)
            wait_until(
                lambda: last_tick(sql, "witness") >= paused + timedelta(seconds=2), new_worker
            )
            assert last_tick(sql, "") <= paused

            # Post, once the old release is gone: what only the old release needed goes
            # (pgtq_0006: the insert trigger its enqueuers relied on).
            with engine.begin() as conn:
                assert migrations.upgrade(conn, "pgtq", phase="post") == [
                    rev for rev, phase in pending if phase == "post"
                ]
            with engine.connect() as conn:
                assert migrations.current(conn, "pgtq") == migrations.heads()
            new.defer(400, 10)  # after post, the new release still works
            wait_until(lambda: all_final(sql) and count_jobs(sql) == 170, new_worker)
            stop(new_worker)
            new_worker = None
        finally:
            for proc in (old_worker, new_worker):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    finally:
        engine.dispose()

    # Nothing lost, nothing run twice.
    statuses = sql(f"SELECT status, count(*) FROM pgtq.jobs WHERE {BATCHES} GROUP BY status")
    assert statuses == [("succeeded", 170)]
    assert sql(f"SELECT count(*) FROM pgtq.jobs WHERE {BATCHES} AND result::int IS NULL") == [(0,)]
    # Each tick of each schedule became one job, whichever release's scheduler deferred it.
    assert sql(
        "SELECT count(*) FROM pgtq.jobs WHERE task_name = 'beat' "
        "AND NOT EXISTS (SELECT FROM pgtq.periodic_ticks t WHERE t.job_id = jobs.id)"
    ) == [(0,)]
    assert (
        sql(
            "SELECT t.periodic_id, j.args->>'timestamp' FROM pgtq.periodic_ticks t "
            "JOIN pgtq.jobs j ON j.id = t.job_id GROUP BY 1, 2 HAVING count(*) > 1"
        )
        == []
    )
    runs = sql("SELECT job_id, count(*) FROM rolling_runs GROUP BY job_id HAVING count(*) <> 1")
    assert runs == [], "a job ran more than once"
    assert sql("SELECT count(DISTINCT job_id) FROM rolling_runs") == [(170,)]
    assert sql(
        "SELECT count(*) FROM pgtq.jobs j JOIN rolling_runs r ON r.job_id = j.id "
        "WHERE j.result::int <> r.n"
    ) == [(0,)]
    by_release = dict(sql("SELECT release, count(*) FROM rolling_runs GROUP BY release"))
    assert by_release.get("old", 0) > 0 and by_release.get("new", 0) >= 50, by_release
    # Both releases' deferrals ran on both kinds of task.
    assert sql(f"SELECT count(DISTINCT task_name) FROM pgtq.jobs WHERE {BATCHES}") == [(2,)]


#: The jobs the test defers in batches (not the periodic ticks, which come all along).
BATCHES = "task_name IN ('sync_job', 'async_job')"


def count_jobs(sql: Callable[..., list[tuple[Any, ...]]]) -> int:
    return int(sql(f"SELECT count(*) FROM pgtq.jobs WHERE {BATCHES}")[0][0])


def all_final(sql: Callable[..., list[tuple[Any, ...]]]) -> bool:
    waiting = f"SELECT count(*) FROM pgtq.jobs WHERE {BATCHES} AND status IN ('todo', 'doing')"
    return sql(waiting) == [(0,)]


def last_tick(sql: Callable[..., list[tuple[Any, ...]]], periodic_id: str) -> datetime:
    rows = sql("SELECT max(tick_at) FROM pgtq.periodic_ticks WHERE periodic_id = %s", periodic_id)
    return rows[0][0] or datetime.min.replace(tzinfo=UTC)


def wait_until(check: Callable[[], bool], *workers: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        for worker in workers:
            if worker.poll() is not None:
                raise AssertionError(f"a worker exited early: {worker.communicate()}")
        assert time.monotonic() < deadline, "the jobs did not finish in time"
        time.sleep(0.05)
