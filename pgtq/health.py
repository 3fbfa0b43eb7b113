"""Is this deployment healthy? What ``pgtq healthcheck`` and ``/healthz`` answer.

Three checks, in order, each failing alone with a line that says why:

- **database**: PostgreSQL answers;
- **schema**: pgtq's schema is one this pgtq can work on (at head, or only *post* revisions
  pending, or newer during a rolling upgrade: the states the worker itself runs on, see
  :func:`pgtq.revisions.require_schema`);
- **worker**: a worker serving the queues asked about has beaten within ``max_age`` seconds
  (a worker registered with no queues serves every queue; with several queues, each needs
  one, not necessarily the same).

:func:`verdict` decides from data already read (pure); :func:`check` reads it with the sync
API (two small queries, one transaction) and decides.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pgtq import statements
from pgtq.reports import WorkerInfo

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.revisions import SchemaStatus

__all__ = [
    "DEFAULT_MAX_AGE",
    "Check",
    "Verdict",
    "check",
    "check_process",
    "serves",
    "unreachable",
    "verdict",
]

#: A worker beats every ``heartbeat_interval`` (5 s by default); one silent for longer than
#: ``rescue_after`` (30 s by default) is declared dead by its peers, which rescue its jobs.
#: The health checks use the same bound: six missed beats, never a single slow one.
DEFAULT_MAX_AGE = 30.0

#: The check that failed.
Check = Literal["database", "schema", "worker"]

#: Schema states a worker runs on (``ahead`` warns: a rolling upgrade; ``unmanaged``: your own
#: Alembic project manages pgtq's tables, pgtq cannot tell).
_USABLE_SCHEMA = frozenset({"current", "ahead", "unmanaged"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer: healthy or not, the check that failed, and one line saying why."""

    healthy: bool
    message: str
    #: The check that failed (None when healthy).
    failed: Check | None = None
    #: The freshest worker that counted (healthy), or the freshest one seen (not healthy).
    worker: WorkerInfo | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the body of ``/healthz``, ``pgtq healthcheck --json``)."""
        w = self.worker
        return {
            "status": "ok" if self.healthy else "fail",
            "failed": self.failed,
            "message": self.message,
            "worker": w.id if w is not None else None,
            "heartbeat_age": round(w.heartbeat_age, 3) if w is not None else None,
        }


def serves(worker: WorkerInfo, queue: str) -> bool:
    """Whether ``worker`` takes the jobs of ``queue`` (no queues: every queue)."""
    return worker.queues is None or queue in worker.queues


def unreachable(reason: str) -> Verdict:
    """The verdict when the database did not answer (or refused the reads)."""
    return Verdict(False, f"the database did not answer: {reason}", "database")


def verdict(
    workers: Iterable[WorkerInfo],
    *,
    schema: SchemaStatus | None = None,
    queues: Sequence[str] | None = None,
    max_age: float = DEFAULT_MAX_AGE,
    whose: str = "",
) -> Verdict:
    """Decide from what the database said (pure).

    ``workers``: the registered workers (:func:`pgtq.statements.worker_heartbeats`), already
    narrowed to the candidates (``/healthz``: this process's); ``schema``: its status, None
    when not checked; ``queues``: each must be served by a worker that beat within
    ``max_age`` seconds (None or empty: any worker will do); ``whose`` qualifies "worker" in
    the messages (``"this process's"``).
    """
    if not max_age > 0:  # NaN too
        raise ValueError(f"max_age must be a positive number of seconds, not {max_age}")
    if schema is not None and schema.state not in _USABLE_SCHEMA:
        return Verdict(False, schema.message, "schema")
    seen = sorted(workers, key=lambda w: (w.heartbeat_age, w.id))
    wanted = list(dict.fromkeys(queues or ()))
    live = [w for w in seen if w.heartbeat_age <= max_age]
    unserved = [q for q in wanted if not any(serves(w, q) for w in live)]
    worker = f"{whose} worker" if whose else "worker"
    if live and not unserved:
        counted = [w for w in live if not wanted or any(serves(w, q) for q in wanted)]
        best = counted[0]
        of = f" serving {_names(wanted)}" if wanted else ""
        others = f" ({len(counted)} live{of})" if wanted or len(counted) > 1 else ""
        at = f"; schema {schema.state}" if schema is not None else ""
        message = f"ok: {worker} {best.id} beat {best.heartbeat_age:.1f} s ago{others}{at}"
        return Verdict(True, message, None, best)
    relevant = [w for w in seen if not unserved or any(serves(w, q) for q in unserved)]
    of = f" serving {_names(unserved)}" if unserved else ""
    freshest = relevant[0] if relevant else None
    if freshest is not None:
        detail = f"the freshest, {freshest.id}, beat {freshest.heartbeat_age:.1f} s ago"
    else:
        detail = "it is not registered" if whose else f"no worker{of} is registered"
    subject = f"{worker}{of} has not" if whose else f"no worker{of} has"
    return Verdict(False, f"{subject} beaten within {max_age:g} s ({detail})", "worker", freshest)


def _names(queues: Sequence[str]) -> str:
    listed = ", ".join(repr(q) for q in queues)
    return f"queue {listed}" if len(queues) == 1 else f"queues {listed}"


def check(
    app: App,
    queues: Sequence[str] | None = None,
    max_age: float = DEFAULT_MAX_AGE,
    *,
    describe_error: Any = None,
) -> Verdict:
    """Read the schema's status and the workers' heartbeats (sync API), then :func:`verdict`.

    A database that cannot be reached or refuses the reads is the ``database`` check failing;
    ``describe_error(exc)`` makes its one line (default: the exception's first line).
    """
    from pgtq import revisions

    def read(conn: Any) -> tuple[SchemaStatus, list[WorkerInfo]]:
        status = revisions.schema_status(conn, app.schema)
        if status.state not in _USABLE_SCHEMA:
            return status, []  # the workers table may not even exist
        return status, app.sync.run(statements.worker_heartbeats(app.statements), conn)

    try:
        status, workers = app.sync.run_in_transaction(read)
    except Exception as exc:
        return unreachable(describe_error(exc) if describe_error else _first_line(exc))
    return verdict(workers, schema=status, queues=queues, max_age=max_age)


def check_process(
    app: App,
    max_age: float = DEFAULT_MAX_AGE,
    *,
    hostname: str | None = None,
    pid: int | None = None,
) -> Verdict:
    """The worker of this process (by the host name and pid it registered with): the
    database answers and it beat within ``max_age`` seconds. What ``/healthz`` answers.

    Reads the ``workers`` table (sync API, one query), never the worker's own state, so it
    is safe from any thread and follows the worker across a re-registration under a new id.
    """
    host = socket.gethostname() if hostname is None else hostname
    me = os.getpid() if pid is None else pid
    try:
        workers = app.sync.run(statements.worker_heartbeats(app.statements))
    except Exception as exc:
        return unreachable(_first_line(exc))
    mine = [w for w in workers if w.hostname == host and w.pid == me]
    return verdict(mine, max_age=max_age, whose="this process's")


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc).strip() or type(exc).__name__
    except Exception:
        text = type(exc).__name__
    return " ".join(text.splitlines()[0].split())
