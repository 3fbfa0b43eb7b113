"""Bulk controls: ``app.jobs.retry_many / cancel_many / abort_many / delete_many`` (+ ``_async``).

Each runs through the sync and the async API (``side``), on real PostgreSQL: by ids and by
filters, what it returns, what it refuses, and against a running worker (a bulk abort stops
running jobs through the abort request; a bulk retry or delete never touches a running job).
States no public call makes quickly (a failed job, a job created an hour ago) are written
with plain SQL.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

import pgtq
from pgtq.jobs import InvalidFilter, JobSelection, NoFilter
from tests.conftest import eventually, libpq
from tests.sides import Side
from tests.test_operations import tasks

SQL = Callable[..., list[tuple[Any, ...]]]
WAIT = 10.0  # seconds: only a bound for a broken test, never a step of one


def set_status(sql: SQL, ids: list[int], status: str) -> None:
    """Jobs as a worker would have left them (``doing``: held by worker ``w``)."""
    sql(
        "UPDATE pgtq.jobs SET status = %s, attempts = 1, started_at = now(), "
        "worker_id = CASE WHEN %s = 'doing' THEN 'w' END, "
        "finished_at = CASE WHEN %s = 'doing' THEN NULL ELSE now() END WHERE id = ANY(%s)",
        status,
        status,
        status,
        ids,
    )


def statuses(sql: SQL) -> dict[int, str]:
    return dict(sql("SELECT id, status FROM pgtq.jobs"))  # type: ignore[arg-type]


async def many(side: Side, app: pgtq.App, action: str, **filters: Any) -> list[int]:
    ids: list[int] = await side.call(app.jobs, f"{action}_many", **filters)
    return ids


class Listener:
    """A LISTEN on the jobs' channel and the abort channel. ``until_end()`` sends a marker on
    both and returns what came before: notifications arrive in commit order (no timeout guess)."""

    CHANNELS = ("pgtq_pgtq", "pgtq_pgtq_abort")

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(libpq(dsn), autocommit=True)
        for channel in self.CHANNELS:
            self.conn.execute(f'LISTEN "{channel}"')

    async def until_end(self) -> list[tuple[str, str]]:
        def read() -> list[tuple[str, str]]:
            with psycopg.connect(self.conn.info.dsn, autocommit=True) as other:
                for channel in self.CHANNELS:
                    other.execute(f"NOTIFY \"{channel}\", 'end'")
            seen, ends = [], 0
            for note in self.conn.notifies(timeout=WAIT):
                if note.payload == "end":
                    ends += 1
                    if ends == len(self.CHANNELS):
                        return seen
                else:
                    seen.append((note.channel, note.payload))
            raise AssertionError(f"the end markers did not come (got {seen})")

        return await asyncio.to_thread(read)


@pytest.fixture
def listener(dsn: str) -> Any:
    listening = Listener(dsn)
    yield listening
    listening.conn.close()


# -- each control, by ids and by filters --------------------------------------------------------


async def test_retry_many_puts_back_the_ended_badly_and_wakes_their_queues(
    app: pgtq.App, side: Side, sql: SQL, listener: Listener
) -> None:
    send, resize = tasks(app)
    failed, aborted, cancelled, done, waiting, running = [
        await side.defer(send, to=str(i)) for i in range(6)
    ]
    other = await side.defer(resize, n=1)
    for ids, status in (
        ([failed, other], "failed"),
        ([aborted], "aborted"),
        ([cancelled], "cancelled"),
        ([done], "succeeded"),
        ([running], "doing"),
    ):
        set_status(sql, ids, status)
    await listener.until_end()  # the defers' own announcements

    every = [failed, aborted, cancelled, done, waiting, running]
    assert await many(side, app, "retry", ids=every) == [failed, aborted, cancelled]
    assert await listener.until_end() == [("pgtq_pgtq", "emails")]  # one a queue
    now = statuses(sql)
    assert [now[i] for i in (failed, aborted, cancelled)] == ["todo"] * 3
    assert (now[done], now[waiting], now[running], now[other]) == (
        "succeeded",
        "todo",
        "doing",
        "failed",
    )
    [(worker, started, finished, abort)] = sql(
        "SELECT worker_id, started_at, finished_at, abort_requested FROM pgtq.jobs WHERE id = %s",
        failed,
    )
    assert (worker, started, finished, abort) == (None, None, None, False)  # as retry() leaves it
    # By filter: the task's failed job only.
    assert await many(side, app, "retry", task="resize", status="failed") == [other]


async def test_cancel_many_cancels_waiting_jobs_only(app: pgtq.App, side: Side, sql: SQL) -> None:
    send, resize = tasks(app)
    a, b, running = [await side.defer(send, to=str(i)) for i in range(3)]
    image = await side.defer(resize, n=1)
    set_status(sql, [running], "doing")
    assert await many(side, app, "cancel", queue="emails") == [a, b]
    assert statuses(sql) == {a: "cancelled", b: "cancelled", running: "doing", image: "todo"}
    assert await many(side, app, "cancel", ids=[a, image, 2**70]) == [image]


async def test_abort_many_cancels_waiting_jobs_and_asks_running_ones_to_stop(
    app: pgtq.App, side: Side, sql: SQL, listener: Listener
) -> None:
    send, _ = tasks(app)
    waiting, running, done = [await side.defer(send, to=str(i)) for i in range(3)]
    set_status(sql, [running], "doing")
    set_status(sql, [done], "succeeded")
    await listener.until_end()
    assert await many(side, app, "abort", task="send") == [waiting, running]
    assert await listener.until_end() == [("pgtq_pgtq_abort", str(running))]
    rows = {i: (st, ab) for i, st, ab in sql("SELECT id, status, abort_requested FROM pgtq.jobs")}
    assert rows == {
        waiting: ("cancelled", False),
        running: ("doing", True),  # its worker ends it: aborted
        done: ("succeeded", False),
    }


async def test_delete_many_deletes_waiting_and_ended_jobs_with_their_history_never_running_ones(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, resize = tasks(app)
    waiting, failed, done, running = [await side.defer(send, to=str(i)) for i in range(4)]
    image = await side.defer(resize, n=1)
    set_status(sql, [failed], "failed")
    set_status(sql, [done], "succeeded")
    set_status(sql, [running], "doing")
    for job_id in (failed, running):  # an earlier attempt of each, as the history keeps it
        sql("INSERT INTO pgtq.job_events (job_id, type, attempt) VALUES (%s, 'failed', 1)", job_id)
    assert await many(side, app, "delete", queue="emails") == [waiting, failed, done]
    assert statuses(sql) == {running: "doing", image: "todo"}
    assert sql("SELECT DISTINCT job_id FROM pgtq.job_events") == [(running,)]
    assert await many(side, app, "delete", all=True) == [image]
    assert statuses(sql) == {running: "doing"}


async def test_dry_run_returns_what_would_change_and_changes_nothing(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, _ = tasks(app)
    a, b, c = [await side.defer(send, to=str(i)) for i in range(3)]
    set_status(sql, [a, b], "failed")
    before = statuses(sql)
    for action, expected in (("retry", [a, b]), ("cancel", [c]), ("abort", [c])):
        assert await many(side, app, action, task="send", dry_run=True) == expected
    assert await many(side, app, "delete", all=True, dry_run=True) == [a, b, c]
    assert statuses(sql) == before
    assert await many(side, app, "retry", task="send") == [a, b]


async def test_before_and_since_filter_on_the_creation_time(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, _ = tasks(app)
    old, recent, new = [await side.defer(send, to=str(i)) for i in range(3)]
    sql("UPDATE pgtq.jobs SET created_at = now() - interval '3 hours' WHERE id = %s", old)
    sql("UPDATE pgtq.jobs SET created_at = now() - interval '1 hour' WHERE id = %s", recent)
    set_status(sql, [old, recent, new], "failed")
    [(now,)] = sql("SELECT now()")
    two_hours_ago = now - timedelta(hours=2)
    dry = {"dry_run": True}
    assert await many(side, app, "retry", before=two_hours_ago, **dry) == [old]
    assert await many(side, app, "retry", before=timedelta(hours=2), **dry) == [old]
    assert await many(side, app, "retry", before=7200, **dry) == [old]
    assert await many(side, app, "retry", since=two_hours_ago, **dry) == [recent, new]
    assert await many(side, app, "retry", since=timedelta(minutes=30), **dry) == [new]
    in_paris = two_hours_ago.astimezone(ZoneInfo("Europe/Paris"))  # the same instant
    assert await many(side, app, "retry", since=in_paris, before=1800, **dry) == [recent]
    # The same filters list what they select: a preview of a bulk control.
    listed = await side.call(app.jobs, "list", since=two_hours_ago, status="failed")
    assert [job.id for job in listed] == [recent, new]


async def test_a_retry_that_would_double_a_queueing_lock_changes_nothing(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """As ``retry`` does: one statement, so one conflict refuses it whole (AlreadyEnqueued)."""
    send, _ = tasks(app)
    other = await side.defer(send, to="x")
    locked = await side.defer(send.configure(queueing_lock="user-1"), to="a")
    set_status(sql, [other, locked], "failed")
    waiting = await side.defer(send.configure(queueing_lock="user-1"), to="b")
    with pytest.raises(pgtq.AlreadyEnqueued):
        await many(side, app, "retry", status="failed")
    assert statuses(sql) == {other: "failed", locked: "failed", waiting: "todo"}
    assert await many(side, app, "retry", status="failed", ids=[other]) == [other]


async def test_an_empty_id_list_selects_nothing(app: pgtq.App, side: Side, sql: SQL) -> None:
    send, _ = tasks(app)
    job = await side.defer(send, to="a")
    for action in ("retry", "cancel", "abort", "delete"):
        assert await many(side, app, action, ids=[]) == []
    assert statuses(sql) == {job: "todo"}


# -- what is refused, before anything is sent ---------------------------------------------------

#: An app whose database does not exist: every check below fails before a connection is made.
NOWHERE = "postgresql://pgtq:pgtq@127.0.0.1:9/nowhere"


def _bulk(side: str, action: str, **filters: Any) -> Any:
    app = pgtq.App(NOWHERE)
    method = getattr(app.jobs, f"{action}_many" + ("_async" if side == "async" else ""))
    return method(**filters) if side == "sync" else asyncio.run(method(**filters))


NAIVE = datetime(2026, 12, 3, 10, 0)  # naive: the point of the test


@pytest.mark.unit
@pytest.mark.parametrize("side", ["sync", "async"])
@pytest.mark.parametrize(
    ("action", "filters", "error", "message"),
    [
        ("delete", {}, NoFilter, "delete_many was given no filter.*all=True"),
        ("retry", {}, NoFilter, "retry_many was given no filter"),
        ("abort", {"search": "", "status": []}, NoFilter, "no filter"),
        ("cancel", {"all": 1}, InvalidFilter, "all must be True or False"),
        ("retry", {"dry_run": None, "all": True}, InvalidFilter, "dry_run must be True"),
        ("delete", {"status": "doing"}, InvalidFilter, "status doing: .*never deleted"),
        ("delete", {"status": ["failed", "doing"]}, InvalidFilter, "status doing"),
        ("retry", {"status": "todo"}, InvalidFilter, "retry_many acts only on .*failed"),
        (
            "cancel",
            {"status": "doing"},
            InvalidFilter,
            "cancel_many acts only on jobs that are todo",
        ),
        ("abort", {"status": "nope"}, InvalidFilter, "unknown status"),
        ("retry", {"before": NAIVE}, InvalidFilter, "before must be timezone-aware"),
        ("retry", {"since": NAIVE}, InvalidFilter, "since must be timezone-aware"),
        ("retry", {"before": "10:00"}, InvalidFilter, "before must be a timezone-aware datetime"),
        ("retry", {"since": True}, InvalidFilter, "since must be a timezone-aware datetime"),
        ("retry", {"before": -5}, InvalidFilter, "before must be a finite number"),
        ("retry", {"since": float("nan")}, InvalidFilter, "since must be a finite"),
        ("cancel", {"ids": "12"}, InvalidFilter, "ids must be a collection of job ids"),
        ("cancel", {"ids": 12}, InvalidFilter, "ids must be a collection"),
        ("cancel", {"ids": [1, "2"]}, InvalidFilter, "ids must be an integer"),
        ("cancel", {"ids": [True]}, InvalidFilter, "ids must be an integer"),
        ("delete", {"queue": "a\x00b"}, InvalidFilter, "queue must not contain a NUL"),
        ("delete", {"task": 7}, InvalidFilter, "task must be a str"),
    ],
)
def test_a_bad_argument_is_refused_before_any_connection(
    side: str, action: str, filters: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _bulk(side, action, **filters)


@pytest.mark.unit
def test_no_filter_is_a_pgtq_invalid_arguments_error() -> None:
    assert issubclass(NoFilter, InvalidFilter)
    assert issubclass(NoFilter, pgtq.InvalidArguments)


@pytest.mark.unit
@pytest.mark.parametrize("side", ["sync", "async"])
def test_an_unknown_filter_is_a_type_error_as_for_any_keyword(side: str) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'statu'"):
        _bulk(side, "retry", statu="failed")
    with pytest.raises(TypeError, match="unexpected keyword argument 'limit'"):
        _bulk(side, "retry", limit=5, status="failed")  # a page is list's, not a selection's


@pytest.mark.unit
def test_every_filter_of_a_selection_is_a_filter_of_list() -> None:
    assert JobSelection.__optional_keys__ <= pgtq.jobs.JobFilter.__optional_keys__


# -- against a running worker ---------------------------------------------------------------------


async def test_a_bulk_abort_stops_running_jobs_through_the_abort_request(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """Running jobs are asked to stop and end ``aborted`` by their worker; waiting ones are
    cancelled at once; one that ended before keeps its outcome."""
    started: set[int] = set()
    all_started = threading.Event()

    @app.task
    def quick() -> str:
        return "done"

    @app.task
    def sync_loop(ctx: pgtq.JobContext) -> str:
        started.add(ctx.job_id)
        if len(started) == 3:
            all_started.set()
        while not ctx.should_abort():
            threading.Event().wait(0.01)  # a step of work
        return "stopped"  # a sync task that returns after an abort ends aborted

    @app.task
    async def async_loop(ctx: pgtq.JobContext) -> str:
        started.add(ctx.job_id)
        if len(started) == 3:
            all_started.set()
        await asyncio.Event().wait()  # cancelled by the abort
        return "never"

    ended = await side.defer(quick.configure(priority=10))  # taken first, and done
    running = [await side.defer(sync_loop), await side.defer(sync_loop)]
    running.append(await side.defer(async_loop))
    worker = asyncio.create_task(
        side.run_worker(app, wait=False, concurrency=3, abort_job_polling_interval=0.05)
    )
    assert await side.wait(app, ended) == "done"
    assert await asyncio.to_thread(all_started.wait, WAIT), "the jobs never all started"
    # Waiting jobs: the worker's three slots are taken, and these are scheduled later.
    waiting = [
        await side.defer(sync_loop.configure(schedule_in=timedelta(hours=1))) for _ in range(2)
    ]
    touched = await many(side, app, "abort", ids=[ended, *running, *waiting])
    assert touched == sorted([*running, *waiting])
    stats = await asyncio.wait_for(worker, WAIT)
    final = statuses(sql)
    assert [final[i] for i in running] == ["aborted"] * 3
    assert [final[i] for i in waiting] == ["cancelled"] * 2
    assert final[ended] == "succeeded"
    assert stats.by_status.get("aborted") == 3
    assert started == set(running)  # the cancelled ones never ran


async def test_a_bulk_retry_or_delete_leaves_running_jobs_alone(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    release = threading.Event()
    running: set[int] = set()

    @app.task(queue="held")
    def hold(ctx: pgtq.JobContext) -> str:
        running.add(ctx.job_id)
        release.wait(WAIT)
        return "held"

    @app.task(queue="parked")  # no worker takes it: retried, it stays todo
    def parked() -> None: ...

    held = [await side.defer(hold) for _ in range(2)]
    worker = asyncio.create_task(side.run_worker(app, wait=False, queues=["held"], concurrency=2))
    await eventually(lambda: running == set(held))
    failed = await side.defer(parked)
    set_status(sql, [failed], "failed")
    # Every job, explicitly: the running ones are not among them.
    assert await many(side, app, "retry", all=True, dry_run=True) == [failed]
    assert await many(side, app, "delete", all=True, dry_run=True) == [failed]
    assert await many(side, app, "retry", ids=[*held, failed]) == [failed]
    assert await many(side, app, "delete", all=True) == [failed]
    assert statuses(sql) == dict.fromkeys(held, "doing")
    release.set()
    await asyncio.wait_for(worker, WAIT)
    rows = sql("SELECT id, status, attempts FROM pgtq.jobs ORDER BY id")
    assert rows == [(i, "succeeded", 1) for i in held]  # each ran once, its outcome kept


async def test_a_bulk_delete_racing_a_worker_never_deletes_a_running_job(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """Jobs are deleted, waiting and ended ones alike, while a worker claims and runs them:
    each running job reads its own row at its end, which must still be there (``doing``)."""
    ran: set[int] = set()
    lost: list[tuple[int, Any]] = []

    @app.task
    async def work(ctx: pgtq.JobContext) -> None:
        ran.add(ctx.job_id)
        job = await app.jobs.get_async(ctx.job_id)  # the row, while the job runs
        if job is None or job.status is not pgtq.Status.DOING:
            lost.append((ctx.job_id, job))

    ids = await side.call(work, "defer_many", [{}] * 300)
    worker = asyncio.create_task(side.run_worker(app, wait=False, concurrency=4, batch_size=5))
    deleted: list[int] = []
    await eventually(lambda: len(ran) > 0)  # the race is on: the worker is taking jobs
    while not worker.done():
        deleted += await many(side, app, "delete", task="work")
    await asyncio.wait_for(worker, WAIT)
    assert lost == []  # no job was deleted while it ran
    left = dict(sql("SELECT id, status FROM pgtq.jobs"))
    assert set(left) <= ran and set(left.values()) <= {"succeeded"}
    assert set(left).isdisjoint(deleted) and ran | set(deleted) == set(ids)
    assert set(deleted) - ran, "the delete never raced the worker: make the batch smaller"
