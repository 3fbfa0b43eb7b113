"""Worker factories as a user writes them (``pgtq worker tests.apps.factories:NAME -- LOG``).

Each one writes what happens to the file named after ``--``: when its context is entered and
exited, and each job, with the event loop each ran on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pgtq


def write(log: Path, line: str) -> None:
    with log.open("a") as f:
        f.write(line + "\n")


def loop_id() -> str:
    try:
        return str(id(asyncio.get_running_loop()))
    except RuntimeError:
        return "no loop"


def build(log: Path, label: str) -> pgtq.App:
    app = pgtq.App()  # the database comes from PGTQ_DSN / --dsn

    @app.task
    async def note(text: str) -> None:
        write(log, f"job {text} loop {loop_id()}")

    write(log, f"built {label}")
    return app


def make_app(log: str, label: str = "plain") -> pgtq.App:
    return build(Path(log), label)


@contextlib.contextmanager
def app_context(log: str) -> Iterator[pgtq.App]:
    path = Path(log)
    write(path, "enter sync")
    try:
        yield build(path, "sync")
    finally:
        write(path, "exit sync")


@contextlib.asynccontextmanager
async def app_async_context(log: str) -> AsyncIterator[pgtq.App]:
    path = Path(log)
    write(path, f"enter async loop {loop_id()}")
    try:
        yield build(path, "async")
    finally:
        await asyncio.sleep(0)  # an async clean-up (closing a client, a pool)
        write(path, f"exit async loop {loop_id()}")


def returns_a_number(log: str) -> int:
    return 42


async def async_factory(log: str) -> pgtq.App:
    return build(Path(log), "coroutine")


class Resources:
    """The worker's typed state: what the factory opened, reached by tasks as ``ctx.state``."""

    def __init__(self, client: list[str]) -> None:
        self.client = client  # stands for an HTTP client, a connection pool, ...


@contextlib.asynccontextmanager
async def with_resources(log: str) -> AsyncIterator[pgtq.App]:
    """Opens a resource once per worker, on the worker's loop, and closes it after it stops."""
    path = Path(log)
    client: list[str] = []
    write(path, "client opened")
    app = pgtq.App()

    @app.task
    async def fetch(ctx: pgtq.JobContext[Resources], url: str) -> int:
        ctx.state.client.append(url)
        write(path, f"fetched {url} with the shared client")
        return len(ctx.state.client)

    def started(state: Resources) -> None:  # a startup hook gets the same state
        write(path, f"worker started, client shared: {state.client is client}")

    app.worker_options.update(state=Resources(client), startup_hooks=[started])
    try:
        yield app
    finally:
        write(path, f"client closed after {len(client)} request(s)")
