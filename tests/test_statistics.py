"""The workers keep the planner's statistics of the jobs table fresh (pgtq/statistics.py).

A backlog bulk-loaded into a table never analyzed (or analyzed while empty) is planned as if
a few jobs waited: a bitmap scan sorting every waiting job at each claim. A worker analyzes
the table at its start and at its beats once enough rows changed, one worker at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL

import pgtq
from pgtq import statistics
from tests.conftest import libpq

BACKLOG = 20_000


@pytest.mark.unit
@pytest.mark.parametrize(
    ("changed", "counted", "since", "expected"),
    [
        (0, -1.0, None, False),  # a new, empty table
        (999, -1.0, None, False),
        (1000, -1.0, None, True),  # never analyzed, a backlog since
        (1000, 0.0, 3600.0, True),  # analyzed while empty
        (1999, 10_000.0, 3600.0, False),  # 10 % of 10,000 on top of 1,000
        (2000, 10_000.0, 3600.0, True),
        (1_000_000, 10_000.0, statistics.MIN_INTERVAL - 1, False),  # analyzed moments ago
        (1_000_000, 10_000.0, statistics.MIN_INTERVAL, True),
    ],
)
def test_stale_when_many_rows_changed_and_not_just_analyzed(
    changed: int, counted: float, since: float | None, expected: bool
) -> None:
    assert statistics.stale(changed, counted, since) is expected


@pytest.fixture
def fresh(make_database: Callable[[], URL]) -> Iterator[tuple[pgtq.App, psycopg.Connection[Any]]]:
    """A database migrated now, its jobs table never analyzed, and a connection to it."""
    url = make_database()
    app = pgtq.App(url)
    app.migrate()
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        yield app, conn
    app.close()


def backlog(app: pgtq.App) -> None:
    """BACKLOG jobs deferred by an app of their own, closed at the end: its connections'
    counts reach pg_stat_user_tables as they close (an idle one reports them up to 10 s
    later)."""
    app.task(name="noop")(noop)
    loader = pgtq.App(app.url)
    task = loader.task(name="noop")(noop)
    for _ in range(BACKLOG // 1000):
        task.defer_many([{}] * 1000)
    loader.close()


async def noop() -> None: ...


@pytest.fixture
def loaded(
    fresh: tuple[pgtq.App, psycopg.Connection[Any]],
) -> tuple[pgtq.App, psycopg.Connection[Any]]:
    """``fresh``, with BACKLOG jobs deferred and counted in pg_stat_user_tables."""
    app, conn = fresh
    backlog(app)
    wait_for_counts(conn, BACKLOG)
    return app, conn


def claim_plan(app: pgtq.App, conn: psycopg.Connection[Any]) -> str:
    compiled = app.statements.claim(None, 100).compile(dialect=postgresql.dialect())
    params = {**compiled.params, "me": "w"}
    conn.execute("BEGIN")
    try:
        rows = conn.execute("EXPLAIN " + str(compiled), params).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return "\n".join(row[0] for row in rows)


def analyzed(conn: psycopg.Connection[Any]) -> bool:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT coalesce(last_analyze, last_autoanalyze) IS NOT NULL FROM pg_stat_user_tables "
        "WHERE relid = 'pgtq.jobs'::regclass"
    ).fetchone()
    return bool(row and row[0])


def wait_for_counts(conn: psycopg.Connection[Any], changed: int) -> None:
    """Polled with a deadline: a closing backend's counts reach the view soon after."""
    deadline = 200
    for _ in range(deadline):
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT n_mod_since_analyze FROM pg_stat_user_tables "
            "WHERE relid = 'pgtq.jobs'::regclass"
        ).fetchone()
        if row and row[0] >= changed:
            return
        conn.execute("SELECT pg_sleep(0.05)")
    raise AssertionError(f"the jobs table's counts never showed {changed} changed rows")


async def test_a_bulk_loaded_backlog_is_analyzed_once_and_then_planned_in_index_order(
    loaded: tuple[pgtq.App, psycopg.Connection[Any]],
) -> None:
    app, conn = loaded
    assert "Sort" in claim_plan(app, conn)  # the plan a stale view gives: every job sorted
    assert not analyzed(conn)
    connector = app.async_connector()
    assert await statistics.refresh(connector, app.statements) is True
    assert analyzed(conn)
    plan = claim_plan(app, conn)
    assert "Sort" not in plan.split("CTE Scan")[0] and "jobs_claim_idx" in plan
    # Just analyzed: the next beats leave it alone.
    assert await statistics.refresh(connector, app.statements) is False
    await app.close_async()


async def test_one_worker_at_a_time_analyzes(
    loaded: tuple[pgtq.App, psycopg.Connection[Any]],
) -> None:
    """Another worker holding the analyze lock: this one skips, and does it once it is free."""
    app, conn = loaded
    key = "SELECT hashtext('pgtq:pgtq:analyze')"
    conn.execute(f"SELECT pg_advisory_lock(({key}))")
    connector = app.async_connector()
    assert await statistics.refresh(connector, app.statements) is False
    assert not analyzed(conn)
    conn.execute(f"SELECT pg_advisory_unlock(({key}))")
    assert await statistics.refresh(connector, app.statements) is True
    await app.close_async()


async def test_a_vacuum_holding_the_table_is_left_alone(
    loaded: tuple[pgtq.App, psycopg.Connection[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """The lock a (auto)vacuum holds: the ANALYZE gives up within its lock_timeout, quietly,
    instead of waiting past deadlock_timeout, which would cancel an autovacuum."""
    app, conn = loaded
    conn.execute("BEGIN")
    conn.execute("LOCK TABLE pgtq.jobs IN SHARE UPDATE EXCLUSIVE MODE")
    connector = app.async_connector()
    with caplog.at_level(logging.INFO, logger="pgtq.worker"):
        assert await statistics.refresh(connector, app.statements) is False
    assert [r.getMessage() for r in caplog.records if r.name == "pgtq.worker"] == []
    conn.execute("COMMIT")
    assert not analyzed(conn)
    assert await statistics.refresh(connector, app.statements) is True
    await app.close_async()


def test_a_worker_analyzes_a_bulk_loaded_backlog_at_its_start(
    loaded: tuple[pgtq.App, psycopg.Connection[Any]],
) -> None:
    app, conn = loaded
    app.run_worker(concurrency=100, wait=False)
    assert analyzed(conn)
    assert conn.execute("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'").fetchone() == (
        BACKLOG,
    )
