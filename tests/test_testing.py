"""``pgtq.testing``: a throw-away migrated schema per test, and ``drain`` to run due jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

import pgtq
import pgtq.testing
from tests.sides import Side

SQL = Callable[..., list[tuple[Any, ...]]]


def schemas(sql: SQL) -> set[str]:
    rows = sql("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'pgtq_test%%'")
    return {name for (name,) in rows}


def user_app() -> tuple[pgtq.App, list[str]]:
    """An app as a user's project has it, whose tasks record what they did."""
    app = pgtq.App()  # no DSN in the code: the test gives one
    done: list[str] = []

    @app.task(retry=pgtq.Retry(max_attempts=2, backoff="fixed", base=0.01, jitter=0))
    def send(to: str) -> str:
        if to == "flaky" and "flaky" not in done:
            done.append("flaky")
            raise RuntimeError("first attempt fails")
        done.append(to)
        return to

    return app, done


async def test_migrated_schema_and_drain(dsn: str, sql: SQL, side: Side) -> None:
    app, done = user_app()
    send = app.tasks["send"]
    before = schemas(sql)
    if side.name == "sync":
        import asyncio

        def scenario() -> tuple[str, Any, Any]:
            with pgtq.testing.migrated_schema(app, dsn=dsn) as test_app:
                assert test_app is app and app.schema.startswith("pgtq_test_")
                send.defer(to="a")
                send.defer(to="flaky")
                send.configure(schedule_in=3600).defer(to="later")
                stats = pgtq.testing.drain(app)
                return app.schema, stats, app.jobs.counts()

        schema, stats, counts = await asyncio.to_thread(scenario)
    else:
        async with pgtq.testing.migrated_schema_async(app, dsn=dsn):
            schema = app.schema
            await send.defer_async(to="a")
            await send.defer_async(to="flaky")
            await send.configure(schedule_in=3600).defer_async(to="later")
            stats = await pgtq.testing.drain_async(app)
            counts = await app.jobs.counts_async()
    assert stats.by_status == {"succeeded": 2, "retried": 1}
    assert sorted(done) == ["a", "flaky", "flaky"]
    assert {status.value: n for (_, status), n in counts.items()} == {"succeeded": 2, "todo": 1}
    # Nothing leaked: the real schema saw no job, the throw-away one is gone.
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]
    assert schema not in schemas(sql) and schemas(sql) == before
    assert app.schema == "pgtq"


# -- what was deferred, and draining what is scheduled ahead --------------------------------


async def test_assert_deferred_finds_the_one_job_with_these_arguments(
    app: pgtq.App, side: Side
) -> None:
    @app.task(queue="mail")
    def welcome(email: str, plan: str = "free") -> None: ...

    @app.task
    def other(email: str) -> None: ...

    await side.defer(welcome, email="a@example.com", plan="pro")
    await side.defer(welcome, email="b@example.com")
    await side.defer(other, email="a@example.com")

    async def check(task: Any, /, **arguments: Any) -> Any:
        return await side.call(pgtq.testing, "assert_deferred", app, task, **arguments)

    job = await check(welcome, email="a@example.com")
    assert job.args == {"email": "a@example.com", "plan": "pro"} and job.queue == "mail"
    assert (await check("welcome", email="b@example.com")).args["email"] == "b@example.com"
    with pytest.raises(AssertionError, match=r"found 2; its jobs:\n  job \d+ welcome"):
        await check(welcome)  # two jobs match
    with pytest.raises(AssertionError, match=r"(?s)found 0.*'plan': 'pro'"):
        await check(welcome, email="b@example.com", plan="pro")
    when = datetime(2026, 12, 3, 10, tzinfo=UTC)

    @app.task
    def remind(at: datetime, days: tuple[int, ...]) -> None: ...

    await side.defer(remind, at=when, days=(1, 2))
    job = await check(remind, at=when, days=(1, 2))  # compared as stored: ISO text, a list
    assert job.args == {"at": "2026-12-03T10:00:00+00:00", "days": [1, 2]}
    found = await side.call(pgtq.testing, "deferred", app, None, email="a@example.com")
    assert sorted(j.task_name for j in found) == ["other", "welcome"]
    assert await side.call(pgtq.testing, "deferred", app, other, email="nobody") == []


async def test_drain_with_include_scheduled_runs_scheduled_and_backed_off_jobs_now(
    app: pgtq.App, side: Side
) -> None:
    ran: list[str] = []

    @app.task(retry=pgtq.Retry(max_attempts=3, base=3600, jitter=0))
    def report(name: str) -> None:
        ran.append(name)
        if name == "flaky" and ran.count("flaky") < 3:
            raise RuntimeError("not yet")

    await side.defer(report.configure(schedule_in=3600), name="tomorrow")
    await side.defer(report, name="flaky")  # retried an hour later, twice
    await side.defer(report.configure(queue="elsewhere", schedule_in=3600), name="other queue")
    plain = await side.call(pgtq.testing, "drain", app, ["default"])
    assert ran == ["flaky"] and plain.by_status == {"retried": 1}  # the rest is ahead
    stats = await side.call(pgtq.testing, "drain", app, ["default"], include_scheduled=True)
    assert sorted(ran) == ["flaky", "flaky", "flaky", "tomorrow"]
    assert stats.by_status == {"retried": 1, "succeeded": 2}
    waiting = await side.call(app.jobs, "list", status=pgtq.Status.TODO)
    assert [j.args["name"] for j in waiting] == ["other queue"]  # not a drained queue


# -- eager: jobs run at defer time, in-process ----------------------------------------------


def test_eager_runs_each_job_at_defer_time_with_its_arguments_through_json(sql: SQL) -> None:
    app = pgtq.App("postgresql://127.0.0.1:1/never-used")  # eager never connects
    seen: list[Any] = []

    @app.task
    def send(ctx: pgtq.JobContext, to: str, tags: tuple[str, ...] = ()) -> str:
        seen.append((ctx.job_id, ctx.attempt, to, tags))
        return to.upper()

    @app.task
    async def fetch(url: str) -> int:
        await asyncio.sleep(0)
        return len(url)

    with pgtq.testing.eager(app) as runs:
        first = send.defer(to="a", tags=("x", "y"))
        ids = send.defer_many([{"to": "b"}, ({"to": "c"}, {"queueing_lock": "k"})])
        fetched = fetch.defer(url="https://x")
    assert [int(first), *ids, int(fetched)] == [1, 2, 3, 4]
    assert seen[0] == (1, 1, "a", ["x", "y"])  # a tuple comes back as JSON's list
    assert [r.result for r in runs] == ["A", "B", "C", 9]
    assert app.eager is None  # off again after the block


async def test_eager_checks_arguments_as_defer_does_and_propagates_errors() -> None:
    app = pgtq.App("postgresql://127.0.0.1:1/never-used")

    @app.task
    def boom(n: int) -> None:
        raise ValueError(f"bad {n}")

    @app.task
    async def later(n: int) -> int:
        return n

    with pgtq.testing.eager(app) as runs:
        with pytest.raises(pgtq.InvalidArguments, match="priority"):
            boom.configure(priority=1.5).defer(n=1)  # type: ignore[arg-type]
        with pytest.raises(pgtq.InvalidArguments, match="missing a required argument"):
            await boom.defer_async(m=1)  # type: ignore[call-overload]
        with pytest.raises(ValueError, match="bad 2"):
            await boom.defer_async(n=2)  # a sync task, run in a thread
        assert await later.defer_async(n=3) == 2
        with pytest.raises(pgtq.ConfigurationError, match="use defer_async"):
            later.defer(n=4)  # a sync defer of an async task inside a running loop
    assert [(r.task_name, r.succeeded) for r in runs] == [("boom", False), ("later", True)]
    with pgtq.testing.eager(app, propagate=False) as quiet:
        await boom.defer_async(n=5)
    assert isinstance(quiet[0].error, ValueError)
