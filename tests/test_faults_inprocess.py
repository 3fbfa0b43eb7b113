"""Faults a worker survives, driven in-process: timeouts, dead workers, lost connections,
shutdown of jobs that will not stop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

import pgtq
from pgtq import runner as runner_module
from pgtq import worker as worker_module
from pgtq.heartbeat import Heartbeat
from pgtq.scope import WorkerScope
from tests.conftest import eventually
from tests.sides import Side


async def test_timeouts_fail_the_attempt_and_follow_the_retry_policy(
    side: Side, app: pgtq.App
) -> None:
    @app.task(timeout=0.2, retry=pgtq.Retry(max_attempts=2, base=0, jitter=0))
    async def slow_async(ctx: pgtq.JobContext) -> str:
        if ctx.attempt == 1:
            await asyncio.sleep(30)
        return "second try"

    saw: list[str | None] = []

    @app.task(timeout=0.2)
    def slow_sync(ctx: pgtq.JobContext) -> None:
        deadline = time.monotonic() + 30
        while not ctx.should_abort() and time.monotonic() < deadline:
            time.sleep(0.01)
        saw.append(ctx.abort_reason())

    @app.task(timeout=5)
    async def own_timeout() -> None:
        raise TimeoutError("the task's own")

    a = await side.defer(slow_async)
    s = await side.defer(slow_sync)
    o = await side.defer(own_timeout)
    await side.run_worker(app, wait=False)
    assert await side.wait(app, a) == "second try"
    with pytest.raises(pgtq.JobFailed, match=r"timeout of 0\.2 s") as info:
        await side.wait(app, s)
    assert info.value.error["type"] == "JobTimeoutError"
    assert saw == ["timeout"]
    with pytest.raises(pgtq.JobFailed) as own:
        await side.wait(app, o)
    assert own.value.error["type"] == "TimeoutError"


async def test_jobs_of_a_dead_worker_are_rescued(side: Side, app: pgtq.App, sql: Any) -> None:
    """A worker row silent past rescue_after: its running job goes back, attempt counted."""

    @app.task(retry=pgtq.Retry(max_attempts=3, base=0))
    def survivor() -> str:
        return "done"

    @app.task  # no retry policy: a lost worker is not a failed job, it runs again
    def fragile() -> str:
        return "again"

    ok = await side.defer(survivor)
    bad = await side.defer(fragile)
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, last_heartbeat) "
        "VALUES ('ghost', 'h', 1, now() - interval '1 hour')"
    )
    sql("UPDATE pgtq.jobs SET status = 'doing', attempts = 1, worker_id = 'ghost'")
    stats = await side.run_worker(app, wait=False, rescue_after=60)
    assert stats.by_status["rescued"] == 2
    assert await side.wait(app, ok) == "done"
    job = await side.get(app, ok)
    assert job is not None and job.attempts == 2
    assert await side.wait(app, bad) == "again"
    history = await side.call(app.jobs, "history", bad)
    rescue = next(e for e in history if e.type == "rescued")
    assert rescue.error is not None and rescue.error["type"] == "WorkerLostError"
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]


async def test_a_job_rescued_max_rescues_times_fails_on_the_next_loss(
    app: pgtq.App, sql: Any
) -> None:
    @app.task(max_rescues=2)
    def fragile() -> None: ...

    job_id = await fragile.defer_async()
    rescuer = Heartbeat(WorkerScope(app, app.async_connector(), lambda: "rescuer"), rescue_after=60)
    for n in range(3):  # claimed by a worker that dies, three times
        sql(
            "INSERT INTO pgtq.workers (id, hostname, pid, last_heartbeat) "
            "VALUES (%s, 'h', 1, now() - interval '1 hour')",
            f"ghost{n}",
        )
        sql(
            "UPDATE pgtq.jobs SET status = 'doing', attempts = attempts + 1, worker_id = %s",
            f"ghost{n}",
        )
        assert await rescuer.rescue() == 1
        job = await app.jobs.get_async(job_id)
        assert job is not None
        assert job.status == (pgtq.Status.TODO if n < 2 else pgtq.Status.FAILED), n
    assert job.error is not None and "max_rescues of 2" in job.error["message"]
    events = [e.type for e in await app.jobs.history_async(job_id)]
    assert events.count("rescued") == 2 and events[-1] == "failed"


async def test_a_live_worker_is_not_rescued(app: pgtq.App, sql: Any) -> None:
    @app.task
    def noop() -> None: ...

    await noop.defer_async()
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid) VALUES ('alive', 'h', 1);"
        "UPDATE pgtq.jobs SET status = 'doing', attempts = 1, worker_id = 'alive'"
    )
    stats = await app.run_worker_async(wait=False, rescue_after=60)
    assert stats.by_status["rescued"] == 0
    assert sql("SELECT status, worker_id FROM pgtq.jobs") == [("doing", "alive")]


async def test_rescue_never_overwrites_a_job_its_worker_finished(app: pgtq.App, sql: Any) -> None:
    """The rescue and the old worker's late write race: the job changes once."""
    from pgtq import statements

    @app.task
    def noop() -> None: ...

    job_id = await noop.defer_async()
    sql("UPDATE pgtq.jobs SET status = 'succeeded', attempts = 1, worker_id = 'ghost'")
    outcomes = statements.Outcomes.empty()
    outcomes.add(job_id, pgtq.Status.TODO, error='{"type": "WorkerLostError"}', retry_in=0.0)
    s = app.statements
    written = await app.async_connector().run(statements.complete_jobs(s, "ghost", outcomes))
    assert written == []
    assert sql("SELECT status FROM pgtq.jobs") == [("succeeded",)]


async def test_the_listener_comes_back_after_its_connection_is_killed(
    app: pgtq.App, sql: Any
) -> None:
    """Kill every pgtq connection but the test's: NOTIFY wakes the worker again soon after.

    The polling interval is 60 s, so a pickup within the deadline proves the listener is back.
    """
    done = asyncio.Event()

    @app.task
    async def ping() -> None:
        done.set()

    worker = asyncio.create_task(app.run_worker_async(fetch_job_polling_interval=60))

    def listening() -> bool:
        rows = sql(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        return bool(rows[0][0])

    await eventually(listening)
    # Waits until the backends are gone (pg_terminate_backend only signals otherwise): a
    # LISTEN seen next is the new one, and no pooled connection is still dying.
    sql(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    await eventually(listening, timeout=15)
    await ping.defer_async()
    await asyncio.wait_for(done.wait(), timeout=15)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker


async def test_a_sync_job_that_ignores_the_shutdown_stays_doing_until_it_ends(
    app: pgtq.App, sql: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never twice at once: the worker returns in bounded time, but the job is not handed
    back while its thread runs; the worker's heartbeat goes on meanwhile, so no other worker
    rescues it; once the thread returns the job goes back, attempt counted."""
    monkeypatch.setattr(worker_module, "SHUTDOWN_ABORT_GRACE", 0.2)
    started, release = threading.Event(), threading.Event()

    @app.task
    def stubborn() -> None:
        started.set()
        release.wait(30)

    job_id = await stubborn.defer_async()
    worker = asyncio.create_task(
        app.run_worker_async(shutdown_graceful_timeout=0.2, heartbeat_interval=0.05)
    )
    await eventually(started.is_set)
    begun = time.monotonic()
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert time.monotonic() - begun < 5
    (worker_id, beat), *_ = sql("SELECT id, last_heartbeat FROM pgtq.workers")

    def beating() -> bool:
        return bool(sql("SELECT last_heartbeat > %s FROM pgtq.workers", beat)[0][0])

    await eventually(beating)  # the heartbeat outlives the worker while the job runs
    job = await app.jobs.get_async(job_id)
    assert job is not None and (job.status, job.worker_id) == (pgtq.Status.DOING, worker_id)

    release.set()

    async def given_back() -> bool:
        job = await app.jobs.get_async(job_id)
        return job is not None and job.status == pgtq.Status.TODO

    await eventually(given_back)
    job = await app.jobs.get_async(job_id)
    assert job is not None and job.attempts == 1
    assert job.error is not None and "shut down" in job.error["message"]
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]


async def test_shutdown_puts_unfinished_jobs_back_with_the_attempt_counted(
    side: Side, app: pgtq.App
) -> None:
    """Past the grace period async jobs are cancelled, sync ones see should_abort()."""
    started = {"a": asyncio.Event(), "s": threading.Event()}
    reasons: list[str | None] = []

    @app.task
    async def long_async() -> None:
        started["a"].set()
        await asyncio.sleep(30)

    @app.task
    def long_sync(ctx: pgtq.JobContext) -> None:
        started["s"].set()
        while not ctx.should_abort():
            time.sleep(0.01)
        reasons.append(ctx.abort_reason())

    a = await side.defer(long_async)
    s = await side.defer(long_sync)
    worker = asyncio.create_task(app.run_worker_async(shutdown_graceful_timeout=0.3))
    await asyncio.wait_for(started["a"].wait(), 10)
    await eventually(started["s"].is_set)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await worker
    assert reasons == ["shutdown"]
    for job_id in (a, s):
        job = await side.get(app, job_id)
        assert job is not None and (job.status, job.attempts) == (pgtq.Status.TODO, 1)


@pytest.mark.parametrize("dsn_driver", ["asyncpg", "psycopg"])
async def test_an_outcome_postgresql_refuses_fails_its_own_job_only(
    dsn: str, sql: Any, monkeypatch: pytest.MonkeyPatch, dsn_driver: str
) -> None:
    """Defence in depth behind the checks in ``decide``: if an outcome still reaches
    PostgreSQL in a form it refuses, that job alone ends failed (OutcomeNotWritable); the
    batch around it is written and the worker drains. Nothing is retried forever."""
    app = pgtq.App(dsn.replace("postgresql://", f"postgresql+{dsn_driver}://"))
    real = runner_module.decide_safely

    def decide(task: Any, job: Any, result: Any, exc: Any, reason: Any) -> Any:
        if result == "poison":  # what a sanitising bug would let through: jsonb refuses it
            return worker_module.Outcome(pgtq.Status.SUCCEEDED, result='"a\\u0000b"')
        return real(task, job, result, exc, reason)

    monkeypatch.setattr(runner_module, "decide_safely", decide)

    @app.task
    async def echo(value: str) -> str:
        return value

    try:
        ids = await echo.defer_many_async(
            [{"value": "fine"}] * 5 + [{"value": "poison"}] + [{"value": "fine"}] * 5
        )
        stats = await asyncio.wait_for(app.run_worker_async(wait=False, concurrency=20), timeout=30)
        assert stats.processed == len(ids)
        rows = dict(sql("SELECT id, status FROM pgtq.jobs WHERE id = ANY(%s)", ids))
        poisoned = ids[5]
        assert rows.pop(poisoned) == "failed"
        assert set(rows.values()) == {"succeeded"}
        job = await app.jobs.get_async(poisoned)
        assert job is not None and job.error is not None
        assert job.error["type"] == "OutcomeNotWritable"
    finally:
        await app.close_async()


async def test_an_async_task_reads_timeout_as_its_abort_reason_when_cancelled(
    app: pgtq.App,
) -> None:
    seen: list[str | None] = []

    @app.task(timeout=0.1)
    async def slow(ctx: pgtq.JobContext) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append(ctx.abort_reason())
            raise

    job_id = await slow.defer_async()
    await asyncio.wait_for(app.run_worker_async(wait=False), timeout=30)
    assert seen == ["timeout"]
    job = await app.jobs.get_async(job_id)
    assert job is not None and job.status == pgtq.Status.FAILED
    assert job.error is not None and job.error["type"] == "JobTimeoutError"


async def test_a_failed_attempt_is_logged_with_its_exception_and_attempt(
    app: pgtq.App, caplog: pytest.LogCaptureFixture
) -> None:
    """INFO is quiet for jobs that succeed (their lines are DEBUG); a retry is INFO and a
    failure WARNING, each naming the exception, its message and the attempt."""

    @app.task(retry=pgtq.Retry(max_attempts=2, base=0, jitter=0))
    async def flaky(ctx: pgtq.JobContext) -> None:
        raise ValueError(f"boom {ctx.attempt}")

    @app.task
    async def fine() -> None: ...

    await flaky.defer_async()
    await fine.defer_async()
    with caplog.at_level(logging.INFO, logger="pgtq.worker"):
        await asyncio.wait_for(app.run_worker_async(wait=False), timeout=30)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pgtq.worker"]
    jobs = [(level, text) for level, text in lines if text.startswith("job ")]
    assert [level for level, _ in jobs] == [logging.INFO, logging.WARNING]
    assert "retried (attempt 1 of 2)" in jobs[0][1] and "ValueError: boom 1" in jobs[0][1]
    assert "failed (attempt 2 of 2)" in jobs[1][1] and "ValueError: boom 2" in jobs[1][1]
    failure = next(r for r in caplog.records if r.getMessage() == jobs[1][1])
    assert (failure.attempt, failure.error, failure.error_message) == (2, "ValueError", "boom 2")  # type: ignore[attr-defined]


async def test_the_worker_sums_up_what_it_did_in_one_info_line(
    app: pgtq.App, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    @app.task
    async def quick() -> None: ...

    @app.task
    async def held() -> None:
        await release.wait()

    await quick.defer_many_async([{}] * 5)
    await held.defer_async()
    with caplog.at_level(logging.INFO, logger="pgtq.worker"):
        worker = asyncio.create_task(app.run_worker_async(summary_interval=0.1))

        def summed_up() -> bool:
            return any("5 succeeded; 1 running" in r.getMessage() for r in caplog.records)

        try:
            await eventually(summed_up)
        finally:
            release.set()
            worker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await worker
    line = next(r for r in caplog.records if "5 succeeded; 1 running" in r.getMessage())
    assert line.levelno == logging.INFO and line.getMessage().startswith("5 job(s) in ")


async def test_a_slow_refresh_never_delays_the_heartbeat(app: pgtq.App, sql: Any) -> None:
    """The beat has its own loop: a rescue or ANALYZE that takes longer than ``rescue_after``
    (here a refresh that hangs) must not let the worker's row go stale, or the fleet declares
    a busy worker dead and runs its jobs again (seen on a loaded machine)."""
    hanging = asyncio.Event()

    async def refresh_that_hangs() -> None:
        hanging.set()
        await asyncio.sleep(3600)

    heartbeat = Heartbeat(
        WorkerScope(app, app.async_connector(), lambda: "busy"),
        interval=0.05,
        rescue_after=0.5,
        every_beat=refresh_that_hangs,
    )
    await heartbeat.register()
    loops = [asyncio.create_task(heartbeat.run()), asyncio.create_task(heartbeat.keep_house())]
    try:
        await asyncio.wait_for(hanging.wait(), 10)
        seen = sql("SELECT last_heartbeat FROM pgtq.workers WHERE id = 'busy'")[0][0]

        def beat_again() -> bool:
            rows = sql("SELECT last_heartbeat > %s FROM pgtq.workers WHERE id = 'busy'", seen)
            return bool(rows and rows[0][0])

        for _ in range(3):  # beats go on while the refresh hangs
            await eventually(beat_again, timeout=5)
            seen = sql("SELECT last_heartbeat FROM pgtq.workers WHERE id = 'busy'")[0][0]
        assert heartbeat.leased()
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def test_held_jobs_wait_for_the_lease_and_start_once_a_beat_renews_it(
    app: pgtq.App, sql: Any
) -> None:
    """Past ``rescue_after`` since its last acknowledged beat (a pause), a worker starts no
    held job: they may have been rescued. ``leased()`` asks for a beat at once; the beat
    renews the lease (the worker was not declared dead) and the held jobs start."""
    renewed = asyncio.Event()
    heartbeat = Heartbeat(
        WorkerScope(app, app.async_connector(), lambda: "paused"),
        interval=3600,  # only the lease's own request makes it beat
        rescue_after=0.2,
        renewed=renewed.set,
    )
    await heartbeat.register()
    assert heartbeat.leased()
    beats = asyncio.create_task(heartbeat.run())
    try:
        await eventually(lambda: not heartbeat.leased(), timeout=5)  # the lease runs out
        await asyncio.wait_for(renewed.wait(), 5)  # the beat it asked for went out at once
        assert heartbeat.leased()
    finally:
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)


def test_a_sync_call_stopped_before_a_thread_took_it_does_not_begin(app: pgtq.App) -> None:
    """A sync attempt stopped while its call waited for a thread (the worker shut down, or
    found it was declared dead) never runs its task: its job may be running elsewhere."""
    ran: list[str] = []
    ctx = pgtq.JobContext(job_id=1, task_name="t", queue="q", attempt=1, worker_id="w", app=app)
    assert runner_module._begin(ctx, ran.append, "first") is None and ran == ["first"]
    ctx.request_abort("shutdown")
    assert runner_module._begin(ctx, ran.append, "second") is None
    assert ran == ["first"]


async def test_a_worker_never_declares_itself_dead(app: pgtq.App, sql: Any) -> None:
    """Its rescue (a loop apart from its beat) skips its own row, however old it looks: a
    worker whose beat is late is alive, and its beat decides (the lease)."""
    heartbeat = Heartbeat(
        WorkerScope(app, app.async_connector(), lambda: "me"), interval=3600, rescue_after=1
    )
    await heartbeat.register()
    sql("UPDATE pgtq.workers SET last_heartbeat = now() - interval '1 hour'")
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, last_heartbeat) "
        "VALUES ('gone', 'h', 1, now() - interval '1 hour')"
    )
    await heartbeat.rescue()
    assert sql("SELECT id FROM pgtq.workers") == [("me",)]


async def test_held_jobs_asking_for_beats_never_make_the_heartbeat_spin(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the database away, held jobs ask for a beat at every turn of the fetch loop: the
    failed beats are tried again after a backoff, not as fast as they are asked for."""
    down = pgtq.App("postgresql://postgres@127.0.0.1:1/x", connect_timeout=1)
    heartbeat = Heartbeat(
        WorkerScope(down, down.async_connector(), lambda: "cut-off"), interval=5, rescue_after=1
    )
    beats = asyncio.create_task(heartbeat.run())
    caplog.set_level(logging.WARNING, logger="pgtq.worker")
    try:
        deadline = asyncio.get_running_loop().time() + 1.0
        while asyncio.get_running_loop().time() < deadline:
            assert not heartbeat.leased()  # asks for a beat each time
            await asyncio.sleep(0.001)
    finally:
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)
        down.close()
    failed = [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert 1 <= len(failed) <= 6, len(failed)  # backoff from 0.1 s, doubling: ~4 in a second
