"""``pgtq demo``: defer a few hundred sample jobs and watch a worker run them.

It shows, in a few seconds and with nothing to set up, what pgtq does: sync and async tasks
side by side, a failure retried into a success, a running job aborted, and the throughput.
With no DSN it runs on the embedded PostgreSQL in ./.pgtq, says so, and stops that server at
the end if it started it (``keep=True``, ``pgtq demo --keep``: leave it running).
The demo's tasks live on an app made by :func:`demo_app`, so importing this module registers
nothing. Its jobs go to a queue of their own (``pgtq_demo``), so running it on a real
database never touches anyone else's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from pgtq.app import DSN_ENV, App
from pgtq.connectors import describe
from pgtq.errors import PgtqError
from pgtq.jobs import JobContext
from pgtq.model import FINAL_STATUSES, Status
from pgtq.retry import Retry

QUEUE = "pgtq_demo"

#: How long the long-running job would run if nobody aborted it (shorter than STALL_TIMEOUT,
#: so a broken abort shows as a success in the summary rather than as a stalled demo).
LONG_JOB_SECONDS = 20.0

#: The demo gives up when no job has finished for this long (a stuck worker, not a slow one).
STALL_TIMEOUT = 30.0


class DemoFailed(PgtqError):
    """The demo's worker stopped or stalled before every job was final."""


@dataclass(frozen=True)
class DemoSummary:
    """How the demo's jobs ended: what ``pgtq demo`` prints, and what tests check."""

    total: int
    #: Final status -> jobs: adds up to ``total``.
    by_status: dict[str, int]
    #: Jobs that needed more than one attempt, whatever their final status.
    retried: int
    elapsed: float
    database: str
    aborted_job_id: int

    @property
    def jobs_per_second(self) -> float:
        return self.total / self.elapsed if self.elapsed > 0 else 0.0


def demo_app(dsn: str) -> App:
    """A fresh app with the demo's sample tasks (a mix of sync and async)."""
    app = App(dsn)

    @app.task(queue=QUEUE)
    def sleep_sync(ctx: JobContext, ms: int) -> int:
        """A sync task: runs in the worker's thread pool."""
        time.sleep(ms / 1000)
        return ms

    @app.task(queue=QUEUE)
    async def sleep_async(ctx: JobContext, ms: int) -> int:
        """An async task: runs on the worker's event loop."""
        await asyncio.sleep(ms / 1000)
        return ms

    @app.task(queue=QUEUE)
    async def noop(ctx: JobContext, n: int) -> dict[str, int]:
        return {"n": n, "square": n * n}

    @app.task(queue=QUEUE, retry=Retry(max_attempts=3, backoff="fixed", base=0.1, jitter=0))
    async def flaky(ctx: JobContext) -> dict[str, int]:
        """Fails its first attempt on purpose; the retry policy runs it again."""
        if ctx.attempt == 1:
            raise RuntimeError("a transient failure (the demo fails the first attempt on purpose)")
        return {"succeeded_on_attempt": ctx.attempt}

    @app.task(queue=QUEUE)
    def long_running(ctx: JobContext, seconds: float) -> str:
        """Works in small steps and stops when asked: how a sync task honours an abort."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ctx.should_abort():
                return "stopped early"
            time.sleep(0.01)
        return "ran to the end"

    return app


def _demo_arguments(count: int) -> dict[str, list[dict[str, Any]]]:
    """The quick jobs: half no-ops, half sleeps of 1-3 ms (async and sync alike)."""
    spread: dict[str, list[dict[str, Any]]] = {"noop": [], "sleep_async": [], "sleep_sync": []}
    for i in range(count):
        if i % 4 in (0, 2):
            spread["noop"].append({"n": i})
        elif i % 4 == 1:
            spread["sleep_async"].append({"ms": 1 + i % 3})
        else:
            spread["sleep_sync"].append({"ms": 1 + i % 3})
    return spread


@dataclass(frozen=True)
class _Database:
    """Where the demo runs: its URL, its name on screen, and whether the demo started it."""

    url: str
    label: str
    embedded: bool = False
    #: The embedded server was not running before the demo: the demo stops it after.
    started: bool = False


def _resolve_dsn(dsn: str | None, console: Console, stderr: Console) -> _Database:
    """``dsn``, else ``PGTQ_DSN``, else the embedded PostgreSQL (saying so on ``stderr``)."""
    dsn = dsn or os.environ.get(DSN_ENV) or None
    if dsn is not None:
        return _Database(dsn, describe(make_url(dsn)))
    from pgtq import embedded

    was_running = embedded.status().running
    with console.status("Starting the embedded PostgreSQL…"):
        url = embedded.embedded_dsn()
    stderr.print(embedded.notice(), soft_wrap=True, markup=False, highlight=False)
    label = f"the embedded PostgreSQL in {embedded.DEFAULT_PATH}"
    return _Database(url, label, embedded=True, started=not was_running)


def run_demo(
    dsn: str | None = None,
    jobs: int = 200,
    *,
    console: Console | None = None,
    stderr: Console | None = None,
    keep: bool = False,
) -> DemoSummary:
    """Migrate, defer ``jobs`` sample jobs, run a worker until all are final, print a summary.

    The database is ``dsn``, else ``PGTQ_DSN``, else the embedded PostgreSQL in ./.pgtq,
    stopped at the end when the demo started it, unless ``keep``.
    """
    if jobs < 3:
        raise ValueError("the demo needs at least 3 jobs")
    console = console or Console()
    database = _resolve_dsn(dsn, console, stderr or Console(stderr=True))
    try:
        app = demo_app(database.url)
        with _quiet_worker_log():
            summary = asyncio.run(_run(app, jobs, console, database.label))
        console.print(render_summary(summary), soft_wrap=True)
    finally:
        if database.embedded:
            _leave_embedded(database, keep, console)
    return summary


def _leave_embedded(database: _Database, keep: bool, console: Console) -> None:
    """Stop the embedded server the demo started (unless ``keep``); say what became of it."""
    from pgtq import embedded

    if database.started and not keep:
        embedded.stop_embedded()
        console.print(
            f"[dim]Stopped {database.label} (`pgtq demo --keep` leaves it running; "
            "the next command that needs it starts it again).[/]",
            soft_wrap=True,
        )
    else:
        console.print(
            f"[dim]{database.label[0].upper()}{database.label[1:]} keeps running: "
            "`pgtq embedded stop` stops it.[/]",
            soft_wrap=True,
        )


@contextlib.contextmanager
def _quiet_worker_log() -> Iterator[None]:
    """The demo fails and aborts jobs on purpose: no warnings about them on the terminal.

    (A logging setup of the user's own still receives them: this only stops Python's
    last-resort handler from printing them.)
    """
    handler = logging.NullHandler()
    logger = logging.getLogger("pgtq")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


async def _run(app: App, jobs: int, console: Console, database: str) -> DemoSummary:
    try:
        await app.migrate_async()
        return await _defer_and_watch(app, jobs, console, database)
    finally:
        await app.close_async()


async def _defer_and_watch(app: App, jobs: int, console: Console, database: str) -> DemoSummary:
    left = sum(
        n
        for (queue, status), n in (await app.jobs.counts_async()).items()
        if queue == QUEUE and status in (Status.TODO, Status.DOING)
    )
    if left:
        console.print(
            f"[dim]{left} job(s) of an interrupted demo are still queued: they run too, "
            "but are not counted.[/]"
        )
    console.print(f"Deferring {jobs} jobs to queue {QUEUE!r} at {database}")
    started = time.monotonic()
    # The long job goes first with a high priority, so the worker claims it at once.
    long_id = (
        await app.tasks["long_running"].configure(priority=10).defer_async(seconds=LONG_JOB_SECONDS)
    )
    ids: list[int] = [long_id, await app.tasks["flaky"].defer_async()]
    for name, arguments in _demo_arguments(jobs - 2).items():
        ids += await app.tasks[name].defer_many_async(arguments)

    worker = asyncio.create_task(
        app.run_worker_async(
            queues=[QUEUE],
            concurrency=10,
            fetch_job_polling_interval=0.1,  # the retry is due 0.1 s after its failure
            abort_job_polling_interval=0.2,
            shutdown_graceful_timeout=5.0,
            install_signal_handlers=False,
        ),
        name="pgtq-demo-worker",
    )
    abort_sent = False
    counts: dict[Status, tuple[int, int]] = {}
    try:
        with Progress(
            TextColumn("[bold]jobs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("final"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("jobs", total=len(ids))
            last_final, last_change = -1, time.monotonic()
            while True:
                if worker.done():
                    worker.result()  # raises what stopped it (e.g. SchemaNotMigrated)
                    raise DemoFailed("the demo's worker stopped before every job was final")
                counts = await app.jobs.counts_of_async(ids)
                if not abort_sent and counts.get(Status.DOING, (0, 0))[0]:
                    job = await app.jobs.get_async(long_id)
                    if job is not None and job.status == Status.DOING:
                        await app.jobs.abort_async(long_id)
                        abort_sent = True
                final = sum(n for status, (n, _) in counts.items() if status in FINAL_STATUSES)
                progress.update(bar, completed=final)
                if final == len(ids):
                    break
                now = time.monotonic()
                if final != last_final:
                    last_final, last_change = final, now
                elif now - last_change > STALL_TIMEOUT:
                    raise DemoFailed(
                        f"no demo job finished for {STALL_TIMEOUT:.0f} s ({final} of {len(ids)} "
                        "final): is another worker holding them?"
                    )
                await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        await _stop(worker)
    return DemoSummary(
        total=len(ids),
        by_status={status.value: n for status, (n, _) in counts.items()},
        retried=sum(retried for _, retried in counts.values()),
        elapsed=elapsed,
        database=database,
        aborted_job_id=long_id,
    )


async def _stop(worker: asyncio.Task[Any]) -> None:
    """Cancel the worker (a graceful shutdown: it ends its running jobs) and wait for it."""
    if not worker.done():
        worker.cancel()
    try:
        await worker
    except asyncio.CancelledError:
        pass
    except Exception:  # already raised by the watch loop; nothing more to report
        logging.getLogger("pgtq.demo").debug("the demo's worker failed", exc_info=True)


def render_summary(summary: DemoSummary) -> RenderableType:
    """How the jobs of this run ended (final states, adding up to the total), the retries
    apart (a retried job is also counted by how it ended), and how fast."""
    table = Table(min_width=30, show_footer=True)
    styles = {"succeeded": "green", "failed": "red", "aborted": "yellow", "cancelled": "yellow"}
    rows = [
        (status.value, summary.by_status.get(status.value, 0))
        for status in (Status.SUCCEEDED, Status.FAILED, Status.ABORTED, Status.CANCELLED)
        if summary.by_status.get(status.value, 0) or status in (Status.SUCCEEDED, Status.FAILED)
    ]
    table.add_column("final status", footer="total")
    table.add_column("jobs", justify="right", footer=str(sum(n for _, n in rows)))
    for status, n in rows:
        table.add_row(f"[{styles[status]}]{status}[/]", str(n))
    retried = "job" if summary.retried == 1 else "jobs"
    return Group(
        Text.from_markup(
            f"[bold]pgtq demo[/]: {summary.total} jobs in {summary.elapsed:.2f} s "
            f"([bold]{summary.jobs_per_second:,.0f} jobs/s[/]) on {summary.database}"
        ),
        table,
        Text(
            f"Retries: {summary.retried} {retried} needed more than one attempt (each also "
            "counted above, by its final status)."
        ),
        Text(f"Inspect the aborted job: pgtq jobs show {summary.aborted_job_id}", style="dim"),
    )
