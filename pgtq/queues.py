"""``app.queues``: pause and resume queues, from sync or async code.

A paused queue keeps its jobs and takes new ones; workers just stop claiming them until it is
resumed (jobs already running finish). Resuming wakes the workers at once with a NOTIFY.
"""

from __future__ import annotations

import builtins
import math
from typing import TYPE_CHECKING

from pgtq import statements
from pgtq.jobs import InvalidFilter, check_integer, check_text
from pgtq.limits import parse_rate
from pgtq.reports import QueueInfo

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = ["QueueInfo", "QueueManager"]


class QueueManager:
    """``app.queues``: every twin is one query from ``pgtq.statements``."""

    def __init__(self, app: App) -> None:
        self._app = app

    @property
    def _s(self) -> statements.Statements:
        return self._app.statements

    def pause(self, name: str) -> bool:
        """Stop workers from claiming the queue's jobs. False if it was already paused."""
        return self._app.sync.run(statements.pause_queue(self._s, _queue_name(name)))

    async def pause_async(self, name: str) -> bool:
        query = statements.pause_queue(self._s, _queue_name(name))
        return await self._app.async_connector().run(query)

    def resume(self, name: str) -> bool:
        """Let workers claim the queue's jobs again. False if it was not paused."""
        return self._app.sync.run(statements.resume_queue(self._s, _queue_name(name)))

    async def resume_async(self, name: str) -> bool:
        query = statements.resume_queue(self._s, _queue_name(name))
        return await self._app.async_connector().run(query)

    def list(self) -> builtins.list[QueueInfo]:
        """Queues ever paused, and queues with waiting or running jobs, by name."""
        return self._app.sync.run(statements.list_queues(self._s))

    async def list_async(self) -> builtins.list[QueueInfo]:
        return await self._app.async_connector().run(statements.list_queues(self._s))

    def set_limits(
        self, name: str, *, concurrency: int | None = None, rate_limit: str | float | None = None
    ) -> None:
        """Fleet-wide limits of the queue, enforced in every worker's claim: at most
        ``concurrency`` jobs running at once, at most ``rate_limit`` starts (``"100/s"``,
        ``"30/m"``). None removes a limit."""
        self._app.sync.run(self._limits_query(name, concurrency, rate_limit))

    async def set_limits_async(
        self, name: str, *, concurrency: int | None = None, rate_limit: str | float | None = None
    ) -> None:
        await self._app.async_connector().run(self._limits_query(name, concurrency, rate_limit))

    def _limits_query(
        self, name: str, concurrency: int | None, rate_limit: str | float | None
    ) -> statements.Query[None]:
        if concurrency is not None:
            concurrency = check_integer("concurrency", concurrency)
            if not 1 <= concurrency <= 2**31 - 1:
                raise InvalidFilter(
                    f"a queue's concurrency must be from 1 (pause it instead) to {2**31 - 1}, "
                    f"got {concurrency}"
                )
        rate = parse_rate(rate_limit)
        if rate is not None and not math.isfinite(rate):
            raise InvalidFilter(f"rate_limit must be finite, got {rate_limit!r}")
        return statements.set_queue_limits(self._s, _queue_name(name), concurrency, rate)


def _queue_name(name: object) -> str:
    """A queue name the ``queues`` table can hold (its primary key is a btree index: at most
    :data:`pgtq.statements.INDEXED_VALUE_LIMIT` bytes), else InvalidFilter."""
    return check_text("queue name", name, max_bytes=statements.INDEXED_VALUE_LIMIT)
