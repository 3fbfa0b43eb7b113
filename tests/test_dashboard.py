"""``pgtq stats``: the dashboard as rendered, and ``--watch`` read off a real terminal screen.

The watch test runs ``python -m pgtq stats --watch`` in a pseudo-terminal and feeds what it
writes to a terminal emulator (pyte), then reads the screen, as a person would, across
refreshes: jobs deferred meanwhile show up without a keystroke.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import pgtq
from pgtq.dashboard import NO_DATA, History, render, sparkline
from pgtq.model import Status
from pgtq.reports import COUNTED_STATUSES, QueueStats, RunningJob, Stats, WorkerInfo

pyte = pytest.importorskip("pyte")

ROOT = Path(__file__).resolve().parent.parent
SQL = Callable[..., list[tuple[Any, ...]]]


def text_of(renderable: Any, width: int = 140) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def counts(**by_status: int) -> dict[Status, int]:
    return {s: by_status.get(s.value, 0) for s in COUNTED_STATUSES}


NOW = datetime(2030, 1, 1, tzinfo=UTC)


def sample_stats() -> Stats:
    worker = WorkerInfo(
        id="host-1-42-abcd",
        hostname="host-1",
        pid=42,
        queues=("emails",),
        started_at=NOW,
        last_heartbeat=NOW,
        heartbeat_age=2.0,
        running=(RunningJob(7, "send", "emails", NOW), RunningJob(8, "send", "emails", NOW)),
    )
    dead = WorkerInfo("host-2-9-ffff", "host-2", 9, None, NOW, NOW, 400.0)
    return Stats(
        window=60.0,
        queues={
            "emails": QueueStats("emails", counts(todo=12, doing=2, failed=1), 4.5, 3.25),
            "images": QueueStats("images", counts(todo=1), None, None, paused=True),
        },
        rates={("emails", "send"): 3.25},
        workers=(worker, dead),
    )


def test_render_shows_queues_rates_and_workers() -> None:
    history = History()
    history.add(sample_stats(), now=100.0)
    text = text_of(render(sample_stats(), history, title="pgtq test"))
    assert _row(text, "emails")[:7] == ["emails", "active", "12", "2", "1", "4.5 s", "3.25"]
    assert _row(text, "images")[:7] == ["images", "paused", "1", "0", "0", NO_DATA, NO_DATA]
    assert _row(text, "all queues")[2:5] == ["13", "2", "1"]
    assert "Workers (1 live)" in text
    assert _row(text, "emails")[7] == "█"  # one sample so far, drawn at the right edge
    assert _row(text, "host-1-42-abcd")[1:] == ["host-1", "42", "emails", "2.0 s ago", "2: send x2"]
    assert _row(text, "host-2-9-ffff")[3:] == ["all", "6.7 min ago (stale)", "idle"]
    assert "silent for over 30 s" in text
    narrow = text_of(render(sample_stats(), history, width=80), width=80)
    assert "last 5 min" not in narrow  # no room for sparklines: the numbers stay whole
    assert _row(narrow, "emails") == ["emails", "active", "12", "2", "1", "4.5 s", "3.25"]


def test_render_shows_idle_queues_with_zero_counts() -> None:
    """An idle queue (``Stats.with_queues``: a declared one, say) is a row of zeros, not a gap:
    no job, and no data for the wait and the rate."""
    text = text_of(render(sample_stats().with_queues(["reports"])))
    assert _row(text, "reports")[:7] == ["reports", "active", "0", "0", "0", NO_DATA, NO_DATA]
    assert [line.split("│")[1].strip() for line in text.splitlines() if "│" in line][:3] == [
        "emails",
        "images",
        "reports",
    ]
    assert "no queue yet" in text_of(render(Stats(window=60.0)))


def test_sparkline_scales_to_the_largest_and_leaves_gaps_blank() -> None:
    assert sparkline([None, 0.0, 1.0, 2.0, 4.0]) == " ▁▃▅█"
    assert sparkline([0.0, 0.0]) == "▁▁"
    assert sparkline([None, None]) == "  "


def test_history_buckets_rates_over_the_last_minutes() -> None:
    history = History()
    stats = sample_stats()
    for second in range(0, 60, 5):
        history.add(stats, now=1000.0 + second)
    buckets = history.buckets("emails", now=1075.0)  # samples 20 to 75 s old
    assert buckets[-2:] == [None, None]  # nothing sampled in the last 20 s
    assert buckets[-8:-2] == [pytest.approx(3.25)] * 6
    assert all(b is None for b in buckets[:-8])
    assert history.buckets("images", now=1075.0)[-3] == 0.0  # no data is drawn at the bottom
    history.add(stats, now=2000.0)  # samples older than the span are dropped
    assert sum(1 for b in history.buckets("emails", now=2000.0) if b is not None) == 1


# -- pgtq stats --watch in a real terminal ----------------------------------------------------


class Terminal:
    """A process on a pseudo-terminal, and the screen a terminal emulator makes of its output."""

    def __init__(self, args: list[str], env: dict[str, str], columns: int = 150, lines: int = 40):
        self.screen = pyte.Screen(columns, lines)
        self.stream = pyte.ByteStream(self.screen)
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True
        )
        os.close(slave)
        self.master = master

    def text(self) -> str:
        return "\n".join(self.screen.display)

    def wait_for(self, check: Callable[[str], bool], timeout: float = 20.0) -> str:
        """Read output until the screen passes ``check``; fail with the screen past ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                with contextlib.suppress(OSError):  # OSError: the process closed the terminal
                    self.stream.feed(os.read(self.master, 65536))
            screen = self.text()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed what was expected:\n{screen}")
            if self.proc.poll() is not None and not ready:
                raise AssertionError(f"the process ended ({self.proc.returncode}):\n{screen}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)


@pytest.fixture
def terminal(dsn: str) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_(*args: str) -> Terminal:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env.update(PGTQ_DSN=dsn, TERM="xterm-256color", PYTHONPATH=str(ROOT))
        term = Terminal([sys.executable, "-m", "pgtq", *args], env)
        opened.append(term)
        return term

    yield open_
    for term in opened:
        term.close()


def _row(screen: str, name: str) -> list[str]:
    for line in screen.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] == name:
            return cells[1:-1]
    return []


def test_watch_redraws_every_second_in_a_terminal(
    dsn: str, sql: SQL, terminal: Callable[..., Terminal]
) -> None:
    app = pgtq.App(dsn)

    @app.task(queue="emails")
    def send(to: str) -> None: ...

    try:
        send.defer_many([{"to": "a"}, {"to": "b"}])
        term = terminal("stats", "--watch")
        first = term.wait_for(lambda s: _row(s, "emails")[2:3] == ["2"])
        assert "Workers (0 live)" in first
        assert "last 5 min" in first  # the sparkline column, on a wide terminal
        stamp = next(line for line in first.splitlines() if "updated" in line)

        # Between refreshes: more jobs, one running on a worker that just beat.
        ids = send.defer_many([{"to": "c"}, {"to": "d"}, {"to": "e"}])
        sql("INSERT INTO pgtq.workers (id, hostname, pid) VALUES ('w-tty', 'tty-host', 4242)")
        sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w-tty' WHERE id = %s", ids[0])
        second = term.wait_for(lambda s: _row(s, "emails")[2:4] == ["4", "1"] and "w-tty" in s)
        assert stamp not in second  # redrawn, not appended: one dashboard on screen
        assert second.count("Queues") == 1
        assert "Workers (1 live)" in second
        assert _row(second, "w-tty")[1:3] == ["tty-host", "4242"]
        assert "1: send" in second

        term.proc.send_signal(signal.SIGINT)  # Ctrl+C ends the dashboard cleanly
        assert term.proc.wait(timeout=10) == 0
    finally:
        app.close()


def test_watch_shows_the_apps_idle_queues(dsn: str, terminal: Callable[..., Terminal]) -> None:
    """With ``--app``, the queues its tasks declare stay on the dashboard with no job at all."""
    term = terminal("stats", "--watch", "--app", "tests.apps.basic:app")
    screen = term.wait_for(
        lambda s: _row(s, "greetings")[:5] == ["greetings", "active", "0", "0", "0"]
    )
    assert _row(screen, "default")[:5] == ["default", "active", "0", "0", "0"]
    term.proc.send_signal(signal.SIGINT)
    assert term.proc.wait(timeout=10) == 0


def test_watch_on_an_unreachable_database_is_one_line(terminal: Callable[..., Terminal]) -> None:
    term = terminal("stats", "--watch", "--dsn", "postgresql://postgres@127.0.0.1:1/x")
    screen = term.wait_for(lambda s: "Error:" in s)
    assert term.proc.wait(timeout=10) == 1
    lines = [line for line in screen.splitlines() if line.strip()]
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0], screen
