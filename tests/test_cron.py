"""``pgtq.cron``, the pure half of periodic tasks: schedules made from their options, the
scheduler's sleep and retention, the options refused where they are written. No database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import pgtq
from pgtq import cron

pytestmark = pytest.mark.unit


def offline_app() -> pgtq.App:
    return pgtq.App("postgresql://nobody@127.0.0.1:1/none")


def test_a_schedule_is_made_from_its_options_with_defaults() -> None:
    app = offline_app()

    @app.task
    def tick(timestamp: int, region: str = "eu") -> None: ...

    plain = cron.schedule(tick, {"cron": "*/5  * * * *"})
    assert (plain.cron, plain.periodic_id, plain.timezone) == ("*/5 * * * *", "", ZoneInfo("UTC"))
    assert plain.max_delay == cron.DEFAULT_MAX_DELAY and dict(plain.kwargs) == {}
    options: cron.ScheduleOptions = {"cron": "0 9 * * *", "periodic_id": "us", "max_delay": 30}
    us = cron.schedule(tick, {**options, "kwargs": {"region": "us"}})
    assert (us.max_delay, dict(us.kwargs)) == (timedelta(seconds=30), {"region": "us"})
    assert app.periodic_tasks == []  # making a schedule registers nothing


def test_unknown_or_missing_options_are_refused_where_written() -> None:
    app = offline_app()
    bp = pgtq.Blueprint()
    for decorator in (app.periodic, bp.periodic):
        with pytest.raises(pgtq.ConfigurationError, match=r"unknown periodic option.*'crn'"):
            decorator(crn="* * * * *")  # type: ignore[call-arg]
        with pytest.raises(pgtq.ConfigurationError, match="needs cron"):
            decorator()  # type: ignore[call-arg]
        with pytest.raises(pgtq.ConfigurationError, match="invalid cron expression"):
            decorator(cron="61 * * * *")
    with pytest.raises(TypeError, match="older"):
        app.add_cleanup_task(older=3)  # type: ignore[call-arg]


def test_the_cleanup_task_takes_its_options() -> None:
    app = offline_app()
    task = app.add_cleanup_task(cron="*/10 * * * *", older_than=60, queue="maintenance")
    [schedule] = app.periodic_tasks
    assert (task.name, task.defaults.queue, schedule.cron) == (
        "pgtq.cleanup",
        "maintenance",
        "*/10 * * * *",
    )
    assert dict(schedule.kwargs) == {
        "older_than": 60.0,
        "include_failed": False,
        "include_cancelled": False,
    }


def test_the_scheduler_sleeps_until_the_next_tick_at_most_max_sleep() -> None:
    app = offline_app()

    @app.periodic(cron="* * * * * */4")
    @app.task
    def often(timestamp: int) -> None: ...

    now = datetime(2024, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert cron.sleep_time(app.periodic_tasks, now) == pytest.approx(3.005)
    assert cron.sleep_time([], now) == cron.MAX_SLEEP


def test_tick_rows_are_kept_twice_the_longest_max_delay_or_a_day() -> None:
    app = offline_app()

    @app.periodic(cron="0 * * * *", max_delay=timedelta(days=2))
    @app.periodic(cron="0 * * * *", periodic_id="short", max_delay=60)
    @app.task
    def hourly(timestamp: int) -> None: ...

    assert cron.retention(app.periodic_tasks) == timedelta(days=4)
    assert cron.retention(app.periodic_tasks[:1]) == cron.TICK_RETENTION


def test_the_pure_module_holds_no_scheduler() -> None:
    names: dict[str, Any] = vars(cron)
    assert "run_scheduler" not in names and "defer_ticks" not in names
