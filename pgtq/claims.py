"""The database side of claiming, for one worker: claims on connections of their own (under
the fleet-wide limits when there are any), when the next scheduled job is due, and the
recovery after a claim that failed. The fetch loop (:mod:`pgtq.fetcher`) decides when.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pgtq import statements
from pgtq.connectors import execute, first_line, is_data_error, sqlstate
from pgtq.limits import (
    Limit,
    allowances,
    bucket_key,
    charges,
    fresh_starts,
    key_allowances,
    key_bucket,
    key_bucket_task,
)
from pgtq.model import ClaimedJob
from pgtq.retry import backoff_delays

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from pgtq.completer import Completer
    from pgtq.connectors import DedicatedConnection
    from pgtq.scope import WorkerScope
    from pgtq.turns import Answer

logger = logging.getLogger("pgtq.worker")

#: Claims a worker keeps in flight at most (each on a connection of its own): two let the
#: server run one while the worker runs the other's jobs (async burn-down at batch 20: +6-10 %).
CLAIMS_IN_FLIGHT = 2


class Claims:
    """A worker's claims: the :class:`pgtq.fetcher.Source` of its fetch loop."""

    def __init__(
        self,
        scope: WorkerScope,
        *,
        serial: bool,
        holding: Callable[[], Iterable[int]],
        completer: Completer,
        stopping: asyncio.Event,
        claimed: Callable[[int], None] = lambda jobs: None,
    ) -> None:
        app = self._app = scope.app
        self._s = app.statements
        self._connector = scope.connector
        self._worker_id = scope.worker_id
        self._queues = scope.queues
        self._serial = serial  # concurrency=1: one claim at a time keeps strict priority order
        self._holding = holding  # the ids of the jobs the worker runs or holds
        self._completer = completer
        self._stopping = stopping
        self._claimed = claimed  # counts each claim that came back, with its jobs
        self._connections: list[DedicatedConnection] = []
        self._free: list[DedicatedConnection] = []
        self._delays = backoff_delays()
        self._reconcile = False  # a claim failed: release claimed jobs this worker lost track of
        self._unclaimable = False  # a claim failed on a job's data: fail the rows that break it
        # Fleet-wide limits: the tasks' own (from code), the queues' (read from the database).
        self._task_limits = {
            bucket_key("task", t.name): t.limit
            for t in app.tasks.values()
            if t.limit.concurrency is not None or t.limit.rate is not None
        }
        self._keycaps = {
            t.name: t.key_concurrency for t in app.tasks.values() if t.key_concurrency is not None
        }
        self._key_rates = {
            t.name: t.key_rate_limit for t in app.tasks.values() if t.key_rate_limit is not None
        }
        self._queue_limits: dict[str, Limit] = {}

    async def open(self) -> None:
        """Read the queues' limits, open the claim connections."""
        await self.refresh_limits()
        session = claim_session(self._app.prepared_statements)
        self._connections = [
            await self._connector.dedicated(session=session, jsonb_text=True)
            for _ in range(CLAIMS_IN_FLIGHT)
        ]
        self._free = list(self._connections)

    async def close(self) -> None:
        for conn in self._connections:
            await conn.close()

    @property
    def limited(self) -> bool:
        """Fleet-wide limits apply: a job that ends may free a limit's slot for others."""
        return bool(self._task_limits or self._queue_limits or self._keycaps or self._key_rates)

    @property
    def depth(self) -> int:
        """One claim at a time under fleet-wide limits (those claims take a lock anyway) and
        for a serial worker: two claims in flight may run on the server in either order."""
        return 1 if self.limited or self._serial else len(self._connections)

    @property
    def recovering(self) -> bool:
        return self._reconcile or self._unclaimable

    async def claim(self, limit: int, answer: Answer | None = None) -> list[ClaimedJob] | None:
        """Claim up to ``limit`` jobs on a free claim connection (there is one: the fetch loop
        keeps at most one claim out on each); None when the claim failed. ``answer``: the
        announcements it answers (:mod:`pgtq.turns`): if more wait, the claim calls the others."""
        conn = self._free.pop()
        try:
            if self.limited:
                claimed = await self._connector.run_in_transaction(
                    functools.partial(self._claim_under_limits, limit=limit, answer=answer)
                )
            else:
                worker_id = self._worker_id()
                claimed = await conn.run(
                    statements.claim_jobs(self._s, worker_id, self._queues, limit, answer)
                )
            self._delays = backoff_delays()
            self._claimed(len(claimed))
            return claimed
        except Exception as exc:
            if sqlstate(exc) == "23505" and "jobs_lock_doing_idx" in str(exc):
                # Another worker claimed a job of the same lock at the same instant.
                logger.debug("lock conflict while claiming; claiming again")
                return None
            # The claim may have committed with its reply lost: its jobs are ours and doing,
            # but unknown here. Give back whatever this worker does not know, before the
            # next claim.
            self._reconcile = True
            if is_data_error(exc) or _decoding_error(exc):
                # A row the claim cannot take (written by other means than defer): the
                # recovery gives the claimed jobs back, fails that row, and claims again.
                logger.warning("claiming jobs failed on a job's data: %s", first_line(exc))
                self._unclaimable = True
                return None
            delay = next(self._delays)
            logger.warning("claiming jobs failed (%s); retrying in %.1f s", exc, delay)
            await self._pause(delay)
            return None
        finally:
            self._free.append(conn)

    def _claim_under_limits(
        self, conn: Connection, *, limit: int, answer: Answer | None
    ) -> list[ClaimedJob]:
        """The claim when limits apply: one transaction under the limits lock, so the counts
        read here hold until the claimed jobs are ``doing``. Runs on a sync Connection (the
        async connector runs it through SQLAlchemy's greenlet bridge)."""
        s = self._s
        limits = {**self._task_limits, **self._queue_limits}
        execute(conn, statements.limits_lock(s))
        running = execute(
            conn,
            statements.running_counts(
                s,
                [k.removeprefix("task:") for k in limits if k.startswith("task:")],
                [k.removeprefix("queue:") for k in limits if k.startswith("queue:")],
            ),
        )
        rated = [k for k, v in limits.items() if v.rate is not None]
        buckets = execute(conn, statements.read_buckets(s, rated)) if rated else {}
        allow = allowances(limits, running, buckets)
        key_rates = self._key_rates
        key_buckets: dict[str, tuple[float, float]] = {}
        full: list[str] = []
        if key_rates:
            key_buckets = execute(conn, statements.read_key_buckets(s, list(key_rates)))
            key_allow, full = key_allowances(key_rates, key_buckets)
            allow.update(key_allow)
        fresh = {name: fresh_starts(limit) for name, limit in key_rates.items()}
        query = statements.claim_limited(
            s, self._worker_id(), self._queues, limit, allow, self._keycaps, answer, fresh
        )
        claimed = execute(conn, query)
        keys = claimed.concurrency_keys
        left: dict[str, float] = {}
        if rated and claimed:
            taken = [k for job in claimed for k in (f"task:{job.task_name}", f"queue:{job.queue}")]
            left = charges(limits, buckets, taken)
        if key_rates and keys:
            charged = [key_bucket(task, key) for task, key in keys if task in key_rates]
            per_key = {k: key_rates[key_bucket_task(k)] for k in charged}
            left.update(charges(per_key, key_buckets, charged))
        if left:
            execute(conn, statements.write_buckets(s, left))
        full = [k for k in full if k not in left]
        if full:  # refilled: the same as no bucket, so the table keeps only busy keys
            execute(conn, statements.delete_buckets(s, full))
        return claimed

    async def refresh_limits(self) -> None:
        """Queue limits live in the database (``app.queues.set_limits``): read them again."""
        found = await self._connector.run(statements.queue_limits(self._s))
        self._queue_limits = {
            bucket_key("queue", name): Limit(concurrency=cap, rate=rate)
            for name, (cap, rate) in found.items()
        }

    async def next_due_in(self) -> float | None:
        try:
            due_in: float | None = await self._connector.run(
                statements.next_due_in(self._s, self._queues)
            )
        except Exception as exc:
            logger.debug("looking up the next due job failed: %s", first_line(exc))
            return None
        return due_in

    async def release(self, ids: list[int]) -> None:
        """Give claimed jobs that never started back to ``todo``, attempt undone."""
        conn = self._connections[0]
        await conn.run(statements.release_jobs(self._s, self._worker_id(), ids))

    # -- after a failed claim -----------------------------------------------------------------

    async def recover(self) -> bool:
        if self._reconcile and not await self._release_unknown():
            return False
        if self._unclaimable:
            await self._fail_unclaimable()
        return True

    async def _release_unknown(self) -> bool:
        """Release this worker's ``doing`` jobs it neither runs, holds, nor has outcomes of
        (written or not): a lost claim reply's jobs. False when it could not be done yet."""
        async with self._completer.lock:  # no write in flight: every known id is here
            known = {*self._holding(), *self._completer.ids}
            try:
                released = await self._connector.run(
                    statements.release_unknown_jobs(self._s, self._worker_id(), known)
                )
            except Exception as exc:
                logger.warning("could not release unknown claimed jobs yet: %s", exc)
                await self._pause(next(self._delays))
                return False
        self._reconcile = False
        if released:
            logger.warning(
                "released %s job(s) claimed by a claim whose reply was lost: %s",
                len(released),
                ", ".join(map(str, released)),
                extra={"worker": self._worker_id()},
            )
        return True

    async def _fail_unclaimable(self) -> None:
        """Fail the waiting jobs no claim can take, so one bad row never stops every claim
        of every worker; when there are none, the claim failed for another reason: wait."""
        self._unclaimable = False
        try:
            failed = await self._connector.run(
                statements.fail_unclaimable_jobs(self._s, self._queues)
            )
        except Exception as exc:
            logger.warning("looking for jobs no claim can take failed: %s", first_line(exc))
            failed = []
        if failed:
            logger.error(
                "failed %s job(s) that no claim can take (written by other means than defer): %s",
                len(failed),
                ", ".join(map(str, failed)),
                extra={"worker": self._worker_id()},
            )
            return
        await self._pause(next(self._delays))

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the worker stops."""
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([stop], timeout=seconds)
        stop.cancel()


def claim_session(prepared_statements: bool) -> tuple[str, ...]:
    """Claims commit without waiting for the WAL flush (about 0.4 ms a claim here). Safe:
    the completion that follows is flushed, and with it the claim before it; a claim lost
    in a server crash puts its job back to ``todo``, and the guarded completion of the lost
    attempt writes nothing: at least once, as always. Visibility is immediate either way.
    Not behind PgBouncer in transaction mode (``prepared_statements=False``), where a
    session setting would leak to other clients."""
    if not prepared_statements:
        return ()
    return ("SET synchronous_commit = off",)


def _decoding_error(exc: BaseException) -> bool:
    """The driver could not decode a claimed row (arguments nested too deep for Python's
    JSON decoder, an integer too long for ``int``): raised in the client, after the claim."""
    causes = (exc, getattr(exc, "orig", None), exc.__cause__)
    return any(isinstance(e, (RecursionError, ValueError)) for e in causes)
