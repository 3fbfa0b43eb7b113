"""Periodic schedules steered at run time: ``app.periodic.list|pause|resume|run_now``.

The state lives in ``periodic_schedules`` (pgtq_0007) and every scheduler reads it in the
statement that defers its ticks. The API runs through both sides; the scheduler runs on the
real clock, its results checked against the instants the pause and the resume returned (one
clock: the schedulers' and the test's), waiting with deadlines, never with a bare sleep.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgtq
from pgtq import periodic
from pgtq.cron import next_ticks
from pgtq.periodic import run_scheduler
from tests.conftest import eventually, libpq
from tests.sides import Side

SQL = Callable[..., list[tuple[Any, ...]]]


def offline_app() -> pgtq.App:
    return pgtq.App("postgresql://nobody@127.0.0.1:1/none")


def ticks_of(sql: SQL, periodic_id: str) -> list[datetime]:
    rows = sql(
        "SELECT tick_at FROM pgtq.periodic_ticks WHERE periodic_id = %s ORDER BY 1", periodic_id
    )
    return [r[0] for r in rows]


# -- naming a schedule ------------------------------------------------------------------------


@pytest.mark.unit
def test_the_decorator_is_still_app_periodic() -> None:
    app = offline_app()

    @app.periodic(cron="0 * * * *", periodic_id="eu")
    @app.task(aliases=["old_report"])
    def report(timestamp: int) -> None: ...

    schedule = app.periodic.get(report, periodic_id="eu")
    assert schedule is app.periodic_tasks[0]
    assert app.periodic.get("report", periodic_id="eu") is schedule
    assert app.periodic.get("old_report", periodic_id="eu") is schedule  # an alias


async def test_an_unknown_schedule_is_an_error_naming_it(
    side: Side, app: pgtq.App, sql: SQL
) -> None:
    @app.periodic(cron="0 * * * *", periodic_id="eu")
    @app.task
    def report(timestamp: int) -> None: ...

    @app.task
    def plain() -> None: ...

    for method in ("pause", "resume", "run_now"):
        with pytest.raises(
            pgtq.UnknownSchedule, match=r"'nightly'.*its schedules: periodic task 'report' \('eu'\)"
        ):
            await side.call(app.periodic, method, "nightly")
        with pytest.raises(pgtq.UnknownSchedule, match=r"'report' \('us'\)"):
            await side.call(app.periodic, method, report, periodic_id="us")
        with pytest.raises(pgtq.UnknownSchedule, match="'plain'"):  # a task, not periodic
            await side.call(app.periodic, method, plain)
    assert isinstance(pgtq.UnknownSchedule("x"), pgtq.PgtqError)
    assert sql("SELECT count(*) FROM pgtq.periodic_schedules") == [(0,)]
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


# -- list -----------------------------------------------------------------------------------


async def test_list_shows_each_schedule_with_its_state(side: Side, app: pgtq.App, sql: SQL) -> None:
    @app.periodic(cron="*/5 * * * *", max_delay=timedelta(minutes=12))
    @app.task
    def tick(timestamp: int) -> None: ...

    @app.periodic(cron="0 9 * * 1-5", periodic_id="eu", timezone="Europe/Paris",
                  kwargs={"region": "eu"})  # fmt: skip
    @app.task
    async def report(timestamp: int, region: str) -> None: ...

    before = datetime.now(UTC)
    fresh, eu = await side.call(app.periodic, "list")
    after = datetime.now(UTC)
    assert (fresh.task_name, fresh.periodic_id, fresh.cron, fresh.timezone) == (
        "tick", "", "*/5 * * * *", "UTC"
    )  # fmt: skip
    assert (eu.task_name, eu.periodic_id, eu.timezone, eu.kwargs) == (
        "report", "eu", "Europe/Paris", {"region": "eu"}
    )  # fmt: skip
    # The next ticks, as the cron code computes them from the moment of the call.
    schedule = app.periodic.get("tick")
    assert len(fresh.next_ticks) == 3
    assert fresh.next_ticks in (
        tuple(next_ticks(schedule, before, 3)),
        tuple(next_ticks(schedule, after, 3)),
    )
    assert all(
        b - a == timedelta(minutes=5)
        for a, b in zip(fresh.next_ticks, fresh.next_ticks[1:], strict=False)
    )
    assert fresh.next_tick == fresh.next_ticks[0] > before
    assert not fresh.paused and fresh.paused_at is None and fresh.last_tick is None
    assert fresh.run_now_at is None and fresh.run_now_job_id is None

    deferred = await side.call(periodic, "defer_due_ticks", app, now=before)
    assert await side.call(app.periodic, "pause", "report", periodic_id="eu") is True
    fresh, eu = await side.call(app.periodic, "list")
    last = max(deferred, key=lambda d: d.tick_at)
    assert (fresh.last_tick, fresh.last_job_id) == (last.tick_at, last.job_id)
    assert not fresh.paused and eu.paused and eu.paused_at is not None
    assert eu.last_tick is None


async def test_an_app_without_schedules_lists_none(side: Side, app: pgtq.App) -> None:
    assert await side.call(app.periodic, "list") == []


# -- pause and resume, one round at a time (an injected now) ----------------------------------


async def test_a_paused_schedule_defers_nothing_and_a_resumed_one_does_not_backfill(
    side: Side, app: pgtq.App, sql: SQL
) -> None:
    @app.periodic(cron="* * * * *", periodic_id="a", max_delay=timedelta(minutes=10))
    @app.periodic(cron="* * * * *", periodic_id="b", max_delay=timedelta(minutes=10))
    @app.task
    def beat(timestamp: int) -> None: ...

    now = datetime.now(UTC)
    assert await side.call(app.periodic, "pause", beat, periodic_id="a") is True
    assert await side.call(app.periodic, "pause", beat, periodic_id="a") is False  # already
    deferred = await side.call(periodic, "defer_due_ticks", app, now=now)
    assert {d.periodic_id for d in deferred} == {"b"} and len(deferred) >= 10
    assert ticks_of(sql, "a") == []

    assert await side.call(app.periodic, "resume", beat, periodic_id="a") is True
    assert await side.call(app.periodic, "resume", beat, periodic_id="a") is False  # not paused
    [(resumed_at, paused)] = sql(
        "SELECT resumed_at, paused FROM pgtq.periodic_schedules WHERE periodic_id = 'a'"
    )
    assert not paused
    # A scheduler that starts now looks back max_delay: the ticks "a" skipped are not deferred,
    # the ones from the resume on are.
    later = now + timedelta(minutes=2)
    deferred = await side.call(periodic, "defer_due_ticks", app, now=later)
    resumed = [d.tick_at for d in deferred if d.periodic_id == "a"]
    assert resumed and all(t >= resumed_at for t in resumed)
    assert ticks_of(sql, "a") == resumed
    assert len(ticks_of(sql, "b")) > len(resumed) + 8  # "b" got the ticks "a" missed


async def test_a_tick_statement_waits_for_a_pending_pause_and_sees_it(
    app: pgtq.App, sql: SQL, migrated_url: Any
) -> None:
    """The tick statement reads the state FOR SHARE: a pause pending on the row (here an
    update left uncommitted) holds it up, and once the pause commits the statement sees the
    schedule paused. Without the lock it would read the row as it was and defer the tick,
    committing it after the pause returned."""

    @app.periodic(cron="* * * * * *", max_delay=timedelta(seconds=5))
    @app.task
    def beat(timestamp: int) -> None: ...

    sql("INSERT INTO pgtq.periodic_schedules (task_name, periodic_id) VALUES ('beat', '')")
    pausing = psycopg.connect(libpq(migrated_url))  # a transaction left open
    try:
        pausing.execute(
            "UPDATE pgtq.periodic_schedules SET paused = true, paused_at = now() "
            "WHERE task_name = 'beat'"
        )
        done: list[list[Any]] = []
        deferring = threading.Thread(
            target=lambda: done.append(periodic.defer_due_ticks(app)), daemon=True
        )
        deferring.start()

        def waiting_for_the_row() -> bool:
            rows = sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE '%ticks_in%'"
            )
            return bool(rows[0][0])

        await eventually(waiting_for_the_row)
        assert done == []
        pausing.commit()
        await eventually(lambda: bool(done))
        deferring.join(timeout=5)
    finally:
        pausing.close()
    assert done == [[]]
    assert ticks_of(sql, "") == []


# -- the scheduler, on the real clock ---------------------------------------------------------


async def test_running_schedulers_honour_pause_and_resume_without_backfill(
    app: pgtq.App, sql: SQL
) -> None:
    @app.periodic(cron="* * * * * *", periodic_id="a", max_delay=timedelta(seconds=30))
    @app.periodic(cron="* * * * * *", periodic_id="b", max_delay=timedelta(seconds=30))
    @app.task(queue="beats")
    def beat(timestamp: int) -> None: ...

    def start(stop: asyncio.Event, count: int) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(run_scheduler(app, stop=stop)) for _ in range(count)]

    stop = asyncio.Event()
    schedulers = start(stop, 2)  # several schedulers: the pause must hold for each
    try:
        await eventually(lambda: bool(ticks_of(sql, "a")) and bool(ticks_of(sql, "b")))
        # Each scheduler registered its schedules: a pause is an update of their row.
        assert sql("SELECT periodic_id, paused FROM pgtq.periodic_schedules ORDER BY 1") == [
            ("a", False),
            ("b", False),
        ]
        assert await app.periodic.pause_async(beat, periodic_id="a")
        paused = datetime.now(UTC)
        # The schedulers go on: "b" gets the ticks of two more seconds, "a" none after the pause.
        await eventually(lambda: ticks_of(sql, "b")[-1] >= paused + timedelta(seconds=2))
        assert ticks_of(sql, "a")[-1] <= paused
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*schedulers), timeout=5)

    # A scheduler that starts after the resume looks back max_delay (30 s): it defers "a"'s
    # ticks from the resume on, none of those it missed while paused.
    assert await app.periodic.resume_async("beat", periodic_id="a")
    [(resumed_at,)] = sql("SELECT resumed_at FROM pgtq.periodic_schedules WHERE periodic_id = 'a'")
    stop = asyncio.Event()
    schedulers = start(stop, 1)
    try:
        await eventually(lambda: ticks_of(sql, "a")[-1] > resumed_at, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*schedulers), timeout=5)
    missed = [t for t in ticks_of(sql, "a") if paused < t < resumed_at]
    assert missed == []
    assert resumed_at - paused >= timedelta(seconds=2)  # there were ticks to miss
    assert [t for t in ticks_of(sql, "b") if paused < t < resumed_at]  # "b" got them


# -- run now ----------------------------------------------------------------------------------


async def test_run_now_defers_one_job_beside_the_ticks(side: Side, app: pgtq.App, sql: SQL) -> None:
    @app.periodic(cron="0 0 1 1 *", periodic_id="x", kwargs={"label": "x"})
    @app.task(queue="yearly", priority=3)
    def new_year(ctx: pgtq.JobContext, timestamp: int, label: str) -> list[Any]:
        return [timestamp, label]

    assert await side.call(app.periodic, "pause", new_year, periodic_id="x")
    before = datetime.now(UTC)
    job_id = await side.call(app.periodic, "run_now", "new_year", periodic_id="x")
    after = datetime.now(UTC)
    job = await side.get(app, job_id)
    assert job is not None and (job.task_name, job.queue, job.priority) == ("new_year", "yearly", 3)
    assert int(before.timestamp()) <= job.args["timestamp"] <= int(after.timestamp())
    assert job.args["label"] == "x"
    # Recorded as the schedule's last run now, not as a tick: no scheduled tick is hidden.
    assert sql("SELECT count(*) FROM pgtq.periodic_ticks") == [(0,)]
    [info] = await side.call(app.periodic, "list")
    assert info.run_now_job_id == job_id and before <= info.run_now_at <= after
    assert info.paused and info.last_tick is None  # run now leaves the pause as it was
    # It runs like any job (a paused schedule's run now too).
    await side.run_worker(app, wait=False, queues=["yearly"])
    assert await side.wait(app, job_id) == [job.args["timestamp"], "x"]
    second = await side.call(app.periodic, "run_now", new_year, periodic_id="x")
    [info] = await side.call(app.periodic, "list")
    assert second != job_id and info.run_now_job_id == second


async def test_a_tick_at_the_instant_of_a_run_now_is_still_deferred(
    side: Side, app: pgtq.App, sql: SQL
) -> None:
    @app.periodic(cron="* * * * * *", max_delay=timedelta(seconds=3))
    @app.task
    def beat(timestamp: int) -> None: ...

    job_id = await side.call(app.periodic, "run_now", beat)
    [(run_now_at,)] = sql("SELECT run_now_at FROM pgtq.periodic_schedules")
    # A scheduler at the next whole second: every tick of the last 3 s is deferred, the one
    # of the run now's second included.
    now = run_now_at.replace(microsecond=0) + timedelta(seconds=1)
    deferred = await side.call(periodic, "defer_due_ticks", app, now=now)
    assert [d.tick_at for d in deferred] == [now - timedelta(seconds=s) for s in (3, 2, 1, 0)]
    assert job_id not in {d.job_id for d in deferred}
