"""Deferring jobs: every behaviour once, through the sync and the async API (``side``)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import pgtq
from pgtq import statements
from pgtq.connectors import async_url, sync_url
from pgtq.statements import Announcement
from tests.conftest import Notifications
from tests.sides import Side


@pytest.fixture
def tasks(app: pgtq.App) -> dict[str, pgtq.Task[..., Any]]:
    @app.task(queue="emails", priority=3)
    def send_email(to: str, subject: str = "hi") -> None: ...

    @app.task()
    async def resize(ctx: pgtq.JobContext, image_id: int) -> dict[str, int]:
        return {"image_id": image_id}

    return {"send_email": send_email, "resize": resize}


async def test_defer_stores_the_job(side: Side, app: pgtq.App, tasks: Any, sql: Any) -> None:
    job_id = await side.defer(tasks["send_email"], to="a@example.com")
    job = await side.get(app, job_id)
    assert job is not None
    assert (job.task_name, job.queue, job.priority, job.status) == (
        "send_email",
        "emails",
        3,
        pgtq.Status.TODO,
    )
    assert job.args == {"to": "a@example.com"}
    assert job.attempts == 0
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(1,)]


async def test_defer_many_returns_ids_in_order(side: Side, app: pgtq.App, tasks: Any) -> None:
    ids = await side.defer_many(tasks["resize"], [{"image_id": i} for i in range(300)])
    assert len(ids) == 300 and ids == sorted(ids)
    for i in (0, 150, 299):
        job = await side.get(app, ids[i])
        assert job is not None and job.args == {"image_id": i}
    assert await side.defer_many(tasks["resize"], []) == []


async def test_configure_sets_job_options(side: Side, app: pgtq.App, tasks: Any) -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    job_id = await side.defer(
        tasks["send_email"].configure(
            queue="bulk", priority=-5, schedule_at=at, lock="box-1", queueing_lock="user-1"
        ),
        to="x",
    )
    job = await side.get(app, job_id)
    assert job is not None
    assert (job.queue, job.priority, job.scheduled_at, job.lock, job.queueing_lock) == (
        "bulk",
        -5,
        at,
        "box-1",
        "user-1",
    )

    many = await side.defer_many(
        tasks["send_email"].configure(queue="bulk", priority=2, schedule_at=at, lock="box-2"),
        [{"to": "p"}, {"to": "q"}],
    )
    for job_id, to in zip(many, "pq", strict=True):
        job = await side.get(app, job_id)
        assert job is not None
        assert (job.args, job.queue, job.priority, job.scheduled_at, job.lock) == (
            {"to": to},
            "bulk",
            2,
            at,
            "box-2",
        )

    before = datetime.now(UTC)
    later = await side.defer(
        tasks["send_email"].configure(schedule_in=timedelta(minutes=5)), to="y"
    )
    job = await side.get(app, later)
    assert job is not None and job.scheduled_at is not None
    assert timedelta(minutes=4) < job.scheduled_at - before < timedelta(minutes=6)


async def test_queueing_lock_refuses_a_second_waiting_job(
    side: Side, app: pgtq.App, tasks: Any, sql: Any
) -> None:
    locked = tasks["send_email"].configure(queueing_lock="user-42")
    first = await side.defer(locked, to="a")
    with pytest.raises(pgtq.AlreadyEnqueued):
        await side.defer(locked, to="b")
    with pytest.raises(pgtq.AlreadyEnqueued):
        await side.defer_many(locked, [{"to": "c"}])
    assert sql("SELECT id FROM pgtq.jobs") == [(first,)]
    # Once the first is no longer waiting, the key is free again.
    sql("UPDATE pgtq.jobs SET status = 'succeeded'")
    await side.defer(locked, to="d")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: ((1,), {}), "keyword arguments only"),
        (lambda t: ((), {"to": object()}), "JSON-serializable"),
        (lambda t: ((), {"to": float("nan")}), "JSON-serializable"),
        (lambda t: ((), {}), "missing a required argument"),
        (lambda t: ((), {"to": "a", "cc": "b"}), "unexpected keyword argument"),
    ],
    ids=["positional", "object", "nan", "missing", "unexpected"],
)
async def test_bad_arguments_are_refused_before_writing(
    side: Side, app: pgtq.App, tasks: Any, sql: Any, call: Any, message: str
) -> None:
    args, kwargs = call(None)
    task = tasks["send_email"]
    with pytest.raises(pgtq.InvalidArguments, match=message):
        await side.call(task, "defer", *args, **kwargs)
    if not args:
        with pytest.raises(pgtq.InvalidArguments, match=message) as raised:
            await side.defer_many(task, [{"to": "fine"}, kwargs])
        if message == "JSON-serializable":  # the one job of the call that cannot be encoded
            assert "(job 1 of 2)" in str(raised.value)
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


async def test_naive_schedule_at_is_refused(app: pgtq.App, tasks: Any) -> None:
    with pytest.raises(pgtq.InvalidArguments, match="timezone-aware"):
        tasks["send_email"].configure(schedule_at=datetime(2030, 1, 1))


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_defer_in_the_callers_transaction(
    side: Side, app: pgtq.App, tasks: Any, sql: Any, dsn: str, commit: bool
) -> None:
    """The job commits or rolls back with the caller's own writes."""
    sql("CREATE TABLE IF NOT EXISTS orders (id int)")
    sql("TRUNCATE orders")
    task = tasks["send_email"]
    if side.name == "sync":
        engine = sa.create_engine(sync_url(dsn))

        def work() -> None:
            with engine.connect() as conn:
                conn.execute(sa.text("INSERT INTO orders VALUES (1)"))
                task.defer(to="a", connection=conn)
                conn.commit() if commit else conn.rollback()

        await asyncio.to_thread(work)
        engine.dispose()
    else:
        aengine = create_async_engine(async_url(dsn))
        async with aengine.connect() as aconn:
            await aconn.execute(sa.text("INSERT INTO orders VALUES (1)"))
            await task.defer_async(to="a", connection=aconn)
            await (aconn.commit() if commit else aconn.rollback())
        await aengine.dispose()
    expected = 1 if commit else 0
    assert sql("SELECT count(*) FROM orders") == [(expected,)]
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(expected,)]


async def test_the_insert_notifies_once_per_call_when_due(
    side: Side, tasks: Any, notifications: Notifications
) -> None:
    """pgtq's insert sends its own NOTIFY (no trigger since pgtq_0006), once for a whole
    defer_many: jobs due now are named (``#<first id>:<count> <queue>``) so idle workers
    answer by turns; jobs not due yet say when they will be (``@<seconds> <queue>``), so an
    idle worker wakes then."""
    one = await side.defer(tasks["send_email"], to="a")
    assert await notifications.until_marker() == [Announcement("emails", first=one, jobs=1)]
    many = await side.defer_many(tasks["resize"], [{"image_id": i} for i in range(50)])
    assert await notifications.until_marker() == [Announcement("default", first=min(many), jobs=50)]
    later = tasks["send_email"].configure(schedule_in=timedelta(hours=1))
    await side.defer(later, to="a")
    await side.defer_many(later, [{"to": "b"}, {"to": "c"}])
    ahead = await notifications.until_marker()
    assert [(a.queue, a.first) for a in ahead] == [("emails", None), ("emails", None)]
    assert all(a.due_in is not None and 3590 < a.due_in <= 3600 for a in ahead)
    due = tasks["send_email"].configure(queue="bulk", schedule_at=datetime.now(UTC))
    await side.defer(due, to="a")
    assert await notifications.queues_until_marker() == ["bulk"]


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_a_job_in_the_callers_transaction_notifies_at_its_commit(
    side: Side, tasks: Any, dsn: str, notifications: Notifications, commit: bool
) -> None:
    """Workers hear of the job once it is visible to them, and never of a rolled-back one."""
    task = tasks["send_email"]
    if side.name == "sync":
        engine = sa.create_engine(sync_url(dsn))
        with engine.connect() as conn:
            await asyncio.to_thread(task.defer, to="a", connection=conn)
            assert await notifications.until_marker() == []  # not committed yet
            conn.commit() if commit else conn.rollback()
        engine.dispose()
    else:
        aengine = create_async_engine(async_url(dsn))
        async with aengine.connect() as aconn:
            await task.defer_async(to="a", connection=aconn)
            assert await notifications.until_marker() == []
            await (aconn.commit() if commit else aconn.rollback())
        await aengine.dispose()
    assert await notifications.queues_until_marker() == (["emails"] if commit else [])


async def test_wrong_kind_of_connection_is_a_clear_error(
    app: pgtq.App, tasks: Any, dsn: str
) -> None:
    aengine = create_async_engine(async_url(dsn))
    async with aengine.connect() as aconn:
        with pytest.raises(TypeError, match="Connection with the sync methods"):
            tasks["send_email"].defer(to="a", connection=aconn)
    await aengine.dispose()


async def test_args_are_stored_as_json(side: Side, app: pgtq.App, tasks: Any, sql: Any) -> None:
    await side.defer(tasks["send_email"], to="ünïcode ✓", subject='quote " and \\')
    [(stored,)] = sql("SELECT args::text FROM pgtq.jobs")
    assert json.loads(stored) == {"to": "ünïcode ✓", "subject": 'quote " and \\'}


# -- the enqueue fast path (compiled SQL on the driver connection) ------------------------------


def _backends(sql: Any) -> int:
    return sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )[0][0]


async def test_a_cancelled_defer_async_writes_nothing_and_the_next_one_works(
    app: pgtq.App, tasks: Any, sql: Any, dsn: str
) -> None:
    """Cancelled mid-insert: its connection is replaced and the next defer works. The
    statement may still commit on the server (as with any driver, a cancelled write's outcome
    is unknown), but never twice."""
    import psycopg

    from tests.conftest import eventually, libpq

    await tasks["resize"].defer_async(image_id=0)  # the fast path's connection is open
    blocker = psycopg.connect(libpq(dsn))
    try:
        blocker.execute("LOCK TABLE pgtq.jobs IN EXCLUSIVE MODE")
        stuck = asyncio.create_task(tasks["resize"].defer_async(image_id=1))
        await eventually(
            lambda: (
                sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'WITH inserted AS%%' AND datname = current_database()"
                )
                == [(1,)]
            )
        )
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
    finally:
        blocker.rollback()
        blocker.close()
    assert await tasks["resize"].defer_async(image_id=2) > 0
    stored = [r[0] for r in sql("SELECT args->>'image_id' FROM pgtq.jobs ORDER BY id")]
    assert sorted(stored) in (["0", "2"], ["0", "1", "2"])


async def test_defer_async_fast_path_is_bounded_by_the_pool(
    app: pgtq.App, tasks: Any, sql: Any
) -> None:
    """Many concurrent defers share at most the engine's pool size of driver connections
    (counted beside what the database held before: an earlier test's connection on its way
    out, a waiter's LISTEN lingering a few seconds, is not this app's)."""
    before = _backends(sql)
    ids = await asyncio.gather(*(tasks["resize"].defer_async(image_id=i) for i in range(200)))
    assert len(set(ids)) == 200
    size = app.async_connector().engine.pool.size()  # type: ignore[attr-defined]
    assert 1 <= _backends(sql) <= before + size


async def test_already_enqueued_on_the_fast_path_keeps_the_connection(
    app: pgtq.App, tasks: Any, sql: Any
) -> None:
    locked = tasks["resize"].configure(queueing_lock="one")
    await locked.defer_async(image_id=1)
    inserting = (
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND query LIKE 'WITH inserted AS%%'"
    )
    pids = sql(inserting)
    assert len(pids) == 1  # the fast path's backend, its last query the insert
    with pytest.raises(pgtq.AlreadyEnqueued):
        await locked.defer_async(image_id=2)
    assert await tasks["resize"].defer_async(image_id=3) > 0
    after = sql(inserting)
    assert after == pids  # the same backend served all three


async def test_one_insert_statement_serves_one_job_and_many(
    side: Side, app: pgtq.App, tasks: Any, sql: Any
) -> None:
    """Every defer is one statement: shared options as scalars, the arguments as one JSON
    array split in PostgreSQL; the ids come back in the order of the arguments, and what is
    stored is what was given."""

    task = tasks["send_email"]
    new = task.configure(queue="q", priority=3).encode([{"to": "a"}, {"to": "b"}])
    assert statements.insert_jobs(app.statements, new).statement is app.statements.insert_jobs
    assert (new.count, json.loads(new.args)) == (2, [{"to": "a"}, {"to": "b"}])
    odd = {"to": "ünï ☃", "subject": [1, {"deep": None}, 2.5]}
    one = await side.defer(task, **odd)
    many = await side.defer_many(task, [{"to": str(i)} for i in range(300)])
    few = await side.defer_many(task, [{"to": "x"}, {"to": "y"}])
    assert many == sorted(many) and few == sorted(few) and one < many[0]
    stored = dict(sql("SELECT id, args FROM pgtq.jobs"))
    assert stored[one] == odd
    assert [stored[i] for i in many] == [{"to": str(i)} for i in range(300)]
    assert [stored[i] for i in few] == [{"to": "x"}, {"to": "y"}]
