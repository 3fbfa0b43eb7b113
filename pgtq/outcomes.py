"""How an attempt ends: the outcome a worker writes for it, decided by pure functions.

Both kinds of task (async and sync), the rescue of a dead worker's jobs and the shutdown
share these decisions; nothing here does I/O, so the tests reach every branch without a
database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgtq.codecs import ArgumentDecodeError
from pgtq.model import (
    MAX_SNOOZES,
    SNOOZED,
    ClaimedJob,
    Status,
    dumps,
    error_record,
    unstorable_json,
)
from pgtq.validation import check_delay

if TYPE_CHECKING:
    from pgtq.tasks import Task

__all__ = [
    "MAX_SNOOZES",
    "SNOOZED",
    "SUCCEEDED_NONE",
    "Discard",
    "JobTimeoutError",
    "Outcome",
    "OutcomeNotWritable",
    "ResultTooLarge",
    "Snooze",
    "UnknownTaskError",
    "WorkerLostError",
    "aborted_on_request",
    "decide",
    "decide_safely",
    "frees_jobs",
    "rescue_outcome",
    "timeout_of",
]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended, as it will be written."""

    status: Status
    result: str | None = None
    error: str | None = None
    retry_in: float | None = None
    #: A :class:`Snooze`: back to ``todo`` after ``retry_in``, the attempt given back.
    snooze: bool = False
    #: A retry that moves the job: (queue, priority), None for either that stays.
    move: tuple[str | None, int | None] | None = None
    # Derived once here, not per job on the hot path (an enum's ``value`` and ``hash`` are
    # Python-level calls): the status as written, and the label stats and logs use.
    value: str = field(init=False, repr=False, compare=False)
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", SNOOZED if self.snooze else self.status.value)
        object.__setattr__(self, "label", SNOOZED if self.snooze else _LABELS[self.status])


class Snooze(Exception):
    """Raise it in a task for "not yet": the job waits ``seconds`` and runs again (a 429 with
    Retry-After, an external system still busy). The attempt is given back: it does not
    count toward the retry budget, and ``ctx.attempt`` is the same next time. A job
    snoozes at most :data:`MAX_SNOOZES` times; the next one fails it.

    A bad ``seconds`` (not a number from 0 to about 100 years) raises
    :class:`pgtq.InvalidArguments` here, in the task: an error of the attempt like any other.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = check_delay("Snooze(seconds)", seconds)
        super().__init__(f"snoozed for {self.seconds:g} s")


class Discard(Exception):
    """Raise it in a task when running the job again cannot help (a deleted account, an
    argument that will never be valid): the job ends ``failed`` now, whatever its retry
    policy, with ``reason`` as its error."""

    def __init__(self, reason: str = "discarded by the task") -> None:
        super().__init__(reason)
        self.reason = reason


def frees_jobs(job: ClaimedJob, outcome: Outcome) -> bool:
    """Whether writing ``outcome`` may make other jobs claimable: the job held a lock (its
    next holder waits for it), or it goes back to waiting (a retry, a release)."""
    return job.lock is not None or outcome.status is Status.TODO


_LABELS = {status: "retried" if status is Status.TODO else status.value for status in Status}
#: The outcome of nearly every job (it returned None): one object, no JSON encoding.
SUCCEEDED_NONE = Outcome(Status.SUCCEEDED, result="null")


class WorkerLostError(Exception):
    """Stored as the error of an attempt whose worker died (or went silent) while running it."""


class ResultTooLarge(Exception):
    """Stored as the error of a job whose result is over ``App(result_max_bytes=...)``."""


class OutcomeNotWritable(Exception):
    """Stored as the error of an attempt whose outcome PostgreSQL refused to store."""


class UnknownTaskError(Exception):
    """Stored as the error of a job whose task this worker does not have."""


class JobTimeoutError(Exception):
    """Stored as the error of an attempt that ran past its task's ``timeout``."""


def rescue_outcome(
    task: Task[..., Any] | None, old_worker: str, rescuer: str, rescues: int
) -> Outcome:
    """What a rescue writes for a job whose worker died running it: pure.

    A lost worker is not a failed job: it goes back to ``todo`` and runs again whatever its
    retry policy (its attempt stays counted), as River, Oban or Celery's ``acks_late`` do. A
    job whose worker died ``max_rescues`` times already is likely what kills them: it ends
    ``failed``. A task this worker does not know goes back as is: a worker that knows it
    decides. Each rescue is a ``rescued`` event in the job's history.
    """
    lost = WorkerLostError(
        f"worker {old_worker} stopped sending heartbeats while running this job; "
        f"rescued by {rescuer}"
    )
    if task is not None and rescues >= task.max_rescues:
        lost = WorkerLostError(
            f"worker {old_worker} stopped sending heartbeats while running this job, which "
            f"had lost its worker {rescues} time(s) before: over the task's max_rescues of "
            f"{task.max_rescues}, so it may be what kills its workers; rescued by {rescuer}"
        )
        return Outcome(Status.FAILED, error=dumps(error_record(lost, with_traceback=False)))
    return Outcome(Status.TODO, error=dumps(error_record(lost, with_traceback=False)), retry_in=0.0)


def decide_safely(
    task: Task[..., Any] | None,
    job: ClaimedJob,
    result: Any,
    exc: BaseException | None,
    abort_reason: str | None,
) -> Outcome:
    """:func:`decide`, which never raises: a retry policy or a result that breaks the
    decision fails the attempt instead of leaving its job ``doing``."""
    try:
        return decide(task, job, result=result, exc=exc, abort_reason=abort_reason)
    except Exception as broken:
        return Outcome(Status.FAILED, error=dumps(error_record(broken)))


def decide(
    task: Task[..., Any] | None,
    job: ClaimedJob,
    *,
    result: Any = None,
    exc: BaseException | None = None,
    abort_reason: str | None = None,
) -> Outcome:
    """The outcome of an attempt: pure, so both kinds of task share it (and tests reach it).

    A job whose abort was requested ends ``aborted`` even if its task ignored the request and
    returned. A timeout is a failure that follows the retry policy. A shutdown puts the job
    back to ``todo`` (its attempt stays counted).
    """
    if result is None and exc is None and abort_reason is None:
        limit = task.app.result_max_bytes if task is not None else None
        if limit is None or limit >= len("null"):
            return SUCCEEDED_NONE
    if abort_reason == "shutdown":
        err = error_record(exc or RuntimeError("worker shut down"), with_traceback=False)
        return Outcome(Status.TODO, error=dumps(err), retry_in=0.0)
    if abort_reason == "requested":
        err = {"type": "Aborted", "message": "the job was aborted on request"}
        return Outcome(Status.ABORTED, error=dumps(err))
    if abort_reason == "timeout":
        exc = JobTimeoutError(f"the job ran past its timeout of {timeout_of(task, job)} s")
    if exc is None:
        # A result that cannot be stored fails the job at once: running it again would not
        # change the result, so the retry policy does not apply. The app's encoder writes
        # it, as it writes arguments (a datetime is its ISO text).
        try:
            encoded = (
                "null"
                if result is None
                else (task.app.codec.dumps if task is not None else dumps)(result)
            )
            unstorable = unstorable_json(encoded)
        except Exception as ser:  # TypeError, ValueError, RecursionError, a hostile __iter__
            bad = TypeError(f"the task's return value is not JSON-serializable: {ser!r}")
            return Outcome(Status.FAILED, error=dumps(error_record(bad, with_traceback=False)))
        if unstorable is not None:
            bad = TypeError(f"the task's return value cannot be stored: {unstorable}")
            return Outcome(Status.FAILED, error=dumps(error_record(bad, with_traceback=False)))
        limit = task.app.result_max_bytes if task is not None else None
        if limit is not None and len(encoded) > limit:
            big = ResultTooLarge(
                f"the task's result is {len(encoded):,} bytes of JSON, over the app's "
                f"result_max_bytes of {limit:,}: store large data elsewhere and return a key"
            )
            return Outcome(Status.FAILED, error=dumps(error_record(big, with_traceback=False)))
        return Outcome(Status.SUCCEEDED, result=encoded)
    if isinstance(exc, Snooze):  # checked again: task code may have changed it since
        return Outcome(
            Status.TODO, retry_in=check_delay("Snooze(seconds)", exc.seconds), snooze=True
        )
    err_json = dumps(error_record(exc))
    # Arguments that cannot be read as their parameters' types never will be: no retry.
    if isinstance(exc, Discard | ArgumentDecodeError):
        return Outcome(Status.FAILED, error=err_json)
    if task is not None:
        # The job's own budget (None for nearly every job) replaces the policy's: a task
        # without a policy then retries with the default backoff (see pgtq.retry).
        decision = task.retry.decide(job.attempts, exc, job.max_attempts)
        if decision is not None:
            return Outcome(Status.TODO, error=err_json, retry_in=decision.delay, move=decision.move)
    return Outcome(Status.FAILED, error=err_json)


def timeout_of(task: Task[..., Any] | None, job: ClaimedJob) -> float | None:
    """The seconds an attempt may run: the job's own ``timeout`` when it has a usable one
    (over zero and finite: a row written by other means may hold anything), else the
    task's. None: no limit."""
    own = job.timeout
    if own is not None and 0 < own < math.inf:  # NaN fails both comparisons
        return float(own)
    return task.timeout if task is not None else None


def aborted_on_request() -> Outcome:
    """The outcome of a claimed job whose abort was requested before it started."""
    return decide(None, _NOT_RUN, abort_reason="requested")


_NOT_RUN = ClaimedJob(0, "", "", {}, 0, 0, None)
