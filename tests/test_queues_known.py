"""Known queues (issue 19): the queues the app's tasks declare plus those the database has.

``app.queues.stats()``, ``pgtq stats``, ``pgtq queues list`` and the dashboards show every
known queue, idle ones with zero counts; a worker asked for an unknown queue warns once;
``pgtq queues pause`` refuses an unknown one unless ``--create``; ``pgtq defer --queue``
warns but defers.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import pgtq
import pgtq.web
from pgtq.model import Status
from pgtq.queues import unknown_queues
from pgtq.reports import COUNTED_STATUSES, QueueStats, Stats, idle_queue
from tests.sides import Side
from tests.test_cli import APP, assert_one_error_line, error_lines, invoke

SQL = Callable[..., list[tuple[Any, ...]]]
ZERO = dict.fromkeys(COUNTED_STATUSES, 0)


@pytest.fixture(autouse=True)
def fresh_app_modules() -> Iterator[None]:
    """Each CLI run imports the sample app anew, as each real ``pgtq`` process does."""
    yield
    for name in [m for m in sys.modules if m.startswith("tests.apps.")]:
        del sys.modules[name]


def tasks(app: pgtq.App) -> tuple[pgtq.Task[..., Any], pgtq.Task[..., Any]]:
    @app.task(queue="emails")
    def send(to: str) -> None: ...

    @app.task(queue="images")
    async def resize(n: int) -> None: ...

    return send, resize


# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_with_queues_adds_idle_queues_with_zero_counts_in_name_order() -> None:
    busy = QueueStats("emails", {**ZERO, Status.TODO: 3}, oldest_waiting=1.0, rate=2.0)
    stats = Stats(window=60.0, queues={"emails": busy})
    shown = stats.with_queues(["reports", "emails", "audit"])
    assert list(shown.queues) == ["audit", "emails", "reports"]
    assert shown.queues["emails"] is busy  # a queue it has is kept as it is
    assert shown.queues["reports"] == idle_queue("reports")
    assert shown.queues["reports"].counts == ZERO and shown.queues["reports"].rate is None
    assert stats.queues == {"emails": busy}  # a new Stats: the first is unchanged


@pytest.mark.unit
def test_unknown_queues_keeps_the_order_asked_once_each() -> None:
    assert unknown_queues(["emial", "emails", "x", "emial"], ["emails"]) == ["emial", "x"]
    assert unknown_queues([], ["emails"]) == []


# -- the API -------------------------------------------------------------------------------------


async def test_stats_show_every_known_queue_idle_ones_included(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, _ = tasks(app)
    assert app.queues.declared() == ["emails", "images"]
    stats: Stats = await side.call(app.queues, "stats")
    assert {name: q.counts for name, q in stats.queues.items()} == {
        "emails": ZERO,
        "images": ZERO,
    }
    # A job that succeeded long ago: app.jobs.stats() forgets its queue, app.queues does not.
    job_id = await side.defer(send, to="a")
    sql(
        "UPDATE pgtq.jobs SET status = 'succeeded', finished_at = now() - interval '1 hour' "
        "WHERE id = %s",
        job_id,
    )
    assert "emails" not in (await side.call(app.jobs, "stats")).queues
    assert "emails" in (await side.call(app.queues, "stats")).queues
    # The database's queues: a limited one never paused, one of a job no task declares.
    await side.call(app.queues, "set_limits", "bulk", concurrency=2)
    await side.defer(send.configure(queue="adhoc"), to="b")
    jobs_stats: Stats = await side.call(app.jobs, "stats")
    assert jobs_stats.queues["bulk"].counts == ZERO and not jobs_stats.queues["bulk"].paused
    assert await side.call(app.queues, "known") == ["adhoc", "bulk", "emails", "images"]


async def test_a_worker_asked_for_an_unknown_queue_warns_once(
    app: pgtq.App, side: Side, caplog: pytest.LogCaptureFixture
) -> None:
    send, _ = tasks(app)
    await side.defer(send.configure(queue="adhoc"), to="a")  # known: a job waits in it
    with caplog.at_level(logging.WARNING, logger="pgtq.worker"):
        await side.run_worker(app, queues=["emial", "emails", "adhoc"], wait=False)
        await side.run_worker(app, queues=["emails"], wait=False)
        await side.run_worker(app, wait=False)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pgtq.worker"]
    warnings = [w for w in warnings if "unknown" in w]
    assert len(warnings) == 1, warnings
    assert "'emial'" in warnings[0] and "'emails'" not in warnings[0]
    assert "known queues: adhoc, emails, images" in warnings[0]
    assert "\n" not in warnings[0]


async def test_pause_of_a_queue_no_task_declares_stays_allowed_in_the_api(
    app: pgtq.App, side: Side
) -> None:
    tasks(app)
    assert await side.call(app.queues, "pause", "later") is True
    assert "later" in await side.call(app.queues, "known")


# -- the CLI -------------------------------------------------------------------------------------


def test_queues_pause_refuses_an_unknown_queue_unless_create(dsn: str, sql: SQL) -> None:
    result = invoke("queues", "pause", "greetings-x", "--app", APP, dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(
        result.stderr, "unknown queue 'greetings-x'", "default, greetings", "--create"
    )
    assert sql("SELECT name FROM pgtq.queues") == []
    result = invoke("queues", "pause", "greetings", "--app", APP, dsn=dsn)  # declared, idle
    assert result.exit_code == 0, result.output
    result = invoke("queues", "pause", "greetings-x", "--create", dsn=dsn)
    assert result.exit_code == 0 and "paused" in result.stdout
    assert sorted(sql("SELECT name FROM pgtq.queues")) == [("greetings",), ("greetings-x",)]
    # Without --app, only the database's queues are known: the error says how to add the app's.
    result = invoke("queues", "pause", "default", dsn=dsn)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "known queues: greetings, greetings-x", "--app")


def test_queues_list_shows_every_known_queue_with_its_counts(dsn: str, sql: SQL) -> None:
    result = invoke("defer", APP, "greet", '{"name": "Ada"}', dsn=dsn)
    assert result.exit_code == 0, result.output
    result = invoke("queues", "list", "--app", APP, "--json", dsn=dsn)
    assert result.exit_code == 0, result.output
    listed = {q["name"]: q for q in json.loads(result.stdout)}
    assert sorted(listed) == ["default", "greetings"]
    assert listed["default"]["counts"] == {s.value: 0 for s in COUNTED_STATUSES}
    assert listed["greetings"]["counts"]["todo"] == 1
    assert listed["greetings"]["paused"] is False and listed["greetings"]["paused_at"] is None
    table = invoke("queues", "list", "--app", APP, dsn=dsn).stdout
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines()]
    assert ["default", "active", "0", "0", "0", ""] in rows
    assert ["greetings", "active", "1", "0", "0", ""] in rows


def test_stats_shows_idle_declared_queues(dsn: str) -> None:
    result = invoke("stats", "--app", APP, "--json", dsn=dsn)
    assert result.exit_code == 0, result.output
    queues = {q["name"]: q for q in json.loads(result.stdout)["queues"]}
    assert sorted(queues) == ["default", "greetings"]
    assert queues["default"]["counts"] == {s.value: 0 for s in COUNTED_STATUSES}
    text = invoke("stats", "--app", APP, dsn=dsn).stdout
    assert any(
        line.split("│")[1].strip() == "greetings" for line in text.splitlines() if "│" in line
    )


def test_a_worker_records_its_declared_queues_for_tools_with_only_a_dsn(dsn: str, sql: SQL) -> None:
    """``pgtq stats --dsn`` sees the database only: idle declared queues show there (and in
    ``queues list``) once a worker of the app has started; a paused one stays paused."""
    assert invoke("queues", "pause", "greetings", "--app", APP, dsn=dsn).exit_code == 0
    before = json.loads(invoke("stats", "--json", dsn=dsn).stdout)["queues"]
    assert [q["name"] for q in before] == ["greetings"]  # the default queue is not known yet
    result = invoke("worker", APP, "--one-shot", dsn=dsn)
    assert result.exit_code == 0, result.output
    after = {q["name"]: q for q in json.loads(invoke("stats", "--json", dsn=dsn).stdout)["queues"]}
    assert sorted(after) == ["default", "greetings"]
    assert after["default"]["counts"] == {s.value: 0 for s in COUNTED_STATUSES}
    listed = {q["name"]: q for q in json.loads(invoke("queues", "list", "--json", dsn=dsn).stdout)}
    assert listed["greetings"]["paused"] is True and listed["default"]["paused"] is False
    assert sql("SELECT name, paused FROM pgtq.queues ORDER BY name") == [
        ("default", False),
        ("greetings", True),
    ]


def test_defer_to_a_queue_no_task_declares_warns_and_defers(dsn: str, sql: SQL) -> None:
    result = invoke("defer", APP, "greet", '{"name": "Ada"}', "--queue", "greetngs", dsn=dsn)
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning.startswith("Warning: queue 'greetngs' is unknown")
    assert "known queues: default, greetings" in warning
    assert sql("SELECT queue FROM pgtq.jobs") == [("greetngs",)]
    result = invoke("defer", APP, "greet", '{"name": "Bo"}', "--queue", "default", dsn=dsn)
    assert result.exit_code == 0 and error_lines(result.stderr) == []
    assert "Warning" not in result.stderr


# -- the web dashboard ---------------------------------------------------------------------------


async def test_the_web_overview_shows_idle_declared_queues(app: pgtq.App) -> None:
    tasks(app)
    transport = httpx.ASGITransport(app=pgtq.web.asgi(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        page = await client.get("/")
    assert page.status_code == 200
    assert "/jobs?queue=emails" in page.text and "/jobs?queue=images" in page.text
    assert "No queue yet" not in page.text


async def test_record_declared_adds_only_new_queues_and_keeps_a_pause(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """Both twins: the declared queues go into the queues table once; a paused one stays
    paused (what a worker does at its start)."""
    tasks(app)
    assert await side.call(app.queues, "pause", "emails") is True
    assert await side.call(app.queues, "record_declared") == ["images"]
    assert await side.call(app.queues, "record_declared") == []
    assert sql("SELECT name, paused FROM pgtq.queues ORDER BY name") == [
        ("emails", True),
        ("images", False),
    ]
