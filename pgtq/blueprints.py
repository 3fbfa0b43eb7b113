"""Blueprints: tasks declared in modules that do not know the app.

::

    # billing/tasks.py
    bp = pgtq.Blueprint()

    @bp.task(queue="billing", aliases=["charge_card"])
    def charge(ctx: pgtq.JobContext, order_id: int) -> None: ...

    # myapp.py
    app = pgtq.App()
    app.add_tasks_from(billing.tasks.bp, namespace="billing")   # billing:charge

A blueprint only records declarations (the keyword options of ``App.task``).
``app.add_tasks_from`` registers them on the app exactly as ``@app.task`` would, so ``defer``,
the worker and the CLI see ordinary tasks. What ``@bp.task`` returns is a
:class:`BlueprintTask`: callable like the function, and deferrable once its blueprint was added
to an app.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Unpack, overload

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from pgtq.errors import ConfigurationError
from pgtq.tasks import DeferItem, Deferrer, Task, TaskOptions, check_task_options

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.cron import ScheduleOptions

__all__ = ["Blueprint", "BlueprintTask", "UnboundTask"]


class UnboundTask(ConfigurationError):
    """A blueprint's task was deferred before the blueprint was added to an app."""


def _qualify(namespace: str | None, name: str) -> str:
    return f"{namespace}:{name}" if namespace else name


def _check_namespace(namespace: str | None) -> None:
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ConfigurationError(f"a namespace must be a non-empty string, got {namespace!r}")


class BlueprintTask:
    """A task declared on a blueprint: call it like its function; defer it once the blueprint
    was added to an app (before that, deferring raises :class:`UnboundTask`).

    Added to several apps, it defers through the one it was added to last; ``task_on(app)``
    gives the task registered on a given app.
    """

    def __init__(self, blueprint: Blueprint, func: Callable[..., Any], name: str) -> None:
        self.blueprint = blueprint
        self.func = func
        #: The name declared on the blueprint (the app's task may be ``namespace:name``).
        self.declared_name = name
        self._bound: Task[..., Any] | None = None
        self._on: weakref.WeakKeyDictionary[App, Task[..., Any]] = weakref.WeakKeyDictionary()
        self.__doc__ = func.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        where = f"bound as {self._bound.name!r}" if self._bound is not None else "not added yet"
        return f"<pgtq.BlueprintTask {self.declared_name!r} {where}>"

    @property
    def is_bound(self) -> bool:
        return self._bound is not None

    @property
    def task(self) -> Task[..., Any]:
        """The app's task this declaration became (the last app it was added to)."""
        if self._bound is None:
            raise UnboundTask(
                f"task {self.declared_name!r} ({self.func.__module__}) is declared on a "
                "blueprint that was not added to an app yet: call "
                "app.add_tasks_from(blueprint, namespace=...) before deferring it"
            )
        return self._bound

    def task_on(self, app: App) -> Task[..., Any]:
        """The task this declaration became on ``app`` (``UnboundTask`` if not added there)."""
        task = self._on.get(app)
        if task is None:
            raise UnboundTask(f"task {self.declared_name!r} was not added to {app!r}")
        return task

    @property
    def name(self) -> str:
        """The bound task's full name (``namespace:name``)."""
        return self.task.name

    def __getattr__(self, attribute: str) -> Any:
        # The bound task's other attributes (queue defaults, retry, ...). Private and dunder
        # lookups (copy, pickle, introspection) and an unbound declaration see a plain
        # AttributeError, so hasattr() and getattr(..., default) keep working.
        if attribute.startswith("_") or self._bound is None:
            where = "" if attribute.startswith("_") else " until its blueprint is added to an app"
            raise AttributeError(
                f"{type(self).__name__} {self.declared_name!r} has no attribute "
                f"{attribute!r}{where}"
            )
        return getattr(self._bound, attribute)

    def configure(self, **options: Any) -> Deferrer[..., Any]:
        return self.task.configure(**options)

    def defer(self, *args: Any, connection: Connection | None = None, **kwargs: Any) -> int:
        return self.task.defer(*args, connection=connection, **kwargs)

    async def defer_async(
        self, *args: Any, connection: AsyncConnection | None = None, **kwargs: Any
    ) -> int:
        return await self.task.defer_async(*args, connection=connection, **kwargs)

    def defer_many(
        self, arguments: Iterable[DeferItem], *, connection: Connection | None = None
    ) -> list[int]:
        return self.task.defer_many(arguments, connection=connection)

    async def defer_many_async(
        self, arguments: Iterable[DeferItem], *, connection: AsyncConnection | None = None
    ) -> list[int]:
        return await self.task.defer_many_async(arguments, connection=connection)


@dataclass(frozen=True)
class _Declaration:
    """One task as a blueprint records it: the name and aliases relative to the blueprint."""

    target: BlueprintTask
    name: str
    aliases: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Schedule:
    target: BlueprintTask
    options: ScheduleOptions


class Blueprint:
    """A collection of task declarations, registered on an app by ``app.add_tasks_from``.

    ``@bp.task(...)`` takes the same keyword options as ``@app.task(...)``. Names (and
    aliases) are checked for clashes within the blueprint when declared, and against the app's
    tasks when added; a clash is an error that names both tasks. A blueprint can include
    another one: ``bp.add_tasks_from(other, namespace="x")``.
    """

    def __init__(self) -> None:
        self._declarations: list[_Declaration] = []
        self._schedules: list[_Schedule] = []

    def __repr__(self) -> str:
        return f"<pgtq.Blueprint tasks={self.names()!r}>"

    def names(self) -> list[str]:
        """The declared names, relative to this blueprint (``namespace:name`` once nested)."""
        return [d.name for d in self._declarations]

    # -- declaring --------------------------------------------------------------------------------

    @overload
    def task(self, func: Callable[..., Any], /) -> BlueprintTask: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        aliases: Sequence[str] = (),
        **options: Unpack[TaskOptions],
    ) -> Callable[[Callable[..., Any]], BlueprintTask]: ...

    def task(  # type: ignore[misc]  # mypy misreads the keyword-only overload (as App.task)
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        aliases: Sequence[str] = (),
        **options: Unpack[TaskOptions],
    ) -> BlueprintTask | Callable[[Callable[..., Any]], BlueprintTask]:
        """Declare a sync or async function as a task of this blueprint (the options of
        ``App.task``: :class:`pgtq.tasks.TaskOptions`); it is registered when the blueprint is
        added to an app, with the options given here (an option not given keeps
        :class:`pgtq.Task`'s default)."""
        declared = dict(options)
        if "middleware" in declared:
            declared["middleware"] = tuple(options["middleware"])

        def declare(f: Callable[..., Any]) -> BlueprintTask:
            task_name = name or f.__name__
            if isinstance(aliases, str):
                raise ConfigurationError(
                    f"task {task_name!r}: aliases takes a list of names, not one string"
                )
            check_task_options(task_name, options)
            target = BlueprintTask(self, f, task_name)
            self._declare(_Declaration(target, task_name, tuple(aliases), declared))
            return target

        return declare(func) if func is not None else declare

    def periodic(
        self, **schedule: Unpack[ScheduleOptions]
    ) -> Callable[[BlueprintTask], BlueprintTask]:
        """``@bp.periodic(cron=...)`` above ``@bp.task(...)``: the schedule of
        ``App.periodic`` (:class:`pgtq.cron.ScheduleOptions`), applied when the blueprint is
        added to an app."""
        from pgtq import periodic

        periodic.check_schedule(schedule)  # a bad expression fails here, where it is written

        def declare(target: BlueprintTask) -> BlueprintTask:
            if not isinstance(target, BlueprintTask) or target.blueprint is not self:
                raise ConfigurationError(
                    f"@bp.periodic(cron={schedule['cron']!r}) applies to a task of the same "
                    f"blueprint: put it above @bp.task(...), got {target!r}"
                )
            self._schedules.append(_Schedule(target, schedule))
            return target

        return declare

    def add_tasks_from(self, blueprint: Blueprint, *, namespace: str | None = None) -> None:
        """Include another blueprint's declarations here, named ``namespace:name``."""
        _check_namespace(namespace)
        if blueprint is self:
            raise ConfigurationError("a blueprint cannot include itself")
        for d in blueprint._declarations:
            self._declare(
                replace(
                    d,
                    name=_qualify(namespace, d.name),
                    aliases=tuple(_qualify(namespace, a) for a in d.aliases),
                )
            )
        self._schedules.extend(blueprint._schedules)

    def _declare(self, declaration: _Declaration) -> None:
        taken = {n: d for d in self._declarations for n in (d.name, *d.aliases)}
        for candidate in (declaration.name, *declaration.aliases):
            if not isinstance(candidate, str) or not candidate:
                raise ConfigurationError(
                    f"task {declaration.name!r}: a task name or alias must be a non-empty "
                    f"string, got {candidate!r}"
                )
            other = taken.get(candidate)
            if other is not None:
                raise ConfigurationError(
                    f"the task name {candidate!r} is already declared on this blueprint "
                    f"(by {_where(other.target.func)}); {_where(declaration.target.func)} asks "
                    "for it too: pass name=... to tell them apart"
                )
        self._declarations.append(declaration)

    # -- registering on an app --------------------------------------------------------------------

    def register_on(self, app: App, *, namespace: str | None = None) -> None:
        """What ``app.add_tasks_from(bp, namespace=...)`` does: register every declaration on
        ``app`` as ``@app.task`` would, all or nothing."""
        _check_namespace(namespace)
        planned = [
            (
                d,
                _qualify(namespace, d.name),
                tuple(_qualify(namespace, a) for a in d.aliases),
            )
            for d in self._declarations
        ]
        # Check every name first, so a clash leaves the app as it was.
        for d, full_name, full_aliases in planned:
            app.check_task_names(full_name, full_aliases, d.target.func)
        registered: list[tuple[Task[..., Any], tuple[str, ...]]] = []
        by_target: dict[BlueprintTask, Task[..., Any]] = {}
        schedules_before = len(app.periodic_tasks)
        try:
            for d, full_name, full_aliases in planned:
                task = app.task(name=full_name, aliases=full_aliases, **d.options)(d.target.func)
                registered.append((task, full_aliases))
                by_target[d.target] = task
            for schedule in self._schedules:
                app.periodic(**schedule.options)(by_target[schedule.target])
        except BaseException:
            for task, full_aliases in registered:
                app.tasks.pop(task.name, None)
                for alias in full_aliases:
                    app.aliases.pop(alias, None)
            del app.periodic_tasks[schedules_before:]
            raise
        for d, _, _ in planned:
            d.target._bound = d.target._on[app] = by_target[d.target]


def _where(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"
