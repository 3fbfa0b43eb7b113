"""``pgtq.testing``: a throw-away migrated schema per test, and ``drain`` to run due jobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
