"""The worker, run through ``run_worker`` (sync, in a thread) and ``run_worker_async``."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgtq
from tests.conftest import eventually
from tests.sides import Side


async def test_runs_sync_and_async_tasks_and_stores_results(side: Side, app: pgtq.App) -> None:
    seen_threads: dict[str, str] = {}

    @app.task
    def add(a: int, b: int) -> int:
        seen_threads["add"] = threading.current_thread().name
        return a + b

    @app.task
    async def shout(word: str) -> dict[str, str]:
        seen_threads["shout"] = threading.current_thread().name
        return {"word": word.upper()}

    a = await side.defer(add, a=2, b=3)
    b = await side.defer(shout, word="hey")
    stats = await side.run_worker(app, wait=False)
    assert stats.by_status["succeeded"] == 2
    assert await side.wait(app, a) == 5
    assert await side.wait(app, b) == {"word": "HEY"}
    assert seen_threads["add"].startswith("pgtq-job")  # sync tasks run in the pool
    assert not seen_threads["shout"].startswith("pgtq-job")  # async ones on the loop
    job = await side.get(app, a)
    assert job is not None and job.status == pgtq.Status.SUCCEEDED and job.attempts == 1
    assert job.started_at is not None and job.finished_at is not None


async def test_context_is_passed_to_tasks_that_ask(side: Side, app: pgtq.App) -> None:
    got: list[pgtq.JobContext] = []

    @app.task(queue="q1")
    def with_ctx(ctx: pgtq.JobContext, n: int) -> None:
        got.append(ctx)

    @app.task
    async def named_ctx(context, n: int) -> int:  # type: ignore[no-untyped-def]
        got.append(context)
        return n

    job_id = await side.defer(with_ctx, n=1)
    await side.defer(named_ctx, n=2)
    await side.run_worker(app, wait=False)
    ctx = next(c for c in got if c.task_name == "with_ctx")
    assert (ctx.job_id, ctx.queue, ctx.attempt) == (job_id, "q1", 1)
    assert ctx.worker_id and ctx.start_timestamp <= time.time()
    assert ctx.should_abort() is False
    assert {c.task_name for c in got} == {"with_ctx", "named_ctx"}


@pytest.mark.parametrize("batch_size", [1, 5], ids=["one per claim", "all in one claim"])
async def test_priority_order(side: Side, app: pgtq.App, batch_size: int) -> None:
    """Higher priority first, then the older job; within one claim too (sorted after it)."""
    order: list[tuple[int, str]] = []

    @app.task
    def record(p: int, tag: str) -> None:
        order.append((p, tag))

    for p, tag in ((0, "a"), (5, "b"), (-3, "c"), (10, "d"), (5, "e")):
        await side.defer(record.configure(priority=p), p=p, tag=tag)
    await side.run_worker(app, wait=False, concurrency=1, batch_size=batch_size, prefetch=4)
    assert order == [(10, "d"), (5, "b"), (5, "e"), (0, "a"), (-3, "c")]


async def test_only_listed_queues_are_worked(side: Side, app: pgtq.App) -> None:
    @app.task
    def noop() -> None: ...

    keep = await side.defer(noop.configure(queue="other"))
    done = await side.defer(noop.configure(queue="mine"))
    await side.run_worker(app, wait=False, queues=["mine"])
    assert (await side.get(app, done)).status == pgtq.Status.SUCCEEDED  # type: ignore[union-attr]
    assert (await side.get(app, keep)).status == pgtq.Status.TODO  # type: ignore[union-attr]


async def test_future_jobs_wait_and_never_block_their_lock(side: Side, app: pgtq.App) -> None:
    @app.task
    def noop() -> None: ...

    later = await side.defer(noop.configure(schedule_in=timedelta(hours=1), lock="L"))
    now = await side.defer(noop.configure(lock="L"))
    stats = await side.run_worker(app, wait=False)
    assert stats.processed == 1
    assert (await side.get(app, now)).status == pgtq.Status.SUCCEEDED  # type: ignore[union-attr]
    assert (await side.get(app, later)).status == pgtq.Status.TODO  # type: ignore[union-attr]


async def test_jobs_sharing_a_lock_never_overlap(side: Side, app: pgtq.App, sql: Any) -> None:
    running: dict[str, int] = {}
    overlaps: list[str] = []
    guard = threading.Lock()

    @app.task
    def locked(key: str) -> None:
        with guard:
            running[key] = running.get(key, 0) + 1
            if running[key] > 1:
                overlaps.append(key)
        time.sleep(0.005)
        with guard:
            running[key] -= 1

    for i in range(60):
        await side.defer(locked.configure(lock=f"k{i % 3}"), key=f"k{i % 3}")
    stats = await side.run_worker(app, wait=False, concurrency=10)
    assert stats.by_status["succeeded"] == 60
    assert overlaps == []


async def test_failure_is_stored_and_retried_by_policy(side: Side, app: pgtq.App) -> None:
    @app.task(retry=pgtq.Retry(max_attempts=3, base=0, jitter=0))
    def flaky(ctx: pgtq.JobContext) -> int:
        if ctx.attempt < 3:
            raise ValueError(f"attempt {ctx.attempt} failed")
        return ctx.attempt

    @app.task
    async def broken() -> None:
        raise KeyError("nope")

    ok = await side.defer(flaky)
    bad = await side.defer(broken)
    stats = await side.run_worker(app, wait=False)
    assert stats.by_status == {"retried": 2, "succeeded": 1, "failed": 1}
    assert await side.wait(app, ok) == 3
    with pytest.raises(pgtq.JobFailed) as info:
        await side.wait(app, bad)
    error = info.value.error
    assert error["type"] == "KeyError" and error["message"] == "'nope'"
    assert "Traceback" in error["traceback"] and "broken" in error["traceback"]
    job = await side.get(app, bad)
    assert job is not None and job.status == pgtq.Status.FAILED and job.attempts == 1


async def test_unknown_task_fails_clearly_and_the_worker_goes_on(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    @app.task
    def known() -> str:
        return "ok"

    sql("INSERT INTO pgtq.jobs (task_name, args) VALUES ('gone_task', '{}')")
    [(ghost,)] = sql("SELECT id FROM pgtq.jobs")
    fine = await side.defer(known)
    stats = await side.run_worker(app, wait=False)
    assert stats.by_status == {"failed": 1, "succeeded": 1}
    with pytest.raises(pgtq.JobFailed, match="no task named 'gone_task'"):
        await side.wait(app, ghost)
    assert await side.wait(app, fine) == "ok"


async def test_result_that_is_not_json_fails_the_job(side: Side, app: pgtq.App) -> None:
    @app.task
    def returns_set() -> Any:
        return {1, 2}

    job_id = await side.defer(returns_set)
    await side.run_worker(app, wait=False)
    with pytest.raises(pgtq.JobFailed, match="not JSON-serializable"):
        await side.wait(app, job_id)


async def test_notify_wakes_an_idle_worker(app: pgtq.App) -> None:
    """A job deferred while the worker sleeps is picked up long before the 60 s poll."""
    done = asyncio.Event()

    @app.task
    async def ping() -> None:
        done.set()

    worker = asyncio.create_task(app.run_worker_async(fetch_job_polling_interval=60))
    await eventually(lambda: _worker_registered(app), timeout=10)
    await ping.defer_async()
    await asyncio.wait_for(done.wait(), timeout=10)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker


async def test_polling_finds_jobs_that_no_notify_announced(app: pgtq.App) -> None:
    """A job scheduled a moment ahead sends no NOTIFY when it falls due: polling finds it."""
    done = asyncio.Event()

    @app.task
    async def later() -> None:
        done.set()

    worker = asyncio.create_task(app.run_worker_async(fetch_job_polling_interval=0.2))
    await later.configure(schedule_in=0.3).defer_async()
    await asyncio.wait_for(done.wait(), timeout=10)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker


async def _worker_registered(app: pgtq.App) -> bool:
    import sqlalchemy as sa

    async with app.async_connector().engine.connect() as conn:
        count = await conn.scalar(sa.text("SELECT count(*) FROM pgtq.workers"))
    return bool(count)


async def test_abort(side: Side, app: pgtq.App) -> None:
    """Waiting → cancelled at once; running async → cancelled; running sync → should_abort."""
    started = {"sync": threading.Event(), "async": asyncio.Event()}
    saw_abort: list[str | None] = []

    @app.task
    def slow_sync(ctx: pgtq.JobContext) -> None:
        started["sync"].set()
        deadline = time.monotonic() + 30
        while not ctx.should_abort() and time.monotonic() < deadline:
            time.sleep(0.01)
        saw_abort.append(ctx.abort_reason())

    @app.task
    async def slow_async() -> None:
        started["async"].set()
        await asyncio.sleep(30)

    waiting = await side.defer(slow_sync.configure(schedule_in=timedelta(hours=1)))
    assert await side.abort(app, waiting) == pgtq.Status.CANCELLED
    a = await side.defer(slow_async)
    s = await side.defer(slow_sync)
    worker = asyncio.create_task(app.run_worker_async(abort_job_polling_interval=0.1))
    await asyncio.wait_for(started["async"].wait(), timeout=10)
    await eventually(started["sync"].is_set)
    assert await side.abort(app, a) == pgtq.Status.DOING
    assert await side.abort(app, s) == pgtq.Status.DOING
    for job_id in (a, s):
        with pytest.raises(pgtq.JobFailed) as info:
            await side.wait(app, job_id, timeout=10)
        assert info.value.status == "aborted"
    assert saw_abort == ["requested"]
    assert await side.abort(app, a) is None  # already final
    job = await side.get(app, waiting)
    assert job is not None and job.status == pgtq.Status.CANCELLED
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker


async def test_retry_puts_a_failed_job_back(side: Side, app: pgtq.App) -> None:
    calls: list[int] = []

    @app.task
    def once_broken() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first")
        return "second"

    job_id = await side.defer(once_broken)
    await side.run_worker(app, wait=False)
    with pytest.raises(pgtq.JobFailed):
        await side.wait(app, job_id)
    assert await side.retry(app, job_id) is True
    assert await side.retry(app, job_id) is False  # already waiting
    await side.run_worker(app, wait=False)
    assert await side.wait(app, job_id) == "second"


async def test_wait_times_out(side: Side, app: pgtq.App) -> None:
    @app.task
    def never_run() -> None: ...

    job_id = await side.defer(never_run)
    with pytest.raises(pgtq.JobTimeout):
        await side.wait(app, job_id, timeout=0.1)
    with pytest.raises(pgtq.JobNotFound):
        await side.wait(app, 999_999, timeout=1)


async def test_worker_on_unmigrated_database_says_to_migrate(
    side: Side, make_database: Any
) -> None:
    app = pgtq.App(make_database())
    with pytest.raises(pgtq.SchemaNotMigrated, match="pgtq migrate"):
        await side.run_worker(app, wait=False)
    await app.close_async()


async def test_cancelling_the_worker_lets_running_jobs_finish(app: pgtq.App) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    @app.task
    async def finishing() -> str:
        started.set()
        await release.wait()
        return "done"

    job_id = await finishing.defer_async()
    worker = asyncio.create_task(app.run_worker_async(shutdown_graceful_timeout=10))
    await asyncio.wait_for(started.wait(), timeout=10)
    worker.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert await app.jobs.wait_async(job_id, timeout=1) == "done"
    assert not await _worker_registered(app)


async def test_run_worker_uses_uvloop_when_installed(app: pgtq.App) -> None:
    uvloop = pytest.importorskip("uvloop")
    seen: list[type] = []

    @app.task
    async def which_loop() -> None:
        seen.append(type(asyncio.get_running_loop()))

    await which_loop.defer_async()
    await asyncio.to_thread(app.run_worker, wait=False, install_signal_handlers=False)
    assert seen == [uvloop.Loop]


async def test_a_paused_queue_is_not_worked(side: Side, app: pgtq.App) -> None:
    @app.task
    def noop() -> None: ...

    held = await side.defer(noop.configure(queue="held"))
    free = await side.defer(noop.configure(queue="free"))
    await side.call(app.queues, "pause", "held")
    await side.run_worker(app, wait=False)
    assert (await side.get(app, held)).status == pgtq.Status.TODO  # type: ignore[union-attr]
    assert (await side.get(app, free)).status == pgtq.Status.SUCCEEDED  # type: ignore[union-attr]
    await side.call(app.queues, "resume", "held")
    await side.run_worker(app, wait=False)
    assert (await side.get(app, held)).status == pgtq.Status.SUCCEEDED  # type: ignore[union-attr]


async def test_the_worker_runs_the_periodic_scheduler(app: pgtq.App) -> None:
    ticks: list[int] = []
    ran = asyncio.Event()

    @app.periodic(cron="* * * * * *")  # every second
    @app.task
    async def tick(timestamp: int) -> None:
        ticks.append(timestamp)
        ran.set()

    worker = asyncio.create_task(app.run_worker_async())
    await asyncio.wait_for(ran.wait(), timeout=10)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert ticks and all(t <= time.time() + 1 for t in ticks)
    assert len(set(ticks)) == len(ticks)  # each tick once


async def test_a_sync_task_that_ignores_the_abort_still_ends_aborted(
    side: Side, app: pgtq.App
) -> None:
    started, release = threading.Event(), threading.Event()
    contexts: list[pgtq.JobContext] = []

    @app.task
    def stubborn(ctx: pgtq.JobContext) -> str:
        contexts.append(ctx)
        started.set()
        release.wait(30)  # never looks at ctx.should_abort()
        return "finished anyway"

    job_id = await side.defer(stubborn)
    worker = asyncio.create_task(app.run_worker_async(abort_job_polling_interval=0.05))
    await eventually(started.is_set)
    assert await side.abort(app, job_id) == pgtq.Status.DOING
    await eventually(lambda: _abort_seen(app, job_id))
    # The worker has seen it (what the task ignores): a request it has not seen yet when the
    # task returns cannot change the outcome (on a loaded machine that happened here).
    await eventually(contexts[0].should_abort)
    release.set()
    with pytest.raises(pgtq.JobFailed) as info:
        await side.wait(app, job_id)
    assert info.value.status == "aborted"
    job = await side.get(app, job_id)
    assert job is not None and job.result is None and job.attempts == 1
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker


async def _abort_seen(app: pgtq.App, job_id: int) -> bool:
    job = await app.jobs.get_async(job_id)
    return job is not None and job.abort_requested


async def test_a_dedicated_connection_keeps_its_session_settings(app: pgtq.App, sql: Any) -> None:
    """What the worker's claim connection is opened with (synchronous_commit off) holds for
    every statement on it, and again after it is replaced."""

    from pgtq import statements

    connector = app.async_connector()
    if connector.engine.dialect.driver != "asyncpg":
        pytest.skip("the session settings apply to the asyncpg fast path only")
    conn = await connector.dedicated(session=("SET application_name = 'pgtq-claims'",))
    try:
        await conn.run(statements.forget_dead_workers(app.statements, 3600.0, "me"))
        named = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgtq-claims' "
            "AND datname = current_database()"
        )
        assert sql(named) == [(1,)]
        (old_pid,) = sql(named.replace("count(*)", "pid"))[0]
        sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pgtq-claims' AND datname = current_database()"
        )
        await eventually(lambda: sql(named) == [(0,)])
        # A connection found dead before the statement is sent is replaced at once (nothing
        # was sent: safe to run on a new one); one that dies with the statement in flight
        # raises, and the next call opens a new one. Either way it is set up again.
        try:
            await conn.run(statements.forget_dead_workers(app.statements, 3600.0, "me"))
        except pgtq.DatabaseUnreachable:
            await conn.run(statements.forget_dead_workers(app.statements, 3600.0, "me"))
        assert sql(named) == [(1,)]
        assert sql(named.replace("count(*)", "pid")) != [(old_pid,)]
    finally:
        await conn.close()


def test_claims_skip_the_wal_flush_except_behind_pgbouncer() -> None:
    from pgtq.claims import claim_session

    assert claim_session(prepared_statements=True) == ("SET synchronous_commit = off",)
    assert claim_session(prepared_statements=False) == ()


@given(room=st.integers(1, 10_000), batch_size=st.integers(1, 1_000))
def test_a_claim_asks_a_full_batch_or_a_power_of_two_that_fits(room: int, batch_size: int) -> None:
    """The claim's limit is part of its SQL: few sizes, so few statements and plans."""
    from pgtq.fetcher import claim_size

    asked = claim_size(room, batch_size)
    assert 1 <= asked <= min(room, batch_size)
    assert asked == batch_size or (asked & (asked - 1) == 0 and asked * 2 > min(room, batch_size))
    sizes = {claim_size(r, batch_size) for r in range(1, 2 * batch_size)}
    assert len(sizes) <= batch_size.bit_length() + 1


@pytest.mark.parametrize(
    ("concurrency", "depth"), [(10, 2), (1, 1)], ids=["pipelined", "serial worker"]
)
async def test_claims_in_flight_stay_within_the_room(
    side: Side, app: pgtq.App, monkeypatch: pytest.MonkeyPatch, concurrency: int, depth: int
) -> None:
    """While full batches come back, two claims are out at once (one at ``concurrency=1``,
    which keeps strict priority order), never more than the room allows, and every job runs
    once."""
    from pgtq.claims import Claims

    out: list[int] = []  # the limits of the claims out right now
    most = {"claims": 0, "held": 0}
    real = Claims.claim

    async def watched(self: Any, limit: int, answer: Any = None) -> Any:
        held = len(list(self._holding())) + sum(out) + limit
        most["held"] = max(most["held"], held)
        out.append(limit)
        most["claims"] = max(most["claims"], len(out))
        try:
            return await real(self, limit, answer)
        finally:
            out.remove(limit)

    monkeypatch.setattr(Claims, "claim", watched)
    runs: list[int] = []

    @app.task
    async def brief(n: int) -> None:
        if n % 2:  # some stay running across the loop's turns, so the room is tight
            await asyncio.sleep(0.001)
        runs.append(n)

    await side.defer_many(brief, [{"n": i} for i in range(300)])
    batch = max(1, concurrency // 2)
    stats = await side.run_worker(app, wait=False, concurrency=concurrency, batch_size=batch)
    assert sorted(runs) == list(range(300)) and stats.processed == 300
    assert most["claims"] == depth
    assert most["held"] <= concurrency + batch  # the default prefetch is one batch


async def test_arguments_reach_the_task_as_they_were_deferred(side: Side, app: pgtq.App) -> None:
    """The claim reads ``jsonb`` as text with JSON's C scanner: every JSON shape survives."""
    args = {
        "text": 'ünïcode ✓ "quoted" \\ back\nslash',
        "numbers": [0, -7, 2**62, 1.5, -2.25e-10],
        "nested": {"a": [None, True, False, {"b": []}], "": {}},
    }
    got: list[dict[str, Any]] = []

    @app.task
    def echo(**kwargs: Any) -> None:
        got.append(kwargs)

    await side.defer(echo, **args)
    await side.run_worker(app, wait=False)
    assert got == [args]
