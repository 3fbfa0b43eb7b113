"""The parallel arrays pgtq sends to ``unnest`` are parallel: a shorter one would be padded
with NULLs by PostgreSQL, writing a row whose columns belong to no job. Pure: no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import pgtq
from pgtq import periodic, statements

pytestmark = pytest.mark.unit


def test_every_tick_row_fills_every_column() -> None:
    app = pgtq.App("postgresql://nowhere/db")

    @app.periodic(cron="* * * * *")
    @app.task
    def every_minute(timestamp: int) -> None: ...

    now = datetime(2026, 12, 2, 12, 0, 30, tzinfo=UTC)
    ticks = periodic.due_ticks(app.periodic_tasks, now=now, since=now - timedelta(minutes=3))
    rows = periodic.tick_rows(ticks)
    params = rows.as_params()
    assert len(ticks) == 3
    assert {len(v) for v in params.values()} == {3}
    assert params[statements.new_param("trace_context")] == [None, None, None]


def test_job_rows_of_unequal_lengths_are_refused() -> None:
    rows = statements.JobRows.empty()
    rows.queue.append("q")
    with pytest.raises(ValueError, match="JobRows: its arrays differ in length"):
        rows.as_params()


def test_outcomes_of_unequal_lengths_are_refused() -> None:
    s = statements.statements_for("pgtq")
    outcomes = statements.Outcomes.empty()
    outcomes.add(1, pgtq.Status.SUCCEEDED, "null", attempt=1)
    statements.complete_jobs(s, "w", outcomes)  # parallel: fine
    outcomes.errors.append(None)
    with pytest.raises(ValueError, match="Outcomes: its arrays differ in length"):
        statements.complete_jobs(s, "w", outcomes)
