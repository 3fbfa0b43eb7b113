"""Completion without polling: the NOTIFY of jobs that ended, the app's one LISTEN for its
waiters, ``wait`` / ``wait_many`` / ``watch`` on both sides, and the polling fallback.

Against the real database. A test that must prove a NOTIFY woke a waiter turns the other
ways off first (``no_polling``: the waiters' polling delays and the watcher's re-check an
hour long) and starts the worker only once the waiter is registered with a watcher that
listens: the waiter then returns within the deadline only if the NOTIFY came.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pgtq
from pgtq import jobs as jobs_module
from pgtq import statements, watcher
from pgtq.errors import JobFailed, JobNotFound, JobTimeout
from pgtq.statements import DONE_MANY, Outcomes
from tests.conftest import eventually, libpq
from tests.sides import Side
from tests.test_operations import SQL

HOUR = 3600.0


def _forever(delay: float) -> Iterator[float]:
    while True:
        yield delay


@pytest.fixture
def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters wake only when told: no polling, no re-check (an hour each)."""
    monkeypatch.setattr(jobs_module, "_poll_delays", lambda: _forever(HOUR))
    monkeypatch.setattr(watcher, "RECHECK_INTERVAL", HOUR)


def watcher_of(side: Side, app: pgtq.App) -> watcher.Watcher:
    found = app.watchers.sync() if side.name == "sync" else app.watchers.for_loop()
    assert found is not None
    return found


async def registered(side: Side, app: pgtq.App, waiters: int) -> watcher.Watcher:
    """The side's watcher, once it listens and holds ``waiters`` waits."""
    found = watcher_of(side, app)
    await eventually(lambda: found.listening and len(found.registry) == waiters)
    return found


async def watch(side: Side, app: pgtq.App, ids: list[int], timeout: float = 10) -> list[pgtq.Job]:
    if side.name == "sync":
        return await asyncio.to_thread(lambda: list(app.jobs.watch(ids, timeout=timeout)))
    return [job async for job in app.jobs.watch_async(ids, timeout=timeout)]


def listeners(sql: SQL, app: pgtq.App) -> list[int]:
    """The backends of this test's database that LISTEN on the done channel."""
    rows = sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND query = %s AND pid <> pg_backend_pid()",
        f'LISTEN "{app.statements.done_channel}"',
    )
    return [pid for (pid,) in rows]


class Done:
    """A LISTEN on the done channel, read until a marker NOTIFY of our own (notifications
    come in commit order: what is not there by then was never sent). It says it listens in
    ``watchers``, as a watcher does: the completions announce jobs only then."""

    def __init__(self, dsn: str, app: pgtq.App) -> None:
        self.channel = app.statements.done_channel
        self.conn = psycopg.connect(libpq(dsn), autocommit=True)
        self.conn.execute(f'LISTEN "{self.channel}"')
        self.conn.execute(
            "INSERT INTO pgtq.watchers (id, expires_at) VALUES ('test', now() + interval '1 hour') "
            "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at"
        )

    def payloads(self) -> list[str]:
        self.conn.execute("SELECT pg_notify(%s, 'marker')", (self.channel,))
        seen: list[str] = []
        for note in self.conn.notifies(timeout=10):
            if note.payload == "marker":
                return seen
            seen.append(note.payload)
        raise AssertionError(f"the marker did not come (got {seen})")


@pytest.fixture
def done(app: pgtq.App, dsn: str) -> Iterator[Done]:
    listening = Done(dsn, app)
    yield listening
    listening.conn.close()


# == the NOTIFY ==================================================================================


@pytest.mark.unit
def test_a_done_payload_is_ids_or_many() -> None:
    assert statements.parse_done("3,10,7") == [3, 10, 7]
    assert statements.parse_done(DONE_MANY) is None
    assert statements.parse_done("garbage") is None


async def test_a_completion_names_the_jobs_that_ended_not_those_retried(
    side: Side, app: pgtq.App, done: Done
) -> None:
    @app.task()
    def ok() -> int:
        return 1

    @app.task(retry=pgtq.Retry(max_attempts=2, backoff="fixed", base=HOUR))
    def flaky() -> None:
        raise ValueError("again later")

    @app.task()
    def broken() -> None:
        raise ValueError("no")

    a, b = await side.defer(ok), await side.defer(broken)
    retried = await side.defer(flaky)
    await side.run_worker(app, wait=False)
    heard = [statements.parse_done(p) for p in done.payloads()]
    named = {i for ids in heard for i in ids or ()}
    assert named == {a, b}
    assert retried not in named and None not in heard


async def test_deleted_jobs_are_named_too(side: Side, app: pgtq.App, done: Done) -> None:
    @app.task()
    def ok() -> None: ...

    ids = [await side.defer(ok) for _ in range(3)]
    await side.run_worker(app, wait=False, delete_jobs="always")
    assert {i for p in done.payloads() for i in statements.parse_done(p) or ()} == set(ids)


async def test_nothing_is_announced_while_nobody_listens(
    side: Side, app: pgtq.App, sql: SQL, done: Done
) -> None:
    """A burn-down nobody waits for sends no NOTIFY (each costs its commit the server's
    notification queue): with no live row in ``watchers`` (none, or expired), none."""

    @app.task()
    def ok() -> None: ...

    sql("UPDATE pgtq.watchers SET expires_at = now() - interval '1 second'")
    await side.defer(ok)
    await side.call(app.jobs, "cancel", await side.defer(ok))
    await side.run_worker(app, wait=False)
    sql("DELETE FROM pgtq.watchers")
    await side.defer(ok)
    await side.run_worker(app, wait=False)
    assert done.payloads() == []
    assert sql("SELECT count(*) FROM pgtq.jobs WHERE status IN ('succeeded', 'cancelled')") == [
        (3,)
    ]


async def test_a_watcher_says_it_listens_while_it_does(side: Side, app: pgtq.App, sql: SQL) -> None:
    """The watcher's row is there while its LISTEN is up, and gone once it stopped."""

    @app.task()
    def ok() -> int:
        return 1

    def rows() -> list[tuple[Any, ...]]:
        return sql("SELECT id, expires_at > now() FROM pgtq.watchers WHERE id LIKE %s", mine)

    mine = f"{os.getpid()}-%"
    sql("DELETE FROM pgtq.watchers")
    job = await side.defer(ok)
    worker = asyncio.create_task(app.run_worker_async(install_signal_handlers=False))
    try:
        assert await side.wait(app, job) == 1
        [(_, live)] = rows()
        assert live is True
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    if side.name == "sync":
        app.close()  # deletes the watcher's row, then the engine
    else:
        await app.close_loop_connector()
    assert rows() == []


async def test_notify_completions_false_sends_nothing(side: Side, dsn: str, done: Done) -> None:
    quiet = pgtq.App(dsn, notify_completions=False)
    try:

        @quiet.task()
        def ok() -> None: ...

        await side.defer(ok)
        await side.run_worker(quiet, wait=False)
        assert done.payloads() == []
    finally:
        await quiet.close_async()


async def run(side: Side, app: pgtq.App, query: statements.Query[Any]) -> Any:
    if side.name == "sync":
        return await asyncio.to_thread(app.sync.run, query)
    return await app.async_connector().run(query)


async def test_too_many_ids_for_a_payload_send_the_marker(
    side: Side, app: pgtq.App, sql: SQL, done: Done
) -> None:
    """2,000 ids of 1-4 digits are over 8,000 bytes: every waiter re-reads instead."""
    sql("SELECT setval(pg_get_serial_sequence('pgtq.jobs', 'id'), 1000000)")
    sql(
        "INSERT INTO pgtq.jobs (queue, task_name, args, status, worker_id, attempts) "
        "SELECT 'default', 't', '{}', 'doing', 'w', 1 FROM generate_series(1, 2000)"
    )
    ids = [i for (i,) in sql("SELECT id FROM pgtq.jobs ORDER BY id")]
    outcomes = Outcomes.empty()
    for job_id in ids:
        outcomes.add(job_id, pgtq.Status.SUCCEEDED, "null")
    assert await run(side, app, statements.complete_jobs(app.statements, "w", outcomes)) == ids
    assert done.payloads() == [DONE_MANY]


async def test_cancel_abort_and_delete_name_their_jobs(
    side: Side, app: pgtq.App, done: Done
) -> None:
    @app.task()
    def ok() -> None: ...

    a, b, c, d = [await side.defer(ok) for _ in range(4)]
    assert await side.call(app.jobs, "cancel", a)
    assert await side.abort(app, b) == pgtq.Status.CANCELLED
    assert await side.call(app.jobs, "cancel_many", ids=[c]) == [c]
    assert await side.call(app.jobs, "delete_many", ids=[d]) == [d]
    assert [statements.parse_done(p) for p in done.payloads()] == [[a], [b], [c], [d]]


# == waiting =====================================================================================


@pytest.mark.usefixtures("no_polling")
async def test_a_waiter_is_woken_by_the_notify(side: Side, app: pgtq.App) -> None:
    @app.task()
    def add(a: int, b: int) -> int:
        return a + b

    job_id = await side.defer(add, a=2, b=3)
    waiting = asyncio.create_task(side.wait(app, job_id, timeout=20))
    await registered(side, app, 1)
    await side.run_worker(app, wait=False)
    assert await asyncio.wait_for(waiting, 10) == 5


@pytest.mark.usefixtures("no_polling")
async def test_without_the_notify_only_the_recheck_wakes(
    side: Side, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that does not announce (``notify_completions=False``, or an older pgtq): the
    waiter hears nothing, and the watcher's re-check finds the job ended."""
    quiet = pgtq.App(dsn, notify_completions=False)
    try:

        @quiet.task()
        def ok() -> int:
            return 7

        job_id = await side.defer(ok)
        waiting = asyncio.create_task(side.wait(quiet, job_id, timeout=20))
        await registered(side, quiet, 1)
        await side.run_worker(quiet, wait=False)
        with pytest.raises(TimeoutError):  # no NOTIFY, no polling: nothing wakes it
            await asyncio.wait_for(asyncio.shield(waiting), 1.0)
        monkeypatch.setattr(watcher, "RECHECK_INTERVAL", 0.05)
        assert await asyncio.wait_for(waiting, 10) == 7
    finally:
        await quiet.close_async()


@pytest.mark.usefixtures("no_polling")
async def test_a_cancelled_waiting_job_wakes_its_waiter(side: Side, app: pgtq.App) -> None:
    @app.task()
    def ok() -> None: ...

    job_id = await side.defer(ok)
    waiting = asyncio.create_task(side.wait(app, job_id, timeout=20))
    await registered(side, app, 1)
    assert await side.call(app.jobs, "cancel", job_id)
    with pytest.raises(JobFailed, match="cancelled"):
        await asyncio.wait_for(waiting, 10)


async def test_200_concurrent_waiters_share_one_listen(
    side: Side, app: pgtq.App, sql: SQL, no_polling: None
) -> None:
    @app.task()
    async def double(n: int) -> int:
        return 2 * n

    ids = await side.defer_many(double, [{"n": n} for n in range(200)])
    if side.name == "sync":
        pool = concurrent.futures.ThreadPoolExecutor(200)
        loop = asyncio.get_running_loop()
        waits = [loop.run_in_executor(pool, app.jobs.wait, i, 30) for i in ids]
    else:
        pool = None
        waits = [asyncio.ensure_future(app.jobs.wait_async(i, timeout=30)) for i in ids]
    try:
        await registered(side, app, 200)
        await eventually(lambda: len(listeners(sql, app)) == 1)
        await side.run_worker(app, wait=False, concurrency=50)
        results = await asyncio.wait_for(asyncio.gather(*waits), 20)
        assert results == [2 * n for n in range(200)]
    finally:
        if pool is not None:
            pool.shutdown(wait=False)


async def test_waiters_poll_while_the_listen_cannot_connect(side: Side, dsn: str) -> None:
    """The LISTEN's server is unreachable: waiters fall back to ``wait``'s polling."""
    deaf = pgtq.App(dsn, listen_dsn="postgresql://postgres@127.0.0.1:1/nowhere")
    try:

        @deaf.task()
        def ok() -> int:
            return 3

        job_id = await side.defer(ok)
        waiting = asyncio.create_task(side.wait(deaf, job_id, timeout=20))
        found = watcher_of(side, deaf)
        await eventually(lambda: len(found.registry) == 1)
        await side.run_worker(deaf, wait=False)
        assert await asyncio.wait_for(waiting, 10) == 3
        assert not found.listening
    finally:
        await deaf.close_async()


async def test_a_killed_listen_is_reopened_and_waiters_still_finish(
    side: Side, app: pgtq.App, sql: SQL
) -> None:
    @app.task()
    def ok(n: int) -> int:
        return n

    ids = await side.defer_many(ok, [{"n": n} for n in range(5)])
    waiting = asyncio.ensure_future(side.call(app.jobs, "wait_many", ids, timeout=30))
    found = await registered(side, app, 1)
    await eventually(lambda: len(listeners(sql, app)) == 1)  # an earlier test's may linger
    [first] = listeners(sql, app)
    sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid = %s",
        first,
    )
    await eventually(lambda: listeners(sql, app) not in ([], [first]) and found.listening)
    await side.run_worker(app, wait=False)
    assert await asyncio.wait_for(waiting, 10) == list(range(5))


async def test_the_listen_ends_when_no_waiter_is_left(
    side: Side, app: pgtq.App, sql: SQL, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watcher, "LINGER", 0.0)
    monkeypatch.setattr(watcher, "RECHECK_INTERVAL", 0.05)

    @app.task()
    def ok() -> None: ...

    job_id = await side.defer(ok)
    waiting = asyncio.create_task(side.wait(app, job_id, timeout=20))
    await registered(side, app, 1)
    await eventually(lambda: len(listeners(sql, app)) == 1)
    await side.run_worker(app, wait=False)
    await asyncio.wait_for(waiting, 10)
    await eventually(lambda: listeners(sql, app) == [])


async def test_app_close_ends_the_listen(side: Side, dsn: str, sql: SQL) -> None:
    """Closed, the app's LISTEN ends; a waiter left polls on (here until its timeout)."""
    other = pgtq.App(dsn)

    @other.task()
    def ok() -> None: ...

    job_id = await side.defer(ok)
    waiting = asyncio.create_task(side.wait(other, job_id, timeout=3))
    found = await registered(side, other, 1)
    await eventually(lambda: len(listeners(sql, other)) == 1)
    if side.name == "sync":
        await asyncio.to_thread(other.close)
    else:
        await other.close_loop_connector()
    await eventually(lambda: listeners(sql, other) == [])
    assert not found.listening
    with pytest.raises(JobTimeout):
        await waiting
    await other.close_async()


# == wait_many and watch =========================================================================


async def test_wait_many_returns_results_in_order(side: Side, app: pgtq.App) -> None:
    @app.task()
    def echo(n: int) -> int:
        return n

    ids = await side.defer_many(echo, [{"n": n} for n in (5, 3, 9)])
    waiting = asyncio.ensure_future(side.call(app.jobs, "wait_many", ids[::-1], timeout=20))
    await side.run_worker(app, wait=False)
    assert await waiting == [9, 3, 5]
    assert await side.call(app.jobs, "wait_many", [], timeout=1) == []


async def test_wait_many_raises_for_the_first_failure_once_all_ended(
    side: Side, app: pgtq.App
) -> None:
    @app.task()
    def maybe(fail: bool) -> None:
        if fail:
            raise ValueError("failed on purpose")

    ok, bad, also_bad = await side.defer_many(
        maybe, [{"fail": False}, {"fail": True}, {"fail": True}]
    )
    await side.run_worker(app, wait=False)
    with pytest.raises(JobFailed) as raised:
        await side.call(app.jobs, "wait_many", [ok, also_bad, bad], timeout=10)
    assert raised.value.job_id == also_bad


async def test_wait_many_and_watch_say_what_is_wrong(side: Side, app: pgtq.App) -> None:
    @app.task()
    def ok() -> None: ...

    job_id = await side.defer(ok)
    with pytest.raises(JobNotFound):
        await side.call(app.jobs, "wait_many", [job_id, 10**12], timeout=1)
    with pytest.raises(JobNotFound):
        await side.call(app.jobs, "wait_many", [2**70], timeout=1)
    with pytest.raises(JobTimeout, match=f"job {job_id} did not finish within 0.2 s"):
        await side.call(app.jobs, "wait_many", [job_id], timeout=0.2)
    with pytest.raises(JobTimeout):
        await watch(side, app, [job_id], timeout=0.2)
    with pytest.raises(pgtq.InvalidArguments):
        await side.call(app.jobs, "wait_many", "12", timeout=1)


async def test_watch_yields_jobs_in_finishing_order(side: Side, app: pgtq.App) -> None:
    @app.task()
    def ok(n: int) -> int:
        return n

    low = await side.defer(ok.configure(priority=0), n=0)
    high = await side.defer(ok.configure(priority=9), n=9)
    mid = await side.defer(ok.configure(priority=5), n=5)
    seen = asyncio.ensure_future(watch(side, app, [low, mid, high], timeout=20))
    await side.run_worker(app, wait=False, concurrency=1, batch_size=1)
    jobs = await seen
    assert [job.id for job in jobs] == [high, mid, low]
    assert all(job.status is pgtq.Status.SUCCEEDED for job in jobs)
    finished = [job.finished_at for job in jobs]
    assert finished == sorted(finished)  # type: ignore[type-var]


async def test_watch_yields_a_job_already_final_at_once(
    side: Side, app: pgtq.App, no_polling: None
) -> None:
    @app.task()
    def ok() -> None: ...

    ended, waiting = await side.defer(ok), await side.defer(ok)
    assert await side.call(app.jobs, "cancel", ended)
    if side.name == "sync":
        stream = app.jobs.watch([ended, waiting], timeout=20)
        first = await asyncio.to_thread(next, stream)
        await asyncio.to_thread(stream.close)
    else:
        stream_async = app.jobs.watch_async([ended, waiting], timeout=20)
        started = time.monotonic()
        first = await anext(stream_async)
        assert time.monotonic() - started < 5
        await stream_async.aclose()  # type: ignore[attr-defined]
    assert first.id == ended and first.status is pgtq.Status.CANCELLED
