"""The job model as plain data: what a row means, with no I/O and no pgtq imports but the
pure :mod:`pgtq.codecs` (the wire form of datetimes, UUIDs, ...).

``statements`` maps rows to these objects, ``jobs`` re-exports them for users.
"""

from __future__ import annotations

import enum
import json
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, NamedTuple, Self, TypeVar

from pgtq.codecs import encode_default


class Status(enum.StrEnum):
    TODO = "todo"
    DOING = "doing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABORTED = "aborted"
    #: Waiting for the jobs it depends on (``configure(depends_on=...)``); released to
    #: ``todo`` by the statement that settles its last parent.
    BLOCKED = "blocked"

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
    #: ``configure(tags=..., meta=...)``: for people and filters, never read by pgtq.
    tags: list[str] | None = None
    meta: dict[str, Any] | None = None
    #: What the task reported last with ``ctx.set_progress``: ``{"fraction", "message"}``.
    progress: dict[str, Any] | None = None
    #: ``configure(timeout=..., max_attempts=...)``: this job's own; None keeps the task's.
    timeout: float | None = None
    max_attempts: int | None = None
    #: The workflow the job is part of (``pgtq.chain``, ``pgtq.group``, ``depends_on``).
    workflow_id: int | None = None


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One status change of a job, from ``job_events`` (``deferred``, ``started``,
    ``succeeded``, ``failed``, ``retried``, ``rescued``, ``released``, ``snoozed``,
    ``aborted``, ``cancelled``). ``error`` is the failed attempt's error record."""

    job_id: int
    type: str
    at: datetime
    attempt: int
    worker_id: str | None
    error: dict[str, Any] | None


R = TypeVar("R")


class Deferred(int, Generic[R]):
    """The id ``defer`` returns: an ``int``, and whether it is the id of a job that was
    already waiting with the same ``queueing_lock`` (``duplicate``), which
    ``on_conflict="skip"`` kept or ``"replace"`` updated, rather than of a new one.

    Typed with the task's return type, so ``app.jobs.wait(task.defer(...))`` is that type
    under mypy."""

    duplicate: bool

    def __new__(cls, job_id: int, duplicate: bool = False) -> Self:
        deferred = super().__new__(cls, job_id)
        deferred.duplicate = duplicate
        return deferred

    def __repr__(self) -> str:
        return f"Deferred({int(self)}, duplicate={self.duplicate})"

    def __str__(self) -> str:  # an id in a URL or a log line reads as the number
        return int.__repr__(self)


#: The status an outcome of ``raise pgtq.Snooze(...)`` is written with: the completion
#: statement turns it into ``todo`` with the attempt given back (``complete_snoozing``).
SNOOZED = "snoozed"
#: Snoozes a job may take: the next one fails it (a task that snoozes forever would never
#: end, and its ``todo`` row would never be cleaned up).
MAX_SNOOZES = 100


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
    #: This job's own ``timeout`` (seconds) and ``max_attempts``, None for nearly every job:
    #: the task's apply (:func:`pgtq.outcomes.timeout_of`, :func:`pgtq.outcomes.decide`).
    timeout: float | None = None
    max_attempts: int | None = None


#: Caps of a stored error record, in characters: a task that raises a 10 MB message must
#: not make a 10 MB row (nor a write that fails). A traceback keeps its head and its tail.
ERROR_MESSAGE_MAX = 4_000
ERROR_TRACEBACK_MAX = 16_000


def error_record(exc: BaseException, *, with_traceback: bool = True) -> dict[str, Any]:
    """The JSON stored for a failed attempt: enough to understand it without the worker's log.

    Task code is hostile input: an exception whose ``str()`` raises is recorded by its type,
    long texts are clipped, and text PostgreSQL cannot store (NUL, lone surrogates) is escaped,
    so the record is always writable.
    """
    try:
        message = str(exc)
    except BaseException:  # any __str__ may fail: the type still tells
        message = f"<{type(exc).__name__}.__str__ failed>"
    record: dict[str, Any] = {
        "type": storable_text(type(exc).__name__),
        "message": storable_text(clip(message, ERROR_MESSAGE_MAX)),
    }
    if with_traceback:
        try:
            text = "".join(traceback.format_exception(exc))
        except BaseException:  # a hostile __str__ or __repr__ in the chain
            text = "<the traceback could not be formatted>"
        record["traceback"] = storable_text(clip(text, ERROR_TRACEBACK_MAX))
    return record


def clip(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters: its head and its tail, the middle left out."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}\n[... {len(text) - 2 * keep:,} characters left out ...]\n{text[-keep:]}"


def storable_text(text: str) -> str:
    """``text`` as PostgreSQL can store it: NUL and lone surrogates written as escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def unstorable_json(encoded: str) -> str | None:
    """Why PostgreSQL's ``jsonb`` would refuse this JSON text (from :func:`dumps`), or None.

    The encoder writes every non-ASCII character as an escape, and ``jsonb`` refuses
    ``\\u0000`` and unpaired surrogates. The common case is two substring scans; only text
    holding such an escape is decoded and looked at string by string.
    """
    if "\\u0000" not in encoded and "\\ud" not in encoded:
        return None
    return _unstorable(json.loads(encoded))


def _unstorable(value: Any) -> str | None:
    if isinstance(value, str):
        if "\x00" in value:
            return "it contains a NUL character (\\u0000)"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "it contains an unpaired surrogate"
        return None
    items: Any = ()
    if isinstance(value, dict):
        items = (x for pair in value.items() for x in pair)
    elif isinstance(value, list):
        items = value
    for item in items:
        reason = _unstorable(item)
        if reason is not None:
            return reason
    return None


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=encode_default)


def dumps(value: Any) -> str:
    """JSON the way pgtq stores it: strict (no NaN), compact, ASCII, with the wire form of
    datetime, UUID, Decimal, Enum, dataclasses, ... (:func:`pgtq.codecs.encode_default`, a
    ``default=`` hook: plain JSON values never reach it). One encoder, made once:
    ``json.dumps`` with options builds a new one per call."""
    return _ENCODER.encode(value)
