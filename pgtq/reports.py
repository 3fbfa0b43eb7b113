"""What the operations API reports: queue statistics, live workers, queues. Plain data, no I/O.

``app.jobs.stats()`` returns a :class:`Stats`; ``app.queues.list()`` returns
:class:`QueueInfo` rows. ``statements`` builds them from rows, the CLI, the dashboard and the
metrics read them. Like ``pgtq.model`` it imports nothing of pgtq's but the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from pgtq.model import Status

__all__ = [
    "COUNTED_STATUSES",
    "NO_DATA",
    "STALE_AFTER",
    "PeriodicInfo",
    "QueueInfo",
    "QueueStats",
    "RunningJob",
    "ScheduleState",
    "Stats",
    "Throughput",
    "ThroughputBucket",
    "WorkerInfo",
    "duration",
    "idle_queue",
]

#: What the dashboards show where there is no data, which is not zero.
NO_DATA = "\N{EN DASH}"

_UNITS = (("s", 1.0, 60.0), ("min", 60.0, 3600.0), ("h", 3600.0, 86400.0), ("d", 86400.0, None))


def duration(seconds: float | None, *, decimals: int = 1) -> str:
    """A span of seconds as both dashboards show it ("4.5 s", "6.7 min", "2.0 h", "1.5 d"):
    seconds and minutes with ``decimals``, hours and days with one."""
    if seconds is None:
        return NO_DATA
    for unit, size, limit in _UNITS:
        if limit is None or seconds < limit:
            places = decimals if size < 3600 else 1
            return f"{seconds / size:.{places}f} {unit}"
    raise AssertionError("unreachable: the last unit has no limit")


#: The statuses ``stats()`` counts. Succeeded jobs are left out on purpose: on a table that
#: keeps its history they are nearly every row, and counting them is a scan of the whole
#: table (``app.jobs.counts()`` does it when you need the exact total); the rates tell how
#: fast jobs succeed.
COUNTED_STATUSES: tuple[Status, ...] = (
    Status.TODO,
    Status.DOING,
    Status.FAILED,
    Status.ABORTED,
    Status.CANCELLED,
)

#: A worker beats every 10 s: one silent for longer than this is shown as stale.
STALE_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue, as ``stats()`` saw it."""

    name: str
    #: Jobs per status, for each of :data:`COUNTED_STATUSES` (0 when none).
    counts: Mapping[Status, int]
    #: Seconds the oldest due waiting job has waited; None when no job is due.
    oldest_waiting: float | None = None
    #: Jobs finished per second over the window; None (not 0) when none finished in it.
    rate: float | None = None
    paused: bool = False

    @property
    def waiting(self) -> int:
        return self.counts.get(Status.TODO, 0)

    @property
    def doing(self) -> int:
        return self.counts.get(Status.DOING, 0)

    @property
    def failed(self) -> int:
        return self.counts.get(Status.FAILED, 0)


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job a worker is running (status ``doing``)."""

    id: int
    task_name: str
    queue: str
    started_at: datetime | None


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker's row and the jobs it runs. Ages are measured by the database's clock."""

    id: str
    hostname: str
    pid: int
    queues: tuple[str, ...] | None  # None: every queue
    started_at: datetime
    last_heartbeat: datetime
    heartbeat_age: float
    running: tuple[RunningJob, ...] = ()

    def is_alive(self, stale_after: float = STALE_AFTER) -> bool:
        """Whether the worker beat recently (a dead one stays listed until it is rescued)."""
        return self.heartbeat_age <= stale_after


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of the queues: counts, waiting times, throughput and workers."""

    #: Seconds over which the rates are measured (finished jobs, by ``finished_at``).
    window: float
    queues: Mapping[str, QueueStats] = field(default_factory=dict)
    #: Jobs per second per (queue, task) over the window; a pair is ABSENT when none of its
    #: jobs finished in the window, never 0.
    rates: Mapping[tuple[str, str], float] = field(default_factory=dict)
    workers: tuple[WorkerInfo, ...] = ()

    def rate(self, queue: str | None = None, task: str | None = None) -> float | None:
        """Jobs per second of a queue, a task, both or everything; None when there is no data."""
        picked = [
            r
            for (q, t), r in self.rates.items()
            if (queue is None or q == queue) and (task is None or t == task)
        ]
        return sum(picked) if picked else None

    def live_workers(self, stale_after: float = STALE_AFTER) -> tuple[WorkerInfo, ...]:
        return tuple(w for w in self.workers if w.is_alive(stale_after))

    def count(self, status: Status, queue: str | None = None) -> int:
        """Jobs with a status (one of :data:`COUNTED_STATUSES`), in a queue or in all."""
        return sum(q.counts.get(status, 0) for q in self.queues.values() if queue in (None, q.name))

    def with_queues(self, names: Iterable[str]) -> Stats:
        """These stats with every queue of ``names`` too, by name: one with no job shows its
        zero counts (an idle queue is information, not a gap)."""
        queues = dict(self.queues)
        for name in names:
            queues.setdefault(name, idle_queue(name))
        return replace(self, queues={name: queues[name] for name in sorted(queues)})


def idle_queue(name: str) -> QueueStats:
    """A queue with no job in any of :data:`COUNTED_STATUSES` and none finished lately."""
    return QueueStats(name=name, counts=dict.fromkeys(COUNTED_STATUSES, 0))


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """A queue ``app.queues.list()`` knows: paused, resumed or limited once, or holding
    waiting or running jobs (``app.queues.stats()`` shows every known queue with its counts)."""

    name: str
    paused: bool
    paused_at: datetime | None


@dataclass(frozen=True, slots=True)
class ThroughputBucket:
    """Jobs that ended in one bucket of time, by final status (cancelled ones are not counted:
    they never ran)."""

    start: datetime
    counts: Mapping[Status, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class Throughput:
    """``app.jobs.throughput()``: jobs that ended per bucket of ``bucket`` seconds over the last
    ``window`` seconds, oldest bucket first, every bucket present (empty ones too)."""

    window: float
    bucket: float
    buckets: tuple[ThroughputBucket, ...] = ()

    @property
    def total(self) -> int:
        return sum(b.total for b in self.buckets)

    def count(self, status: Status) -> int:
        return sum(b.counts.get(status, 0) for b in self.buckets)


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """What the database holds about one periodic schedule (``app.periodic.list()`` adds
    what the code declares): its run-time state (pgtq_0007) and its last tick."""

    task_name: str
    periodic_id: str
    paused: bool = False
    #: Since when it is paused (None when it is not).
    paused_at: datetime | None = None
    #: When it was last resumed: ticks before it are never deferred (no backfill).
    resumed_at: datetime | None = None
    #: The last ``run_now``: when, and the job it deferred.
    run_now_at: datetime | None = None
    run_now_job_id: int | None = None
    #: The last tick a scheduler deferred (within the ticks' retention), and its job.
    last_tick: datetime | None = None
    last_job_id: int | None = None


@dataclass(frozen=True, slots=True)
class PeriodicInfo:
    """A schedule of the app, as ``app.periodic.list()`` reports it: what the code declares
    (cron, time zone, the next ticks, computed here) and what the database holds (paused,
    the last tick, the last run now)."""

    task_name: str
    periodic_id: str
    cron: str
    #: The cron's time zone (an IANA name, or the tzinfo's text).
    timezone: str
    #: The schedule's next ticks (UTC), whether or not it is paused.
    next_ticks: tuple[datetime, ...]
    paused: bool
    paused_at: datetime | None
    resumed_at: datetime | None
    last_tick: datetime | None
    last_job_id: int | None
    run_now_at: datetime | None
    run_now_job_id: int | None
    #: The fixed keyword arguments of each job (``timestamp`` is added per tick).
    kwargs: Mapping[str, object] = field(default_factory=dict)

    @property
    def next_tick(self) -> datetime | None:
        return self.next_ticks[0] if self.next_ticks else None
