"""``ctx.set_progress`` / ``set_progress_async``: checked, handed to the worker's completer
(never a round trip per call), written with its next write or alone within
``PROGRESS_INTERVAL``, guarded so that it only touches the attempt that reported it.

Against the real database: a trigger records every change of ``jobs.progress``, so a test
counts the writes PostgreSQL really received.
"""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import psycopg
import pytest
from sqlalchemy.dialects import postgresql

import pgtq
from pgtq import statements
from pgtq.completer import PROGRESS_INTERVAL, Completer
from pgtq.errors import InvalidArguments
from pgtq.jobs import MAX_PROGRESS_MESSAGE, JobContext, progress_record
from pgtq.model import ClaimedJob, Status
from pgtq.outcomes import Outcome
from tests.conftest import eventually
from tests.sides import Side
from tests.test_operations import SQL
from tests.test_plans import OUTCOMES, _nodes, big_db  # noqa: F401 (a fixture)

#: Every change of a job's progress, as PostgreSQL saw it: (job id, fraction).
PROGRESS_LOG = (
    "CREATE TABLE IF NOT EXISTS public.progress_log (job_id bigint, fraction float8)",
    "TRUNCATE public.progress_log",
    """CREATE OR REPLACE FUNCTION public.log_progress() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO public.progress_log VALUES (NEW.id, (NEW.progress ->> 'fraction')::float8);
      RETURN NEW;
    END $$""",
    "CREATE OR REPLACE TRIGGER log_progress AFTER UPDATE ON pgtq.jobs FOR EACH ROW "
    "WHEN (OLD.progress IS DISTINCT FROM NEW.progress) EXECUTE FUNCTION public.log_progress()",
)


@pytest.fixture
def progress_log(sql: SQL) -> Any:
    for statement in PROGRESS_LOG:
        sql(statement)
    yield lambda: sql("SELECT job_id, fraction FROM public.progress_log")
    sql("DROP TRIGGER IF EXISTS log_progress ON pgtq.jobs")


# == the record: checked once, the same for both twins ==========================================


@pytest.mark.unit
@pytest.mark.parametrize("fraction", [True, -0.01, 1.01, math.nan, math.inf, "0.5", None, 2**70])
def test_a_fraction_outside_0_to_1_is_refused(fraction: Any) -> None:
    with pytest.raises(InvalidArguments, match="fraction must be a number from 0 to 1"):
        progress_record(fraction, None, 1)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (b"bytes", "message must be a str"),
        ("a\x00b", "NUL"),
        ("\ud800", "lone surrogate"),
        ("é" * MAX_PROGRESS_MESSAGE, "over the limit"),
    ],
)
def test_a_message_must_be_bounded_text(message: Any, fragment: str) -> None:
    with pytest.raises(InvalidArguments, match=fragment):
        progress_record(0.5, message, 1)


@pytest.mark.unit
def test_the_record_says_which_attempt_reported_it() -> None:
    assert progress_record(0, None, 3) == {"fraction": 0.0, "message": None, "attempt": 3}
    assert progress_record(1, "done", 1)["fraction"] == 1.0


@pytest.mark.unit
async def test_a_context_without_a_worker_keeps_the_last_progress() -> None:
    """A task tested by calling it with a context of its own: nothing to write to, the last
    value is on the context."""
    ctx: JobContext[Any] = JobContext(1, "t", "default", 1, "w", app=pgtq.App("postgresql:///x"))
    assert ctx.progress is None
    ctx.set_progress(0.25, "a quarter")
    await ctx.set_progress_async(0.5)
    assert ctx.progress == {"fraction": 0.5, "message": None, "attempt": 1}
    with pytest.raises(InvalidArguments):
        await ctx.set_progress_async(2)


# == the completer: coalesced, with the outcomes, or alone within the interval ==================


class Recording:
    """A completer's connection that records each query it is given."""

    def __init__(self) -> None:
        self.queries: list[statements.Query[Any]] = []

    async def run(self, query: statements.Query[Any]) -> list[int]:
        self.queries.append(query)
        # What the database answers for jobs without children: every outcome written (a
        # job with children would be refused and written again: tests/test_workflows.py).
        return list(query.params.get("ids", []))

    async def close(self) -> None:
        pass


def _completer() -> tuple[Completer, Recording]:
    s = statements.statements_for("pgtq")
    c = Completer(s, lambda: "w1", (), on_written=lambda frees: None)
    conn = Recording()
    c.connection = conn  # type: ignore[assignment]
    return c, conn


def _job(n: int, attempt: int = 1) -> ClaimedJob:
    return ClaimedJob(n, "t", "default", {}, attempt, 0, None)


@pytest.mark.unit
async def test_a_write_without_progress_runs_the_statement_it_always_ran() -> None:
    c, conn = _completer()
    c.add(_job(1), Outcome(Status.SUCCEEDED, result="null"))
    await c.write(give_up_after=None)
    [query] = conn.queries
    assert query.statement is c._s.complete
    assert "progress_ids" not in query.params and "outcome_progress" not in query.params


@pytest.mark.unit
async def test_only_the_newest_progress_of_each_job_is_written() -> None:
    c, conn = _completer()
    for i in range(1000):
        c.set_progress(7, 2, progress_record(i / 1000, f"step {i}", 2))
    c.set_progress(8, 1, progress_record(0.5, None, 1))
    await c.write(give_up_after=None)
    [query] = conn.queries
    assert query.statement is c._s.set_progress  # no outcome: the progress alone
    assert query.params["progress_ids"] == [7, 8]
    assert query.params["progress_attempts"] == [2, 1]
    assert '"step 999"' in query.params["progress_values"][0]
    await c.write(give_up_after=None)
    assert len(conn.queries) == 1  # nothing pending: nothing written


@pytest.mark.unit
async def test_progress_goes_with_the_outcomes_in_one_statement() -> None:
    """A finishing job's last progress in its own outcome row (never its row twice in one
    statement); a running job's in the same statement."""
    c, conn = _completer()
    c.set_progress(1, 1, progress_record(0.9, "almost", 1))
    c.set_progress(2, 1, progress_record(0.3, None, 1))
    c.set_progress(3, 1, progress_record(0.3, None, 1))  # of an older attempt than its outcome
    c.add(_job(1), Outcome(Status.SUCCEEDED, result="null"))
    c.add(_job(3, attempt=2), Outcome(Status.SUCCEEDED, result="null"))
    c.add(_job(4), Outcome(Status.SUCCEEDED, result="null"))
    await c.write(give_up_after=None)
    [query] = conn.queries
    assert query.statement is c._s.completion(False, statements.Rare(False, False, True, True))
    assert query.params["ids"] == [1, 3, 4]
    progress = query.params["outcome_progress"]
    assert '"almost"' in progress[0] and progress[1:] == [None, None]
    assert query.params["progress_ids"] == [2]


@pytest.mark.unit
async def test_progress_alone_is_written_within_the_interval_once_for_many_calls() -> None:
    c, conn = _completer()
    runner = asyncio.create_task(c.run())
    try:
        await asyncio.sleep(0)  # the loop is known to the completer
        reported = threading.Event()

        def task() -> None:  # a sync task, in its thread
            for i in range(5000):
                c.set_progress(1, 1, progress_record(i / 5000, None, 1))
            reported.set()

        started = asyncio.get_running_loop().time()
        await asyncio.to_thread(task)
        assert reported.is_set()
        await eventually(lambda: bool(conn.queries), timeout=5 * PROGRESS_INTERVAL)
        assert asyncio.get_running_loop().time() - started < 4 * PROGRESS_INTERVAL
        assert len(conn.queries) <= 2  # not one per call (5000)
        assert '"fraction": 0.9998' in conn.queries[-1].params["progress_values"][0]
    finally:
        runner.cancel()


@pytest.mark.unit
async def test_progress_not_written_is_kept_unless_newer_came() -> None:
    c, conn = _completer()

    async def lost(query: statements.Query[Any]) -> list[int]:
        conn.queries.append(query)
        c.set_progress(2, 1, progress_record(0.8, None, 1))  # newer, meanwhile
        conn.run = Recording.run.__get__(conn)  # type: ignore[method-assign]
        raise OSError("connection lost")

    c.set_progress(1, 1, progress_record(0.1, None, 1))
    c.set_progress(2, 1, progress_record(0.2, None, 1))
    conn.run = lost  # type: ignore[method-assign]
    await c.write(give_up_after=None)
    assert len(conn.queries) == 2
    retried = conn.queries[1].params
    values = dict(zip(retried["progress_ids"], retried["progress_values"], strict=True))
    assert sorted(values) == [1, 2]
    assert '"fraction": 0.1' in values[1] and '"fraction": 0.8' in values[2]


# == on the database: the guard, and through a real worker =====================================


def _claimed(sql: SQL, worker: str = "w1") -> int:
    """A job as the claim of ``worker``'s first attempt leaves it."""
    [(job_id,)] = sql(
        "INSERT INTO pgtq.jobs (queue, task_name, status, worker_id, attempts, started_at) "
        "VALUES ('default', 'slow', 'doing', %s, 1, now()) RETURNING id",
        worker,
    )
    return int(job_id)


def _progress(job_id: int, attempt: int, fraction: float) -> statements.Progress:
    return statements.Progress([job_id], [attempt], [f'{{"fraction": {fraction}}}'])


async def test_progress_reaches_only_the_attempt_that_reported_it(
    app: pgtq.App, sql: SQL, side: Side
) -> None:
    """Written while this worker holds this attempt; never once the job was rescued,
    aborted, taken by another attempt or finished (and never brought back to life)."""
    s, run = app.statements, app.async_connector().run
    job_id = _claimed(sql)

    async def progress_of() -> Any:
        job = await side.get(app, job_id)
        assert job is not None
        return job.progress

    assert await run(statements.write_progress(s, "w1", _progress(job_id, 1, 0.2))) == [job_id]
    assert await progress_of() == {"fraction": 0.2}
    # Another worker's id, or another attempt: untouched.
    assert await run(statements.write_progress(s, "w2", _progress(job_id, 1, 0.3))) == []
    assert await run(statements.write_progress(s, "w1", _progress(job_id, 2, 0.3))) == []
    # Rescued (back to todo), then claimed again by another worker: attempt 1's report is late.
    sql("UPDATE pgtq.jobs SET status = 'todo', worker_id = NULL WHERE id = %s", job_id)
    assert await run(statements.write_progress(s, "w1", _progress(job_id, 1, 0.4))) == []
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w2', attempts = 2 WHERE id = %s",
        job_id,
    )
    assert await run(statements.write_progress(s, "w1", _progress(job_id, 1, 0.4))) == []
    assert await progress_of() == {"fraction": 0.2}
    # Ended (aborted, succeeded): never written, the status stays.
    for status in ("aborted", "succeeded"):
        sql("UPDATE pgtq.jobs SET status = %s, worker_id = 'w1' WHERE id = %s", status, job_id)
        late = statements.write_progress(s, "w1", _progress(job_id, 2, 0.9))
        assert await run(late) == []
        # With another job's outcome, in one statement: the same guard.
        other = _claimed(sql)
        outcomes = statements.Outcomes.empty()
        outcomes.add(other, Status.SUCCEEDED, "null", attempt=1)
        both = statements.complete_jobs(s, "w1", outcomes, (), _progress(job_id, 2, 0.9))
        assert await run(both) == [other]
        job = await side.get(app, job_id)
        assert (
            job is not None and job.status == Status(status) and job.progress == {"fraction": 0.2}
        )


async def test_a_finishing_job_keeps_its_last_progress(app: pgtq.App, sql: SQL) -> None:
    s, run = app.statements, app.async_connector().run
    job_id = _claimed(sql)
    outcomes = statements.Outcomes.empty()
    outcomes.add(job_id, Status.SUCCEEDED, "null", attempt=1)
    outcomes.progress[job_id] = '{"fraction": 1.0, "message": "done"}'
    assert await run(statements.complete_jobs(s, "w1", outcomes, ("failed",))) == [job_id]
    job = await app.jobs.get_async(job_id)
    assert job is not None and job.status is Status.SUCCEEDED
    assert job.progress == {"fraction": 1.0, "message": "done"}
    # An outcome without progress leaves the progress it had (a retry keeps the last bar).
    other = _claimed(sql)
    sql("UPDATE pgtq.jobs SET progress = '{\"fraction\": 0.5}' WHERE id = %s", other)
    outcomes = statements.Outcomes.empty()
    outcomes.add(other, Status.SUCCEEDED, "null", attempt=1)
    outcomes.progress[job_id] = '{"fraction": 1.0}'  # another job's: not this row's
    await run(statements.complete_jobs(s, "w1", outcomes))
    job = await app.jobs.get_async(other)
    assert job is not None and job.progress == {"fraction": 0.5}


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_running_task_progress_is_seen_live_and_costs_few_writes(
    app: pgtq.App, side: Side, kind: str, progress_log: Any
) -> None:
    """A task reports thousands of times then waits: a reader polling ``get`` sees 0.4 (the
    last report), written a handful of times; the job ends keeping its last progress."""
    release = threading.Event()
    calls = 3000

    if kind == "sync":

        @app.task
        def crunch(ctx: pgtq.JobContext) -> str:
            for i in range(calls):
                ctx.set_progress(0.4 * i / (calls - 1), f"row {i}")
            release.wait(30)
            ctx.set_progress(1.0, "done")
            return "ok"

        task: pgtq.Task[..., Any] = crunch
    else:

        @app.task
        async def crunch_async(ctx: pgtq.JobContext) -> str:
            for i in range(calls):
                await ctx.set_progress_async(0.4 * i / (calls - 1), f"row {i}")
            await asyncio.to_thread(release.wait, 30)
            await ctx.set_progress_async(1.0, "done")
            return "ok"

        task = crunch_async

    job_id = await side.defer(task)
    worker = asyncio.create_task(side.run_worker(app, wait=False))
    try:

        async def at_04() -> bool:
            job = await side.get(app, job_id)
            assert job is not None
            return job.progress is not None and job.progress["fraction"] == 0.4

        await eventually(at_04, timeout=10)
        job = await side.get(app, job_id)
        assert job is not None and job.status is Status.DOING
        assert job.progress == {"fraction": 0.4, "message": f"row {calls - 1}", "attempt": 1}
    finally:
        release.set()
        await worker
    job = await side.get(app, job_id)
    assert job is not None and job.status is Status.SUCCEEDED
    assert job.progress == {"fraction": 1.0, "message": "done", "attempt": 1}
    writes = progress_log()
    assert 2 <= len(writes) <= 10, writes  # 3001 reports
    assert writes[-1] == (job_id, 1.0)  # with the outcome, in its statement


async def test_a_job_that_never_reports_progress_has_none(app: pgtq.App, side: Side) -> None:
    @app.task
    def plain() -> int:
        return 1

    job_id = await side.defer(plain)
    await side.run_worker(app, wait=False)
    job = await side.get(app, job_id)
    assert job is not None and job.status is Status.SUCCEEDED and job.progress is None


# == the plans at 100k rows: as the completion's, by primary key ================================

S = statements.statements_for("pgtq")
_RUNNING = {
    "progress_ids": list(range(1, 200, 2)),
    "progress_attempts": [1] * 100,
    "progress_values": ['{"fraction": 0.5}'] * 100,
}
PROGRESS_PLANS = {
    "progress alone": (S.set_progress, {"me": "w", **_RUNNING}),
    "completion with progress": (
        S.completion(False, statements.Rare(False, False, True, True)),
        {
            **OUTCOMES,
            "outcome_attempts": [1] * 100,
            "outcome_progress": ['{"fraction": 1.0}'] * 100,
            **{k: [i + 1 for i in v] if k == "progress_ids" else v for k, v in _RUNNING.items()},
        },
    ),
}


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("case", list(PROGRESS_PLANS))
def test_progress_writes_use_the_primary_key(
    request: pytest.FixtureRequest, case: str, plan_mode: str
) -> None:
    url: str = request.getfixturevalue("big_db")  # tests.test_plans's 100k jobs
    statement, params = PROGRESS_PLANS[case]
    compiled = statement.compile(dialect=postgresql.dialect(paramstyle="pyformat"))
    with psycopg.connect(url) as conn:
        conn.execute(f"SET plan_cache_mode = {plan_mode}")
        [(plan,)] = conn.execute(
            "EXPLAIN (FORMAT JSON) " + compiled.string, {**compiled.params, **params}
        ).fetchall()
        conn.rollback()
    scans = {(n["Node Type"], n.get("Relation Name")) for n in _nodes(plan[0]["Plan"])}
    assert ("Seq Scan", "jobs") not in scans, scans
    assert ("Bitmap Heap Scan", "jobs") not in scans, scans
    assert ("Index Scan", "jobs") in scans, scans
