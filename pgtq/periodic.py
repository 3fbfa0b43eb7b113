"""Periodic tasks: cron schedules whose every tick is deferred exactly once.

The pure part decides (which instants a schedule ticks at in its timezone, which ticks are
due and not older than ``max_delay``); :func:`defer_ticks` / :func:`defer_ticks_async` write
the due ticks in one statement; :func:`run_scheduler` is the loop every worker may run.

Exactly once, however many schedulers run: deferring a tick inserts its row into
``periodic_ticks`` (primary key: task name, periodic id, tick) with ``ON CONFLICT DO
NOTHING``, and the same statement inserts the job only for a tick row it really inserted.

Cron expressions (croniter's syntax, validated when declared):

- 5 fields: ``minute hour day-of-month month day-of-week``;
- 6 fields: the same, then **seconds as the sixth (last) field**, croniter's convention:
  ``* * * * * */10`` is every 10 seconds, ``0 * * * * 30`` minute 0 of every hour, at second
  30 (beware: ``0 * * * * *`` is every second of minute 0, not every minute);
- the aliases ``@hourly``, ``@daily``, ``@midnight``, ``@weekly``, ``@monthly``,
  ``@yearly``, ``@annually``.

Random (``R``) fields would give each worker a different schedule and hashed (``H``) ones
need an id, so both are refused, as are 7-field (year) expressions.

Ticks are wall-clock times in the schedule's timezone (default UTC). Across DST changes:

- a wall time the clock skips (spring forward) fires at the first instant after the gap
  (a daily ``30 2 * * *`` in Europe/Paris fires at 03:00 CEST on the last Sunday of March);
- a wall time the clock shows twice (fall back) fires once, at its first occurrence, unless
  the hour field is ``*``: then both occurrences fire, so ``*/15 * * * *`` keeps its pace;
- ticks that land on the same instant are one tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import (  # type: ignore[import-untyped, unused-ignore]
    CroniterBadDateError,
    croniter,
)

from pgtq import statements
from pgtq.errors import ConfigurationError, InvalidArguments
from pgtq.model import dumps
from pgtq.retry import backoff_delays
from pgtq.statements import DeferredTick
from pgtq.tasks import Task

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = [
    "CLEANUP_TASK_NAME",
    "DEFAULT_MAX_DELAY",
    "CronInfo",
    "DeferredTick",
    "PeriodicTask",
    "Tick",
    "add_cleanup_task",
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
    "validate_cron",
]

logger = logging.getLogger("pgtq.periodic")

#: Ticks older than this are skipped (a schedule's ``max_delay``, unless given). A scheduler
#: that starts looks back this far, so a restart within it loses no tick.
DEFAULT_MAX_DELAY = timedelta(minutes=10)
#: The scheduler wakes at least this often (seconds), whatever the schedules: a wall clock
#: that jumps, or a daily cron, never leaves it asleep for long.
MAX_SLEEP = 10.0
#: ``periodic_ticks`` rows are kept at least this long (and at least twice the largest
#: ``max_delay``, so a tick a scheduler may still try to defer is always remembered).
TICK_RETENTION = timedelta(days=1)
#: How often (seconds) each scheduler deletes expired ``periodic_ticks`` rows.
TICK_CLEANUP_INTERVAL = 3600.0
#: A window longer than this is computed in a thread, not on the worker's event loop.
_BIG_WINDOW = timedelta(minutes=1)
#: Delays between retries after a database error: from ``first`` s, doubling up to ``cap``.
RETRY_FIRST, RETRY_CAP = 0.5, 30.0

CLEANUP_TASK_NAME = "pgtq.cleanup"

_ALIASES = frozenset(
    {"@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually"}
)
_RANDOM_OR_HASHED = re.compile(r"[hr](\(\d+-\d+\))?(/\d+)?", re.IGNORECASE)
_HOUR_FIELD = 1  # croniter's order: minute, hour, day, month, day of week, second
_ONE_MICROSECOND = timedelta(microseconds=1)


# -- cron expressions and timezones (pure) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CronInfo:
    """What declaring a schedule learns from its expression."""

    expression: str
    has_seconds: bool
    every_hour: bool  # the hour field matches every hour (its fall-back hour fires twice)


def validate_cron(expression: str) -> CronInfo:
    """Check a cron expression; ``ConfigurationError`` naming it when it is not usable."""

    def bad(reason: str) -> ConfigurationError:
        return ConfigurationError(f"invalid cron expression {expression!r}: {reason}")

    if not isinstance(expression, str):
        raise bad("a cron expression is a string")
    text = " ".join(expression.split())
    if text.lower() not in _ALIASES:
        fields = text.split(" ") if text else []
        if len(fields) not in (5, 6):
            raise bad(
                f"expected 5 fields (minute hour day month weekday) or 6 (the same, then "
                f"seconds), got {len(fields)}"
            )
        for part in (p for f in fields for p in f.split(",")):
            if _RANDOM_OR_HASHED.fullmatch(part):
                raise bad(
                    f"{part!r}: random (R) and hashed (H) fields are not supported "
                    "(every worker must compute the same ticks)"
                )
    try:
        cron = croniter(text, datetime(2000, 1, 1, tzinfo=UTC))
        cron.get_next(datetime)
    except CroniterBadDateError:
        raise bad("it never matches a date") from None
    except (ValueError, TypeError, KeyError, IndexError) as exc:  # croniter's are ValueErrors
        raise bad(str(exc) or type(exc).__name__) from None
    hours = cron.expanded[_HOUR_FIELD]
    return CronInfo(
        expression=text,
        has_seconds=len(cron.expanded) == 6,
        every_hour=hours == ["*"] or len(set(hours)) == 24,
    )


def to_timezone(tz: str | tzinfo) -> tzinfo:
    """A tzinfo from an IANA name (``"Europe/Paris"``) or a tzinfo."""
    if isinstance(tz, tzinfo):
        if hasattr(tz, "localize"):
            raise ConfigurationError(
                f"timezone {tz!r} is a pytz zone, which ignores fold: give its name instead"
            )
        return tz
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigurationError(
            f"unknown timezone {tz!r}: give an IANA name such as 'UTC' or 'Europe/Paris' "
            "(install the tzdata package where the system has no time zone database)"
        ) from None


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ValueError(f"a timezone-aware datetime is needed, got {dt!r}")
    return dt.astimezone(UTC)


def _offsets(tz: tzinfo, start: datetime, end: datetime) -> list[timedelta]:
    """The UTC offsets the zone has over [start, end] (sampled daily, and at both ends)."""
    points = [start, end]
    point = start + timedelta(days=1)
    while point < end:
        points.append(point)
        point += timedelta(days=1)
    found: set[timedelta] = set()
    for p in points:
        offset = p.astimezone(tz).utcoffset()
        found.add(offset if offset is not None else timedelta(0))
    return sorted(found)


def _transition(tz: tzinfo, before: datetime, after: datetime) -> datetime:
    """The first instant in (before, after] with ``after``'s offset (bisected to the second)."""
    target = after.astimezone(tz).utcoffset()
    while after - before > timedelta(seconds=1):
        middle = before + (after - before) / 2
        middle = middle.replace(microsecond=0)
        if middle <= before:
            break
        if middle.astimezone(tz).utcoffset() == target:
            after = middle
        else:
            before = middle
    return after


def _instants(wall: datetime, tz: tzinfo, every_hour: bool) -> list[datetime]:
    """The UTC instants at which a (naive) wall-clock time of ``tz`` fires; see the module."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    if first.astimezone(tz).replace(tzinfo=None) == wall:  # shown twice: the clock went back
        return [first, second] if every_hour else [first]
    # Skipped (the clock went forward): fold=1 gives the earlier instant, before the gap.
    low, high = sorted((first, second))
    return [_transition(tz, low, high)]


def cron_ticks(
    expression: str,
    tz: tzinfo,
    after: datetime,
    until: datetime,
    *,
    every_hour: bool | None = None,
) -> list[datetime]:
    """The instants (UTC, sorted) in ``(after, until]`` at which the expression fires in ``tz``."""
    after, until = _utc(after), _utc(until)
    if until <= after:
        return []
    if every_hour is None:
        every_hour = validate_cron(expression).every_hour
    offsets = _offsets(tz, after, until)
    # Wall-clock times are iterated as UTC datetimes: pure calendar arithmetic, no DST.
    low = (after + offsets[0]).replace(tzinfo=UTC) - timedelta(seconds=1)
    high = (until + offsets[-1]).replace(tzinfo=UTC)
    cron = croniter(expression, low)
    found: set[datetime] = set()
    while True:
        try:
            wall: datetime = cron.get_next(datetime)
        except CroniterBadDateError:
            break
        if wall > high:
            break
        for instant in _instants(wall.replace(tzinfo=None), tz, every_hour):
            if after < instant <= until:
                found.add(instant)
    return sorted(found)


# -- schedules and ticks (pure) ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PeriodicTask:
    """A task with a cron schedule: what ``@app.periodic(...)`` declares."""

    task: Task[Any]
    cron: str
    periodic_id: str
    timezone: tzinfo
    max_delay: timedelta
    #: Fixed keyword arguments of every job of this schedule (``timestamp`` is added).
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    has_seconds: bool = False
    every_hour: bool = False

    @property
    def name(self) -> str:
        return self.task.name

    def ticks(self, after: datetime, until: datetime) -> list[datetime]:
        """This schedule's ticks in ``(after, until]``, as UTC datetimes."""
        return cron_ticks(self.cron, self.timezone, after, until, every_hour=self.every_hour)

    def next_tick(self, after: datetime, within: timedelta) -> datetime | None:
        """The first tick after ``after`` and at most ``within`` later, if any."""
        found = self.ticks(after, after + within)
        return found[0] if found else None

    def arguments(self, tick: datetime) -> dict[str, Any]:
        return {**self.kwargs, "timestamp": int(tick.timestamp())}

    def __repr__(self) -> str:
        pid = f" periodic_id={self.periodic_id!r}" if self.periodic_id else ""
        return f"<pgtq.PeriodicTask {self.name!r} cron={self.cron!r}{pid} tz={self.timezone}>"


@dataclass(frozen=True, eq=False)
class Tick:
    """One tick of one schedule: the job to defer."""

    periodic: PeriodicTask
    at: datetime  # UTC

    @property
    def timestamp(self) -> int:
        """Epoch seconds of the tick: the task's ``timestamp`` argument."""
        return int(self.at.timestamp())


def declare(
    app: App,
    task: Task[Any],
    *,
    cron: str,
    periodic_id: str = "",
    timezone: str | tzinfo = "UTC",
    max_delay: timedelta | float = DEFAULT_MAX_DELAY,
    kwargs: Mapping[str, Any] | None = None,
) -> PeriodicTask:
    """Check a schedule and add it to ``app.periodic_tasks`` (what ``app.periodic`` does)."""
    if not isinstance(task, Task):
        raise ConfigurationError(
            f"@app.periodic(cron={cron!r}) applies to a task: put it above @app.task(...), "
            f"got {task!r}"
        )
    if task.app is not app:
        raise ConfigurationError(f"task {task.name!r} is registered on another app")
    info = validate_cron(cron)
    where = f"periodic task {task.name!r}" + (f" ({periodic_id!r})" if periodic_id else "")
    if not isinstance(periodic_id, str):
        raise ConfigurationError(f"{where}: periodic_id must be a string")
    zone = to_timezone(timezone)
    delay = max_delay if isinstance(max_delay, timedelta) else timedelta(seconds=max_delay)
    if delay <= timedelta(0):
        raise ConfigurationError(f"{where}: max_delay must be positive, got {max_delay!r}")
    fixed = dict(kwargs or {})
    if "timestamp" in fixed:
        raise ConfigurationError(f"{where}: 'timestamp' is given by each tick, not by kwargs")
    try:
        task.check_arguments({**fixed, "timestamp": 0})
        dumps(fixed)
    except InvalidArguments as exc:
        raise ConfigurationError(
            f"{where} must accept `timestamp: int` (the tick, in epoch seconds) and the "
            f"kwargs {sorted(fixed)}: {exc}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{where}: kwargs must be JSON-serializable: {exc}") from None
    for existing in app.periodic_tasks:
        if (existing.name, existing.periodic_id) == (task.name, periodic_id):
            raise ConfigurationError(
                f"{where} already has a schedule ({existing.cron!r}): give each schedule of "
                "a task its own periodic_id"
            )
    periodic = PeriodicTask(
        task=task,
        cron=info.expression,
        periodic_id=periodic_id,
        timezone=zone,
        max_delay=delay,
        kwargs=fixed,
        has_seconds=info.has_seconds,
        every_hour=info.every_hour,
    )
    app.periodic_tasks.append(periodic)
    return periodic


def due_ticks(
    periodic_tasks: Iterable[PeriodicTask], *, now: datetime, since: datetime | None = None
) -> list[Tick]:
    """Ticks in ``(since, now]``, without those older than their schedule's ``max_delay``.

    With ``since=None`` (a scheduler that just started), every schedule looks back its
    ``max_delay``. A tick exactly ``max_delay`` old is still due.
    """
    now = _utc(now)
    found: list[Tick] = []
    for periodic in periodic_tasks:
        oldest = now - periodic.max_delay - _ONE_MICROSECOND  # (oldest, now]: age <= max_delay
        start = oldest if since is None else max(_utc(since), oldest)
        found.extend(Tick(periodic, at) for at in periodic.ticks(start, now))
    found.sort(key=lambda t: (t.at, t.periodic.name, t.periodic.periodic_id))
    return found


def tick_rows(ticks: Iterable[Tick]) -> statements.TickRows:
    """Encode ticks as the jobs they become: queue and priority are the task's defaults."""
    rows = statements.TickRows.empty()
    for tick in ticks:
        p = tick.periodic
        options = p.task.defaults
        rows.jobs.queue.append(options.queue)
        rows.jobs.task_name.append(p.name)
        rows.jobs.args.append(dumps(p.arguments(tick.at)))
        rows.jobs.priority.append(options.priority)
        rows.jobs.scheduled_at.append(None)
        rows.jobs.lock.append(None)
        rows.jobs.queueing_lock.append(None)
        rows.jobs.concurrency_key.append(None)
        rows.jobs.trace_context.append(None)
        rows.periodic_id.append(p.periodic_id)
        rows.tick_at.append(tick.at)
    return rows


def _retention(periodic_tasks: Sequence[PeriodicTask]) -> timedelta:
    longest = max((p.max_delay for p in periodic_tasks), default=timedelta(0))
    return max(TICK_RETENTION, 2 * longest)


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


def _sleep_time(periodic_tasks: Sequence[PeriodicTask], now: datetime) -> float:
    """Seconds until the next tick of any schedule, at most ``MAX_SLEEP``."""
    within = timedelta(seconds=MAX_SLEEP)
    upcoming = [t for p in periodic_tasks if (t := p.next_tick(now, within)) is not None]
    if not upcoming:
        return MAX_SLEEP
    # A few ms past the tick, so that the clock read on waking is surely past it.
    return min(MAX_SLEEP, max(0.001, (min(upcoming) - now).total_seconds() + 0.005))


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run_scheduler(app: App, *, stop: asyncio.Event | None = None) -> None:
    """Defer the app's periodic tasks' ticks as they come, until ``stop`` is set or cancelled.

    Every worker may run it: each tick is deferred once however many run. On start it looks
    back each schedule's ``max_delay``; then each round defers, in one statement, the ticks
    since its last successful round that are not older than ``max_delay``, and sleeps until
    the next tick (at most ``MAX_SLEEP`` s). A database error is logged and the round is
    tried again after a backoff (the ticks it missed are deferred then, if still young
    enough). Once an hour it forgets ``periodic_ticks`` rows older than a day (or twice the
    largest ``max_delay``).
    """
    periodic_tasks = list(app.periodic_tasks)
    if not periodic_tasks:
        logger.debug("no periodic tasks: the scheduler has nothing to do")
        return
    retention = _retention(periodic_tasks)
    longest = max(p.max_delay for p in periodic_tasks)
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
                gone = await delete_old_ticks_async(app, retention)
            except Exception as exc:
                logger.warning("deleting old periodic ticks failed: %s", exc)
                next_cleanup = time.monotonic() + 60.0
            else:
                logger.debug("deleted %s old periodic tick(s)", gone)
                next_cleanup = time.monotonic() + TICK_CLEANUP_INTERVAL
        if pause is None:
            pause = _sleep_time(periodic_tasks, datetime.now(UTC))
        await _pause(pause, stop)


# -- the builtin clean-up task ----------------------------------------------------------------


def add_cleanup_task(
    app: App,
    *,
    cron: str = "0 * * * *",
    older_than: timedelta | float = timedelta(days=7),
    include_failed: bool = False,
    include_cancelled: bool = False,
    queue: str = "default",
    timezone: str | tzinfo = "UTC",
    name: str = CLEANUP_TASK_NAME,
    results_older_than: timedelta | float | None = None,
) -> Task[Any]:
    """Register a periodic task that deletes jobs finished more than ``older_than`` ago.

    It calls ``app.jobs.delete_old_jobs_async`` (succeeded jobs always; failed ones with
    ``include_failed``; cancelled and aborted ones with ``include_cancelled``) and returns
    ``{"deleted": n}``. Its settings are the job's arguments, so a run is visible in the job
    and can be deferred by hand (``pgtq defer app pgtq.cleanup '{}'``).
    """
    seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    if seconds < 0:
        raise ConfigurationError(f"older_than must not be negative, got {older_than!r}")
    results_seconds = (
        None
        if results_older_than is None
        else results_older_than.total_seconds()
        if isinstance(results_older_than, timedelta)
        else float(results_older_than)
    )
    settings = {
        "older_than": float(seconds),
        "include_failed": include_failed,
        "include_cancelled": include_cancelled,
    }
    if results_seconds is not None:
        settings["results_older_than"] = results_seconds

    async def cleanup(
        timestamp: int = 0,
        older_than: float = float(seconds),
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

    validate_cron(cron)  # before registering anything
    to_timezone(timezone)
    task = app.task(name=name, queue=queue)(cleanup)
    declare(app, task, cron=cron, timezone=timezone, kwargs=settings)
    return task
