"""Four worker processes race over 20,000 jobs (one of them replaced on the way): no
job ever has two attempts running at once, attempts are counted exactly, every job succeeds,
and every job's successful run happens exactly once."""

from __future__ import annotations

import signal
from collections import Counter, defaultdict
from itertools import groupby
from typing import Any

import pytest

from tests.faults import worker as script
from tests.faults.conftest import Workers, until

COUNTS = "SELECT status, count(*) FROM pgtq.jobs GROUP BY status"

#: What may end an attempt (``started`` is the only way to begin one).
ENDS = {"retried", "rescued", "released", "succeeded", "failed", "aborted"}


def check_history(job_id: int, events: list[tuple[str, int]]) -> list[str]:
    """What is wrong with one job's history (``(type, attempt)`` oldest first), if anything.

    ``deferred``, then attempts one after the other: each ``started`` ends before the next
    begins; the attempt numbers count up by one per start (down by one per release).
    """
    problems = []
    types = [t for t, _ in events]
    if types[:1] != ["deferred"]:
        problems.append(f"job {job_id} does not begin with deferred: {types}")
    attempt, running = 0, False
    for kind, recorded in events[1:]:
        if kind == "started":
            if running:
                problems.append(f"job {job_id}: two attempts running at once: {types}")
            running, attempt = True, attempt + 1
        elif kind in ENDS:
            if not running:
                problems.append(f"job {job_id}: {kind} with no attempt running: {types}")
            running = False
            if kind == "released":
                attempt -= 1
        else:
            problems.append(f"job {job_id}: unexpected {kind}: {types}")
        if recorded != attempt:
            problems.append(f"job {job_id}: attempt {recorded} recorded, {attempt} counted")
    if types[-1:] != ["succeeded"]:
        problems.append(f"job {job_id} did not end succeeded: {types}")
    return problems


def explain(job_ids: list[int], runs: list[Any], sql: Any, workers: Workers) -> str:
    """What happened to these jobs: every run record, every history row, and each worker's
    log lines that name them (to find which path ran or gave back a job twice)."""
    lines = []
    for job_id in job_ids:
        lines.append(f"\njob {job_id}:")
        lines += [
            f"  run {r.attempt} {r.pid} {r.event} {r.at:.6f}" for r in runs if r.job_id == job_id
        ]
        history = sql(
            "SELECT * FROM pgtq.job_history WHERE job_id = %s ORDER BY at, rank, seq", job_id
        )
        lines += [f"  history {row}" for row in history]
    for w in workers.started:
        named = [
            line
            for line in w.log_text().splitlines()
            if any(str(j) in line for j in job_ids) or " WARNING " in line or " ERROR " in line
        ][:20]
        lines += [f"  log of {w.pid}: {line}" for line in named]
    return "\n".join(lines)


@pytest.mark.slow
async def test_four_workers_never_run_two_attempts_of_a_job_at_once(
    dsn: str, sql: Any, workers: Workers
) -> None:
    total = 20_000
    app = script.build(dsn)
    # 40 % sync no-ops, 40 % async ones, 20 % that fail once (retried at once, base=0).
    mix = {"noop_sync": 200, "noop_async": 200, "flaky_sync": 50, "flaky_async": 50}
    ids_by_kind: dict[str, list[int]] = defaultdict(list)
    for chunk in range(total // sum(mix.values())):  # interleaved: every worker gets each kind
        for kind, n in mix.items():
            ids_by_kind[kind] += app.get_task(kind).defer_many([{"n": chunk}] * n)
    app.close()
    ids = {i for kind_ids in ids_by_kind.values() for i in kind_ids}
    assert len(ids) == total
    flaky = set(ids_by_kind["flaky_sync"]) | set(ids_by_kind["flaky_async"])

    def succeeded() -> int:
        return int(sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'")[0][0])

    # No worker is declared dead here (the kill tests cover that): a beat late by a second on
    # a loaded machine must not turn the rescue's at-least-once into a "doubled run" failure.
    options: dict[str, Any] = {"concurrency": 10, "batch_size": 20, "rescue_after": 10.0}
    pool = [workers.start(**options) for _ in range(4)]
    # A third of the way through, one worker is stopped (SIGTERM) and replaced: its jobs
    # claimed ahead are released and run elsewhere.
    await until(lambda: succeeded() >= total // 3, timeout=120, what="a third done")
    pool[0].send(signal.SIGTERM)
    assert await pool[0].exit_code(timeout=30) == 0
    pool[0] = workers.start(**options)
    # The replacement must be up (registered) before it is told to stop at the end: a SIGTERM
    # that lands while Python is still importing is not the worker's to handle.
    await until(
        lambda: sql("SELECT count(*) FROM pgtq.workers")[0][0] == 4,
        timeout=60,
        what="the replacement worker registered",
    )
    await until(
        lambda: succeeded() == total,
        timeout=150,
        what=lambda: f"every job succeeded: {sql(COUNTS)}",
        every=0.2,
    )
    for w in pool:
        w.send(signal.SIGTERM)
    assert [await w.exit_code(timeout=30) for w in pool] == [0, 0, 0, 0]

    events = sql(
        "SELECT job_id, type, attempt FROM pgtq.job_history ORDER BY job_id, at, rank, seq"
    )
    started: Counter[int] = Counter()
    released: Counter[int] = Counter()
    problems: list[str] = []
    for job_id, rows in groupby(events, key=lambda r: r[0]):
        history = [(kind, attempt) for _, kind, attempt in rows]
        problems += check_history(job_id, history)
        started[job_id] = sum(kind == "started" for kind, _ in history)
        released[job_id] = sum(kind == "released" for kind, _ in history)
    assert not problems, f"{len(problems)} problems, first ones: {problems[:5]}"
    attempts = dict(sql("SELECT id, attempts FROM pgtq.jobs"))
    assert set(attempts) == ids
    wrong = [j for j in ids if attempts[j] != started[j] - released[j]]
    assert not wrong, f"attempts != started - released for {len(wrong)} jobs, e.g. {wrong[:5]}"
    assert all(attempts[j] >= 2 for j in flaky)

    runs = workers.runs()
    ok = Counter(r.job_id for r in runs if r.event == "ok")
    wrong_runs = sorted((ids - set(ok)) | {j for j, n in ok.items() if n > 1})
    assert not wrong_runs, (
        f"a successful run missing or doubled for {len(wrong_runs)} jobs: "
        + explain(wrong_runs[:3], runs, sql, workers)
    )
    failed_first = {r.job_id for r in runs if r.event == "fail"}
    assert failed_first == flaky
    assert {r.attempt for r in runs if r.event == "fail"} == {1}
    print(
        f"\n4 workers, {total} jobs: {sum(released.values())} releases, "
        f"{sum(started.values())} attempts started, {len(flaky)} retried once"
    )
