"""``app.periodic``: declare periodic schedules, and steer them at run time, from sync or async
code.

Schedules live in code (``@app.periodic(cron=...)``). What an operator decides about one at
run time lives in the database (``periodic_schedules``, pgtq_0007), so that it holds for every
scheduler of the fleet: ``pause`` (no scheduler defers its ticks), ``resume`` (from now on:
the ticks it skipped while paused are never deferred), ``run_now`` (one job now, beside the
ticks). ``list`` shows both halves.

How often a scheduler reads the state: in every statement that defers ticks, the one it runs
anyway (``Statements.defer_ticks``), so a pause costs the hot loop no round trip and there is
no copy to go stale; once ``pause`` returns, no scheduler of this release defers a tick of
that schedule. A scheduler of a release before pgtq_0007 does not know about pauses.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Unpack

from pgtq import statements
from pgtq.errors import UnknownSchedule
from pgtq.jobs import AppOperations
from pgtq.reports import PeriodicInfo, ScheduleState
from pgtq.tasks import Task

if TYPE_CHECKING:
    from pgtq.cron import PeriodicTask, ScheduleOptions

__all__ = ["NEXT_TICKS", "PeriodicManager", "TaskRef"]

#: How many next ticks ``list`` computes for each schedule.
NEXT_TICKS = 3

#: What names a schedule's task: the task, or its name (or an alias of it).
TaskRef = Task[..., Any] | str


class PeriodicManager(AppOperations):
    """``app.periodic``: the ``@app.periodic(cron=...)`` decorator, and the run-time control of
    the schedules it declares. Every twin is one query from ``pgtq.statements``."""

    def __call__(
        self, **schedule: Unpack[ScheduleOptions]
    ) -> Callable[[Task[..., Any]], Task[..., Any]]:
        """Defer a task at each tick of a cron schedule (``@app.periodic(cron=...)`` above
        ``@app.task(...)``); each tick is deferred once, however many workers run.

        ``schedule``: :class:`pgtq.cron.ScheduleOptions` (cron, periodic_id, timezone,
        max_delay, kwargs). The task gets ``timestamp`` (the tick, in epoch seconds) and
        ``kwargs``. A bad cron expression raises ``ConfigurationError`` naming it.
        """
        from pgtq import periodic

        periodic.check_schedule(schedule)  # a bad expression fails here, where it is written

        def declare(task: Task[..., Any]) -> Task[..., Any]:
            periodic.declare(self._app, task, **schedule)
            return task

        return declare

    def get(self, task: TaskRef, *, periodic_id: str = "") -> PeriodicTask:
        """The app's schedule of ``task`` (a task, its name or an alias) with this periodic id;
        :class:`~pgtq.UnknownSchedule`, naming it and the app's schedules, when there is none."""
        name = task.name if isinstance(task, Task) else task
        found = self._app.lookup_task(name) if isinstance(name, str) else None
        if found is not None:
            name = found.name
        for schedule in self._app.periodic_tasks:
            if (schedule.name, schedule.periodic_id) == (name, periodic_id):
                return schedule
        raise UnknownSchedule(_unknown(self._app.periodic_tasks, name, periodic_id))

    def list(self) -> builtins.list[PeriodicInfo]:
        """The app's schedules, in declaration order: cron, next ticks, last tick, paused."""
        if not self._app.periodic_tasks:
            return []
        return _infos(self._app.periodic_tasks, self._run(self._states_query()))

    async def list_async(self) -> builtins.list[PeriodicInfo]:
        if not self._app.periodic_tasks:
            return []
        return _infos(self._app.periodic_tasks, await self._run_async(self._states_query()))

    def pause(self, task: TaskRef, *, periodic_id: str = "") -> bool:
        """Stop every scheduler from deferring this schedule's ticks (jobs deferred already
        stay). False if it was already paused."""
        return self._run(self._control(statements.pause_schedule, task, periodic_id))

    async def pause_async(self, task: TaskRef, *, periodic_id: str = "") -> bool:
        return await self._run_async(self._control(statements.pause_schedule, task, periodic_id))

    def resume(self, task: TaskRef, *, periodic_id: str = "") -> bool:
        """Defer this schedule's ticks again, from now on: the ticks it skipped while paused
        are not deferred (no burst of late jobs). False if it was not paused."""
        return self._run(self._control(statements.resume_schedule, task, periodic_id))

    async def resume_async(self, task: TaskRef, *, periodic_id: str = "") -> bool:
        return await self._run_async(self._control(statements.resume_schedule, task, periodic_id))

    def run_now(self, task: TaskRef, *, periodic_id: str = "") -> int:
        """Defer one job of this schedule now, as a tick would (its ``timestamp`` is now), even
        while paused; returns its id. It is recorded as the schedule's last run now, not as a
        tick: the scheduled ticks are deferred as before."""
        return self._run(self._run_now_query(task, periodic_id))

    async def run_now_async(self, task: TaskRef, *, periodic_id: str = "") -> int:
        return await self._run_async(self._run_now_query(task, periodic_id))

    # -- the queries -------------------------------------------------------------------------

    def _states_query(self) -> statements.Query[dict[tuple[str, str], ScheduleState]]:
        keys = [(p.name, p.periodic_id) for p in self._app.periodic_tasks]
        return statements.schedule_states(self._s, keys)

    def _control(
        self,
        make: Callable[[statements.Statements, str, str], statements.Query[bool]],
        task: TaskRef,
        periodic_id: str,
    ) -> statements.Query[bool]:
        schedule = self.get(task, periodic_id=periodic_id)  # UnknownSchedule before any I/O
        return make(self._s, schedule.name, schedule.periodic_id)

    def _run_now_query(self, task: TaskRef, periodic_id: str) -> statements.Query[int]:
        from pgtq.cron import Tick, tick_rows

        schedule = self.get(task, periodic_id=periodic_id)
        rows = tick_rows([Tick(schedule, datetime.now(UTC))])
        return statements.run_schedule_now(self._s, rows)


def _unknown(schedules: Sequence[PeriodicTask], name: object, periodic_id: object) -> str:
    """The message of :class:`UnknownSchedule`: what was asked, and what the app has."""
    from pgtq.cron import describe

    asked = (
        describe(name, periodic_id)
        if isinstance(name, str) and isinstance(periodic_id, str)
        else f"periodic task {name!r} ({periodic_id!r})"
    )
    known = ", ".join(describe(p.name, p.periodic_id) for p in schedules)
    return f"the app declares no schedule {asked} (its schedules: {known or 'none'})"


def _infos(
    schedules: Sequence[PeriodicTask], states: dict[tuple[str, str], ScheduleState]
) -> builtins.list[PeriodicInfo]:
    """The schedules as code declares them, with what the database holds (pure but for the
    clock: the next ticks count from now)."""
    from pgtq.cron import next_ticks

    now = datetime.now(UTC)
    infos = []
    for p in schedules:
        state = states.get((p.name, p.periodic_id)) or ScheduleState(p.name, p.periodic_id)
        infos.append(
            PeriodicInfo(
                task_name=p.name,
                periodic_id=p.periodic_id,
                cron=p.cron,
                timezone=str(p.timezone),
                next_ticks=tuple(next_ticks(p, now, NEXT_TICKS)),
                paused=state.paused,
                paused_at=state.paused_at,
                resumed_at=state.resumed_at,
                last_tick=state.last_tick,
                last_job_id=state.last_job_id,
                run_now_at=state.run_now_at,
                run_now_job_id=state.run_now_job_id,
                kwargs=dict(p.kwargs),
            )
        )
    return infos
