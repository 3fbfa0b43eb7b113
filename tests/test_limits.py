"""Fleet-wide limits, enforced in the claim itself: three worker processes never exceed them.

The proof is exact: every start and end is in ``job_events`` (written by the database), so
the greatest number of jobs running at once can be computed by a sweep over them, not only
sampled. A sampler polls the database as well, as a second witness.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgtq
from pgtq.limits import (
    Limit,
    allowances,
    charges,
    fresh_starts,
    key_allowances,
    key_bucket,
    key_bucket_task,
    most_starts,
    parse_rate,
)
from pgtq.worker import Worker
from tests import limits_workload
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_parse_rate() -> None:
    assert parse_rate("100/s") == 100
    assert parse_rate("30/m") == 0.5
    assert parse_rate(" 36 / hour ") == 0.01
    assert parse_rate(2.5) == 2.5
    assert parse_rate(None) is None
    for bad in ("fast", "10/d", "0/s", -1):
        with pytest.raises(ValueError, match="invalid rate limit"):
            parse_rate(bad)  # type: ignore[arg-type]


@pytest.mark.unit
def test_allowances_and_charges() -> None:
    limits = {"task:a": Limit(concurrency=3), "queue:q": Limit(rate=10), "task:b": Limit(2, 1)}
    running = {"task:a": 1, "task:b": 2}
    buckets = {"queue:q": (2.5, 0.1)}  # 2.5 tokens, 0.1 s ago: 3.5 now
    assert allowances(limits, running, buckets) == {"task:a": 2, "queue:q": 3, "task:b": 0}
    left = charges(limits, buckets, ["queue:q", "queue:q", "task:a"])
    assert left == {"queue:q": pytest.approx(1.5), "task:b": 1.0}  # a new bucket starts full


class _Clock:
    """A fake clock and one rate-limited group, claimed as the worker does: read the bucket
    (tokens, seconds since it was written), take what ``allowances`` gives, then write what
    ``charges`` leaves (only when something was taken, as the worker does)."""

    def __init__(self, limit: Limit) -> None:
        self.limits = {"task:t": limit}
        self.bucket: tuple[float, float] | None = None  # (tokens, written at)
        self.starts: list[float] = []

    def claim(self, now: float, want: int) -> int:
        buckets = {} if self.bucket is None else {"task:t": (self.bucket[0], now - self.bucket[1])}
        took = min(want, allowances(self.limits, {}, buckets)["task:t"])
        if took:
            left = charges(self.limits, buckets, ["task:t"] * took)["task:t"]
            self.bucket = (left, now)
            self.starts += [now] * took
        return took


@pytest.mark.unit
def test_the_default_burst_is_one_seconds_worth_then_the_rate() -> None:
    clock = _Clock(Limit(rate=parse_rate("5/s")))
    assert clock.claim(0.0, 100) == 5  # a full bucket: five at once
    assert clock.claim(0.1, 100) == 0
    assert clock.claim(0.2, 100) == 1  # then one each 1/5 s
    assert clock.claim(0.3, 100) == 0
    assert clock.claim(1.2, 100) == 5  # refilled, never above the capacity
    assert Limit(rate=0.5).capacity == 1  # "30/m": one at a time
    assert most_starts(Limit(rate=5), 1.0) == 10  # documented: 5 at once, 5 refilled


@pytest.mark.unit
def test_burst_one_spaces_starts_evenly() -> None:
    clock = _Clock(Limit(rate=parse_rate("5/s"), burst=1))
    taken = [clock.claim(t / 100, 100) for t in range(0, 101, 10)]  # every 0.1 s for 1 s
    assert taken == [1, 0] * 5 + [1]
    burst = _Clock(Limit(rate=5, burst=20))
    assert burst.claim(0.0, 100) == 20


@pytest.mark.unit
def test_bad_bursts_are_refused() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="burst"):
            Limit(rate=1, burst=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_limit"):
        Limit(concurrency=1, burst=3)
    app = pgtq.App("postgresql://localhost/x")
    with pytest.raises(pgtq.ConfigurationError, match="burst"):

        @app.task(rate_limit="5/s", burst=0)
        def nope() -> None: ...


@pytest.mark.unit
@given(
    per_second=st.integers(min_value=1, max_value=50),
    burst=st.one_of(st.none(), st.integers(min_value=1, max_value=60)),
    claims=st.lists(
        st.tuples(st.integers(min_value=0, max_value=400), st.integers(min_value=1, max_value=80)),
        max_size=60,
    ),
)
def test_no_window_sees_more_starts_than_the_bucket_allows(
    per_second: int, burst: int | None, claims: list[tuple[int, int]]
) -> None:
    """Claims at any times (ms steps of a fake clock) wanting any numbers of jobs: any span
    of T seconds sees at most capacity + rate * T starts, and with ``burst=1`` no
    one-second window sees more than the rate's count."""
    limit = Limit(rate=float(per_second), burst=burst)
    clock = _Clock(limit)
    now = 0
    for gap, want in claims:
        now += gap
        clock.claim(now / 1000, want)
    starts = clock.starts
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            if starts[j] > first + 1.0:
                break
            assert j - i + 1 <= most_starts(limit, starts[j] - first)
        in_window = sum(1 for t in starts[i:] if t < first + 1.0)
        if burst == 1:
            assert in_window <= per_second
        else:
            assert in_window <= limit.capacity + per_second


async def test_a_rate_limit_with_burst_one_never_exceeds_its_count_in_any_second(
    app: pgtq.App, sql: Any
) -> None:
    """A real worker, with claims as often as it likes: the jobs' ``started_at`` (the
    database's clock) are 1/5 s apart or more, so no one-second window holds six."""

    @app.task(rate_limit="5/s", burst=1)
    async def paced(n: int) -> None:
        return None

    await paced.defer_many_async([{"n": i} for i in range(8)])
    worker = Worker(app, concurrency=8, fetch_job_polling_interval=0.01, summary_interval=None)
    running = asyncio.create_task(worker.run())
    try:
        await eventually(
            lambda: sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'") == [(8,)],
            timeout=20,
        )
    finally:
        worker.stop()
        await running
    starts = [
        r[0] for r in sql("SELECT started_at FROM pgtq.jobs WHERE task_name = 'paced' ORDER BY 1")
    ]
    assert len(starts) == 8
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.2 - 1e-6, gaps
    for i, first in enumerate(starts):
        assert sum(1 for t in starts[i:] if (t - first).total_seconds() < 1.0) <= 5


def _max_overlap(events: list[tuple[Any, str]]) -> int:
    """Greatest number of attempts running at once, from (time, 'start'|'end') pairs."""
    running = peak = 0
    for _, kind in sorted(events, key=lambda e: (e[0], e[1] == "start")):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


def _overlaps(sql: Any, group: str) -> dict[str, int]:
    rows = sql(
        f"SELECT {group}, e.at, e.type FROM pgtq.job_history e JOIN pgtq.jobs j ON j.id = e.job_id "
        "WHERE e.type <> 'deferred'"
    )
    by_group: dict[str, list[tuple[Any, str]]] = {}
    for key, at, kind in rows:
        by_group.setdefault(key, []).append((at, "start" if kind == "started" else "end"))
    return {key: _max_overlap(events) for key, events in by_group.items()}


@pytest.mark.slow
async def test_three_worker_processes_never_exceed_a_limit(dsn: str, sql: Any) -> None:
    app = limits_workload.build(dsn)
    await app.queues.set_limits_async("narrow", concurrency=2)
    await app.get_task("capped").defer_many_async([{"n": i} for i in range(60)])
    keyed = app.get_task("keyed")
    for key in range(3):
        await keyed.configure(concurrency_key=f"tenant-{key}").defer_many_async(
            [{"n": i} for i in range(15)]
        )
    await app.get_task("in_narrow_queue").defer_many_async([{"n": i} for i in range(40)])
    await app.get_task("rated").defer_many_async([{"n": i} for i in range(100)])
    await app.close_async()

    peaks = {"capped": 0, "narrow": 0, "keyed": 0}

    async def sample() -> None:
        while True:
            [(capped, narrow, keyed_peak)] = sql(
                "SELECT count(*) FILTER (WHERE task_name = 'capped'), "
                "count(*) FILTER (WHERE queue = 'narrow'), "
                "coalesce((SELECT max(n) FROM (SELECT count(*) n FROM pgtq.jobs WHERE "
                "status = 'doing' AND concurrency_key IS NOT NULL GROUP BY concurrency_key) k), 0) "
                "FROM pgtq.jobs WHERE status = 'doing'"
            )
            for name, value in (("capped", capped), ("narrow", narrow), ("keyed", keyed_peak)):
                peaks[name] = max(peaks[name], value)
            await asyncio.sleep(0.005)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 (started once, waited for below)
            [sys.executable, "-m", "tests.limits_workload", dsn], env=env, cwd=ROOT
        )
        for _ in range(3)
    ]
    sampler = asyncio.create_task(sample())
    try:
        await eventually(
            lambda: sql("SELECT count(*) FROM pgtq.jobs WHERE status <> 'succeeded'") == [(0,)],
            timeout=120,
        )
    finally:
        sampler.cancel()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 30) for p in procs]
    assert codes == [0, 0, 0]
    by_task = _overlaps(sql, "j.task_name")
    by_queue = _overlaps(sql, "j.queue")
    by_key = _overlaps(sql, "coalesce(j.concurrency_key, '-')")
    assert peaks["capped"] <= 3, peaks
    assert by_task["capped"] <= 3, by_task
    assert by_queue["narrow"] <= 2 and peaks["narrow"] <= 2
    assert all(by_key[f"tenant-{k}"] == 1 for k in range(3)) and peaks["keyed"] <= 1
    # The limits do not stop the work: each task ran to the end (and went above one at once).
    assert by_task["capped"] >= 2 and by_queue["narrow"] >= 2

    # Rate: a bucket of one second's worth (40), refilled at 40/s: by t seconds after the
    # first start, at most 40 + 40 t jobs may have started.
    starts = [
        row[0]
        for row in sql(
            "SELECT e.at FROM pgtq.job_history e JOIN pgtq.jobs j ON j.id = e.job_id "
            "WHERE j.task_name = 'rated' AND e.type = 'started' ORDER BY e.at"
        )
    ]
    assert len(starts) == 100
    first = starts[0]
    for i, at in enumerate(starts):
        assert i + 1 <= 40 + 40 * (at - first).total_seconds() + 1e-6, (i, at - first)


async def test_task_concurrency_in_process(side: Any, app: pgtq.App) -> None:
    """Two workers of one app share a task cap of 1: the task never runs twice at once."""
    running = 0
    peak = 0

    @app.task(concurrency=1)
    async def single() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    await side.defer_many(single, [{} for _ in range(10)])
    await asyncio.gather(
        app.run_worker_async(wait=False, concurrency=5),
        app.run_worker_async(wait=False, concurrency=5),
    )
    assert peak == 1
    statuses = {row.status for row in [await side.get(app, i) for i in range(1, 11)] if row}
    assert statuses == {pgtq.Status.SUCCEEDED}


# -- key_rate_limit: a token bucket per concurrency_key of a task ---------------------------


@pytest.mark.unit
def test_key_buckets_and_their_allowances() -> None:
    limits = {"send": Limit(rate=2.0), "push": Limit(rate=1.0, burst=3)}
    assert key_bucket("send", "tenant#1") == "key:send#tenant#1"
    assert key_bucket_task("key:send#tenant#1") == "send"
    assert fresh_starts(limits["send"]) == 2 and fresh_starts(limits["push"]) == 3
    buckets = {
        "key:send#a": (0.2, 0.1),  # 0.4 tokens now: none to start
        "key:send#b": (0.0, 0.6),  # 1.2: one
        "key:send#c": (1.5, 1.0),  # full again (2): dropped, the same as no bucket
        "key:push#a": (0.0, 2.5),  # 2.5 of 3: two
        "key:gone#a": (0.0, 0.0),  # a task this worker does not have: left alone
    }
    allowed, full = key_allowances(limits, buckets)
    assert allowed == {"key:send#a": 0, "key:send#b": 1, "key:push#a": 2}
    assert full == ["key:send#c"]


@pytest.mark.unit
def test_key_rate_limit_options() -> None:
    app = pgtq.App("postgresql://localhost/x")

    @app.task(key_rate_limit="5/s", burst=1)
    def paced() -> None: ...

    assert paced.key_rate_limit == Limit(rate=5.0, burst=1)
    assert paced.limit == Limit()  # no task-wide limit: burst is the key buckets'

    @app.task(rate_limit="100/s", key_rate_limit="30/m")
    def both() -> None: ...

    assert both.limit == Limit(rate=100.0) and both.key_rate_limit == Limit(rate=0.5)
    with pytest.raises(pgtq.ConfigurationError, match="invalid rate limit"):
        app.task(key_rate_limit="fast")(lambda: None)
    with pytest.raises(pgtq.ConfigurationError, match="'#'"):
        app.task(name="a#b", key_rate_limit="1/s")(lambda: None)


def _starts_by_key(sql: Any, task: str) -> dict[str, list[Any]]:
    by_key: dict[str, list[Any]] = {}
    for key, at in sql(
        "SELECT concurrency_key, started_at FROM pgtq.jobs WHERE task_name = %s AND "
        "started_at IS NOT NULL ORDER BY started_at",
        task,
    ):
        by_key.setdefault(key, []).append(at)
    return by_key


def _within_the_bucket(starts: list[Any], limit: Limit) -> None:
    """No span of T seconds holds more than ``capacity + rate * T`` starts (the database's
    clock: ``started_at`` is written by the claim)."""
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            span = (starts[j] - first).total_seconds()
            assert j - i + 1 <= most_starts(limit, span + 1e-3), (i, j, span)


async def test_a_key_with_a_backlog_does_not_hold_back_another_key(
    side: Any, app: pgtq.App, sql: Any
) -> None:
    """One key's backlog, far past what a claim scans, waits on its bucket; a job of
    another key starts at once. The buckets of idle keys are dropped again."""
    if side.name == "sync":

        @app.task(key_rate_limit="2/s")
        def send(n: int) -> None:
            return None

    else:

        @app.task(key_rate_limit="2/s")  # type: ignore[no-redef]
        async def send(n: int) -> None:
            return None

    await side.defer_many(send.configure(concurrency_key="busy"), [{"n": i} for i in range(100)])
    await side.defer(send, n=-1)  # no key: no key bucket either
    worker = Worker(app, concurrency=4, fetch_job_polling_interval=0.01, summary_interval=None)
    running = asyncio.create_task(worker.run())
    try:

        def started(key: str | None) -> int:
            [(n,)] = sql(
                "SELECT count(*) FROM pgtq.jobs WHERE started_at IS NOT NULL AND "
                "concurrency_key IS NOT DISTINCT FROM %s",
                key,
            )
            return int(n)

        await eventually(lambda: started("busy") >= 3 and started(None) == 1)
        quiet = await side.defer(send.configure(concurrency_key="quiet"), n=0)
        await side.wait(app, quiet, timeout=10)
        [(waited, busy_left)] = sql(
            "SELECT extract(epoch FROM started_at - created_at)::float, (SELECT count(*) FROM "
            "pgtq.jobs WHERE concurrency_key = 'busy' AND status = 'todo') FROM pgtq.jobs "
            "WHERE id = %s",
            quiet,
        )
        assert busy_left > 80 and waited < 1.0, (waited, busy_left)
        await eventually(lambda: sql("SELECT key FROM pgtq.limit_buckets") == [("key:send#busy",)])
    finally:
        worker.stop()
        await running
    _within_the_bucket(_starts_by_key(sql, "send")["busy"], Limit(rate=2.0))


async def test_a_key_rate_holds_across_two_workers(side: Any, app: pgtq.App, sql: Any) -> None:
    """Two workers claim side by side: each key's starts stay within its bucket, and the
    keys run side by side (the rate is per key, not the task's)."""
    if side.name == "sync":

        @app.task(key_rate_limit="5/s")
        def fetch(n: int) -> None:
            return None

    else:

        @app.task(key_rate_limit="5/s")  # type: ignore[no-redef]
        async def fetch(n: int) -> None:
            return None

    for key in ("a", "b"):
        await side.defer_many(fetch.configure(concurrency_key=key), [{"n": i} for i in range(15)])
    workers = [
        Worker(app, concurrency=8, fetch_job_polling_interval=0.01, summary_interval=None)
        for _ in range(2)
    ]
    running = [asyncio.create_task(w.run()) for w in workers]
    try:
        await eventually(
            lambda: sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'") == [(30,)],
            timeout=30,
        )
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*running)
    [(claimers,)] = sql("SELECT count(DISTINCT worker_id) FROM pgtq.jobs")
    assert claimers == 2  # both workers took jobs
    starts = _starts_by_key(sql, "fetch")
    limit = Limit(rate=5.0)
    for key in ("a", "b"):
        assert len(starts[key]) == 15
        _within_the_bucket(starts[key], limit)
        # The bucket did bind: 5 at once, then 10 more at 5 a second.
        assert (starts[key][-1] - starts[key][0]).total_seconds() >= 2.0 - 0.05
    # Side by side: each key started before the other's last start.
    assert starts["a"][0] < starts["b"][-1] and starts["b"][0] < starts["a"][-1]
