"""``pgtq stats``: the queues, their throughput and the workers, as rich tables.

:func:`render` is pure (a :class:`~pgtq.reports.Stats` and a :class:`History` in, a renderable
out), so tests can look at a dashboard without a terminal; :func:`watch` redraws it every
``interval`` seconds until Ctrl+C. Sparklines show jobs per second over the last minutes as
sampled by this dashboard (they fill in while it runs).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pgtq.reports import NO_DATA, STALE_AFTER, Stats, WorkerInfo, duration

__all__ = ["History", "render", "sparkline", "watch"]

TICKS = "▁▂▃▄▅▆▇█"
#: Every column of a sparkline is this many seconds; with SPARK_WIDTH columns: 5 minutes.
BUCKET_SECONDS = 10.0
SPARK_WIDTH = 30
ALL = "all queues"


@dataclass
class History:
    """Rates sampled at each refresh, per queue (and for all queues), kept for a few minutes."""

    span: float = BUCKET_SECONDS * SPARK_WIDTH
    samples: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    last: float = 0.0  # when the newest sample was taken: the right edge of the sparklines

    def add(self, stats: Stats, now: float | None = None) -> None:
        now = self.last = time.monotonic() if now is None else now
        rates = {name: q.rate for name, q in stats.queues.items()}
        rates[ALL] = stats.rate()
        for name in set(rates) | set(self.samples):
            series = self.samples.setdefault(name, deque())
            series.append((now, rates.get(name) or 0.0))
            while series and series[0][0] < now - self.span:
                series.popleft()

    def buckets(self, name: str, now: float | None = None) -> list[float | None]:
        """Mean rate per bucket, oldest first; None where no sample fell."""
        now = self.last if now is None else now
        sums = [0.0] * SPARK_WIDTH
        counts = [0] * SPARK_WIDTH
        for at, rate in self.samples.get(name, ()):
            index = SPARK_WIDTH - 1 - int((now - at) // BUCKET_SECONDS)
            if 0 <= index < SPARK_WIDTH:
                sums[index] += rate
                counts[index] += 1
        return [s / c if c else None for s, c in zip(sums, counts, strict=True)]


def sparkline(values: list[float | None]) -> str:
    """One character per value, scaled to the largest; a blank where there is no sample."""
    top = max((v for v in values if v is not None), default=0.0)
    chars = []
    for v in values:
        if v is None:
            chars.append(" ")
        elif top <= 0:
            chars.append(TICKS[0])
        else:
            chars.append(TICKS[min(len(TICKS) - 1, int(v / top * (len(TICKS) - 1) + 0.5))])
    return "".join(chars)


def _rate(value: float | None) -> str:
    return NO_DATA if value is None else f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _running(worker: WorkerInfo) -> str:
    if not worker.running:
        return "idle"
    names: dict[str, int] = {}
    for job in worker.running:
        names[job.task_name] = names.get(job.task_name, 0) + 1
    detail = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in sorted(names.items()))
    return f"{len(worker.running)}: {detail}"


def spark_width_for(console_width: int) -> int:
    """Room left for the sparklines once the numbers are drawn (0: no sparkline column)."""
    return max(0, min(SPARK_WIDTH, console_width - 80))


def queues_table(
    stats: Stats, history: History | None = None, spark_width: int = SPARK_WIDTH
) -> Table:
    title = f"Queues (oldest: wait of the oldest due job; jobs/s over {stats.window:.0f} s)"
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("queue", style="bold", overflow="fold")
    for name in ("state", "waiting", "doing", "failed", "oldest", "jobs/s"):
        table.add_column(name, justify="left" if name == "state" else "right", no_wrap=True)
    if history is None or spark_width <= 0:
        history = None
    else:
        minutes = history.span / 60
        table.add_column(f"last {minutes:.0f} min", no_wrap=True, min_width=spark_width)
    for q in stats.queues.values():
        row: list[RenderableType] = [
            q.name,
            Text("paused", style="yellow") if q.paused else Text("active", style="green"),
            str(q.waiting),
            str(q.doing),
            Text(str(q.failed), style="red" if q.failed else ""),
            duration(q.oldest_waiting),
            _rate(q.rate),
        ]
        if history is not None:
            row.append(Text(sparkline(history.buckets(q.name)[-spark_width:]), style="cyan"))
        table.add_row(*row)
    if not stats.queues:
        table.add_row(Text("no queue yet", style="dim"), *[""] * (len(table.columns) - 1))
    elif len(stats.queues) > 1:
        oldest = [q.oldest_waiting for q in stats.queues.values() if q.oldest_waiting is not None]
        total: list[RenderableType] = [
            Text(ALL, style="dim"),
            "",
            str(sum(q.waiting for q in stats.queues.values())),
            str(sum(q.doing for q in stats.queues.values())),
            str(sum(q.failed for q in stats.queues.values())),
            duration(max(oldest, default=None)),
            _rate(stats.rate()),
        ]
        if history is not None:
            total.append(Text(sparkline(history.buckets(ALL)[-spark_width:]), style="cyan"))
        table.add_row(*total, style="dim", end_section=False)
    return table


def workers_table(stats: Stats) -> Table:
    live = len(stats.live_workers())
    table = Table(title=f"Workers ({live} live)", title_justify="left")
    table.add_column("worker", style="bold", overflow="fold")
    table.add_column("host")
    table.add_column("pid", justify="right")
    table.add_column("queues")
    table.add_column("heartbeat", justify="right")
    table.add_column("running", overflow="fold")
    for w in stats.workers:
        beat = Text(
            f"{duration(w.heartbeat_age)} ago",
            style="" if w.is_alive() else "bold red",
        )
        if not w.is_alive():
            beat.append(" (stale)")
        table.add_row(
            w.id,
            w.hostname,
            str(w.pid),
            ", ".join(w.queues) if w.queues else "all",
            beat,
            _running(w),
        )
    if not stats.workers:
        table.add_row(Text("no worker running", style="dim"), "", "", "", "", "")
    return table


def render(
    stats: Stats,
    history: History | None = None,
    *,
    title: str = "pgtq",
    error: str | None = None,
    at: datetime | None = None,
    width: int = 120,
) -> RenderableType:
    """The whole dashboard. ``error``: why the last refresh failed (the data shown is older)."""
    stamp = (at or datetime.now()).strftime("%H:%M:%S")
    header = Text.assemble((title, "bold"), f"  ·  updated {stamp}")
    parts: list[RenderableType] = [header]
    if error:
        parts.append(Text(f"refresh failed, showing older data: {error}", style="bold red"))
    parts += [queues_table(stats, history, spark_width_for(width)), workers_table(stats)]
    stale = [w for w in stats.workers if not w.is_alive()]
    if stale:
        parts.append(
            Text(
                f"{len(stale)} worker(s) silent for over {STALE_AFTER:.0f} s: their jobs are "
                "retried once they are declared dead",
                style="dim",
            )
        )
    return Group(*parts)


def watch(
    read: Callable[[], Stats],
    *,
    console: Console,
    title: str,
    interval: float = 1.0,
    refreshes: int | None = None,
) -> None:
    """Redraw the dashboard every ``interval`` seconds until Ctrl+C (or ``refreshes`` draws).

    A failed read keeps the last data on screen with the error above it, and tries again:
    a dashboard should outlive a database restart.
    """
    history = History()
    stats = Stats(window=60.0)
    drawn = 0
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while refreshes is None or drawn < refreshes:
            started = time.monotonic()
            error = None
            try:
                stats = read()
                history.add(stats)
            except Exception as exc:  # shown on screen, then tried again
                error = " ".join(str(exc).split()) or type(exc).__name__
            frame = render(stats, history, title=title, error=error, width=console.width)
            live.update(frame, refresh=True)
            drawn += 1
            if refreshes is not None and drawn >= refreshes:
                break
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
