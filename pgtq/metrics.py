"""Prometheus metrics (``pip install 'pgtq[prometheus]'``).

Two sources, because they answer different questions:

- **per job, in this process** (a :class:`~pgtq.observers.JobObserver` the worker calls):
  ``pgtq_jobs_finished_total{queue,task,status}``, ``pgtq_job_duration_seconds{queue,task}``,
  ``pgtq_job_pickup_latency_seconds{queue}`` (from due to claimed), ``pgtq_jobs_running``;
- **per queue, from the database** at scrape time (``app.jobs.stats()``, cached for
  ``min_interval`` seconds so many workers scraped often cost little):
  ``pgtq_queue_jobs{queue,status}`` (the depth), ``pgtq_queue_oldest_waiting_seconds``,
  ``pgtq_queue_jobs_per_second``, ``pgtq_queue_paused``, ``pgtq_workers_live``.

``pgtq worker --metrics-port 9400`` calls :func:`serve`, which also answers ``/healthz`` for
the worker of its process (200 or 503, a one-line JSON body: see :func:`pgtq.health.check_process`);
in your own process::

    import pgtq.metrics
    pgtq.metrics.install(app)           # then expose prometheus_client's REGISTRY your way
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

try:
    from prometheus_client import (
        REGISTRY,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        make_wsgi_app,
    )
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pgtq.metrics needs prometheus-client: pip install 'pgtq[prometheus]'"
    ) from exc

from pgtq import health, observers
from pgtq.reports import Stats

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = ["JobMetrics", "QueueCollector", "install", "serve", "uninstall", "wsgi_app"]

logger = logging.getLogger("pgtq.metrics")

#: From a no-op (~1 ms) to a long batch job.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
PICKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

_M = TypeVar("_M", Counter, Gauge, Histogram)


class JobMetrics(observers.JobObserver):
    """Counts, times and pickup latencies of the jobs this process runs."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.finished = self._new(
            Counter,
            "pgtq_jobs_finished",
            "Job attempts finished by this process, by outcome (retried: failed, runs again).",
            ("queue", "task", "status"),
        )
        self.duration = self._new(
            Histogram,
            "pgtq_job_duration_seconds",
            "How long job attempts ran.",
            ("queue", "task"),
            buckets=DURATION_BUCKETS,
        )
        self.pickup = self._new(
            Histogram,
            "pgtq_job_pickup_latency_seconds",
            "From when a job was due to when a worker claimed it.",
            ("queue",),
            buckets=PICKUP_BUCKETS,
        )
        self.running = self._new(
            Gauge, "pgtq_jobs_running", "Jobs running in this process.", ("queue", "task")
        )

    def _new(
        self, kind: type[_M], name: str, documentation: str, labels: Sequence[str], **more: Any
    ) -> _M:
        """A metric of this observer, in its registry."""
        return kind(name, documentation, labels, registry=self.registry, **more)

    @property
    def metrics(self) -> tuple[Counter, Histogram, Histogram, Gauge]:
        """Every metric this observer registered (what :func:`uninstall` takes back)."""
        return (self.finished, self.duration, self.pickup, self.running)

    def job_started(self, start: observers.JobStart) -> Any:
        job = start.job
        self.running.labels(job.queue, job.task_name).inc()
        if start.waited is not None:
            self.pickup.labels(job.queue).observe(max(0.0, start.waited))
        return None

    def job_finished(self, end: observers.JobEnd, state: Any) -> None:
        job = end.job
        self.running.labels(job.queue, job.task_name).dec()
        self.finished.labels(job.queue, job.task_name, end.status).inc()
        self.duration.labels(job.queue, job.task_name).observe(end.duration)


class QueueCollector(Collector):
    """Queue depth, waits, rates and live workers, read from the database when scraped."""

    def __init__(self, app: App, min_interval: float = 5.0) -> None:
        self.app = app
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._cached: tuple[float, Stats] | None = None

    def _stats(self) -> Stats:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.min_interval:
                self._cached = (now, self.app.jobs.stats())
            return self._cached[1]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("pgtq_stats_up", "1 when the last read of queue stats worked.")
        try:
            stats = self._stats()
        except Exception as exc:
            logger.warning("reading queue stats for /metrics failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily(
            "pgtq_queue_jobs",
            "Jobs per queue and status (succeeded jobs are not counted).",
            labels=["queue", "status"],
        )
        oldest = GaugeMetricFamily(
            "pgtq_queue_oldest_waiting_seconds",
            "How long the oldest due job of the queue has waited.",
            labels=["queue"],
        )
        rate = GaugeMetricFamily(
            "pgtq_queue_jobs_per_second",
            "Jobs finished per second over the last minute (absent when none).",
            labels=["queue"],
        )
        paused = GaugeMetricFamily("pgtq_queue_paused", "1 when paused.", labels=["queue"])
        for q in stats.queues.values():
            for status, n in q.counts.items():
                depth.add_metric([q.name, status.value], n)
            if q.oldest_waiting is not None:
                oldest.add_metric([q.name], q.oldest_waiting)
            if q.rate is not None:
                rate.add_metric([q.name], q.rate)
            paused.add_metric([q.name], 1 if q.paused else 0)
        workers = GaugeMetricFamily("pgtq_workers_live", "Workers whose heartbeat is recent.")
        workers.add_metric([], len(stats.live_workers()))
        yield from (depth, oldest, rate, paused, workers)


_installed: dict[int, tuple[CollectorRegistry, JobMetrics, list[QueueCollector]]] = {}
_install_lock = threading.Lock()


def install(
    app: App | None = None,
    *,
    registry: CollectorRegistry = REGISTRY,
    min_interval: float = 5.0,
) -> JobMetrics:
    """Record job metrics in ``registry`` and, with ``app``, its queues at scrape time.

    Idempotent per registry (a second call returns the same observer; a second app adds its
    queue collector).
    """
    with _install_lock:
        found = _installed.get(id(registry))
        if found is None:
            found = (registry, JobMetrics(registry), [])
            _installed[id(registry)] = found
        _, job_metrics, collectors = found
        observers.add(job_metrics)
        if app is not None and not any(c.app is app for c in collectors):
            collector = QueueCollector(app, min_interval)
            registry.register(collector)
            collectors.append(collector)
        return job_metrics


def uninstall(registry: CollectorRegistry = REGISTRY) -> None:
    """Undo :func:`install` for ``registry`` (tests, reloads)."""
    with _install_lock:
        found = _installed.pop(id(registry), None)
        if found is None:
            return
        _, job_metrics, collectors = found
        observers.remove(job_metrics)
        for collector in collectors:
            registry.unregister(collector)
        for metric in job_metrics.metrics:
            registry.unregister(metric)


#: Where :func:`serve` answers for the worker's health.
HEALTHZ_PATH = "/healthz"

_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def wsgi_app(
    app: App,
    *,
    registry: CollectorRegistry = REGISTRY,
    max_age: float = health.DEFAULT_MAX_AGE,
) -> _WSGIApp:
    """The WSGI app :func:`serve` runs: ``/healthz`` (see :func:`pgtq.health.check_process`:
    200 when the database answers and this process's worker beat within ``max_age`` seconds,
    else 503; a one-line JSON body), every other path prometheus_client's metrics page."""
    if not max_age > 0:  # NaN too
        raise ValueError(f"max_age must be a positive number of seconds, not {max_age}")
    metrics_page = make_wsgi_app(registry)

    def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != HEALTHZ_PATH:
            return metrics_page(environ, start_response)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        verdict = health.check_process(app, max_age)
        if not verdict.healthy:
            logger.warning("/healthz: %s", verdict.message)
        body = (json.dumps(verdict.as_dict(), ensure_ascii=False) + "\n").encode()
        start_response(
            "200 OK" if verdict.healthy else "503 Service Unavailable",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else body]

    return application


class _Server(ThreadingMixIn, WSGIServer):
    """One thread a request: a slow database read (``/healthz``, a scrape) blocks only its
    own request, never the worker's loop nor the next probe."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr (a probe every few seconds would flood it)."""


def serve(
    app: App,
    port: int,
    addr: str = "0.0.0.0",
    *,
    registry: CollectorRegistry = REGISTRY,
    max_age: float = health.DEFAULT_MAX_AGE,
) -> WSGIServer:
    """:func:`install`, then serve ``/metrics`` and ``/healthz`` (:func:`wsgi_app`) on
    ``addr:port`` from a daemon thread.

    Returns the server: ``server.shutdown()`` stops it. ``port=0`` picks a free port
    (``server.server_port``).
    """
    install(app, registry=registry)
    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_Server):
        address_family = family  # IPv6 for "::", IPv4 for "0.0.0.0"

    server: WSGIServer = make_server(
        str(sockaddr[0]),
        port,
        wsgi_app(app, registry=registry, max_age=max_age),
        Server,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="pgtq-metrics", daemon=True)
    thread.start()
    return server
