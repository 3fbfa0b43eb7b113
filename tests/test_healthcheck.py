"""Health: the pure verdict, ``pgtq healthcheck``'s exit codes, and ``/healthz`` on the
metrics server, against a real PostgreSQL (workers are real ones or rows as they register)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.engine import URL
from typer.testing import Result

import pgtq
from pgtq import health
from pgtq.migrations import SchemaStatus
from pgtq.reports import WorkerInfo
from tests.conftest import eventually
from tests.test_cli import UNREACHABLE, assert_one_error_line, invoke, run_pgtq

SQL = Callable[..., list[tuple[Any, ...]]]
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def worker(name: str = "w1", age: float = 1.0, queues: tuple[str, ...] | None = None) -> WorkerInfo:
    return WorkerInfo(name, "host", 1, queues, NOW, NOW, age)


def schema_in(state: Any) -> SchemaStatus:
    found = frozenset() if state == "missing" else frozenset({"pgtq_0001"})
    needed = ("pgtq_0002",) if state == "behind" else ()
    return SchemaStatus("pgtq", state, found, frozenset({"pgtq_0002"}), needed=needed)


# -- the verdict (pure) -------------------------------------------------------------------------


def test_no_worker_is_unhealthy() -> None:
    verdict = health.verdict([])
    assert not verdict.healthy and verdict.failed == "worker"
    assert "no worker has beaten within 30 s (no worker is registered)" in verdict.message
    assert verdict.as_dict() == {
        "status": "fail",
        "failed": "worker",
        "message": verdict.message,
        "worker": None,
        "heartbeat_age": None,
    }


def test_a_fresh_worker_is_healthy_the_freshest_is_named() -> None:
    verdict = health.verdict([worker("old", 20), worker("new", 2)], schema=schema_in("current"))
    assert verdict.healthy and verdict.failed is None
    assert verdict.worker is not None and verdict.worker.id == "new"
    assert verdict.message.startswith("ok: worker new beat 2.0 s ago (2 live)")
    assert verdict.as_dict()["status"] == "ok" and verdict.as_dict()["heartbeat_age"] == 2.0


def test_a_stale_worker_is_unhealthy_and_max_age_is_inclusive() -> None:
    verdict = health.verdict([worker("w", 31)])
    assert not verdict.healthy and verdict.failed == "worker"
    assert "the freshest, w, beat 31.0 s ago" in verdict.message
    assert health.verdict([worker("w", 30)]).healthy
    assert health.verdict([worker("w", 31)], max_age=60).healthy
    assert not health.verdict([worker("w", 5)], max_age=4.5).healthy


def test_queues_need_a_worker_serving_each() -> None:
    images, emails = worker("img", queues=("images",)), worker("mail", queues=("emails", "x"))
    every = worker("all", queues=None)
    assert health.verdict([images]).healthy  # no queue asked: any worker will do
    verdict = health.verdict([images], queues=["emails"])
    assert not verdict.healthy and verdict.failed == "worker"
    assert "no worker serving queue 'emails'" in verdict.message
    assert "no worker serving queue 'emails' is registered" in verdict.message
    assert health.verdict([images, emails], queues=["emails", "images"]).healthy
    verdict = health.verdict([images], queues=["emails", "images", "emails", "x"])
    assert "queues 'emails', 'x'" in verdict.message  # only the unserved ones, once each
    assert health.verdict([every], queues=["emails", "anything"]).healthy
    stale = health.verdict([images, worker("mail", 40, ("emails",))], queues=["emails"])
    assert not stale.healthy and "the freshest, mail, beat 40.0 s ago" in stale.message
    assert stale.worker is not None and stale.worker.id == "mail"  # not the unrelated one


def test_the_schema_is_checked_before_the_workers() -> None:
    for state in ("missing", "behind"):
        verdict = health.verdict([worker()], schema=schema_in(state))
        assert not verdict.healthy and verdict.failed == "schema", state
        assert "pgtq migrate" in verdict.message
    for state in ("current", "ahead", "unmanaged"):  # the states a worker runs on
        assert health.verdict([worker()], schema=schema_in(state)).healthy, state
    assert health.verdict([], schema=schema_in("current")).failed == "worker"


def test_unreachable_and_bad_max_age() -> None:
    verdict = health.unreachable("connection refused")
    assert not verdict.healthy and verdict.failed == "database"
    assert verdict.message == "the database did not answer: connection refused"
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_age"):
            health.verdict([], max_age=bad)


# -- pgtq healthcheck ---------------------------------------------------------------------------


def register(sql: SQL, name: str, *, age: float = 0.0, queues: list[str] | None = None) -> None:
    """A worker's row as a worker registers it, its last beat ``age`` seconds ago."""
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, queues, last_heartbeat) "
        "VALUES (%s, %s, %s, %s, now() - make_interval(secs => %s))",
        name,
        socket.gethostname(),
        os.getpid(),
        queues,
        age,
    )


def healthcheck(dsn: str, *args: str) -> Result:
    return invoke("healthcheck", *args, dsn=dsn)


def assert_fails(result: Result, check: str, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert_one_error_line(result.stderr, f"healthcheck failed ({check})", *fragments)


def test_healthcheck_without_a_worker_fails(dsn: str) -> None:
    assert_fails(healthcheck(dsn), "worker", "no worker is registered")
    assert_fails(healthcheck(dsn, "-q", "emails"), "worker", "queue 'emails'")


def test_healthcheck_with_a_fresh_worker_passes(dsn: str, sql: SQL) -> None:
    register(sql, "w1")
    result = healthcheck(dsn)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: worker w1 beat")
    assert "schema current" in result.stdout


def test_healthcheck_with_a_stale_worker_fails_unless_max_age_allows(dsn: str, sql: SQL) -> None:
    register(sql, "w1", age=45)
    assert_fails(healthcheck(dsn), "worker", "within 30 s", "the freshest, w1, beat 45")
    assert healthcheck(dsn, "--max-age", "60").exit_code == 0
    assert_fails(healthcheck(dsn, "--max-age", "40"), "worker", "within 40 s")


def test_healthcheck_wants_a_worker_of_each_queue(dsn: str, sql: SQL) -> None:
    register(sql, "images-worker", queues=["images"])
    assert healthcheck(dsn).exit_code == 0
    assert healthcheck(dsn, "--queue", "images").exit_code == 0
    assert_fails(healthcheck(dsn, "-q", "emails"), "worker", "serving queue 'emails'")
    assert_fails(healthcheck(dsn, "-q", "images", "-q", "emails"), "worker", "'emails'")
    register(sql, "all-queues")  # no queues: serves every queue
    assert healthcheck(dsn, "-q", "images", "-q", "emails").exit_code == 0


def test_healthcheck_on_a_schema_behind_fails(make_database: Callable[[], URL]) -> None:
    empty = make_database().render_as_string(hide_password=False)
    assert_fails(healthcheck(empty), "schema", "tables are missing", "pgtq migrate")


def test_healthcheck_on_an_unreachable_database_fails_in_one_line() -> None:
    proc = run_pgtq("healthcheck", "--dsn", UNREACHABLE)
    assert proc.returncode == 1, proc.stderr
    assert_one_error_line(proc.stderr, "healthcheck failed (database)", "127.0.0.1:1")
    proc = run_pgtq("healthcheck", "--json", "--dsn", UNREACHABLE)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["failed"] == "database"


def test_healthcheck_json_and_bad_max_age(dsn: str, sql: SQL) -> None:
    result = healthcheck(dsn, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["failed"] == "worker"
    register(sql, "w1", age=2)
    document = json.loads(healthcheck(dsn, "--json").stdout)
    assert document["status"] == "ok" and document["worker"] == "w1"
    assert 2 <= document["heartbeat_age"] < 30
    for bad in ("0", "-1", "nan"):
        assert_fails_option = healthcheck(dsn, "--max-age", bad)
        assert assert_fails_option.exit_code == 1
        assert_one_error_line(assert_fails_option.stderr, "--max-age")


async def test_healthcheck_follows_a_live_worker(app: pgtq.App, sql: SQL) -> None:
    """A real worker beating every 50 ms: healthy while it runs, even once its last beat was
    made old; unhealthy once it stopped (it unregisters)."""

    @app.task(queue="emails")
    def send() -> None: ...

    running = asyncio.create_task(app.run_worker_async(queues=["emails"], heartbeat_interval=0.05))
    dsn = app.url.render_as_string(hide_password=False)
    try:
        await eventually(lambda: sql("SELECT count(*) FROM pgtq.workers") == [(1,)])
        result = await asyncio.to_thread(healthcheck, dsn, "-q", "emails")
        assert result.exit_code == 0, result.output
        sql("UPDATE pgtq.workers SET last_heartbeat = now() - interval '1 hour'")

        def passes() -> bool:
            return healthcheck(dsn, "-q", "emails", "--max-age", "5").exit_code == 0

        await eventually(lambda: asyncio.to_thread(passes))  # it beat again
        result = await asyncio.to_thread(healthcheck, dsn, "-q", "images")
        assert_fails(result, "worker", "serving queue 'images'")
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    result = await asyncio.to_thread(healthcheck, dsn, "-q", "emails")
    assert_fails(result, "worker", "is registered")


# -- /healthz -----------------------------------------------------------------------------------


@pytest.fixture
def registry() -> Iterator[Any]:
    prometheus_client = pytest.importorskip("prometheus_client")
    from pgtq import metrics

    reg = prometheus_client.CollectorRegistry()
    yield reg
    metrics.uninstall(reg)


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    lines = body.decode().splitlines()
    assert len(lines) == 1, body  # one line of JSON
    return status, json.loads(lines[0])


@pytest.fixture
def healthz(app: pgtq.App, registry: Any) -> Iterator[Callable[[], Any]]:
    from pgtq import metrics

    server = metrics.serve(app, 0, "127.0.0.1", registry=registry, max_age=5)
    url = f"http://127.0.0.1:{server.server_port}/healthz"
    yield lambda: asyncio.to_thread(get, url)
    server.shutdown()
    server.server_close()


async def test_healthz_is_503_without_this_process_worker(
    healthz: Callable[[], Any], sql: SQL
) -> None:
    status, body = await healthz()
    assert status == 503 and body["status"] == "fail" and body["failed"] == "worker"
    assert "no this process's worker" not in body["message"]  # a readable sentence
    assert "this process's worker" in body["message"]
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid) VALUES ('elsewhere', 'other-host', %s)",
        os.getpid(),
    )
    register(sql, "me", age=60)  # this process, but silent
    status, body = await healthz()
    assert status == 503 and "the freshest, me, beat 60" in body["message"]


async def test_healthz_is_200_while_this_process_worker_beats(
    app: pgtq.App, healthz: Callable[[], Any], sql: SQL
) -> None:
    running = asyncio.create_task(app.run_worker_async(heartbeat_interval=0.05))
    try:

        async def healthy() -> bool:
            status, _ = await healthz()
            return bool(status == 200)

        await eventually(healthy)
        status, body = await healthz()
        [(worker_id,)] = sql("SELECT id FROM pgtq.workers")
        assert (status, body["status"], body["worker"]) == (200, "ok", worker_id)
        assert body["heartbeat_age"] < 5
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    status, body = await healthz()
    assert status == 503


async def test_healthz_is_503_when_the_database_is_down(registry: Any) -> None:
    from pgtq import metrics

    down = pgtq.App(UNREACHABLE, connect_timeout=1)
    server = metrics.serve(down, 0, "127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/healthz"
        status, body = await asyncio.to_thread(get, url)
        assert status == 503 and body["failed"] == "database"
        assert "127.0.0.1" in body["message"]
    finally:
        server.shutdown()
        server.server_close()
        down.close()
