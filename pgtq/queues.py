"""``app.queues``: pause and resume queues, from sync or async code.

A paused queue keeps its jobs and takes new ones; workers just stop claiming them until it is
resumed (jobs already running finish). Resuming wakes the workers at once with a NOTIFY.
"""

from __future__ import annotations

import builtins
import math

from pgtq import statements
from pgtq.jobs import AppOperations, InvalidFilter, check_integer, check_text
from pgtq.limits import parse_rate
from pgtq.reports import QueueInfo

__all__ = ["QueueInfo", "QueueManager"]


class QueueManager(AppOperations):
    """``app.queues``: every twin is one query from ``pgtq.statements``."""

    def pause(self, name: str) -> bool:
        """Stop workers from claiming the queue's jobs. False if it was already paused."""
        return self._run(statements.pause_queue(self._s, _queue_name(name)))

    async def pause_async(self, name: str) -> bool:
        return await self._run_async(statements.pause_queue(self._s, _queue_name(name)))

    def resume(self, name: str) -> bool:
        """Let workers claim the queue's jobs again. False if it was not paused."""
        return self._run(statements.resume_queue(self._s, _queue_name(name)))

    async def resume_async(self, name: str) -> bool:
        return await self._run_async(statements.resume_queue(self._s, _queue_name(name)))

    def list(self) -> builtins.list[QueueInfo]:
        """Queues ever paused, and queues with waiting or running jobs, by name."""
        return self._run(statements.list_queues(self._s))

    async def list_async(self) -> builtins.list[QueueInfo]:
        return await self._run_async(statements.list_queues(self._s))

    def set_limits(
        self, name: str, *, concurrency: int | None = None, rate_limit: str | float | None = None
    ) -> None:
        """Fleet-wide limits of the queue, enforced in every worker's claim: at most
        ``concurrency`` jobs running at once, at most ``rate_limit`` starts (``"100/s"``,
        ``"30/m"``). None removes a limit."""
        self._run(self._limits_query(name, concurrency, rate_limit))

    async def set_limits_async(
        self, name: str, *, concurrency: int | None = None, rate_limit: str | float | None = None
    ) -> None:
        await self._run_async(self._limits_query(name, concurrency, rate_limit))

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
