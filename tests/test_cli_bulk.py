"""``pgtq jobs retry|cancel|abort|delete`` on many jobs: by ids and by the filters of ``jobs
list``, shown and confirmed first (``--yes``: not asked), ``--dry-run``, ``--json``; one id
alone keeps its own messages."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from pgtq.cli import cli
from tests.test_cli import APP, assert_one_error_line, invoke
from tests.test_cli_operations import fresh_app_modules  # noqa: F401 (autouse fixture)

SQL = Callable[..., list[tuple[Any, ...]]]


def answering(answer: str, *args: str, dsn: str) -> Result:
    """``pgtq ARGS`` with ``answer`` typed at the question."""
    return CliRunner().invoke(cli, list(args), env={"PGTQ_DSN": dsn}, input=answer)


def jobs(dsn: str, sql: SQL, *states: str) -> list[int]:
    """One ``add`` job per state given (``doing``: held by worker ``w``)."""
    for _ in states:
        assert invoke("defer", APP, "add", '{"a": 1, "b": 2}', dsn=dsn).exit_code == 0
    ids = [row[0] for row in sql("SELECT id FROM pgtq.jobs ORDER BY id")][-len(states) :]
    for job_id, state in zip(ids, states, strict=True):
        worker = "w" if state == "doing" else None
        sql("UPDATE pgtq.jobs SET status = %s, worker_id = %s WHERE id = %s", state, worker, job_id)
    return ids


def statuses(sql: SQL) -> list[str]:
    return [row[0] for row in sql("SELECT status FROM pgtq.jobs ORDER BY id")]


def test_a_filter_shows_the_jobs_asks_and_acts_on_those_shown(dsn: str, sql: SQL) -> None:
    jobs(dsn, sql, "failed", "failed", "succeeded", "todo")
    declined = answering("n\n", "jobs", "retry", "--status", "failed", dsn=dsn)
    assert declined.exit_code == 1
    assert "2 job(s) to retry" in declined.stdout and "Retry these 2 job(s)?" in declined.stdout
    assert_one_error_line(declined.stderr, "not confirmed: no job retried")
    assert statuses(sql) == ["failed", "failed", "succeeded", "todo"]

    done = answering("y\n", "jobs", "retry", "--status", "failed", "--task", "add", dsn=dsn)
    assert done.exit_code == 0, done.output
    assert "2 job(s) retried" in done.stdout
    assert statuses(sql) == ["todo", "todo", "succeeded", "todo"]


def test_yes_acts_without_asking_and_json_prints_the_ids(dsn: str, sql: SQL) -> None:
    waiting, running, done = jobs(dsn, sql, "todo", "doing", "succeeded")
    result = invoke("jobs", "abort", "--task", "add", "--yes", "--json", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [waiting, running]
    assert result.stderr == ""
    assert statuses(sql) == ["cancelled", "doing", "succeeded"]
    assert sql("SELECT abort_requested FROM pgtq.jobs WHERE id = %s", running) == [(True,)]
    result = invoke("jobs", "delete", "--all", "--yes", "--json", dsn=dsn)
    assert json.loads(result.stdout) == [waiting, done]  # never the running one
    assert statuses(sql) == ["doing"]


def test_dry_run_shows_and_changes_nothing(dsn: str, sql: SQL) -> None:
    ids = jobs(dsn, sql, *["todo"] * 12)
    result = invoke("jobs", "cancel", "--all", "--dry-run", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert "12 job(s) to cancel" in result.stdout and "… and 2 more" in result.stdout
    result = invoke("jobs", "cancel", *map(str, ids[:3]), "--dry-run", "--json", dsn=dsn)
    assert json.loads(result.stdout) == ids[:3]
    assert "3 job(s) to cancel" in result.stderr  # --json: stdout is the document only
    assert set(statuses(sql)) == {"todo"}


def test_several_ids_are_confirmed_and_one_id_keeps_its_own_messages(dsn: str, sql: SQL) -> None:
    a, b, c = jobs(dsn, sql, "todo", "todo", "doing")
    result = answering("y\n", "jobs", "cancel", str(a), str(b), str(c), dsn=dsn)
    assert result.exit_code == 0, result.output
    assert "2 job(s) cancelled" in result.stdout
    single = invoke("jobs", "delete", str(c), dsn=dsn)  # running: never deleted
    assert single.exit_code == 1
    assert_one_error_line(single.stderr, f"job {c} is doing", "jobs abort")
    single = invoke("jobs", "delete", str(a), dsn=dsn)
    assert single.exit_code == 0 and f"Job {a} deleted" in single.stdout
    assert_one_error_line(invoke("jobs", "delete", "99", dsn=dsn).stderr, "no job with id 99")
    assert statuses(sql) == ["cancelled", "doing"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["retry"], ("which jobs?", "--all")),
        (["delete", "--status", "doing", "--yes"], ("status doing", "never deleted")),
        (["retry", "--status", "todo"], ("retry_many acts only on",)),
        (["abort", "--since", "yesterday"], ("--since 'yesterday' is not an ISO 8601",)),
        (["cancel", "--status", "done"], ("unknown status",)),
    ],
)
def test_what_is_refused_is_one_error_line(
    dsn: str, sql: SQL, args: list[str], fragments: tuple[str, ...]
) -> None:
    jobs(dsn, sql, "todo", "failed")
    result = invoke("jobs", *args, dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, *fragments)
    assert statuses(sql) == ["todo", "failed"]


def test_list_takes_the_same_filters(dsn: str, sql: SQL) -> None:
    a, b = jobs(dsn, sql, "failed", "failed")
    sql("UPDATE pgtq.jobs SET created_at = '2020-01-01T00:00Z' WHERE id = %s", a)
    listed = invoke("jobs", "list", "--before", "2021-01-01T00:00+00:00", "--json", dsn=dsn)
    assert [job["id"] for job in json.loads(listed.stdout)] == [a]
    listed = invoke("jobs", "list", "--since", "2021-01-01T00:00", "--json", dsn=dsn)
    assert [job["id"] for job in json.loads(listed.stdout)] == [b]
    listed = invoke("jobs", "list", "--search", '"A": 1', "--json", dsn=dsn)
    assert [job["id"] for job in json.loads(listed.stdout)] == [b, a]


def test_the_confirmed_action_changes_only_the_jobs_shown(
    dsn: str, sql: SQL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that matches the filters only after they were shown is left alone: what was
    confirmed is what may change."""
    (shown,) = jobs(dsn, sql, "failed")

    def confirm_while_another_fails(text: str, **options: Any) -> bool:
        sql("INSERT INTO pgtq.jobs (task_name, status) VALUES ('add', 'failed') RETURNING id")
        return True

    monkeypatch.setattr("pgtq.cli.typer.confirm", confirm_while_another_fails)
    result = invoke("jobs", "retry", "--status", "failed", dsn=dsn)
    assert result.exit_code == 0, result.output
    assert "1 job(s) retried" in result.stdout
    assert sql("SELECT id, status FROM pgtq.jobs ORDER BY id") == [
        (shown, "todo"),
        (shown + 1, "failed"),
    ]
