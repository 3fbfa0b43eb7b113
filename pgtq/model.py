"""The job model as plain data: what a row means, with no I/O and no pgtq imports.

``statements`` maps rows to these objects, ``jobs`` re-exports them for users.
"""

from __future__ import annotations

import enum
import json
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple


class Status(enum.StrEnum):
    TODO = "todo"
    DOING = "doing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABORTED = "aborted"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.ABORTED})


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    queue: str
    task_name: str
    args: dict[str, Any]
    status: Status
    priority: int
    scheduled_at: datetime | None
    lock: str | None
    queueing_lock: str | None
    concurrency_key: str | None
    trace_context: dict[str, str] | None
    attempts: int
    worker_id: str | None
    abort_requested: bool
    result: Any
    error: dict[str, Any] | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One status change of a job, from ``job_events`` (``deferred``, ``started``,
    ``succeeded``, ``failed``, ``retried``, ``rescued``, ``released``, ``aborted``,
    ``cancelled``). ``error`` is the failed attempt's error record."""

    job_id: int
    type: str
    at: datetime
    attempt: int
    worker_id: str | None
    error: dict[str, Any] | None


class ClaimedJob(NamedTuple):
    """What the worker needs of a job it has just claimed: the hot path's small row.

    A named tuple: made straight from the claim's row in C (``ClaimedJob._make(row)``), a
    few µs a job cheaper than a frozen dataclass, whose ``__init__`` sets each field through
    ``object.__setattr__``.
    """

    id: int
    queue: str
    task_name: str
    args: dict[str, Any]
    attempts: int
    priority: int
    lock: str | None
    waited: float | None = None  # seconds from when it was due to its claim
    trace_context: dict[str, str] | None = None


def error_record(exc: BaseException, *, with_traceback: bool = True) -> dict[str, Any]:
    """The JSON stored for a failed attempt: enough to understand it without the worker's log."""
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if with_traceback:
        record["traceback"] = "".join(traceback.format_exception(exc))
    return record


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def dumps(value: Any) -> str:
    """JSON the way pgtq stores it: strict (no NaN), compact. One encoder, made once:
    ``json.dumps`` with options builds a new one per call."""
    return _ENCODER.encode(value)
