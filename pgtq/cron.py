"""Cron schedules, pure: which instants a schedule ticks at, which ticks are due, the rows
they become. No I/O: the scheduler that defers them is :mod:`pgtq.periodic`.

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

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Required, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import (  # type: ignore[import-untyped, unused-ignore]
    CroniterBadDateError,
    croniter,
)

from pgtq import statements
from pgtq.errors import ConfigurationError, InvalidArguments
from pgtq.model import dumps

if TYPE_CHECKING:
    from pgtq.tasks import Task

__all__ = [
    "DEFAULT_MAX_DELAY",
    "MAX_SLEEP",
    "TICK_RETENTION",
    "CronInfo",
    "PeriodicTask",
    "ScheduleOptions",
    "Tick",
    "check_schedule",
    "cron_ticks",
    "describe",
    "due_ticks",
    "next_ticks",
    "retention",
    "schedule",
    "sleep_time",
    "tick_rows",
    "to_timezone",
    "validate_cron",
]

#: Ticks older than this are skipped (a schedule's ``max_delay``, unless given). A scheduler
#: that starts looks back this far, so a restart within it loses no tick.
DEFAULT_MAX_DELAY = timedelta(minutes=10)
#: The scheduler wakes at least this often (seconds), whatever the schedules: a wall clock
#: that jumps, or a daily cron, never leaves it asleep for long.
MAX_SLEEP = 10.0
#: How far ahead :func:`next_ticks` looks at most: 9 years hold two ticks of a cron of 29
#: February even across a century year that skips it (2100).
NEXT_TICKS_HORIZON = timedelta(days=366 * 9)
#: ``periodic_ticks`` rows are kept at least this long (and at least twice the largest
#: ``max_delay``, so a tick a scheduler may still try to defer is always remembered).
TICK_RETENTION = timedelta(days=1)

_ALIASES = frozenset(
    {"@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually"}
)
_RANDOM_OR_HASHED = re.compile(r"[hr](\(\d+-\d+\))?(/\d+)?", re.IGNORECASE)
_HOUR_FIELD = 1  # croniter's order: minute, hour, day, month, day of week, second
_ONE_MICROSECOND = timedelta(microseconds=1)


# -- cron expressions and timezones -----------------------------------------------------------


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


# -- schedules ---------------------------------------------------------------------------------


class ScheduleOptions(TypedDict, total=False):
    """The keyword options of ``@app.periodic(...)`` and ``@bp.periodic(...)``, declared once.

    ``cron``: 5 fields, or 6 with seconds as the sixth (see this module); a bad expression
    raises ``ConfigurationError`` naming it. ``periodic_id`` (default ``""``) tells apart
    several schedules of one task. ``timezone``: the cron's wall clock, an IANA name or a
    tzinfo (default UTC). Ticks more than ``max_delay`` (a timedelta or seconds; default
    :data:`DEFAULT_MAX_DELAY`) old, after an outage, are skipped. ``kwargs``: fixed keyword
    arguments of every job, beside the tick's ``timestamp``.
    """

    cron: Required[str]
    periodic_id: str
    timezone: str | tzinfo
    max_delay: timedelta | float | None
    kwargs: Mapping[str, Any] | None


def check_schedule(options: Mapping[str, Any]) -> CronInfo:
    """Refuse an unknown option or a bad cron where the decorator is written (a blueprint
    applies its schedules later: a mistake must not wait until then)."""
    unknown = sorted(set(options) - ScheduleOptions.__optional_keys__ - {"cron"})
    if unknown:
        known = ", ".join(sorted(ScheduleOptions.__annotations__))
        raise ConfigurationError(f"unknown periodic option(s) {unknown}: the options are {known}")
    if "cron" not in options:
        raise ConfigurationError("a periodic schedule needs cron=...")
    return validate_cron(options["cron"])


def describe(name: str, periodic_id: str) -> str:
    """``periodic task 'report' ('eu')``: a schedule as errors name it."""
    return f"periodic task {name!r}" + (f" ({periodic_id!r})" if periodic_id else "")


def schedule(task: Task[..., Any], options: ScheduleOptions) -> PeriodicTask:
    """Check a schedule of ``task`` (cron, timezone, ``max_delay``, and that the task takes
    ``timestamp`` and the ``kwargs``) and make it; ``ConfigurationError`` naming what is wrong."""
    info = check_schedule(options)
    periodic_id = options.get("periodic_id", "")
    where = describe(task.name, periodic_id)
    if not isinstance(periodic_id, str):
        raise ConfigurationError(f"{where}: periodic_id must be a string")
    zone = to_timezone(options.get("timezone", "UTC"))
    max_delay = options.get("max_delay")
    if max_delay is None:
        max_delay = DEFAULT_MAX_DELAY
    delay = max_delay if isinstance(max_delay, timedelta) else timedelta(seconds=max_delay)
    if delay <= timedelta(0):
        raise ConfigurationError(f"{where}: max_delay must be positive, got {max_delay!r}")
    fixed = dict(options.get("kwargs") or {})
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
    return PeriodicTask(
        task=task,
        cron=info.expression,
        periodic_id=periodic_id,
        timezone=zone,
        max_delay=delay,
        kwargs=fixed,
        has_seconds=info.has_seconds,
        every_hour=info.every_hour,
    )


@dataclass(frozen=True, eq=False)
class PeriodicTask:
    """A task with a cron schedule: what ``@app.periodic(...)`` declares."""

    task: Task[..., Any]
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


# -- ticks -------------------------------------------------------------------------------------


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


def next_ticks(periodic: PeriodicTask, after: datetime, count: int) -> list[datetime]:
    """The schedule's first ``count`` ticks after ``after`` (UTC, sorted), within
    :data:`NEXT_TICKS_HORIZON`. It looks a minute ahead first, then twice as far each time, so
    a per-second schedule never computes a year of ticks, nor a yearly one thousands of
    windows."""
    found: list[datetime] = []
    start, window = _utc(after), timedelta(minutes=1)
    limit = start + NEXT_TICKS_HORIZON
    while len(found) < count and start < limit:
        end = min(start + window, limit)
        found.extend(periodic.ticks(start, end))
        start, window = end, window * 2
    return found[:count]


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


def retention(periodic_tasks: Sequence[PeriodicTask]) -> timedelta:
    """How long ``periodic_ticks`` rows are kept: a tick a scheduler may still try to defer
    is always remembered."""
    longest = max((p.max_delay for p in periodic_tasks), default=timedelta(0))
    return max(TICK_RETENTION, 2 * longest)


def sleep_time(periodic_tasks: Sequence[PeriodicTask], now: datetime) -> float:
    """Seconds until the next tick of any schedule, at most ``MAX_SLEEP``."""
    within = timedelta(seconds=MAX_SLEEP)
    upcoming = [t for p in periodic_tasks if (t := p.next_tick(now, within)) is not None]
    if not upcoming:
        return MAX_SLEEP
    # A few ms past the tick, so that the clock read on waking is surely past it.
    return min(MAX_SLEEP, max(0.001, (min(upcoming) - now).total_seconds() + 0.005))
