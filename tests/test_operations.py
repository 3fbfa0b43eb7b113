"""Operations API: list jobs, stats, delete old jobs, cancel, pause and resume queues.

Each behaviour is one test run through the sync and the async API (``side``). States that no
public call produces quickly (a job finished a minute ago, a worker with a stale heartbeat)
are written with plain SQL, then read back through pgtq.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy.dialects import postgresql

import pgtq
from pgtq.jobs import InvalidFilter
from pgtq.model import Status
from pgtq.reports import COUNTED_STATUSES, Stats
from pgtq.statements import ListKey, SelectionKey, statements_for
from tests.conftest import eventually, libpq
from tests.sides import Side

SQL = Callable[..., list[tuple[Any, ...]]]


def tasks(app: pgtq.App) -> tuple[pgtq.Task[..., Any], pgtq.Task[..., Any]]:
    @app.task(queue="emails")
    def send(to: str) -> None: ...

    @app.task(queue="images")
    async def resize(n: int) -> None: ...

    return send, resize


def finish(sql: SQL, ids: list[int], status: str, ago: float = 0.0) -> None:
    """Mark jobs ended ``ago`` seconds ago, as a worker would have."""
    sql(
        "UPDATE pgtq.jobs SET status = %s, attempts = 1, "
        "started_at = now() - make_interval(secs => %s + 0.5), "
        "finished_at = now() - make_interval(secs => %s) WHERE id = ANY(%s)",
        status,
        ago,
        ago,
        ids,
    )


# -- list -------------------------------------------------------------------------------------


async def test_list_filters_by_queue_status_task_and_lock(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, resize = tasks(app)
    a = await side.defer(send.configure(lock="box-1"), to="a")
    b = await side.defer(send, to="b")
    c = await side.defer(resize, n=1)
    d = await side.defer(resize.configure(queue="emails"), n=2)
    finish(sql, [b], "failed")

    async def ids(**filters: Any) -> list[int]:
        jobs = await side.call(app.jobs, "list", **filters)
        assert all(isinstance(j, pgtq.Job) for j in jobs)
        return [j.id for j in jobs]

    assert await ids() == [a, b, c, d]
    assert await ids(queue="emails") == [a, b, d]
    assert await ids(status="todo") == [a, c, d]
    assert await ids(status=Status.FAILED) == [b]
    assert await ids(status=["failed", Status.TODO], queue="emails") == [a, b, d]
    assert await ids(task="resize") == [c, d]
    assert await ids(task="resize", queue="images") == [c]
    assert await ids(lock="box-1") == [a]
    assert await ids(queue="nowhere") == []
    with pytest.raises(InvalidFilter, match=r"unknown status.*todo, doing"):
        await ids(status="finished")
    with pytest.raises(InvalidFilter, match="limit"):
        await ids(limit=0)


async def test_list_pages_by_id(app: pgtq.App, side: Side) -> None:
    send, _ = tasks(app)
    ids = await side.defer_many(send, [{"to": str(i)} for i in range(7)])

    async def pages(**filters: Any) -> list[list[int]]:
        found, after = [], None
        while True:
            page = await side.call(app.jobs, "list", limit=3, after=after, **filters)
            if not page:
                return found
            found.append([j.id for j in page])
            after = page[-1].id

    assert await pages() == [ids[0:3], ids[3:6], ids[6:]]
    newest = list(reversed(ids))
    assert await pages(newest_first=True) == [newest[0:3], newest[3:6], newest[6:]]


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_only_a_waiting_job(app: pgtq.App, side: Side, sql: SQL) -> None:
    send, _ = tasks(app)
    waiting, running, done = await side.defer_many(send, [{"to": "a"}, {"to": "b"}, {"to": "c"}])
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = %s", running)
    finish(sql, [done], "succeeded")

    assert await side.call(app.jobs, "cancel", waiting) is True
    assert await side.call(app.jobs, "cancel", waiting) is False  # already cancelled
    assert await side.call(app.jobs, "cancel", running) is False  # that is abort's job
    assert await side.call(app.jobs, "cancel", done) is False
    assert await side.call(app.jobs, "cancel", 999_999) is False
    rows = sql("SELECT id, status, finished_at IS NOT NULL FROM pgtq.jobs ORDER BY id")
    assert rows == [
        (waiting, "cancelled", True),
        (running, "doing", False),
        (done, "succeeded", True),
    ]


# -- delete_old_jobs --------------------------------------------------------------------------


async def test_delete_old_jobs_keeps_recent_waiting_and_unasked_ones(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, resize = tasks(app)
    ids = await side.defer_many(send, [{"to": str(i)} for i in range(7)])
    other_queue = await side.defer(resize, n=1)
    old_ok, new_ok, old_failed, old_cancelled, old_aborted, waiting, running = ids
    finish(sql, [old_ok, other_queue], "succeeded", ago=7200)
    finish(sql, [new_ok], "succeeded", ago=10)
    finish(sql, [old_failed], "failed", ago=7200)
    finish(sql, [old_cancelled], "cancelled", ago=7200)
    finish(sql, [old_aborted], "aborted", ago=7200)
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = %s", running)

    def left() -> set[int]:
        return {row[0] for row in sql("SELECT id FROM pgtq.jobs")}

    deleted = await side.call(app.jobs, "delete_old_jobs", timedelta(hours=1), queue="emails")
    assert deleted == 1
    assert left() == set(ids) - {old_ok} | {other_queue}
    assert await side.call(app.jobs, "delete_old_jobs", 3600, include_failed=True) == 2
    assert left() == {new_ok, old_cancelled, old_aborted, waiting, running}
    assert await side.call(app.jobs, "delete_old_jobs", 3600.0, include_cancelled=True) == 2
    assert left() == {new_ok, waiting, running}
    assert await side.call(app.jobs, "delete_old_jobs", 0, include_failed=True) == 1
    assert left() == {waiting, running}
    # Their history went with them; the history of the jobs left stays.
    orphans = "SELECT count(*) FROM pgtq.job_events WHERE job_id <> ALL(%s)"
    assert sql(orphans, [waiting, running]) == [(0,)]
    with pytest.raises(InvalidFilter):
        await side.call(app.jobs, "delete_old_jobs", -1)


# -- stats ------------------------------------------------------------------------------------


async def test_stats_counts_waits_and_rates(app: pgtq.App, side: Side, sql: SQL) -> None:
    send, resize = tasks(app)
    empty: Stats = await side.call(app.jobs, "stats")
    assert empty.queues == {}
    assert empty.rate() is None
    assert empty.workers == ()

    mails = await side.defer_many(send, [{"to": str(i)} for i in range(6)])
    await side.defer(send.configure(schedule_in=3600), to="later")  # not due: no wait yet
    images = await side.defer_many(resize, [{"n": i} for i in range(3)])
    sql("UPDATE pgtq.jobs SET created_at = now() - interval '90 s' WHERE id = %s", mails[0])
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = %s", mails[1])
    finish(sql, mails[2:5], "succeeded", ago=5)
    finish(sql, [mails[5]], "failed", ago=5)
    finish(sql, images[:1], "cancelled", ago=5)  # never ran: no rate
    finish(sql, images[1:2], "succeeded", ago=600)  # out of the window

    stats: Stats = await side.call(app.jobs, "stats")
    emails, imgs = stats.queues["emails"], stats.queues["images"]
    assert dict(emails.counts) == {
        Status.TODO: 2,
        Status.DOING: 1,
        Status.FAILED: 1,
        Status.ABORTED: 0,
        Status.CANCELLED: 0,
    }
    assert (emails.waiting, emails.doing, emails.failed) == (2, 1, 1)
    assert tuple(emails.counts) == COUNTED_STATUSES
    assert emails.oldest_waiting is not None and 89 <= emails.oldest_waiting < 120
    assert emails.rate == pytest.approx(4 / 60)
    assert stats.rates == {("emails", "send"): pytest.approx(4 / 60)}
    assert (imgs.waiting, imgs.counts[Status.CANCELLED]) == (1, 1)
    assert imgs.oldest_waiting is not None and imgs.oldest_waiting < 30
    assert imgs.rate is None  # absent, not 0: nothing ran in the window
    assert stats.rate(queue="images") is None
    assert stats.rate(task="send") == pytest.approx(4 / 60)
    assert stats.count(Status.TODO) == 3

    wide: Stats = await side.call(app.jobs, "stats", window=3600)
    assert wide.rate(queue="images") == pytest.approx(1 / 3600)


async def test_stats_rate_is_absent_for_a_queue_with_only_old_jobs(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, _ = tasks(app)
    ids = await side.defer_many(send, [{"to": "a"}, {"to": "b"}])
    finish(sql, ids, "succeeded", ago=3600)
    stats: Stats = await side.call(app.jobs, "stats")
    assert "emails" not in stats.queues  # nothing counted, nothing recent
    assert stats.rates == {}
    assert stats.rate() is None


async def test_stats_shows_workers_their_heartbeat_and_running_jobs(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, _ = tasks(app)
    a, b, c = await side.defer_many(send, [{"to": "a"}, {"to": "b"}, {"to": "c"}])
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, queues, started_at, last_heartbeat) VALUES "
        "('w-live', 'host-1', 11, NULL, now() - interval '1 h', now() - interval '3 s'), "
        "('w-stale', 'host-2', 22, '{emails}', now() - interval '2 h', now() - interval '5 min')"
    )
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', started_at = now(), "
        "worker_id = CASE WHEN id = %s THEN 'w-stale' ELSE 'w-live' END WHERE id = ANY(%s)",
        c,
        [a, c],
    )
    stats: Stats = await side.call(app.jobs, "stats")
    stale, live = stats.workers  # oldest first
    assert (live.id, live.hostname, live.pid, live.queues) == ("w-live", "host-1", 11, None)
    assert 2.5 <= live.heartbeat_age < 30 and live.is_alive()
    assert [(j.id, j.task_name, j.queue) for j in live.running] == [(a, "send", "emails")]
    assert (stale.id, stale.queues, [j.id for j in stale.running]) == ("w-stale", ("emails",), [c])
    assert stale.heartbeat_age >= 299 and not stale.is_alive()
    assert [w.id for w in stats.live_workers()] == ["w-live"]
    assert b not in [j.id for w in stats.workers for j in w.running]


# -- queues -----------------------------------------------------------------------------------


async def test_pause_resume_and_list_queues(app: pgtq.App, side: Side, sql: SQL) -> None:
    send, resize = tasks(app)
    await side.defer(send, to="a")
    await side.defer(resize, n=1)
    assert [(q.name, q.paused) for q in await side.call(app.queues, "list")] == [
        ("emails", False),
        ("images", False),
    ]
    assert await side.call(app.queues, "pause", "emails") is True
    assert await side.call(app.queues, "pause", "emails") is False  # already paused
    assert await side.call(app.queues, "pause", "reports") is True  # a queue with no job yet
    queues = {q.name: q for q in await side.call(app.queues, "list")}
    assert sorted(queues) == ["emails", "images", "reports"]
    assert queues["emails"].paused and queues["emails"].paused_at is not None
    assert not queues["images"].paused and queues["images"].paused_at is None

    stats: Stats = await side.call(app.jobs, "stats")
    assert stats.queues["emails"].paused and stats.queues["reports"].paused
    assert not stats.queues["images"].paused

    assert await side.call(app.queues, "resume", "emails") is True
    assert await side.call(app.queues, "resume", "emails") is False  # not paused any more
    assert await side.call(app.queues, "resume", "never-seen") is False
    assert sql("SELECT name, paused, paused_at FROM pgtq.queues ORDER BY name") == [
        ("emails", False, None),
        ("reports", True, sql("SELECT paused_at FROM pgtq.queues WHERE name = 'reports'")[0][0]),
    ]


async def test_resume_wakes_the_workers_with_a_notify(
    app: pgtq.App, side: Side, migrated_url: Any
) -> None:
    await side.call(app.queues, "pause", "emails")
    listener = await psycopg.AsyncConnection.connect(libpq(migrated_url), autocommit=True)
    try:
        await listener.execute('LISTEN "pgtq_pgtq"')
        await side.call(app.queues, "resume", "emails")
        got: list[str] = []

        async def receive() -> None:
            async for note in listener.notifies(timeout=5, stop_after=1):
                got.append(note.payload)

        await asyncio.wait_for(receive(), timeout=10)
        await eventually(lambda: got == ["emails"])
    finally:
        await listener.close()


# -- plans on a big table ---------------------------------------------------------------------


def finished_jobs(make_database: Any, rows: int, every: float, then: str | None = None) -> str:
    """A migrated database holding ``rows`` jobs that succeeded ``every`` s apart back from
    now, over queues q0-q2 (``then``: more SQL before the VACUUM ANALYZE); its libpq DSN."""
    url = make_database()
    app = pgtq.App(url)
    app.migrate()
    app.close()
    dsn = libpq(url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgtq.jobs (queue, task_name, status, finished_at) "
            "SELECT 'q' || (i %% 3), 't', 'succeeded', now() - make_interval(secs => i * %s) "
            "FROM generate_series(1, %s) AS i",
            (every, rows),
        )
        if then is not None:
            conn.execute(then)
        conn.execute("VACUUM ANALYZE pgtq.jobs")
    return dsn


@pytest.fixture(scope="module")
def big_table(make_database: Any) -> Iterator[str]:
    """100k finished jobs and a few hundred live ones: what a busy queue keeps."""
    yield finished_jobs(
        make_database,
        100_000,
        every=1,
        then="INSERT INTO pgtq.jobs (queue, task_name, status, finished_at) "
        "SELECT 'q' || (i % 3), 't', (ARRAY['todo', 'failed'])[1 + i % 2], "
        "CASE WHEN i % 2 = 1 THEN now() END FROM generate_series(1, 400) AS i",
    )


S = statements_for("pgtq")
PLAN_CASES = {
    "counts": (S.queue_counts, {}),
    "rates": (S.finished_counts, {"window": 60.0}),
    "delete old": (S.delete_old((Status.SUCCEEDED,), False), {"older_than": 86400.0}),
    "list failed": (S.list_jobs(ListKey(statuses=(Status.FAILED,))), {"limit": 50}),
    # The bulk controls: by ids, by status (their partial indexes), and every job they take.
    "abort by ids": (S.bulk("abort", SelectionKey(ids=True)), {"only_ids": [1, 2, 3]}),
    "delete by ids": (S.bulk("delete", SelectionKey(ids=True)), {"only_ids": [1, 2, 3]}),
    "retry failed of a task": (
        S.bulk("retry", SelectionKey(statuses=(Status.FAILED,), task=True)),
        {"only_task": "t"},
    ),
    "retry all": (S.bulk("retry", SelectionKey()), {}),
    "cancel all": (S.bulk("cancel", SelectionKey()), {}),
}


def _scans(plan: dict[str, Any]) -> Iterator[tuple[str, str | None]]:
    yield plan["Node Type"], plan.get("Relation Name")
    for child in plan.get("Plans", []):
        yield from _scans(child)


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_operations_never_scan_the_whole_table(big_table: str, case: str, plan_mode: str) -> None:
    statement, params = PLAN_CASES[case]
    compiled = statement.compile(dialect=postgresql.dialect(paramstyle="pyformat"))
    with psycopg.connect(big_table) as conn:
        conn.execute(f"SET plan_cache_mode = {plan_mode}")
        [(plan,)] = conn.execute(
            "EXPLAIN (FORMAT JSON) " + compiled.string, {**compiled.params, **params}
        ).fetchall()
        conn.rollback()
    scans = set(_scans(plan[0]["Plan"]))
    assert ("Seq Scan", "jobs") not in scans, scans
