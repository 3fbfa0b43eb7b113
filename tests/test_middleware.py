"""Task middleware and worker hooks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import pgtq
from tests.sides import Side


async def test_middleware_wraps_tasks_of_its_own_kind(side: Side, dsn: str) -> None:
    calls: list[tuple[str, str, str]] = []

    def sync_outer(ctx: pgtq.JobContext, call_next: Callable[[], Any]) -> Any:
        calls.append(("app-sync", ctx.task_name, threading.current_thread().name))
        return call_next()

    async def async_outer(ctx: pgtq.JobContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        calls.append(("app-async", ctx.task_name, threading.current_thread().name))
        return await call_next()

    def doubling(ctx: pgtq.JobContext, call_next: Callable[[], Any]) -> Any:
        return call_next() * 2

    async def tagging(ctx: pgtq.JobContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        return {"tagged": await call_next()}

    app = pgtq.App(dsn, middleware=[sync_outer, async_outer])

    @app.task(middleware=[doubling])
    def number() -> int:
        return 21

    @app.task(middleware=[tagging])
    async def word() -> str:
        return "hi"

    n = await side.defer(number)
    w = await side.defer(word)
    await side.run_worker(app, wait=False)
    assert await side.wait(app, n) == 42
    assert await side.wait(app, w) == {"tagged": "hi"}
    kinds = {(kind, task) for kind, task, _ in calls}
    assert kinds == {("app-sync", "number"), ("app-async", "word")}
    threads = {kind: thread for kind, _, thread in calls}
    assert threads["app-sync"].startswith("pgtq-job")  # in the task's thread
    assert not threads["app-async"].startswith("pgtq-job")  # on the loop
    await app.close_async()


def test_a_middleware_of_the_wrong_kind_is_refused_at_declaration() -> None:
    app = pgtq.App("postgresql://localhost/x")

    async def async_mw(ctx: pgtq.JobContext, call_next: Callable[[], Any]) -> Any:
        return await call_next()

    with pytest.raises(pgtq.ConfigurationError, match="task 'plain' is sync"):

        @app.task(middleware=[async_mw])
        def plain() -> None: ...


async def test_startup_and_shutdown_hooks_run_sync_or_async(side: Side, app: pgtq.App) -> None:
    events: list[str] = []

    def open_sync() -> None:
        events.append("sync startup")

    async def open_async() -> None:
        await asyncio.sleep(0)
        events.append("async startup")

    async def close_async() -> None:
        events.append("async shutdown")

    @app.task
    def work() -> None:
        events.append("job")

    await side.defer(work)
    await side.run_worker(
        app, wait=False, startup_hooks=[open_sync, open_async], shutdown_hooks=[close_async]
    )
    assert events == ["sync startup", "async startup", "job", "async shutdown"]


class Resources:
    """A typed per-worker state, as a user would write it."""

    client: list[str]


async def test_hooks_open_resources_on_the_worker_state_for_every_task(
    side: Side, app: pgtq.App
) -> None:
    opened: list[Resources] = []

    async def open_client(state: Resources) -> None:
        state.client = []
        opened.append(state)

    def close_client(state: Resources) -> None:
        state.client.append("closed")

    @app.task
    def use_sync(ctx: pgtq.JobContext[Resources], n: int) -> None:
        ctx.state.client.append(f"sync {n}")

    @app.task
    async def use_async(ctx: pgtq.JobContext[Resources], n: int) -> None:
        ctx.state.client.append(f"async {n}")

    await side.defer(use_sync, n=1)
    await side.defer(use_async, n=2)
    await side.run_worker(
        app,
        wait=False,
        state=Resources(),
        startup_hooks=[open_client],
        shutdown_hooks=[close_client],
    )
    [state] = opened
    assert sorted(state.client[:2]) == ["async 2", "sync 1"] and state.client[2] == "closed"
