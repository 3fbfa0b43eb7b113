"""Periodic tasks: the scheduler that defers each tick of a cron schedule exactly once.

What a schedule decides is pure and lives in :mod:`pgtq.cron` (cron syntax, time zones and
DST, due ticks; its names are re-exported here). This module does the I/O:
:func:`defer_ticks` / :func:`defer_ticks_async` write the due ticks in one statement;
:func:`run_scheduler` is the loop every worker may run.

Exactly once, however many schedulers run: deferring a tick inserts its row into
``periodic_ticks`` (primary key: task name, periodic id, tick) with ``ON CONFLICT DO
NOTHING``, and the same statement inserts the job only for a tick row it really inserted.
The same statement skips the ticks of paused schedules (``app.periodic.pause``, in
:mod:`pgtq.schedules`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from pgtq import statements
from pgtq.cron import (
    DEFAULT_MAX_DELAY,
    MAX_SLEEP,
    TICK_RETENTION,
    CronInfo,
    PeriodicTask,
    ScheduleOptions,
    Tick,
    check_schedule,
    cron_ticks,
    describe,
    due_ticks,
    retention,
    schedule,
    sleep_time,
    tick_rows,
    to_timezone,
    validate_cron,
)
from pgtq.errors import ConfigurationError
from pgtq.retry import backoff_delays
from pgtq.statements import DeferredTick
from pgtq.tasks import Task

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = [
    "CLEANUP_TASK_NAME",
    "DEFAULT_MAX_DELAY",
    "MAX_SLEEP",
    "TICK_RETENTION",
    "CleanupOptions",
    "CronInfo",
    "DeferredTick",
    "PeriodicTask",
    "ScheduleOptions",
    "Tick",
    "add_cleanup_task",
    "check_schedule",
    "cron_ticks",
    "declare",
    "defer_due_ticks",
    "defer_due_ticks_async",
    "defer_ticks",
    "defer_ticks_async",
    "delete_old_ticks",
    "delete_old_ticks_async",
    "due_ticks",
    "run_scheduler",
    "tick_rows",
    "to_timezone",
    "validate_cron",
]

logger = logging.getLogger("pgtq.periodic")

#: How often (seconds) each scheduler deletes expired ``periodic_ticks`` rows.
TICK_CLEANUP_INTERVAL = 3600.0
#: A window longer than this is computed in a thread, not on the worker's event loop.
_BIG_WINDOW = timedelta(minutes=1)
#: Delays between retries after a database error: from ``first`` s, doubling up to ``cap``.
RETRY_FIRST, RETRY_CAP = 0.5, 30.0

CLEANUP_TASK_NAME = "pgtq.cleanup"


def declare(app: App, task: Task[..., Any], **options: Unpack[ScheduleOptions]) -> PeriodicTask:
    """Check a schedule and add it to ``app.periodic_tasks`` (what ``app.periodic`` does)."""
    if not isinstance(task, Task):
        raise ConfigurationError(
            f"@app.periodic(cron={options.get('cron')!r}) applies to a task: put it above "
            f"@app.task(...), got {task!r}"
        )
    if task.app is not app:
        raise ConfigurationError(f"task {task.name!r} is registered on another app")
    periodic = schedule(task, options)
    for existing in app.periodic_tasks:
        if (existing.name, existing.periodic_id) == (task.name, periodic.periodic_id):
            raise ConfigurationError(
                f"{describe(task.name, periodic.periodic_id)} already has a schedule "
                f"({existing.cron!r}): give each schedule of a task its own periodic_id"
            )
    app.periodic_tasks.append(periodic)
    return periodic


# -- deferring: the sync and async twins ------------------------------------------------------


def defer_ticks(app: App, ticks: Sequence[Tick]) -> list[DeferredTick]:
    """Defer these ticks in one statement; returns those this call deferred (new ticks)."""
    if not ticks:
        return []
    return app.sync.run(statements.defer_ticks(app.statements, tick_rows(ticks)))


async def defer_ticks_async(app: App, ticks: Sequence[Tick]) -> list[DeferredTick]:
    if not ticks:
        return []
    query = statements.defer_ticks(app.statements, tick_rows(ticks))
    return await app.async_connector().run(query)


def defer_due_ticks(
    app: App, *, now: datetime | None = None, since: datetime | None = None
) -> list[DeferredTick]:
    """One scheduler round: defer the app's ticks due at ``now`` (see :func:`due_ticks`)."""
    now = datetime.now(UTC) if now is None else now
    return defer_ticks(app, due_ticks(app.periodic_tasks, now=now, since=since))


async def defer_due_ticks_async(
    app: App, *, now: datetime | None = None, since: datetime | None = None
) -> list[DeferredTick]:
    now = datetime.now(UTC) if now is None else now
    return await defer_ticks_async(app, due_ticks(app.periodic_tasks, now=now, since=since))


def delete_old_ticks(app: App, older_than: timedelta) -> int:
    """Forget ``periodic_ticks`` rows older than ``older_than`` (the scheduler does it)."""
    query = statements.delete_old_ticks(app.statements, older_than.total_seconds())
    return app.sync.run(query)


async def delete_old_ticks_async(app: App, older_than: timedelta) -> int:
    query = statements.delete_old_ticks(app.statements, older_than.total_seconds())
    return await app.async_connector().run(query)


# -- the scheduler ----------------------------------------------------------------------------


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run_scheduler(app: App, *, stop: asyncio.Event | None = None) -> None:
    """Defer the app's periodic tasks' ticks as they come, until ``stop`` is set or cancelled.

    Every worker may run it: each tick is deferred once however many run. On start it gives
    each schedule its row of run-time state (see :mod:`pgtq.schedules`) and looks back each
    schedule's ``max_delay``; then each round defers, in one statement, the ticks since its
    last successful round that are not older than ``max_delay``, and sleeps until the next
    tick (at most ``MAX_SLEEP`` s). That statement skips the ticks of paused schedules: it
    reads their state itself, so a pause costs no round trip. A database error is logged and
    the round is tried again after a backoff (the ticks it missed are deferred then, if still
    young enough). Once an hour it forgets ``periodic_ticks`` rows older than a day (or twice
    the largest ``max_delay``).
    """
    periodic_tasks = list(app.periodic_tasks)
    if not periodic_tasks:
        logger.debug("no periodic tasks: the scheduler has nothing to do")
        return
    keep = retention(periodic_tasks)
    longest = max(p.max_delay for p in periodic_tasks)
    register = statements.register_schedules(
        app.statements, [(p.name, p.periodic_id) for p in periodic_tasks]
    )
    registered = False
    since: datetime | None = None
    delays = backoff_delays(first=RETRY_FIRST, cap=RETRY_CAP)
    failures = 0
    next_cleanup = time.monotonic()
    logger.info(
        "periodic scheduler started: %s",
        ", ".join(f"{p.name}[{p.periodic_id}] {p.cron!r}" for p in periodic_tasks),
    )
    while stop is None or not stop.is_set():
        now = datetime.now(UTC)
        pause: float | None = None
        window = longest if since is None else min(now - since, longest)
        try:
            if not registered:  # once: a pause is then an update the tick statement waits for
                await app.async_connector().run(register)
                registered = True
            if window > _BIG_WINDOW:  # many ticks to compute: off the event loop
                ticks = await asyncio.to_thread(due_ticks, periodic_tasks, now=now, since=since)
            else:
                ticks = due_ticks(periodic_tasks, now=now, since=since)
            deferred = await defer_ticks_async(app, ticks)
        except Exception as exc:
            pause = next(delays)
            failures += 1
            logger.warning(
                "deferring periodic ticks failed (%s); trying again in %.1f s",
                exc,
                pause,
                exc_info=failures == 1,  # the traceback once per streak of failures
            )
        else:
            if since is not None and any(now - p.max_delay > since for p in periodic_tasks):
                logger.warning(
                    "the periodic scheduler was %.0f s behind: ticks older than their "
                    "max_delay were skipped",
                    (now - since).total_seconds(),
                )
            since = now
            if failures:
                failures = 0
                delays = backoff_delays(first=RETRY_FIRST, cap=RETRY_CAP)
            for d in deferred:
                logger.debug(
                    "deferred periodic task %s[%s] tick %s as job %s",
                    d.task_name,
                    d.periodic_id,
                    d.tick_at.isoformat(),
                    d.job_id,
                )
        if time.monotonic() >= next_cleanup:
            try:
                gone = await delete_old_ticks_async(app, keep)
            except Exception as exc:
                logger.warning("deleting old periodic ticks failed: %s", exc)
                next_cleanup = time.monotonic() + 60.0
            else:
                logger.debug("deleted %s old periodic tick(s)", gone)
                next_cleanup = time.monotonic() + TICK_CLEANUP_INTERVAL
        if pause is None:
            pause = sleep_time(periodic_tasks, datetime.now(UTC))
        await _pause(pause, stop)


# -- the builtin clean-up task ----------------------------------------------------------------


class CleanupOptions(TypedDict, total=False):
    """The options of ``app.add_cleanup_task(...)``, declared once.

    ``cron`` (default ``"0 * * * *"``, hourly) and ``timezone`` (default UTC): when it runs.
    Each run deletes jobs that ended more than ``older_than`` ago (a timedelta or seconds;
    default 7 days): succeeded ones always, failed ones with ``include_failed``, cancelled
    and aborted ones with ``include_cancelled`` (both default False); with
    ``results_older_than``, it also drops older results while keeping their jobs. ``queue``:
    the task's queue (default ``"default"``).
    """

    cron: str
    older_than: timedelta | float
    include_failed: bool
    include_cancelled: bool
    queue: str
    timezone: str | tzinfo
    results_older_than: timedelta | float | None


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def add_cleanup_task(
    app: App, *, name: str = CLEANUP_TASK_NAME, **options: Unpack[CleanupOptions]
) -> Task[..., Any]:
    """Register a periodic task that deletes jobs finished more than ``older_than`` ago
    (:class:`CleanupOptions`).

    It calls ``app.jobs.delete_old_jobs_async`` and returns ``{"deleted": n}`` (and
    ``"results_cleared"`` with ``results_older_than``). Its settings are the job's
    arguments, so a run is visible in the job and can be deferred by hand
    (``pgtq defer app pgtq.cleanup '{}'``).
    """
    unknown = sorted(set(options) - CleanupOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"add_cleanup_task() got unexpected keyword argument(s) {unknown}")
    older = options.get("older_than", timedelta(days=7))
    seconds = _seconds(older)
    if seconds < 0:
        raise ConfigurationError(f"older_than must not be negative, got {older!r}")
    results = options.get("results_older_than")
    results_seconds = None if results is None else _seconds(results)
    include_failed = options.get("include_failed", False)
    include_cancelled = options.get("include_cancelled", False)
    settings = {
        "older_than": seconds,
        "include_failed": include_failed,
        "include_cancelled": include_cancelled,
    }
    if results_seconds is not None:
        settings["results_older_than"] = results_seconds

    async def cleanup(
        timestamp: int = 0,
        older_than: float = seconds,
        include_failed: bool = include_failed,
        include_cancelled: bool = include_cancelled,
        results_older_than: float | None = results_seconds,
    ) -> dict[str, int]:
        deleted = await app.jobs.delete_old_jobs_async(
            older_than, include_failed=include_failed, include_cancelled=include_cancelled
        )
        done = {"deleted": deleted}
        if results_older_than is not None:  # the results' retention, shorter than the jobs'
            done["results_cleared"] = await app.jobs.clear_results_async(results_older_than)
        return done

    cron, timezone = options.get("cron", "0 * * * *"), options.get("timezone", "UTC")
    validate_cron(cron)  # before registering anything
    to_timezone(timezone)
    task = app.task(name=name, queue=options.get("queue", "default"))(cleanup)
    declare(app, task, cron=cron, timezone=timezone, kwargs=settings)
    return task
