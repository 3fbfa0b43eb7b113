"""Rows ``defer`` would refuse, written by other means (plain SQL, an older pgtq, a restored
dump), break neither the claim nor a read; bad arguments of the read paths raise pgtq errors.

The rows are inserted with plain SQL beside healthy jobs, then read and claimed through pgtq:
the sync side (psycopg) and the async side on both its drivers (asyncpg, psycopg).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy.engine import make_url

import pgtq
from pgtq import statements
from pgtq.connectors import is_data_error
from pgtq.model import ClaimedJob, Status
from pgtq.statements import INDEXED_VALUE_LIMIT, READ_TIME_MAX, READ_TIME_MIN
from tests.sides import Side

SQL = Callable[..., list[tuple[Any, ...]]]

#: ~3 kB that PostgreSQL cannot compress (hex digits of random hashes): over the index limit.
BIG_KEY = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 100))"


@pytest.fixture(params=["asyncpg", "psycopg"])
async def driven_app(request: pytest.FixtureRequest, dsn: str) -> AsyncIterator[pgtq.App]:
    """An app whose async side runs on asyncpg or on psycopg (the sync side is psycopg)."""
    driver = "postgresql" if request.param == "asyncpg" else "postgresql+psycopg"
    url = make_url(dsn).set(drivername=driver).render_as_string(hide_password=False)
    application = pgtq.App(url)
    yield application
    await application.close_async()


async def run(side: Side, app: pgtq.App, query: statements.Query[Any]) -> Any:
    """A query from ``pgtq.statements`` on the side's connector."""
    if side.name == "sync":
        return await asyncio.to_thread(app.sync.run, query)
    return await app.async_connector().run(query)


def insert(sql: SQL, values: str, columns: str = "task_name, scheduled_at") -> int:
    rows = sql(f"INSERT INTO pgtq.jobs ({columns}) VALUES {values} RETURNING id")
    return int(rows[0][0])


def add_worker(sql: SQL, worker_id: str = "w1") -> None:
    sql("INSERT INTO pgtq.workers (id, hostname, pid) VALUES (%s, 'here', 1)", worker_id)


# -- times out of Python's range ----------------------------------------------------------


async def test_non_finite_times_are_read_clamped(
    driven_app: pgtq.App, side: Side, sql: SQL
) -> None:
    app = driven_app

    @app.task(name="work")
    def work(n: int) -> None: ...

    healthy = await side.defer(work, n=1)
    past = insert(sql, "('work', '-infinity')")
    never = insert(sql, "('work', 'infinity')")
    far = insert(sql, "('work', '20000-01-01')")
    born = insert(sql, "('work', '-infinity')", "task_name, created_at")
    ended = insert(
        sql,
        "('work', 'succeeded', '-infinity', 'infinity')",
        "task_name, status, started_at, finished_at",
    )
    add_worker(sql)
    running = insert(
        sql, "('work', 'doing', 'w1', '-infinity')", "task_name, status, worker_id, started_at"
    )

    job = await side.get(app, past)
    assert job is not None and job.scheduled_at == READ_TIME_MIN
    assert job.created_at is not None and job.created_at.year > 2000
    for job_id in (never, far):
        job = await side.get(app, job_id)
        assert job is not None and job.scheduled_at == READ_TIME_MAX
    job = await side.get(app, born)
    assert job is not None and (job.created_at, job.scheduled_at) == (READ_TIME_MIN, None)
    job = await side.get(app, ended)
    assert job is not None and (job.started_at, job.finished_at) == (READ_TIME_MIN, READ_TIME_MAX)

    listed = await side.call(app.jobs, "list", newest_first=True)
    assert {j.id for j in listed} == {healthy, past, never, far, born, ended, running}

    stats = await side.call(app.jobs, "stats")
    assert stats.count(Status.TODO) == 5 and stats.count(Status.DOING) == 1
    oldest = stats.queues["default"].oldest_waiting
    assert oldest is not None and math.isfinite(oldest) and oldest < 3600  # due since created
    (worker,) = stats.workers
    assert [(r.id, r.started_at) for r in worker.running] == [(running, READ_TIME_MIN)]
    throughput = await side.call(app.jobs, "throughput")
    assert throughput.total == 0  # an end at infinity is in no bucket
    assert stats.rates == {}  # nor in any window
    assert await side.call(app.jobs, "counts") == {
        ("default", Status.TODO): 5,
        ("default", Status.DOING): 1,
        ("default", Status.SUCCEEDED): 1,
    }
    history = await side.call(app.jobs, "history", born)
    assert [(e.type, e.at) for e in history] == [("deferred", READ_TIME_MIN)]


async def test_job_scheduled_at_minus_infinity_is_claimed_and_runs(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    done: list[int] = []

    @app.task(name="work")
    def work(n: int) -> None:
        done.append(n)

    await side.defer_many(work, [{"n": 1}, {"n": 2}])
    past = insert(sql, """('work', '-infinity', '{"n": 3}')""", "task_name, scheduled_at, args")
    never = insert(sql, """('work', 'infinity', '{"n": 4}')""", "task_name, scheduled_at, args")
    stats = await side.run_worker(app, wait=False)
    assert stats.by_status["succeeded"] == 3
    assert sorted(done) == [1, 2, 3]
    job = await side.get(app, past)
    assert job is not None and job.status == Status.SUCCEEDED and job.attempts == 1
    job = await side.get(app, never)
    assert job is not None and job.status == Status.TODO  # never due: never claimed


async def test_claim_reports_a_wait_from_creation_for_a_non_finite_schedule(
    driven_app: pgtq.App, side: Side, sql: SQL
) -> None:
    app = driven_app
    add_worker(sql)
    past = insert(sql, "('work', '-infinity')")
    born = insert(sql, "('work', '-infinity')", "task_name, created_at")
    claimed = await run(side, app, statements.claim_jobs(app.statements, "w1", None, 20))
    waited = {job.id: job.waited for job in claimed}
    assert waited.keys() == {past, born}
    assert waited[past] is not None and 0 <= waited[past] < 3600  # from its creation
    assert waited[born] is None  # no finite time to measure from


# -- rows no claim can take ---------------------------------------------------------------


async def test_fail_unclaimable_jobs_fails_only_the_bad_rows(
    driven_app: pgtq.App, side: Side, sql: SQL
) -> None:
    app = driven_app

    @app.task(name="work")
    def work(n: int) -> None: ...

    healthy = await side.defer_many(work, [{"n": 1}, {"n": 2}])
    big_lock = insert(sql, f"('work', {BIG_KEY})", "task_name, lock")
    big_key = insert(sql, f"('work', {BIG_KEY})", "task_name, concurrency_key")
    counted_out = insert(sql, f"('work', {2**31 - 1})", "task_name, attempts")
    deep = insert(sql, "('work', (repeat('[', 900) || repeat(']', 900))::jsonb)", "task_name, args")
    huge = insert(
        sql, """('work', ('{"n": ' || repeat('9', 5000) || '}')::jsonb)""", "task_name, args"
    )
    nested = insert(
        sql, "('work', (repeat('[', 300) || repeat(']', 300))::jsonb)", "task_name, args"
    )
    # Compressible, so stored far under the limit however long: claimable.
    long_lock = insert(sql, "('work', repeat('a', 10000))", "task_name, lock")
    past = insert(sql, "('work', '-infinity')")
    add_worker(sql)
    claim = statements.claim_jobs(app.statements, "w1", None, 20)

    # The driver's own error on the fast path, SQLAlchemy's otherwise: what the worker's
    # claim tells apart either way is that a row's data broke it.
    with pytest.raises(Exception, match="index row") as raised:
        await run(side, app, claim)
    assert is_data_error(raised.value)
    failed = await run(side, app, statements.fail_unclaimable_jobs(app.statements))
    assert failed == sorted([big_lock, big_key, counted_out, deep, huge])
    assert await run(side, app, statements.fail_unclaimable_jobs(app.statements)) == []

    for job_id, column in ((big_lock, "lock"), (big_key, "concurrency_key")):
        job = await side.get(app, job_id)
        assert job is not None and job.status == Status.FAILED and job.attempts == 0
        assert job.error is not None and job.error["type"] == "UnclaimableJob"
        assert f"{column} is 3200 bytes" in job.error["message"]
        assert f"over the limit of {INDEXED_VALUE_LIMIT} bytes" in job.error["message"]
        assert job.finished_at is not None
        history = await side.call(app.jobs, "history", job_id)
        assert history[-1].type == "failed" and history[-1].error == job.error
    job = await side.get(app, counted_out)
    assert job is not None and job.error is not None and "attempts" in job.error["message"]
    # (Read with SQL: their arguments are what Python's JSON decoder refuses.)
    errors = sql(
        "SELECT error FROM pgtq.jobs WHERE id = ANY(%s) AND status = 'failed'", [deep, huge]
    )
    assert len(errors) == 2
    assert all("args cannot be read by Python's JSON decoder" in e["message"] for (e,) in errors)

    claimed: list[ClaimedJob] = await run(side, app, claim)
    assert sorted(j.id for j in claimed) == sorted([*healthy, long_lock, past, nested])
    stats = await side.call(app.jobs, "stats")
    assert stats.count(Status.FAILED) == 5 and stats.count(Status.DOING) == 5
    # A failed one can be retried like any failed job (and is failed again when claimed).
    assert await side.retry(app, big_lock) is True


async def test_fail_unclaimable_jobs_looks_at_the_first_jobs_of_the_queues(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    other = insert(sql, f"('work', 'other', {BIG_KEY})", "task_name, queue, lock")
    later = insert(sql, f"('work', -1, {BIG_KEY})", "task_name, priority, lock")
    first = insert(sql, f"('work', 1, {BIG_KEY})", "task_name, priority, lock")
    s = app.statements

    assert await run(side, app, statements.fail_unclaimable_jobs(s, ["default"], scan=1)) == [first]
    assert await run(side, app, statements.fail_unclaimable_jobs(s, ["default"])) == [later]
    assert await run(side, app, statements.fail_unclaimable_jobs(s, ["nowhere"])) == []
    assert await run(side, app, statements.fail_unclaimable_jobs(s)) == [other]


async def test_fail_unclaimable_jobs_unblocks_the_limited_claim(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    @app.task(name="work")
    def work(n: int) -> None: ...

    healthy = await side.defer(work, n=1)
    bad = insert(sql, f"('work', {BIG_KEY})", "task_name, concurrency_key")
    add_worker(sql)

    def limited() -> statements.Query[list[ClaimedJob]]:
        return statements.claim_limited(app.statements, "w1", None, 20, {"task:work": 5}, {})

    with pytest.raises(sqlalchemy.exc.DBAPIError, match="index row"):
        await run(side, app, limited())
    assert await run(side, app, statements.fail_unclaimable_jobs(app.statements)) == [bad]
    assert [j.id for j in await run(side, app, limited())] == [healthy]


# -- arguments of the read paths -----------------------------------------------------------


async def test_an_id_outside_bigint_is_no_job(app: pgtq.App, side: Side) -> None:
    for job_id in (2**63, -(2**63) - 1, 10**30):
        assert await side.get(app, job_id) is None
        assert await side.retry(app, job_id) is False
        assert await side.abort(app, job_id) is None
        assert await side.call(app.jobs, "cancel", job_id) is False
        assert await side.call(app.jobs, "history", job_id) == []
        with pytest.raises(pgtq.JobNotFound):
            await side.wait(app, job_id)


BAD_JOB_IDS = ["5", 1.5, True, None]

BAD_CALLS: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = [
    ("limit", "list", (), {"limit": 10**12}),
    ("limit", "list", (), {"limit": -1}),
    ("limit", "list", (), {"limit": "5"}),
    ("after", "list", (), {"after": 2**63}),
    ("after", "list", (), {"after": 1.5}),
    ("queue", "list", (), {"queue": "a\x00b"}),
    ("task", "list", (), {"task": 7}),
    ("search", "list", (), {"search": "\ud800"}),
    ("lock", "list", (), {"lock": "\x00"}),
    ("older_than", "delete_old_jobs", (math.nan,), {}),
    ("older_than", "delete_old_jobs", (math.inf,), {}),
    ("older_than", "delete_old_jobs", (1e20,), {}),
    ("older_than", "delete_old_jobs", (timedelta.max,), {}),
    ("older_than", "delete_old_jobs", ("5",), {}),
    ("older_than", "delete_old_jobs", (-1,), {}),
    ("queue", "delete_old_jobs", (60,), {"queue": "\x00"}),
    ("older_than", "clear_results", (math.nan,), {}),
    ("window", "stats", (), {"window": math.nan}),
    ("window", "stats", (), {"window": 0}),
    ("window", "stats", (), {"window": 1e20}),
    ("window", "throughput", (), {"window": math.inf}),
    ("bucket", "throughput", (), {"window": 1e-300, "bucket": 1e-301}),
    ("timeout", "wait", (1,), {"timeout": math.nan}),
]


@pytest.mark.parametrize("job_id", BAD_JOB_IDS, ids=repr)
async def test_a_job_id_must_be_an_integer(app: pgtq.App, side: Side, job_id: Any) -> None:
    for method in ("get", "retry", "abort", "cancel", "history"):
        with pytest.raises(pgtq.InvalidArguments, match="job_id"):
            await side.call(app.jobs, method, job_id)


@pytest.mark.parametrize(("name", "method", "args", "kwargs"), BAD_CALLS, ids=repr)
async def test_read_path_arguments_raise_pgtq_errors(
    app: pgtq.App,
    side: Side,
    name: str,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    with pytest.raises(pgtq.InvalidArguments, match=name) as raised:
        await side.call(app.jobs, method, *args, **kwargs)
    assert isinstance(raised.value, ValueError)  # as InvalidFilter always was


@pytest.mark.parametrize(
    ("name", "method", "args", "kwargs"),
    [
        ("queue name", "pause", ("é" * 2000,), {}),
        ("queue name", "pause", ("a\x00",), {}),
        ("queue name", "resume", (3,), {}),
        ("concurrency", "set_limits", ("q",), {"concurrency": 2**31}),
        ("concurrency", "set_limits", ("q",), {"concurrency": 1.5}),
        ("concurrency", "set_limits", ("q",), {"concurrency": 0}),
        ("rate_limit", "set_limits", ("q",), {"rate_limit": math.nan}),
        ("rate_limit", "set_limits", ("q",), {"rate_limit": math.inf}),
    ],
    ids=repr,
)
async def test_queue_arguments_raise_pgtq_errors(
    app: pgtq.App,
    side: Side,
    name: str,
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    with pytest.raises(pgtq.InvalidArguments, match=name):
        await side.call(app.queues, method, *args, **kwargs)
    assert await side.call(app.queues, "list") == []


async def test_edge_arguments_still_work(app: pgtq.App, side: Side) -> None:
    assert await side.call(app.jobs, "list", limit=2**31 - 1, after=2**63 - 1) == []
    assert await side.call(app.jobs, "delete_old_jobs", timedelta(days=365 * 999)) == 0
    assert (await side.call(app.jobs, "stats", window=1)).window == 1
    assert await side.call(app.queues, "pause", "q" * INDEXED_VALUE_LIMIT) is True


# -- through a worker: one bad row never stops the claims ----------------------------------


@pytest.mark.parametrize("limited", [False, True], ids=["plain", "limited"])
async def test_a_worker_fails_the_rows_no_claim_can_take_and_runs_the_rest(
    driven_app: pgtq.App, sql: SQL, limited: bool
) -> None:
    """A 3 kB lock, a 3 kB concurrency key, arguments nested past Python's decoder, and a
    ``-infinity`` schedule, written by plain SQL among healthy jobs: the worker fails the
    three rows no claim can take (``UnclaimableJob``), runs everything else, and drains."""
    app = driven_app

    @app.task(name="work", **({"concurrency": 50} if limited else {}))
    async def work(n: int = 0) -> int:
        return n

    healthy = await work.defer_many_async([{"n": n} for n in range(30)])
    big_lock = insert(sql, f"('work', {BIG_KEY})", "task_name, lock")
    big_key = insert(sql, f"('work', {BIG_KEY})", "task_name, concurrency_key")
    deep = insert(
        sql,
        "('work', (repeat('[', 2000) || repeat(']', 2000))::jsonb)",
        "task_name, args",
    )
    timeless = insert(sql, "('work', '-infinity')")
    healthy += await work.defer_many_async([{"n": n} for n in range(30, 60)])

    stats = await asyncio.wait_for(app.run_worker_async(wait=False, concurrency=8), timeout=60)

    rows = dict(sql("SELECT id, status FROM pgtq.jobs"))
    assert {rows[i] for i in healthy} == {"succeeded"}
    assert rows[timeless] == "succeeded"
    for bad in (big_lock, big_key, deep):
        assert rows[bad] == "failed", bad
        job = await app.jobs.get_async(bad) if bad != deep else None
        if job is not None:
            assert job.error is not None and job.error["type"] == "UnclaimableJob"
    (deep_error,) = sql("SELECT error->>'type' FROM pgtq.jobs WHERE id = %s", deep)[0]
    assert deep_error == "UnclaimableJob"
    assert stats.processed == len(healthy) + 1
