"""``app.queues``: pause and resume queues, from sync or async code; the known queues.

A paused queue keeps its jobs and takes new ones; workers just stop claiming them until it is
resumed (jobs already running finish). Resuming wakes the workers at once with a NOTIFY.

The *known* queues are the queues the app's tasks declare (``@app.task(queue=...)``) and those
the database has: the ``queues`` table's (paused, resumed or limited once) and those of jobs
waiting, running, ended badly or finished lately. A typo in a queue name is none of them:
``pgtq queues pause`` refuses it (unless ``--create``), a worker asked for it warns at start.
"""

from __future__ import annotations

import builtins
import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pgtq import statements
from pgtq.jobs import AppOperations, InvalidFilter, check_integer, check_text
from pgtq.limits import parse_rate
from pgtq.reports import QueueInfo, Stats

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = [
    "QueueInfo",
    "QueueManager",
    "at_worker_start",
    "describe_known",
    "unknown_queues",
]

#: The worker's logger: the warning about unknown queues is a line of its start.
worker_logger = logging.getLogger("pgtq.worker")


class QueueManager(AppOperations):
    """``app.queues``: every twin is one query from ``pgtq.statements`` (``stats`` adds the
    declared queues to ``app.jobs.stats()``)."""

    def declared(self) -> builtins.list[str]:
        """The queues the app's tasks declare, by name (no I/O)."""
        return sorted({task.defaults.queue for task in self._app.tasks.values()})

    def record_declared(self) -> builtins.list[str]:
        """Record the declared queues in the database, so what sees only the database
        (``pgtq stats --dsn``, the dashboards, ``queues list``) shows them while idle. Every
        worker does it at its start. Returns the queues it added."""
        return self._run(statements.declare_queues(self._s, self.declared()))

    async def record_declared_async(self) -> builtins.list[str]:
        return await self._run_async(statements.declare_queues(self._s, self.declared()))

    def stats(self, window: float = 60.0) -> Stats:
        """``app.jobs.stats()`` with every known queue: a declared queue with no job, or one
        of the ``queues`` table, shows with zero counts instead of vanishing."""
        return self._app.jobs.stats(window).with_queues(self.declared())

    async def stats_async(self, window: float = 60.0) -> Stats:
        return (await self._app.jobs.stats_async(window)).with_queues(self.declared())

    def known(self) -> builtins.list[str]:
        """Every known queue, by name: declared by a task, or found in the database (see
        :meth:`stats`)."""
        return builtins.list(self.stats().queues)

    async def known_async(self) -> builtins.list[str]:
        return builtins.list((await self.stats_async()).queues)

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


def unknown_queues(asked: Iterable[str], known: Iterable[str]) -> builtins.list[str]:
    """The queues of ``asked`` that are not known, in the order asked (pure)."""
    seen = set(known)
    return [name for name in dict.fromkeys(asked) if name not in seen]


def describe_known(known: Sequence[str]) -> str:
    """The known queues for a message: their names, or that there is none yet."""
    return "known queues: " + (", ".join(known) if known else "none yet")


async def at_worker_start(app: App, asked: Sequence[str] | None, worker_id: str) -> None:
    """Once, at a worker's start: record the app's declared queues (see
    :meth:`Queues.record_declared`); then a queue the worker was asked for that no task
    declares and the database does not know (``-q emial``) runs nothing, ever: say so on one
    line, naming the known queues. A worker of every queue (``asked`` None) has nothing to
    check."""
    if app.queues.declared():
        await app.queues.record_declared_async()
    if not asked or not unknown_queues(asked, app.queues.declared()):
        return  # the common case costs no query
    known = await app.queues.known_async()
    missing = unknown_queues(asked, known)
    if missing:
        worker_logger.warning(
            "worker %s takes jobs from unknown queue(s) %s: no task declares them and they "
            "hold no waiting, running or failed job (a typo?); %s",
            worker_id,
            ", ".join(repr(name) for name in missing),
            describe_known(known),
            extra={"worker": worker_id},
        )
