"""Metrics (Prometheus) and tracing (OpenTelemetry): what a scrape shows, what spans a job makes.

The per-job observers are driven through ``pgtq.observers`` exactly as the worker calls them;
the queue metrics are read from a real database at scrape time.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import pgtq
from pgtq import observers
from pgtq.jobs import JobContext
from pgtq.model import ClaimedJob
from tests.conftest import eventually
from tests.sides import Side

prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from pgtq import metrics, tracing  # noqa: E402


def claimed(job_id: int = 1, task: str = "send", queue: str = "emails") -> ClaimedJob:
    return ClaimedJob(job_id, queue, task, {}, 1, 0, None)


def context_of(app: pgtq.App, job: ClaimedJob) -> JobContext:
    return JobContext.for_job(job, app, "worker-1")


def run_job(
    app: pgtq.App,
    job: ClaimedJob,
    status: str,
    duration: float,
    *,
    waited: float | None = None,
    trace_context: dict[str, str] | None = None,
    error: BaseException | None = None,
) -> None:
    """What the worker does around one job."""
    ctx = context_of(app, job)
    started = observers.job_started(job, ctx, waited=waited, trace_context=trace_context)
    observers.job_finished(started, job, ctx, status=status, duration=duration, error=error)


@pytest.fixture
def registry() -> Iterator[Any]:
    reg = prometheus_client.CollectorRegistry()
    yield reg
    metrics.uninstall(reg)


def value(registry: Any, name: str, **labels: str) -> float | None:
    result: float | None = registry.get_sample_value(name, labels)
    return result


# -- job metrics --------------------------------------------------------------------------------


@pytest.mark.unit
def test_no_observer_means_no_work() -> None:
    assert observers.installed() == ()
    assert observers.job_started(claimed(), None) is None  # type: ignore[arg-type]
    assert observers.trace_context() is None


async def test_job_metrics_count_time_and_pickup_latency(app: pgtq.App, registry: Any) -> None:
    metrics.install(registry=registry)
    assert metrics.install(registry=registry) is metrics.install(registry=registry)  # once
    run_job(app, claimed(1), "succeeded", 0.02, waited=0.3)
    run_job(app, claimed(2), "succeeded", 0.2, waited=0.01)
    run_job(app, claimed(3), "failed", 1.5, error=RuntimeError("boom"))
    run_job(app, claimed(4, "resize", "images"), "retried", 0.001)

    finished = "pgtq_jobs_finished_total"
    assert value(registry, finished, queue="emails", task="send", status="succeeded") == 2
    assert value(registry, finished, queue="emails", task="send", status="failed") == 1
    assert value(registry, finished, queue="images", task="resize", status="retried") == 1
    duration = "pgtq_job_duration_seconds"
    assert value(registry, duration + "_count", queue="emails", task="send") == 3
    assert value(registry, duration + "_sum", queue="emails", task="send") == pytest.approx(1.72)
    assert value(registry, duration + "_bucket", queue="emails", task="send", le="0.025") == 1
    pickup = "pgtq_job_pickup_latency_seconds"
    assert value(registry, pickup + "_count", queue="emails") == 2  # only where it is known
    assert value(registry, pickup + "_bucket", queue="emails", le="0.01") == 1
    assert value(registry, "pgtq_jobs_running", queue="emails", task="send") == 0

    metrics.uninstall(registry)
    assert observers.installed() == ()


async def test_a_failing_observer_never_fails_the_job(app: pgtq.App) -> None:
    class Broken(observers.JobObserver):
        def job_started(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("observer bug")

    broken = Broken()
    observers.add(broken)
    try:
        run_job(app, claimed(), "succeeded", 0.1)  # logged, not raised
    finally:
        observers.remove(broken)


@pytest.mark.unit
def test_an_observer_sees_one_record_per_start_and_end() -> None:
    seen: list[Any] = []

    class Recorder(observers.JobObserver):
        def job_started(self, start: observers.JobStart) -> Any:
            seen.append(start)
            return "state"

        def job_finished(self, end: observers.JobEnd, state: Any) -> None:
            seen.append((end, state))

    recorder, job, error = Recorder(), claimed(), RuntimeError("boom")
    observers.add(recorder)
    try:
        started = observers.job_started(job, None, waited=0.5, trace_context={"a": "b"})  # type: ignore[arg-type]
        observers.job_finished(started, job, None, status="failed", duration=2.0, error=error)  # type: ignore[arg-type]
    finally:
        observers.remove(recorder)
    assert seen == [
        observers.JobStart(job, None, 0.5, {"a": "b"}),  # type: ignore[arg-type]
        (observers.JobEnd(job, None, "failed", 2.0, error), "state"),  # type: ignore[arg-type]
    ]


# -- queue metrics, from the database ------------------------------------------------------------


async def test_queue_metrics_come_from_the_database(
    app: pgtq.App, side: Side, registry: Any
) -> None:
    @app.task(queue="emails")
    def send(to: str) -> None: ...

    await side.defer_many(send, [{"to": "a"}, {"to": "b"}])
    await side.call(app.queues, "pause", "emails")
    metrics.install(app, registry=registry, min_interval=0)
    # A scrape runs in the metrics server's thread, with the sync API.
    text = (await asyncio.to_thread(prometheus_client.generate_latest, registry)).decode()
    assert 'pgtq_queue_jobs{queue="emails",status="todo"} 2.0' in text
    assert 'pgtq_queue_jobs{queue="emails",status="failed"} 0.0' in text
    assert 'pgtq_queue_paused{queue="emails"} 1.0' in text
    assert "pgtq_queue_oldest_waiting_seconds{queue=" in text
    assert "pgtq_queue_jobs_per_second{" not in text  # no data is absent, not 0
    assert "pgtq_workers_live 0.0" in text
    assert "pgtq_stats_up 1.0" in text


@pytest.mark.unit
async def test_queue_metrics_say_when_the_database_is_down(registry: Any) -> None:
    down = pgtq.App("postgresql://postgres@127.0.0.1:1/x", connect_timeout=1)
    metrics.install(down, registry=registry)
    text = (await asyncio.to_thread(prometheus_client.generate_latest, registry)).decode()
    assert "pgtq_stats_up 0.0" in text
    down.close()


async def test_serve_exposes_metrics_over_http(app: pgtq.App, registry: Any) -> None:
    server = metrics.serve(app, 0, "127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                body: bytes = response.read()
                return body.decode()

        body = ""

        async def scraped() -> bool:
            nonlocal body
            body = await asyncio.to_thread(scrape)
            return "pgtq_stats_up 1.0" in body

        await eventually(scraped)
        assert "pgtq_workers_live" in body
        assert "# TYPE pgtq_job_duration_seconds histogram" in body
    finally:
        server.shutdown()
        server.server_close()


# -- tracing ------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    tracing.uninstall()


async def test_a_job_span_is_a_child_of_the_span_that_deferred_it(
    app: pgtq.App, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tracing.install(provider)
    tracer = provider.get_tracer("the web app")
    with tracer.start_as_current_span("POST /signup") as request:
        carrier = observers.trace_context()  # what defer stores with the job
    assert carrier is not None and "traceparent" in carrier
    assert observers.trace_context() is None  # no active span: nothing to carry

    job = claimed(42)
    ctx = context_of(app, job)
    started = observers.job_started(job, ctx, waited=0.5, trace_context=carrier)
    # While the task runs, its own spans nest under the job's.
    with tracer.start_as_current_span("smtp send"):
        pass
    observers.job_finished(started, job, ctx, status="succeeded", duration=0.1)

    by_name = {s.name: s for s in exporter.get_finished_spans()}
    job_span, inner = by_name["process send"], by_name["smtp send"]
    assert job_span.kind is SpanKind.CONSUMER
    assert job_span.context.trace_id == request.get_span_context().trace_id
    assert job_span.parent is not None
    assert job_span.parent.span_id == request.get_span_context().span_id
    assert inner.parent is not None and inner.parent.span_id == job_span.context.span_id
    assert job_span.attributes is not None
    assert job_span.attributes["messaging.destination.name"] == "emails"
    assert job_span.attributes["messaging.message.id"] == "42"
    assert job_span.attributes["pgtq.outcome"] == "succeeded"
    assert job_span.status.status_code is StatusCode.UNSET
    assert trace.get_current_span().get_span_context().is_valid is False  # detached after


async def test_a_failed_job_span_records_the_error_and_link_only_starts_a_trace(
    app: pgtq.App, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tracing.install(provider, link_only=True)
    with provider.get_tracer("t").start_as_current_span("batch import") as deferring:
        carrier = tracing.inject()
    run_job(app, claimed(), "failed", 0.1, trace_context=carrier, error=ValueError("bad"))
    [job_span] = [s for s in exporter.get_finished_spans() if s.name == "process send"]
    assert job_span.status.status_code is StatusCode.ERROR
    assert "ValueError: bad" in (job_span.status.description or "")
    assert [e.name for e in job_span.events] == ["exception"]
    assert job_span.parent is None
    assert job_span.context.trace_id != deferring.get_span_context().trace_id
    [link] = job_span.links
    assert link.context.span_id == deferring.get_span_context().span_id


# -- through a real worker (the worker's hook calls) -----------------------------------------------

WIRING = "the worker does not call pgtq.observers yet (see the operations hand-off)"


async def test_a_real_worker_feeds_the_job_metrics(
    app: pgtq.App, side: Side, registry: Any
) -> None:
    @app.task(queue="emails")
    def send(to: str) -> None:
        if to == "bad":
            raise ValueError("no such mailbox")

    @app.task(queue="images")
    async def resize(n: int) -> int:
        return n

    await side.defer_many(send, [{"to": "a"}, {"to": "bad"}])
    await side.defer(resize, n=1)
    metrics.install(registry=registry)
    await side.run_worker(app, wait=False)
    finished = "pgtq_jobs_finished_total"
    assert value(registry, finished, queue="emails", task="send", status="succeeded") == 1
    assert value(registry, finished, queue="emails", task="send", status="failed") == 1
    assert value(registry, finished, queue="images", task="resize", status="succeeded") == 1
    assert value(registry, "pgtq_job_pickup_latency_seconds_count", queue="emails") == 2
    assert value(registry, "pgtq_jobs_running", queue="emails", task="send") == 0


async def test_a_real_worker_traces_each_job_in_the_deferring_trace(
    app: pgtq.App, side: Side, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tracing.install(provider)
    tracer = provider.get_tracer("the web app")

    @app.task()
    def work(n: int) -> None:
        with tracer.start_as_current_span("inside the sync task"):
            pass

    @app.task()
    async def work_async(n: int) -> None:
        with tracer.start_as_current_span("inside the async task"):
            pass

    with tracer.start_as_current_span("POST /work") as request:
        await side.defer(work, n=1)
        await side.defer(work_async, n=2)
    await side.run_worker(app, wait=False)

    by_name = {s.name: s for s in exporter.get_finished_spans()}
    for task, inner in (("work", "inside the sync task"), ("work_async", "inside the async task")):
        job_span = by_name[f"process {task}"]
        assert job_span.parent is not None
        assert job_span.parent.span_id == request.get_span_context().span_id
        assert by_name[inner].parent is not None
        assert by_name[inner].parent.span_id == job_span.context.span_id
