"""OpenTelemetry tracing (``pip install 'pgtq[otel]'``): a span per job, linked to its deferrer.

At ``defer`` time the active trace context is stored with the job (a W3C ``traceparent``
carrier, see :func:`pgtq.observers.trace_context`); the worker starts the job's span as a
child of it, so a request and the jobs it deferred are one trace, however much later and
wherever the jobs run. The span is current while the task runs: spans the task makes (HTTP
calls, SQL) nest under it. Spans go to whatever tracer provider you configure::

    import pgtq.tracing
    pgtq.tracing.install()            # in the process that defers AND in the worker
"""

from __future__ import annotations

from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pgtq.tracing needs opentelemetry-api: pip install 'pgtq[otel]'") from exc

from pgtq import observers

__all__ = ["JobTracing", "inject", "install", "uninstall"]

#: Outcomes that mark a job's span as an error.
ERROR_OUTCOMES = frozenset({"failed", "aborted", "retried"})


def inject() -> dict[str, str] | None:
    """The active trace context as a carrier, or None when no valid span is active."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


class JobTracing(observers.JobObserver):
    """Starts a CONSUMER span per job attempt and makes it current while the task runs.

    ``link_only=True`` starts each job in a trace of its own with a span link to the deferring
    span, for jobs deferred in bulk whose traces would otherwise grow very wide.
    """

    def __init__(
        self, tracer_provider: trace.TracerProvider | None = None, *, link_only: bool = False
    ) -> None:
        self.tracer = trace.get_tracer("pgtq", tracer_provider=tracer_provider)
        self.link_only = link_only

    def job_started(self, start: observers.JobStart) -> Any:
        job, carrier = start.job, start.trace_context
        parent = propagate.extract(dict(carrier)) if carrier else None
        links: list[Link] = []
        if parent is not None and self.link_only:
            deferred_by = trace.get_current_span(parent).get_span_context()
            if deferred_by.is_valid:
                links.append(Link(deferred_by))
            parent = otel_context.Context()  # a new trace
        attributes: dict[str, Any] = {
            "messaging.system": "pgtq",
            "messaging.operation.type": "process",
            "messaging.destination.name": job.queue,
            "messaging.message.id": str(job.id),
            "pgtq.task": job.task_name,
            "pgtq.attempt": job.attempts,
            "pgtq.worker": start.ctx.worker_id,
        }
        if start.waited is not None:
            attributes["pgtq.pickup_latency"] = start.waited
        span = self.tracer.start_span(
            f"process {job.task_name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def job_finished(self, end: observers.JobEnd, state: Any) -> None:
        span, token = state
        status, error = end.status, end.error
        try:
            span.set_attribute("pgtq.outcome", status)
            if error is not None:
                span.record_exception(error)
            if status in ERROR_OUTCOMES:
                detail = f"{type(error).__name__}: {error}" if error is not None else status
                span.set_status(StatusCode.ERROR, detail)
            span.end()
        finally:
            otel_context.detach(token)


_installed: JobTracing | None = None


def install(
    tracer_provider: trace.TracerProvider | None = None, *, link_only: bool = False
) -> JobTracing:
    """Trace jobs in this process: store the trace context at defer, a span per job run."""
    global _installed
    uninstall()
    _installed = JobTracing(tracer_provider, link_only=link_only)
    observers.add(_installed)
    observers.set_trace_injector(inject)
    return _installed


def uninstall() -> None:
    global _installed
    if _installed is not None:
        observers.remove(_installed)
        _installed = None
    observers.set_trace_injector(None)
