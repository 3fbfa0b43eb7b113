"""Job observers: how metrics and tracing see every job a worker runs.

The worker calls :func:`job_started` before a job's task and :func:`job_finished` after its
outcome is decided. With no observer installed (the default) each call is one check of an
empty tuple: the hot path pays nothing for instrumentation nobody asked for.
``pgtq.metrics.install()`` and ``pgtq.tracing.install()`` add observers; an observer that
raises is logged and skipped, never allowed to fail a job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgtq.jobs import JobContext
    from pgtq.model import ClaimedJob

__all__ = [
    "JobEnd",
    "JobObserver",
    "JobStart",
    "add",
    "installed",
    "job_finished",
    "job_started",
    "remove",
    "set_trace_injector",
    "trace_context",
]

logger = logging.getLogger("pgtq.observers")


@dataclass(frozen=True, slots=True)
class JobStart:
    """What an observer learns when a job starts (one record, so a field added later breaks
    no observer)."""

    job: ClaimedJob
    ctx: JobContext
    #: Seconds from when the job was due to its claim (pickup latency), when measured.
    waited: float | None = None
    #: The carrier stored with the job at defer time (W3C ``traceparent``).
    trace_context: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class JobEnd:
    """What an observer learns once a job's outcome is decided."""

    job: ClaimedJob
    ctx: JobContext
    #: The outcome's label: ``succeeded``, ``failed``, ``aborted``, ``retried``.
    status: str
    duration: float
    error: BaseException | None = None


class JobObserver:
    """Override what you need. ``job_started`` returns a state handed back to ``job_finished``
    (a span, a start time, ...)."""

    def job_started(self, start: JobStart) -> Any:
        return None

    def job_finished(self, end: JobEnd, state: Any) -> None:
        return None


_observers: tuple[JobObserver, ...] = ()

#: What job_started returns and job_finished takes: each observer and its state.
Started = tuple[tuple[JobObserver, Any], ...]


def add(observer: JobObserver) -> None:
    """Install an observer for every worker of this process (once; adding it again is a no-op)."""
    global _observers
    if observer not in _observers:
        _observers = (*_observers, observer)


def remove(observer: JobObserver) -> None:
    global _observers
    _observers = tuple(o for o in _observers if o is not observer)


def installed() -> tuple[JobObserver, ...]:
    return _observers


def job_started(
    job: ClaimedJob,
    ctx: JobContext,
    *,
    waited: float | None = None,
    trace_context: Mapping[str, str] | None = None,
) -> Started | None:
    """Call in the asyncio task that runs the job, right before the task function.

    ``waited``: seconds from when the job was due to its claim (pickup latency).
    ``trace_context``: the carrier stored with the job at defer time (W3C ``traceparent``).
    """
    if not _observers:
        return None
    start = JobStart(job, ctx, waited, trace_context)
    started = []
    for observer in _observers:
        try:
            state = observer.job_started(start)
        except Exception:
            logger.exception("job observer %r failed on job %s", observer, job.id)
            continue
        started.append((observer, state))
    return tuple(started)


def job_finished(
    started: Started | None,
    job: ClaimedJob,
    ctx: JobContext,
    *,
    status: str,
    duration: float,
    error: BaseException | None = None,
) -> None:
    """Call in the same asyncio task as :func:`job_started`, once the outcome is decided.

    ``status``: the outcome's label (``succeeded``, ``failed``, ``aborted``, ``retried``).
    """
    if not started:
        return
    end = JobEnd(job, ctx, status, duration, error)
    for observer, state in reversed(started):
        try:
            observer.job_finished(end, state)
        except Exception:
            logger.exception("job observer %r failed on job %s", observer, job.id)


# -- the defer side: what travels in the job so its span links to the one that deferred it ------

_injector: Callable[[], dict[str, str] | None] | None = None


def set_trace_injector(injector: Callable[[], dict[str, str] | None] | None) -> None:
    """Set by ``pgtq.tracing.install()``; None turns it off."""
    global _injector
    _injector = injector


def trace_context() -> dict[str, str] | None:
    """The carrier ``defer`` stores with a job (W3C ``traceparent``), None when tracing is off
    or no span is active. Costs one check when tracing is not installed."""
    if _injector is None:
        return None
    try:
        return _injector()
    except Exception:
        logger.exception("reading the trace context failed; the job is deferred without it")
        return None
