"""The ``side`` fixture: one test per behaviour, run once through the sync API and once
through the async one.

A :class:`Side` exposes every twin as a coroutine. The sync side calls the sync method in a
plain thread (as a Flask view or a script would), the async side awaits the async twin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

import pgtq


class Side:
    name = ""

    async def call(self, obj: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def defer(self, deferrer: Any, **kwargs: Any) -> int:
        return int(await self.call(deferrer, "defer", **kwargs))

    async def defer_many(
        self, deferrer: Any, arguments: Iterable[Mapping[str, Any]], **kwargs: Any
    ) -> list[int]:
        return list(await self.call(deferrer, "defer_many", list(arguments), **kwargs))

    async def get(self, app: pgtq.App, job_id: int) -> pgtq.Job | None:
        job: pgtq.Job | None = await self.call(app.jobs, "get", job_id)
        return job

    async def wait(self, app: pgtq.App, job_id: int, timeout: float | None = 10) -> Any:
        return await self.call(app.jobs, "wait", job_id, timeout=timeout)

    async def abort(self, app: pgtq.App, job_id: int) -> Any:
        return await self.call(app.jobs, "abort", job_id)

    async def retry(self, app: pgtq.App, job_id: int) -> Any:
        return await self.call(app.jobs, "retry", job_id)

    async def migrate(self, app: pgtq.App) -> None:
        await self.call(app, "migrate")

    async def run_worker(self, app: pgtq.App, **options: Any) -> Any:
        raise NotImplementedError


class SyncSide(Side):
    name = "sync"

    async def call(self, obj: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(obj, method), *args, **kwargs)

    async def run_worker(self, app: pgtq.App, **options: Any) -> Any:
        options.setdefault("install_signal_handlers", False)
        return await asyncio.to_thread(app.run_worker, **options)


class AsyncSide(Side):
    name = "async"

    async def call(self, obj: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return await getattr(obj, method + "_async")(*args, **kwargs)

    async def run_worker(self, app: pgtq.App, **options: Any) -> Any:
        return await app.run_worker_async(**options)


@pytest.fixture(params=[SyncSide(), AsyncSide()], ids=lambda s: s.name)
def side(request: pytest.FixtureRequest) -> Side:
    side: Side = request.param
    return side
