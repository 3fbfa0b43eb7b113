"""``Task[P, R]``: mypy checks ``defer``'s arguments against the task's function (a
``JobContext`` first parameter left out) and types ``jobs.wait``'s result as the task's
return (tests/typing/tasks_usage.py, checked as a user's project would be)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pgtq
from tests.mypy_check import TYPING, errors_without_ignores, mypy


@pytest.mark.slow
def test_defer_takes_exactly_the_tasks_arguments_under_mypy(tmp_path: Path) -> None:
    usage = TYPING / "tasks_usage.py"
    checked = mypy(usage)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # each ignore needed
    errors = errors_without_ignores(usage, tmp_path)
    assert len(errors) == 5, errors
    assert sum('No overload variant of "defer"' in e for e in errors) == 4, errors
    assert any('has type "int", variable has type "str"' in e for e in errors), errors


async def test_defer_returns_a_deferred_id(app: pgtq.App) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    job_id = add.defer(a=1, b=2)
    assert isinstance(job_id, pgtq.Deferred) and not job_id.duplicate
    also = await add.defer_async(a=2, b=3)
    assert isinstance(also, pgtq.Deferred) and also == job_id + 1
    assert str(job_id) == str(int(job_id))  # reads as the number in URLs and logs
