"""Worker factories: what ``pgtq worker MODULE:ATTRIBUTE`` accepts, typed as :data:`AppFactory`.

``ATTRIBUTE`` is one of

- an :class:`~pgtq.App`;
- a callable returning an ``App``;
- a callable returning a context manager of an ``App`` (``@contextlib.contextmanager``);
- a callable returning an async context manager of an ``App``
  (``@contextlib.asynccontextmanager``).

A callable is called with the command line's arguments after ``--``, as strings. A context
manager is entered before the worker starts and exited after it stops (SIGTERM included: the
worker shuts down gracefully, returns, then the context exits). An async one is entered on the
worker's own event loop, so what it opens (an ``AsyncEngine``, an HTTP client) belongs to the
loop the tasks run on.

From Python: ``with open_app(make_app) as app`` / ``async with open_app_async(make_app) as app``,
or ``run_worker(make_app, concurrency=5)`` to do what the command does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeAlias

from pgtq.app import App
from pgtq.errors import ConfigurationError
from pgtq.eventloop import new_event_loop

if TYPE_CHECKING:
    from pgtq.worker import WorkerStats

__all__ = [
    "AppFactory",
    "Opened",
    "open_app",
    "open_app_async",
    "resolve_app",
    "run_worker",
    "run_worker_async",
]

#: What a factory may give: an app, or a context (sync or async) that yields one.
Opened: TypeAlias = App | AbstractContextManager[App] | AbstractAsyncContextManager[App]

#: What ``pgtq worker MODULE:ATTRIBUTE`` accepts: an app, or a callable returning an app or a
#: context manager (sync or async) of one. Arguments after ``--`` are passed to the callable.
AppFactory: TypeAlias = (
    App
    | Callable[..., App]
    | Callable[..., AbstractContextManager[App]]
    | Callable[..., AbstractAsyncContextManager[App]]
)


def _describe(factory: object) -> str:
    name = getattr(factory, "__qualname__", None) or type(factory).__name__
    module = getattr(factory, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def resolve_app(factory: AppFactory, *args: Any) -> Opened:
    """Call the factory (unless it is an app) and check what it gave; enter nothing yet."""
    if isinstance(factory, App):
        if args:
            raise ConfigurationError(
                f"arguments {list(args)!r} were given, but only a factory takes arguments and "
                "this is a pgtq.App: make it a function that returns the app"
            )
        return factory
    if not callable(factory):
        raise ConfigurationError(
            f"{_describe(factory)} is not a pgtq.App nor a factory of one "
            f"(got {type(factory).__name__})"
        )
    result: object = factory(*args)
    if isinstance(result, App | AbstractContextManager | AbstractAsyncContextManager):
        return result
    hint = ""
    if asyncio.iscoroutine(result):
        result.close()
        hint = (
            ": an async factory must return an async context manager "
            "(decorate it with @contextlib.asynccontextmanager and yield the app)"
        )
    raise ConfigurationError(
        f"the factory {_describe(factory)} returned {type(result).__name__}, not a pgtq.App "
        f"nor a context manager of one{hint}"
    )


def _checked(value: object, factory: AppFactory) -> App:
    if not isinstance(value, App):
        raise ConfigurationError(
            f"the context manager of {_describe(factory)} gave {type(value).__name__}, "
            "not a pgtq.App: yield the app (or return it from __enter__)"
        )
    return value


@contextlib.contextmanager
def open_app(factory: AppFactory, *args: Any) -> Iterator[App]:
    """The factory's app, its context entered for the duration of the ``with`` block.

    An async context manager cannot be entered here: use :func:`open_app_async`.
    """
    with _enter(resolve_app(factory, *args), factory) as app:
        yield app


@contextlib.asynccontextmanager
async def open_app_async(factory: AppFactory, *args: Any) -> AsyncIterator[App]:
    """The factory's app, its context (async or sync) entered for the ``async with`` block."""
    async with _enter_async(resolve_app(factory, *args), factory) as app:
        yield app


@contextlib.contextmanager
def _enter(opened: Opened, factory: AppFactory) -> Iterator[App]:
    if isinstance(opened, App):
        yield opened
    elif isinstance(opened, AbstractContextManager):
        with opened as app:
            yield _checked(app, factory)
    else:
        raise ConfigurationError(
            f"the factory {_describe(factory)} returned an async context manager: open it with "
            "open_app_async() on the loop the worker runs on (`pgtq worker` does)"
        )


@contextlib.asynccontextmanager
async def _enter_async(opened: Opened, factory: AppFactory) -> AsyncIterator[App]:
    if isinstance(opened, App):
        yield opened
    elif isinstance(opened, AbstractAsyncContextManager):
        async with opened as app:
            yield _checked(app, factory)
    else:
        with opened as app:
            yield _checked(app, factory)


def run_worker(
    factory: AppFactory,
    *args: Any,
    on_open: Callable[[App], object] | None = None,
    **options: Any,
) -> WorkerStats:
    """Open the factory's app, run a worker on it until it stops, then close the context.

    What ``pgtq worker`` does. ``options`` are ``App.run_worker``'s (signal handlers are
    installed unless ``install_signal_handlers=False``): on SIGTERM the worker shuts down
    gracefully and returns, then the context exits. ``on_open(app)`` runs once the app is
    open, before the worker starts.
    """
    options.setdefault("install_signal_handlers", True)
    opened = resolve_app(factory, *args)
    if isinstance(opened, App) or not isinstance(opened, AbstractAsyncContextManager):
        with _enter(opened, factory) as app:
            try:
                if on_open is not None:
                    on_open(app)
                return app.run_worker(**options)
            finally:
                app.close()

    async def main() -> WorkerStats:
        async with _enter_async(opened, factory) as app:
            try:
                if on_open is not None:
                    on_open(app)
                return await app.run_worker_async(**options)
            finally:
                await app.close_loop_connector()
                app.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main())


async def run_worker_async(factory: AppFactory, *args: Any, **options: Any) -> WorkerStats:
    """:func:`run_worker` on the running loop: cancelling it shuts the worker down
    gracefully, then the context exits."""
    async with open_app_async(factory, *args) as app:
        return await app.run_worker_async(**options)
