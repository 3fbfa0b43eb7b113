"""Periodic tasks: cron validation, ticks in time zones, exactly-once deferral, the scheduler.

The decisions are pure (``cron_ticks``, ``due_ticks``) and tested with fixed instants; what
touches the database runs through the sync and the async API (``side``) with an injected
``now``; only the scheduler loop itself is run against the real clock, with deadlines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import pgtq
from pgtq import periodic
from pgtq.cron import cron_ticks, due_ticks
from pgtq.periodic import run_scheduler
from tests.conftest import Notifications, eventually
from tests.sides import Side

PARIS = ZoneInfo("Europe/Paris")
NEW_YEAR = datetime(2024, 1, 1, tzinfo=UTC)  # a tick of "0 0 1 1 *": never "now" in a test run

SQL = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture
def dsn(dsn: str, sql: SQL) -> str:
    # The shared fixture empties the jobs tables; the ticks are emptied here.
    sql("TRUNCATE pgtq.periodic_ticks")
    return dsn


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def offline_app() -> pgtq.App:
    """An app for declarations only: nothing connects."""
    return pgtq.App("postgresql://nobody@127.0.0.1:1/none")


# -- (1) declaring: the cron and everything else is checked at once ---------------------------


@pytest.mark.parametrize(
    "expression",
    [
        "61 * * * *",  # out of range
        "* * * *",  # too few fields
        "0 0 1 1 * 0 2030",  # 7 fields (years) are refused
        "* * * * FOO",  # not a weekday
        "R * * * *",  # random: each worker would tick differently
        "H * * * *",  # hashed
        "0 0 30 2 *",  # never matches
        "every monday",
        "",
    ],
)
@pytest.mark.unit
def test_a_bad_cron_is_refused_when_declared_naming_it(expression: str) -> None:
    app = offline_app()

    @app.task
    def tick(timestamp: int) -> None: ...

    with pytest.raises(pgtq.ConfigurationError, match="invalid cron expression") as info:
        app.periodic(cron=expression)(tick)
    assert repr(expression) in str(info.value)
    assert app.periodic_tasks == []


@pytest.mark.unit
def test_other_mistakes_are_refused_when_declared() -> None:
    app = offline_app()

    @app.task
    def no_timestamp() -> None: ...

    @app.task
    def tick(timestamp: int, region: str) -> None: ...

    with pytest.raises(pgtq.ConfigurationError, match=r"must accept `timestamp: int`"):
        app.periodic(cron="* * * * *")(no_timestamp)
    with pytest.raises(pgtq.ConfigurationError, match="region"):  # a required argument
        app.periodic(cron="* * * * *")(tick)
    with pytest.raises(pgtq.ConfigurationError, match="'Mars/Olympus_Mons'"):
        app.periodic(cron="* * * * *", timezone="Mars/Olympus_Mons", kwargs={"region": "eu"})(tick)
    with pytest.raises(pgtq.ConfigurationError, match="max_delay must be positive"):
        app.periodic(cron="* * * * *", max_delay=0, kwargs={"region": "eu"})(tick)
    with pytest.raises(pgtq.ConfigurationError, match="given by each tick"):
        app.periodic(cron="* * * * *", kwargs={"region": "eu", "timestamp": 1})(tick)
    with pytest.raises(pgtq.ConfigurationError, match="JSON"):
        app.periodic(cron="* * * * *", kwargs={"region": object()})(tick)
    with pytest.raises(pgtq.ConfigurationError, match=r"above @app\.task"):

        @app.periodic(cron="* * * * *")  # type: ignore[arg-type]  # the wrong order
        def plain(timestamp: int) -> None: ...

    app.periodic(cron="0 * * * *", periodic_id="eu", kwargs={"region": "eu"})(tick)
    with pytest.raises(pgtq.ConfigurationError, match="already has a schedule"):
        app.periodic(cron="30 * * * *", periodic_id="eu", kwargs={"region": "eu"})(tick)
    assert len(app.periodic_tasks) == 1


@pytest.mark.unit
def test_declaring_stacks_on_app_task() -> None:
    app = offline_app()

    @app.periodic(cron="*/5 * * * *")
    @app.task(queue="beats", priority=4)
    def tick(ctx: pgtq.JobContext, timestamp: int) -> None: ...

    @app.periodic(cron="0 9 * * 1-5", periodic_id="eu", timezone="Europe/Paris",
                  kwargs={"region": "eu"}, max_delay=60)  # fmt: skip
    @app.periodic(cron="0 9 * * 1-5", periodic_id="us", timezone="America/New_York",
                  kwargs={"region": "us"}, max_delay=timedelta(hours=1))  # fmt: skip
    @app.task
    async def report(timestamp: int, region: str) -> None: ...

    assert isinstance(tick, pgtq.Task) and isinstance(report, pgtq.Task)
    assert [(p.name, p.periodic_id) for p in app.periodic_tasks] == [
        ("tick", ""),
        ("report", "us"),
        ("report", "eu"),
    ]
    first, us, eu = app.periodic_tasks
    assert first.max_delay == periodic.DEFAULT_MAX_DELAY
    assert (eu.max_delay, us.max_delay) == (timedelta(seconds=60), timedelta(hours=1))
    assert eu.timezone == PARIS
    assert eu.arguments(utc(2024, 1, 1)) == {"region": "eu", "timestamp": 1704067200}


@pytest.mark.unit
def test_the_sixth_field_is_seconds() -> None:
    # croniter's convention: seconds come last.
    assert cron_ticks("*/20 * * * * 30", UTC, utc(2024, 1, 1), utc(2024, 1, 1, 1, 0, 30)) == [
        utc(2024, 1, 1, 0, 0, 30),
        utc(2024, 1, 1, 0, 20, 30),
        utc(2024, 1, 1, 0, 40, 30),
        utc(2024, 1, 1, 1, 0, 30),
    ]
    every_second = cron_ticks("* * * * * *", UTC, utc(2024, 1, 1), utc(2024, 1, 1, 0, 0, 3))
    assert every_second == [utc(2024, 1, 1, 0, 0, s) for s in (1, 2, 3)]  # (after, until]


# -- (5) time zones, across DST changes (pure) ------------------------------------------------


def paris(*args: int) -> datetime:
    return datetime(*args, tzinfo=PARIS)


@pytest.mark.unit
def test_a_daily_cron_fires_at_its_local_time_across_dst() -> None:
    # 9:00 in Paris is 08:00 UTC in winter and 07:00 UTC once summer time starts (31 March).
    assert cron_ticks("0 9 * * *", PARIS, utc(2024, 3, 29), utc(2024, 4, 2)) == [
        utc(2024, 3, 29, 8),
        utc(2024, 3, 30, 8),
        utc(2024, 3, 31, 7),
        utc(2024, 4, 1, 7),
    ]
    # ... and back on 27 October.
    assert cron_ticks("0 9 * * *", PARIS, utc(2024, 10, 26), utc(2024, 10, 28, 12)) == [
        utc(2024, 10, 26, 7),
        utc(2024, 10, 27, 8),
        utc(2024, 10, 28, 8),
    ]
    ny = ZoneInfo("America/New_York")
    assert cron_ticks("0 12 * * *", ny, utc(2024, 3, 9), utc(2024, 3, 11)) == [
        utc(2024, 3, 9, 17),
        utc(2024, 3, 10, 16),
    ]


@pytest.mark.unit
def test_a_skipped_wall_time_fires_once_right_after_the_gap() -> None:
    # 02:30 does not exist on 31 March 2024 in Paris (02:00 CET → 03:00 CEST).
    ticks = cron_ticks("30 2 * * *", PARIS, utc(2024, 3, 29), utc(2024, 4, 2))
    assert ticks == [
        paris(2024, 3, 29, 2, 30),
        paris(2024, 3, 30, 2, 30),
        paris(2024, 3, 31, 3, 0),  # the first instant after the gap: 01:00 UTC
        paris(2024, 4, 1, 2, 30),
    ]
    assert ticks[2] == utc(2024, 3, 31, 1)
    # Every 20 minutes: the gap's times fold onto one tick; no duplicate, no hole.
    assert cron_ticks("*/20 * * * *", PARIS, utc(2024, 3, 31, 0, 30), utc(2024, 3, 31, 1, 30)) == [
        utc(2024, 3, 31, 0, 40),
        utc(2024, 3, 31, 1, 0),
        utc(2024, 3, 31, 1, 20),
    ]


@pytest.mark.unit
def test_a_repeated_wall_time_fires_once_unless_the_cron_runs_every_hour() -> None:
    # 02:30 happens twice on 27 October 2024 in Paris (03:00 CEST → 02:00 CET).
    assert cron_ticks("30 2 * * *", PARIS, utc(2024, 10, 26, 12), utc(2024, 10, 28)) == [
        utc(2024, 10, 27, 0, 30),  # the first 02:30 (CEST) only
    ]
    # Every 30 minutes keeps its pace in real time through the repeated hour.
    assert cron_ticks("*/30 * * * *", PARIS, utc(2024, 10, 26, 23), utc(2024, 10, 27, 2)) == [
        utc(2024, 10, 26, 23, 30),
        utc(2024, 10, 27, 0, 0),
        utc(2024, 10, 27, 0, 30),
        utc(2024, 10, 27, 1, 0),
        utc(2024, 10, 27, 1, 30),
        utc(2024, 10, 27, 2, 0),
    ]


# -- (3) due ticks: max_delay after an outage (pure) ------------------------------------------


@pytest.mark.unit
def test_due_ticks_skip_those_older_than_max_delay() -> None:
    app = offline_app()

    @app.periodic(cron="*/5 * * * *", max_delay=timedelta(minutes=10))
    @app.task
    def tick(timestamp: int) -> None: ...

    now = utc(2024, 5, 1, 12, 0)
    # A scheduler that just started looks back max_delay; a tick exactly that old is due.
    fresh = due_ticks(app.periodic_tasks, now=now)
    assert [t.at for t in fresh] == [utc(2024, 5, 1, 11, 50), now - timedelta(minutes=5), now]
    # After an outage of two hours, only the ticks of the last max_delay are due.
    after_outage = due_ticks(app.periodic_tasks, now=now, since=now - timedelta(hours=2))
    assert [t.at for t in after_outage] == [t.at for t in fresh]
    # Normally: what came since the last look.
    recent = due_ticks(app.periodic_tasks, now=now, since=now - timedelta(minutes=6))
    assert [t.at for t in recent] == [utc(2024, 5, 1, 11, 55), now]
    assert due_ticks(app.periodic_tasks, now=now, since=now) == []
    assert fresh[-1].timestamp == int(now.timestamp())


# -- deferring, through both APIs ---------------------------------------------------------------


async def test_a_tick_is_deferred_once_when_schedulers_race(
    side: Side, app: pgtq.App, sql: SQL
) -> None:
    @app.periodic(cron="* * * * * *", max_delay=timedelta(minutes=5))
    @app.task(queue="beats", priority=2)
    def beat(timestamp: int) -> None: ...

    every_30_s = "* * * * * */30"  # seconds are the sixth field

    @app.periodic(cron=every_30_s, periodic_id="a", kwargs={"zone": "a"}, max_delay=60)
    @app.periodic(cron=every_30_s, periodic_id="b", kwargs={"zone": "b"}, max_delay=60)
    @app.task
    async def zoned(timestamp: int, zone: str) -> None: ...

    now = utc(2024, 5, 1, 12, 0, 0)
    # Three schedulers, same instant: threads (sync side) or tasks on one loop (async side).
    results = await asyncio.gather(
        *(side.call(periodic, "defer_due_ticks", app, now=now) for _ in range(3))
    )
    deferred = [d for result in results for d in result]
    # 11:55:00 to 12:00:00 for "beat" (a tick exactly max_delay old is still due), and
    # 11:59:00, 11:59:30, 12:00:00 for each schedule of "zoned".
    assert len(deferred) == 301 + 2 * 3
    keys = {(d.task_name, d.periodic_id, d.tick_at) for d in deferred}
    assert len(keys) == len(deferred)
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(307,)]
    # Each tick row records its job, and the job looks like any deferred job.
    rows = sql(
        "SELECT t.task_name, t.periodic_id, t.tick_at, j.queue, j.priority, j.status, j.args "
        "FROM pgtq.periodic_ticks t JOIN pgtq.jobs j ON j.id = t.job_id ORDER BY j.id"
    )
    assert len(rows) == 307
    by_task = {(r[0], r[1], r[2]): r[3:] for r in rows}
    assert by_task["beat", "", now] == ("beats", 2, "todo", {"timestamp": int(now.timestamp())})
    assert by_task["zoned", "b", now][0] == "default"
    assert by_task["zoned", "b", now][3] == {"zone": "b", "timestamp": int(now.timestamp())}
    # A later round (or a late scheduler) defers nothing twice.
    again = await side.call(periodic, "defer_due_ticks", app, now=now + timedelta(seconds=1))
    assert [(d.task_name, d.tick_at) for d in again] == [("beat", now + timedelta(seconds=1))]


async def test_deferred_ticks_wake_the_workers_of_their_queues(
    side: Side, app: pgtq.App, notifications: Notifications
) -> None:
    """The ticks' insert notifies each queue that got a job, once (no insert trigger)."""

    @app.periodic(cron="* * * * *")
    @app.task(queue="beats")
    def beat(timestamp: int) -> None: ...

    @app.periodic(cron="* * * * *")
    @app.task
    async def other(timestamp: int) -> None: ...

    now = utc(2024, 5, 1, 12, 0, 0)
    assert await side.call(periodic, "defer_due_ticks", app, now=now)  # a few ticks each
    assert sorted(await notifications.queues_until_marker()) == ["beats", "default"]
    assert await side.call(periodic, "defer_due_ticks", app, now=now) == []  # all deferred
    assert await notifications.until_marker() == []


async def test_after_an_outage_old_ticks_are_skipped(side: Side, app: pgtq.App, sql: SQL) -> None:
    @app.periodic(cron="*/5 * * * *", max_delay=timedelta(minutes=12))
    @app.task
    def tick(timestamp: int) -> None: ...

    before = utc(2024, 5, 1, 10, 0)
    first = await side.call(periodic, "defer_due_ticks", app, now=before, since=before)
    assert first == []
    # The last successful round was at 10:00; the next one comes at 12:00.
    now = utc(2024, 5, 1, 12, 0)
    deferred = await side.call(periodic, "defer_due_ticks", app, now=now, since=before)
    assert [d.tick_at for d in deferred] == [utc(2024, 5, 1, 11, 50), utc(2024, 5, 1, 11, 55), now]
    args = sql("SELECT args FROM pgtq.jobs ORDER BY id")
    assert [a[0]["timestamp"] for a in args] == [int(d.tick_at.timestamp()) for d in deferred]
    # A scheduler that starts now (no last round) finds them all deferred already.
    assert await side.call(periodic, "defer_due_ticks", app, now=now) == []


async def test_the_task_receives_the_ticks_timestamp(side: Side, app: pgtq.App) -> None:
    got: list[tuple[str, int, str]] = []

    @app.periodic(cron="0 0 1 1 *")
    @app.task
    def sync_new_year(ctx: pgtq.JobContext, timestamp: int) -> int:
        got.append(("sync", timestamp, ctx.task_name))
        return timestamp

    @app.periodic(cron="0 0 1 1 *", periodic_id="x", kwargs={"label": "x"})
    @app.task
    async def async_new_year(timestamp: int, label: str) -> None:
        got.append(("async", timestamp, label))

    deferred = await side.call(
        periodic, "defer_due_ticks", app, now=NEW_YEAR + timedelta(minutes=3)
    )
    assert len(deferred) == 2
    stats = await side.run_worker(app, wait=False)
    assert stats.by_status["succeeded"] == 2
    stamp = int(NEW_YEAR.timestamp())
    assert sorted(got) == [("async", stamp, "x"), ("sync", stamp, "sync_new_year")]
    job_of = {d.task_name: d.job_id for d in deferred}
    assert await side.wait(app, job_of["sync_new_year"]) == stamp


async def test_old_tick_rows_are_forgotten(side: Side, app: pgtq.App, sql: SQL) -> None:
    @app.periodic(cron="0 * * * *", max_delay=timedelta(days=30))
    @app.task
    def hourly(timestamp: int) -> None: ...

    recent = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    for now in (recent - timedelta(days=10), recent):
        await side.call(periodic, "defer_due_ticks", app, now=now, since=now - timedelta(hours=3))
    assert sql("SELECT count(*) FROM pgtq.periodic_ticks") == [(6,)]
    gone = await side.call(periodic, "delete_old_ticks", app, timedelta(days=2))
    assert gone == 3
    assert [r[0] for r in sql("SELECT tick_at FROM pgtq.periodic_ticks ORDER BY 1")] == [
        recent - timedelta(hours=2),
        recent - timedelta(hours=1),
        recent,
    ]


# -- (6) the builtin clean-up task ------------------------------------------------------------


async def test_the_cleanup_task_deletes_old_finished_jobs(
    side: Side, app: pgtq.App, sql: SQL
) -> None:
    @app.task
    def work(n: int) -> None:
        if n == 2:
            raise ValueError("boom")

    cleanup = app.add_cleanup_task(
        cron="0 0 1 1 *", older_than=timedelta(days=3), include_failed=True
    )
    assert cleanup.name == periodic.CLEANUP_TASK_NAME
    assert [p.name for p in app.periodic_tasks] == ["pgtq.cleanup"]
    old_ok, recent_ok, old_failed = await side.defer_many(work, [{"n": n} for n in range(3)])
    await side.run_worker(app, wait=False)
    waiting = await side.defer(work, n=3)
    assert await side.call(app.jobs, "cancel", waiting)
    # Make three of them end long ago (the cancelled one too: it is kept by default).
    sql(
        "UPDATE pgtq.jobs SET finished_at = now() - interval '4 days' WHERE id = ANY(%s)",
        [old_ok, old_failed, waiting],
    )
    [tick] = await side.call(periodic, "defer_due_ticks", app, now=NEW_YEAR)
    assert tick.task_name == "pgtq.cleanup"
    await side.run_worker(app, wait=False)
    assert await side.wait(app, tick.job_id) == {"deleted": 2}
    left = {row[0] for row in sql("SELECT id FROM pgtq.jobs")}
    assert left == {recent_ok, waiting, tick.job_id}
    job = await side.get(app, tick.job_id)
    assert job is not None and job.args == {
        "older_than": 3 * 86400.0,
        "include_failed": True,
        "include_cancelled": False,
        "timestamp": int(NEW_YEAR.timestamp()),
    }


# -- the scheduler loop, on the real clock ----------------------------------------------------


async def test_racing_schedulers_defer_each_second_once_and_run_it(app: pgtq.App, sql: SQL) -> None:
    seen: list[int] = []

    @app.periodic(cron="* * * * * *", max_delay=timedelta(seconds=2))
    @app.task
    async def every_second(timestamp: int) -> None:
        seen.append(timestamp)

    started = int(datetime.now(UTC).timestamp())
    stop = asyncio.Event()
    schedulers = [asyncio.create_task(run_scheduler(app, stop=stop)) for _ in range(3)]
    worker = asyncio.create_task(app.run_worker_async(fetch_job_polling_interval=0.2))
    try:
        await eventually(lambda: len(set(seen)) >= 4, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*schedulers), timeout=5)
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    ticks = sql("SELECT tick_at, job_id FROM pgtq.periodic_ticks ORDER BY tick_at")
    stamps = [int(t.timestamp()) for t, _ in ticks]
    assert stamps == list(range(stamps[0], stamps[0] + len(stamps)))  # every second, once
    assert stamps[0] >= started - 2  # a start looks back max_delay at most
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(len(ticks),)]
    assert len(seen) == len(set(seen)) and set(seen) <= set(stamps)


async def test_the_scheduler_survives_database_errors(
    app: pgtq.App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    @app.periodic(cron="* * * * * *", max_delay=timedelta(seconds=30))
    @app.task
    def every_second(timestamp: int) -> None: ...

    real = periodic.defer_ticks_async
    failures = 0

    async def flaky(app_: pgtq.App, ticks: Any) -> Any:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise pgtq.DatabaseUnreachable("the database went away")
        return await real(app_, ticks)

    monkeypatch.setattr(periodic, "defer_ticks_async", flaky)
    monkeypatch.setattr(periodic, "RETRY_FIRST", 0.05)

    async def two_jobs() -> bool:
        counts = await app.jobs.counts_async()
        return counts.get(("default", pgtq.Status.TODO), 0) >= 2

    stop = asyncio.Event()
    failed_at = datetime.now(UTC)
    with caplog.at_level(logging.WARNING, logger="pgtq.periodic"):
        scheduler = asyncio.create_task(run_scheduler(app, stop=stop))
        try:
            await eventually(two_jobs)
        finally:
            stop.set()
            await asyncio.wait_for(scheduler, timeout=5)
    assert failures == 2
    assert "deferring periodic ticks failed" in caplog.text
    # The ticks of the failed rounds were deferred once the database came back.
    stamps = sorted(job.args["timestamp"] for job in await app.jobs.list_async())
    assert stamps[0] <= int(failed_at.timestamp()) + 1
    assert stamps == list(range(stamps[0], stamps[0] + len(stamps)))


@pytest.mark.unit
async def test_the_scheduler_stops_promptly(caplog: pytest.LogCaptureFixture) -> None:
    app = offline_app()  # a database that never answers

    @app.periodic(cron="0 0 1 1 *")
    @app.task
    def yearly(timestamp: int) -> None: ...

    scheduler = asyncio.create_task(run_scheduler(app))
    await asyncio.sleep(0.2)
    assert not scheduler.done()  # errors are logged, not raised
    scheduler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(scheduler, timeout=1)

    stop = asyncio.Event()
    scheduler = asyncio.create_task(run_scheduler(app, stop=stop))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(scheduler, timeout=1)
    await run_scheduler(pgtq.App("postgresql://nobody@127.0.0.1:1/none"))  # nothing to do
    await app.close_async()
