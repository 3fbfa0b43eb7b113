"""Enqueue from SQL (pgtq_0010): ``pgtq.defer_job(...)`` and ``pgtq.defer_jobs(jsonb)``, as a
psql session, a trigger or a service in another language calls them: checked like
``defer``, announced like ``defer``, run by an ordinary worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

import pgtq
from pgtq.model import Status
from tests.conftest import Notifications, libpq
from tests.sides import Side


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain libpq session, as psql or another language's driver would have."""
    with psycopg.connect(libpq(dsn), autocommit=True) as connection:
        yield connection


def one(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return row[0]


async def test_a_job_deferred_from_sql_wakes_an_idle_worker_and_runs(
    side: Side, app: pgtq.App, conn: psycopg.Connection[Any]
) -> None:
    seen: list[tuple[str, int]] = []

    @app.task(queue="mail")
    def send(to: str, n: int) -> str:
        seen.append((to, n))
        return to

    # Polling every 600 s: only the NOTIFY can make the job run within the deadline.
    worker = asyncio.create_task(app.run_worker_async(fetch_job_polling_interval=600))
    try:
        first = await side.defer(send, to="first", n=1)
        assert await side.wait(app, first) == "first"  # the worker is up, now idle
        job_id = one(
            conn,
            "SELECT pgtq.defer_job('send', args => %s, queue => 'mail')",
            Jsonb({"to": "a@example.com", "n": 2}),
        )
        assert await side.wait(app, job_id, timeout=10) == "a@example.com"
        assert seen == [("first", 1), ("a@example.com", 2)]
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)


async def test_the_payload_is_the_one_defer_sends(
    app: pgtq.App, conn: psycopg.Connection[Any], notifications: Notifications
) -> None:
    due = one(conn, "SELECT pgtq.defer_job('t', queue => 'q1')")
    one(conn, "SELECT pgtq.defer_job('t', queue => 'q2', run_at => now() + interval '1 hour')")
    heard = await notifications.until_marker()
    assert heard[0].queue == "q1" and heard[0].first == due and heard[0].jobs == 1
    assert heard[1].queue == "q2" and heard[1].due_in is not None
    assert 3590 < heard[1].due_in <= 3600
    assert len(heard) == 2


def test_every_column_is_stored(app: pgtq.App, conn: psycopg.Connection[Any]) -> None:
    job_id = one(
        conn,
        "SELECT pgtq.defer_job('t', %s, 'q', 7, '2100-01-01T00:00Z', 'l', 'ql', 'raise', 'ck', "
        "ARRAY['a', 'b', 'a'], %s, 2.5, 4)",
        Jsonb({"x": [1]}),
        Jsonb({"tenant": 3}),
    )
    job = app.jobs.get(job_id)
    assert job is not None and job.status is Status.TODO
    assert (job.task_name, job.args, job.queue, job.priority) == ("t", {"x": [1]}, "q", 7)
    assert job.scheduled_at is not None and job.scheduled_at.year == 2100
    assert (job.lock, job.queueing_lock, job.concurrency_key) == ("l", "ql", "ck")
    assert (job.tags, job.meta) == (["a", "b"], {"tenant": 3})
    assert (job.timeout, job.max_attempts) == (2.5, 4)
    assert [e.type for e in app.jobs.history(job_id)] == ["deferred"]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("defer_job('')", "task_name"),
        ("defer_job(NULL)", "task_name"),
        ("defer_job('t', queue => repeat('q', 256))", "queue"),
        ("defer_job('t', args => '[1]')", "args"),
        ("defer_job('t', args => NULL)", "args"),
        ("defer_job('t', priority => NULL)", "priority"),
        ("defer_job('t', run_at => 'infinity')", "run_at"),
        ("defer_job('t', run_at => '1999-01-01')", "run_at"),
        ("defer_job('t', lock => '')", "lock"),
        ("defer_job('t', concurrency_key => repeat('k', 1025))", "concurrency_key"),
        ("defer_job('t', on_conflict => 'skip')", "on_conflict"),
        ("defer_job('t', queueing_lock => 'k', on_conflict => 'maybe')", "on_conflict"),
        ("defer_job('t', tags => ARRAY['a', ''])", "tags"),
        ("defer_job('t', tags => ARRAY(SELECT 't' || i FROM generate_series(1, 51) i))",
         "tags: at most 50"),
        ("defer_job('t', meta => '3')", "meta"),
        ("defer_job('t', timeout => 0)", "timeout"),
        ("defer_job('t', max_attempts => 0)", "max_attempts"),
        ("defer_jobs('{}')", "jobs"),
        ("defer_jobs('[{\"task_name\": \"t\"}, 3]')", "item 1"),
        ("defer_jobs('[{\"task_name\": \"t\", \"prio\": 3}]')", "prio"),
        ("defer_jobs('[{\"task_name\": \"t\"}, {\"task_name\": \"t\", \"queue\": \"\"}]')",
         "item 1: queue"),
        ("defer_jobs('[{\"task_name\": \"t\", \"priority\": \"high\"}]')", "item 0: a value"),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_its_field_and_nothing_is_written(
    conn: psycopg.Connection[Any], call: str, field: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=field):
        conn.execute(f"SELECT pgtq.{call}")
    assert conn.execute("SELECT count(*) FROM pgtq.jobs").fetchone() == (0,)


def test_a_queueing_lock_raises_skips_or_replaces(
    app: pgtq.App, conn: psycopg.Connection[Any]
) -> None:
    first = one(conn, "SELECT pgtq.defer_job('t', '{\"v\": 1}', queueing_lock => 'k')")
    with pytest.raises(psycopg.errors.UniqueViolation, match=f"held by job {first}"):
        conn.execute("SELECT pgtq.defer_job('t', '{\"v\": 2}', queueing_lock => 'k')")
    skipped = one(
        conn,
        "SELECT pgtq.defer_job('t', '{\"v\": 3}', queueing_lock => 'k', on_conflict => 'skip')",
    )
    replaced = one(
        conn,
        "SELECT pgtq.defer_job('t', '{\"v\": 4}', priority => 5, queueing_lock => 'k', "
        "on_conflict => 'replace')",
    )
    assert skipped == replaced == first
    job = app.jobs.get(first)
    assert job is not None and job.args == {"v": 4} and job.priority == 5
    with pytest.raises(psycopg.errors.UniqueViolation, match="held by job"):
        # replace leaves another task's job alone
        conn.execute(
            "SELECT pgtq.defer_job('other', queueing_lock => 'k', on_conflict => 'replace')"
        )
    assert one(conn, "SELECT count(*) FROM pgtq.jobs") == 1


async def test_a_batch_goes_in_with_one_notify_per_queue(
    app: pgtq.App, conn: psycopg.Connection[Any], notifications: Notifications
) -> None:
    jobs = [
        {"task_name": "t", "args": {"i": 0}, "queue": "a"},
        {"task_name": "t", "args": {"i": 1}, "queue": "b", "tags": ["x"]},
        {"task_name": "t", "args": {"i": 2}, "queue": "a"},
        {"task_name": "t", "queue": "a", "queueing_lock": "k", "on_conflict": "skip"},
        {"task_name": "t", "queue": "a", "queueing_lock": "k", "on_conflict": "skip"},
        {"task_name": "t", "queue": "later", "run_at": "2100-01-01T00:00:00Z"},
    ]
    ids = [row[0] for row in conn.execute("SELECT pgtq.defer_jobs(%s)", (Jsonb(jobs),))]
    assert len(ids) == 6 and ids[3] == ids[4] and len(set(ids)) == 5
    assert [app.jobs.get(i).args for i in ids[:3]] == [{"i": 0}, {"i": 1}, {"i": 2}]  # type: ignore[union-attr]
    heard = {h.queue: h for h in await notifications.until_marker()}
    assert sorted(heard) == ["a", "b", "later"]
    assert heard["a"].first == ids[0] and heard["a"].jobs == 3  # the duplicate is no new job
    assert heard["b"].jobs == 1 and heard["later"].due_in is not None


def test_a_batch_is_all_or_none(conn: psycopg.Connection[Any]) -> None:
    bad = [{"task_name": "t"}, {"task_name": "t", "max_attempts": 0}]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="item 1: max_attempts"):
        conn.execute("SELECT pgtq.defer_jobs(%s)", (Jsonb(bad),))
    assert one(conn, "SELECT count(*) FROM pgtq.jobs") == 0


async def test_a_trigger_defers_a_job_in_the_same_transaction(
    side: Side, app: pgtq.App, conn: psycopg.Connection[Any], sql: Any
) -> None:
    sql("DROP TABLE IF EXISTS signups")
    sql("CREATE TABLE signups (id serial PRIMARY KEY, email text NOT NULL)")
    sql(
        """
        CREATE FUNCTION welcome_signup() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pgtq.defer_job('welcome', jsonb_build_object('email', NEW.email));
            RETURN NEW;
        END $$
        """
    )
    sql(
        "CREATE TRIGGER signups_welcome AFTER INSERT ON signups "
        "FOR EACH ROW EXECUTE FUNCTION welcome_signup()"
    )
    try:
        welcomed: list[str] = []

        @app.task
        def welcome(email: str) -> None:
            welcomed.append(email)

        with conn.transaction():
            conn.execute("INSERT INTO signups (email) VALUES ('b@example.com')")
            assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]  # not visible yet
        # rolled back: no job either
        with pytest.raises(psycopg.errors.NotNullViolation), conn.transaction():
            conn.execute("INSERT INTO signups (email) VALUES ('c@example.com')")
            conn.execute("INSERT INTO signups (email) VALUES (NULL)")
        await side.run_worker(app, wait=False)
        assert welcomed == ["b@example.com"]
        assert sql("SELECT status FROM pgtq.jobs") == [("succeeded",)]
    finally:
        sql("DROP TABLE signups")
        sql("DROP FUNCTION welcome_signup()")
