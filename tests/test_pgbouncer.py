"""pgtq through a real PgBouncer in ``pool_mode = transaction`` (tests/pgbouncer.py), with
``App(dsn, prepared_statements=False)``: defer (sync, asyncpg, psycopg async; one job, a
batch, in the caller's transaction), the worker (claim, complete, retry, heartbeat, rescue,
aborts, limits), periodic ticks, the web dashboard's reads, ``pgtq migrate``, and what LISTEN
does there (nothing: a worker finds jobs by polling, or hears them on ``listen_dsn``).

Each server connection serves whichever client needs one for its next transaction, so a
session's state (prepared statements, SET, LISTEN) does not follow the client:
:func:`test_the_pool_hands_server_connections_between_clients` shows it, and what it breaks.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

import pgtq
import pgtq.web
from pgtq import listener as listener_module
from pgtq import periodic
from pgtq.claims import Claims
from pgtq.cli import cli
from pgtq.fetcher import Fetcher
from pgtq.worker import Worker
from tests.conftest import eventually, libpq
from tests.pgbouncer import BINARY, PgBouncer, without_pgbouncer
from tests.sides import Side
from tests.system_packages import NO_SYSTEM_INSTALL

SQL = Callable[..., list[tuple[Any, ...]]]

#: ``App(listen_dsn=...)`` (LISTEN on a direct connection) is there.
HAS_LISTEN_DSN = "listen_dsn" in inspect.signature(pgtq.App).parameters
needs_listen_dsn = pytest.mark.skipif(not HAS_LISTEN_DSN, reason="App(listen_dsn=...) not there")


def bounced_app(dsn: str, **options: Any) -> pgtq.App:
    return pgtq.App(dsn, prepared_statements=False, **options)


@pytest.fixture
async def app(bounced_dsn: str) -> AsyncIterator[pgtq.App]:
    """The test's app, through PgBouncer (this module's ``app`` is never a direct one)."""
    application = bounced_app(bounced_dsn)
    yield application
    await application.close_async()


def statuses(sql: SQL) -> dict[int, str]:
    return {int(r[0]): str(r[1]) for r in sql("SELECT id, status FROM pgtq.jobs")}


async def run_until(worker: Worker, done: Callable[[], bool], timeout: float = 15) -> None:
    """Run ``worker`` until ``done()`` (checked with a deadline), then stop it."""
    running = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: done() or running.done(), timeout=timeout)
        if running.done():
            running.result()  # the worker's own error, if it stopped by one
    finally:
        worker.stop()
        await running


# -- where PgBouncer is missing ----------------------------------------------------------------


@pytest.mark.unit
def test_without_pgbouncer_the_skip_names_the_opt_out_or_the_package() -> None:
    fail, why = without_pgbouncer({NO_SYSTEM_INSTALL: "1"})
    assert not fail and f"{NO_SYSTEM_INSTALL} is set" in why and BINARY in why
    fail, why = without_pgbouncer({})
    assert not fail and "installs it with apt-get" in why and BINARY in why
    fail, why = without_pgbouncer({"CI": "true", NO_SYSTEM_INSTALL: "1"})
    assert fail and "CI must run the PgBouncer tests" in why


# -- the pool itself ----------------------------------------------------------------------------


async def test_the_pool_hands_server_connections_between_clients(
    pgbouncer: PgBouncer, bounced_dsn: str
) -> None:
    """The fixture pools per transaction, and so what pgtq must not rely on really breaks: a
    prepared statement lives on one server connection, which another client may hold when the
    statement's client comes back (idle server connections are reused last-in first-out)."""
    with psycopg.connect(libpq(pgbouncer.url("pgbouncer")), autocommit=True) as admin:
        config = psycopg.ClientCursor(admin).execute("SHOW CONFIG").fetchall()
    assert tuple(r[1] for r in config if r[0] == "pool_mode") == ("transaction",)

    prepares = await asyncpg.connect(bounced_dsn)  # asyncpg's default: named statements
    holder = await asyncpg.connect(bounced_dsn, statement_cache_size=0)
    try:
        pid = await prepares.fetchval("SELECT pg_backend_pid() + $1", 0)
        async with holder.transaction():
            assert await holder.fetchval("SELECT pg_backend_pid()") == pid  # the same server
            with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
                await prepares.fetchval("SELECT pg_backend_pid() + $1", 0)
    finally:
        await prepares.close()
        await holder.close()


async def test_prepared_statements_break_a_defer_without_the_setting(bounced_dsn: str) -> None:
    """Why ``prepared_statements=False``: with the default, the second ``defer_async`` finds
    its statement gone when another client holds the server connection that prepared it."""
    app = pgtq.App(bounced_dsn)

    @app.task
    def noop() -> None: ...

    holder = await asyncpg.connect(bounced_dsn, statement_cache_size=0)
    try:
        await noop.defer_async()
        async with holder.transaction():
            await holder.fetchval("SELECT 1")
            with pytest.raises(Exception, match=r"prepared statement .* does not exist"):
                await noop.defer_async()
    finally:
        await holder.close()
        await app.close_async()


# -- defer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("way", ["sync", "asyncpg", "psycopg-async"])
async def test_defer_one_a_batch_and_many_at_once(bounced_dsn: str, sql: SQL, way: str) -> None:
    """Every enqueue path, and 40 concurrent defers (threads on the sync side, tasks on the
    async ones) so that clients trade server connections between their statements."""
    driver = "psycopg" if way == "psycopg-async" else "asyncpg"
    url = make_url(bounced_dsn).set(drivername=f"postgresql+{driver}")
    app = bounced_app(url.render_as_string(hide_password=False))

    @app.task(queue="emails")
    def send(to: str) -> None: ...

    async def defer(**kwargs: Any) -> int:
        if way == "sync":
            return await asyncio.to_thread(send.defer, **kwargs)
        return await send.defer_async(**kwargs)

    async def defer_many(arguments: list[dict[str, Any]]) -> list[int]:
        if way == "sync":
            return await asyncio.to_thread(send.defer_many, arguments)
        return await send.defer_many_async(arguments)

    try:
        one = await defer(to="a")
        batch = await defer_many([{"to": f"b{i}"} for i in range(100)])
        concurrent = await asyncio.gather(*(defer(to=f"c{i}") for i in range(40)))
        ids = [one, *batch, *concurrent]
        assert len(set(ids)) == 141
        rows = sql("SELECT id, args->>'to', queue, status FROM pgtq.jobs ORDER BY id")
        assert [r[0] for r in rows] == sorted(ids)
        expected = {"a"} | {f"b{i}" for i in range(100)} | {f"c{i}" for i in range(40)}
        assert {r[1] for r in rows} == expected
        assert {(r[2], r[3]) for r in rows} == {("emails", "todo")}
        job = await app.jobs.get_async(one) if way != "sync" else app.jobs.get(one)
        assert job is not None and job.args == {"to": "a"}
    finally:
        await app.close_async()
        app.close()


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
async def test_defer_in_the_callers_transaction(
    side: Side, app: pgtq.App, bounced_dsn: str, sql: SQL, commit: bool
) -> None:
    """The caller's own engine through PgBouncer (prepared statements off, as it must be
    there too): the job commits or rolls back with the caller's writes."""

    @app.task
    def send(to: str) -> None: ...

    sql("CREATE TABLE IF NOT EXISTS orders (id int)")
    sql("TRUNCATE orders")
    url = make_url(bounced_dsn)
    if side.name == "sync":
        engine = sa.create_engine(
            url.set(drivername="postgresql+psycopg"), connect_args={"prepare_threshold": None}
        )

        def work() -> None:
            with engine.connect() as conn:
                conn.execute(sa.text("INSERT INTO orders VALUES (1)"))
                send.defer(to="a", connection=conn)
                send.defer_many([{"to": "b"}, {"to": "c"}], connection=conn)
                conn.commit() if commit else conn.rollback()

        await asyncio.to_thread(work)
        engine.dispose()
    else:
        aengine = create_async_engine(
            url.set(drivername="postgresql+asyncpg").update_query_dict(
                {"prepared_statement_cache_size": "0"}
            ),
            connect_args={"statement_cache_size": 0},
        )
        async with aengine.connect() as aconn:
            await aconn.execute(sa.text("INSERT INTO orders VALUES (1)"))
            await send.defer_async(to="a", connection=aconn)
            await send.defer_many_async([{"to": "b"}, {"to": "c"}], connection=aconn)
            await (aconn.commit() if commit else aconn.rollback())
        await aengine.dispose()
    assert sql("SELECT count(*) FROM orders") == [(1 if commit else 0,)]
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(3 if commit else 0,)]


# -- the worker ---------------------------------------------------------------------------------


async def test_a_worker_claims_completes_retries_and_beats(app: pgtq.App, sql: SQL) -> None:
    """Sync and async tasks, batches of claims and completions, a retry, a failure, and the
    heartbeat moving on: all through PgBouncer."""

    @app.task(retry=pgtq.Retry(max_attempts=2, base=0, jitter=0))
    async def flaky(ctx: pgtq.JobContext, n: int) -> int:
        if ctx.attempt == 1 and n % 10 == 0:
            raise RuntimeError("first attempt")
        return n * 2

    @app.task
    def double(n: int) -> int:
        return n * 2

    @app.task
    def broken() -> None:
        raise ValueError("always")

    flaky_ids = await flaky.defer_many_async([{"n": i} for i in range(60)])
    sync_ids = await asyncio.to_thread(double.defer_many, [{"n": i} for i in range(60)])
    bad = broken.defer()
    worker = Worker(
        app,
        concurrency=8,
        heartbeat_interval=0.1,
        fetch_job_polling_interval=0.2,
        summary_interval=None,
    )
    beats: set[Any] = set()

    def done() -> bool:
        beats.update(r[0] for r in sql("SELECT last_heartbeat FROM pgtq.workers"))
        counts = {r[0]: r[1] for r in sql("SELECT status, count(*) FROM pgtq.jobs GROUP BY 1")}
        return counts == {"succeeded": 120, "failed": 1} and len(beats) >= 3

    await run_until(worker, done)
    assert await app.jobs.wait_async(flaky_ids[10], timeout=5) == 20
    assert await asyncio.to_thread(app.jobs.wait, sync_ids[7], timeout=5) == 14
    with pytest.raises(pgtq.JobFailed, match="always"):
        await app.jobs.wait_async(bad, timeout=5)
    retried = sql("SELECT count(*) FROM pgtq.jobs WHERE attempts = 2")
    assert retried == [(6,)]
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]  # unregistered at its stop


async def test_a_dead_workers_job_is_rescued_by_a_live_one(app: pgtq.App, sql: SQL) -> None:
    @app.task
    def again() -> str:
        return "again"

    job_id = await again.defer_async()
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, last_heartbeat) "
        "VALUES ('ghost', 'h', 1, now() - interval '1 hour')"
    )
    sql("UPDATE pgtq.jobs SET status = 'doing', attempts = 1, worker_id = 'ghost'")
    stats = await asyncio.wait_for(app.run_worker_async(wait=False, rescue_after=60), 30)
    assert stats.by_status["rescued"] == 1
    assert await app.jobs.wait_async(job_id, timeout=5) == "again"
    history = [e.type for e in await app.jobs.history_async(job_id)]
    assert "rescued" in history and history[-1] == "succeeded"
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]


async def test_an_abort_reaches_a_running_job_by_polling(app: pgtq.App, sql: SQL) -> None:
    """The abort's NOTIFY is not heard through PgBouncer; the worker's abort polling finds
    the request within ``abort_job_polling_interval``."""
    started = asyncio.Event()

    @app.task
    async def endless() -> None:
        started.set()
        await asyncio.sleep(60)  # an abort cancels it here

    job_id = await endless.defer_async()
    worker = Worker(app, abort_job_polling_interval=0.2, summary_interval=None)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(started.wait(), 10)
        await app.jobs.abort_async(job_id)
        await eventually(lambda: statuses(sql) == {job_id: "aborted"}, timeout=5)
    finally:
        worker.stop()
        await running


async def test_limits_hold_across_two_workers(app: pgtq.App, sql: SQL) -> None:
    """The fleet-wide limits' claim runs under a transaction-level advisory lock
    (``pg_advisory_xact_lock``): it ends with the transaction, so it works per transaction.
    A task capped at 1 never runs twice at once, a queue capped at 2 never runs three."""
    running: dict[str, int] = {"single": 0, "narrow": 0}
    peak: dict[str, int] = {"single": 0, "narrow": 0}

    async def step(group: str) -> None:
        running[group] += 1
        peak[group] = max(peak[group], running[group])
        await asyncio.sleep(0.01)
        running[group] -= 1

    @app.task(concurrency=1)
    async def single() -> None:
        await step("single")

    @app.task(queue="narrow")
    async def narrow() -> None:
        await step("narrow")

    await app.queues.set_limits_async("narrow", concurrency=2)
    await single.defer_many_async([{} for _ in range(10)])
    await narrow.defer_many_async([{} for _ in range(12)])
    workers = asyncio.gather(
        app.run_worker_async(wait=False, concurrency=5),
        app.run_worker_async(wait=False, concurrency=5),
    )
    await asyncio.wait_for(workers, 30)
    assert set(statuses(sql).values()) == {"succeeded"}
    assert peak == {"single": 1, "narrow": 2}


# -- periodic ticks -----------------------------------------------------------------------------


async def test_periodic_ticks_are_deferred_once_by_racing_schedulers(
    side: Side, app: pgtq.App, sql: SQL
) -> None:
    @app.periodic(cron="* * * * * */10", max_delay=60)
    @app.task(queue="beats")
    def beat(timestamp: int) -> None: ...

    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    results = await asyncio.gather(
        *(side.call(periodic, "defer_due_ticks", app, now=now) for _ in range(3))
    )
    deferred = [d for result in results for d in result]
    assert len(deferred) == 7  # 11:59:00 to 12:00:00, every 10 s
    assert len({d.tick_at for d in deferred}) == 7
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(7,)]
    assert sql("SELECT count(*) FROM pgtq.periodic_ticks") == [(7,)]
    later = now + timedelta(seconds=10)
    assert [d.tick_at for d in await side.call(periodic, "defer_due_ticks", app, now=later)] == [
        later
    ]


async def test_a_workers_scheduler_defers_and_runs_a_tick(app: pgtq.App, sql: SQL) -> None:
    """The worker's own scheduler (periodic=True) ticks through PgBouncer too."""
    ran = threading.Event()

    @app.periodic(cron="* * * * * *")  # every second
    @app.task
    def tick(timestamp: int) -> None:
        ran.set()

    worker = Worker(app, fetch_job_polling_interval=0.2, summary_interval=None)
    await run_until(worker, ran.is_set, timeout=10)
    assert sql("SELECT count(*) > 0 FROM pgtq.periodic_ticks") == [(True,)]


# -- the web dashboard --------------------------------------------------------------------------


async def test_the_dashboard_reads_and_acts(app: pgtq.App, sql: SQL) -> None:
    @app.task(queue="emails")
    def send(to: str) -> None: ...

    @app.periodic(cron="0 3 * * *")
    @app.task
    def backup(timestamp: int) -> None: ...

    failed, waiting = await send.defer_many_async([{"to": "a"}, {"to": "b"}])
    sql(
        "UPDATE pgtq.jobs SET status = 'failed', attempts = 1, started_at = now(), "
        'finished_at = now(), error = \'{"type": "E", "message": "m"}\' WHERE id = %s',
        failed,
    )
    sql("INSERT INTO pgtq.workers (id, hostname, pid) VALUES ('w-1', 'host-1', 42)")
    transport = httpx.ASGITransport(app=pgtq.web.asgi(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for path, shows in [
            ("/", 'href="/jobs?queue=emails&amp;status=todo">1<'),
            ("/jobs?queue=emails", f'<tr data-job="{waiting}">'),
            (f"/jobs/{failed}", '<dd id="job-status">failed</dd>'),
            ("/workers", "host-1"),
            ("/periodic", "0 3 * * *"),
        ]:
            page = await client.get(path)
            assert page.status_code == 200, path
            assert shows in page.text, path
        csrf = client.cookies.get("pgtq_csrf")
        assert csrf
        done = await client.post(f"/jobs/{failed}/retry", data={"csrf_token": csrf})
        assert done.status_code == 303
    assert statuses(sql) == {failed: "todo", waiting: "todo"}


async def test_pgtq_web_given_only_a_dsn(bounced_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pgtq web --dsn URL` (no --app) serves App(URL): PGTQ_PREPARED_STATEMENTS=off turns
    prepared statements off there too (a page failed once another client held the server
    connection that prepared its statement)."""
    monkeypatch.setenv("PGTQ_PREPARED_STATEMENTS", "off")
    app = pgtq.App(None)
    assert app.prepared_statements is False
    app.use_dsn(bounced_dsn)  # what `pgtq web --dsn URL` serves, with no --app
    holder = await asyncpg.connect(bounced_dsn, statement_cache_size=0)
    transport = httpx.ASGITransport(app=pgtq.web.asgi(app))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            assert (await client.get("/")).status_code == 200
            for _ in range(3):  # another client takes the server connection between two pages
                async with holder.transaction():
                    await holder.fetchval("SELECT 1")
                    page = await client.get("/")
                assert page.status_code == 200
    finally:
        await holder.close()
        await app.close_async()


# -- migrations ---------------------------------------------------------------------------------


def test_pgtq_migrate_through_pgbouncer(
    pgbouncer: PgBouncer, make_database: Callable[[], URL]
) -> None:
    """``pgtq migrate`` (Alembic, transactional DDL under a transaction-level advisory lock)
    on a fresh database through PgBouncer, then ``--check``; the CLI's own app, prepared
    statements on (psycopg prepares a statement only on its fifth run)."""
    fresh = make_database()
    assert fresh.database
    url = pgbouncer.url(fresh.database).render_as_string(hide_password=False)
    runner = CliRunner()
    done = runner.invoke(cli, ["migrate", "--dsn", url])
    assert done.exit_code == 0, done.output
    check = runner.invoke(cli, ["migrate", "--check", "--dsn", url])
    assert check.exit_code == 0, check.output
    with psycopg.connect(libpq(fresh)) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgtq' AND tablename = 'jobs'"
        ).fetchone()
    assert tables == (1,)


# -- LISTEN -------------------------------------------------------------------------------------


@pytest.fixture
def heard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """The NOTIFYs the workers' listeners hear (channel, payload)."""
    got: list[tuple[str, str]] = []
    on_notify = listener_module.Listener.on_notify

    def recording(self: listener_module.Listener, channel: str, payload: str) -> None:
        got.append((channel, payload))
        on_notify(self, channel, payload)

    monkeypatch.setattr(listener_module.Listener, "on_notify", recording)
    yield got


class Idle:
    """Tells when a worker is idle: its claims came back empty since it last had a reason to
    claim (its start, LISTEN up), and none is out. A job deferred then is found only by a
    NOTIFY heard or by polling."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.claims: list[tuple[float, int]] = []  # (sent at, jobs claimed)
        self.out = 0
        self.looked: list[float] = []  # LISTEN (re)established: the fetcher looks again
        claim, look_again = Claims.claim, Fetcher.look_again

        async def recorded_claim(claims: Claims, limit: int, answer: Any = None) -> Any:
            self.out += 1
            sent = time.monotonic()
            try:
                got = await claim(claims, limit, answer)
            finally:
                self.out -= 1
            self.claims.append((sent, len(got or ())))
            return got

        def recorded_look_again(fetcher: Fetcher) -> None:
            self.looked.append(time.monotonic())
            look_again(fetcher)

        monkeypatch.setattr(Claims, "claim", recorded_claim)
        monkeypatch.setattr(Fetcher, "look_again", recorded_look_again)

    def idle(self, listening: bool) -> bool:
        if not self.claims or self.out or self.claims[-1][1] or (listening and not self.looked):
            return False
        return not self.looked or self.claims[-1][0] >= self.looked[-1]


async def _pickup(app: pgtq.App, dsn: str, idle: Idle, **worker: Any) -> tuple[float, float, float]:
    """Defer a job to an idle worker; seconds until a direct LISTEN heard its NOTIFY, until
    the worker started it, and from the worker's last claim (its polling counts from there)
    until it started it."""
    started: list[float] = []

    @app.task
    async def probe() -> None:
        started.append(time.monotonic())

    direct = await asyncpg.connect(dsn)
    notified: list[float] = []
    await direct.add_listener(app.statements.channel, lambda *_: notified.append(time.monotonic()))
    w = Worker(app, summary_interval=None, **worker)
    running = asyncio.create_task(w.run())
    try:
        await eventually(lambda: idle.idle(getattr(app, "listens", True)) or running.done())
        assert not running.done()
        last_claim, sent = idle.claims[-1][0], time.monotonic()
        await probe.defer_async()
        await eventually(lambda: bool(notified), timeout=5)
        await eventually(lambda: bool(started) or running.done(), timeout=15)
        assert started, "the worker stopped"
        return notified[0] - sent, started[0] - sent, started[0] - last_claim
    finally:
        w.stop()
        await running
        await direct.close()


async def test_a_worker_behind_pgbouncer_without_listen_dsn_polls(
    app: pgtq.App, dsn: str, heard: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LISTEN through transaction pooling succeeds and never delivers (the LISTEN ran on a
    server connection that went back to the pool at once), and leaves that server connection
    listening: its notifications then reach PgBouncer while no client is linked ("got packet
    'A' from server when not linked"), and once hung the next client of that connection in
    this suite. So with ``prepared_statements=False`` and no ``listen_dsn`` a worker does not
    LISTEN: it finds the job by polling (``fetch_job_polling_interval``), not sooner."""
    assert app.listens is False
    interval = 1.0
    idle = Idle(monkeypatch)
    notified, picked, polled = await _pickup(app, dsn, idle, fetch_job_polling_interval=interval)
    assert heard == []
    assert notified < 0.5  # it was sent: a direct LISTEN had it at once
    assert interval * 0.9 < polled < interval + 1.0  # the claim that found it was the poll
    print(f"\npickup by polling: {picked * 1000:.0f} ms (interval {interval} s)")


@needs_listen_dsn
async def test_listen_dsn_wakes_a_worker_through_pgbouncer(
    bounced_dsn: str, dsn: str, heard: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``listen_dsn`` pointing at the server itself, the NOTIFY wakes the worker: the
    job starts well within the polling interval (30 s here)."""
    app = bounced_app(bounced_dsn, listen_dsn=dsn)
    try:
        idle = Idle(monkeypatch)
        notified, picked, _ = await _pickup(app, dsn, idle, fetch_job_polling_interval=30)
    finally:
        await app.close_async()
    assert any(channel == app.statements.channel for channel, _ in heard)
    assert picked < 1.0, picked
    print(
        f"\npickup with listen_dsn: {picked * 1000:.1f} ms (NOTIFY heard in {notified * 1000:.1f})"
    )


@needs_listen_dsn
async def test_listen_dsn_false_polls(
    bounced_dsn: str, dsn: str, heard: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``listen_dsn=False``: no LISTEN at all; the worker polls."""
    app = bounced_app(bounced_dsn, listen_dsn=False)
    try:
        idle = Idle(monkeypatch)
        _, _, polled = await _pickup(app, dsn, idle, fetch_job_polling_interval=0.5)
    finally:
        await app.close_async()
    assert heard == []
    assert 0.45 < polled < 1.5


async def test_no_session_state_is_left_on_pooled_connections(
    pgbouncer: PgBouncer, app: pgtq.App
) -> None:
    """The claims' ``SET synchronous_commit = off`` would stay on a server connection that
    other clients then get: with ``prepared_statements=False`` the claim connections set
    nothing. After a worker ran, every server connection of the pool still has the server's
    default (each one looked at by a client holding it in a transaction)."""

    @app.task
    def noop() -> None: ...

    await noop.defer_many_async([{} for _ in range(20)])
    await asyncio.wait_for(app.run_worker_async(wait=False, concurrency=4), 30)
    await app.close_async()
    database = make_url(app.url).database
    with psycopg.connect(libpq(pgbouncer.url("pgbouncer")), autocommit=True) as admin:
        cursor = psycopg.ClientCursor(admin).execute("SHOW SERVERS")
        assert cursor.description
        column = [c.name for c in cursor.description].index("database")
        servers = [r for r in cursor.fetchall() if r[column] == database]
    assert len(servers) >= 2  # the worker's claims and its completions had one each, at least
    clients = [psycopg.connect(libpq(app.url)) for _ in servers]
    try:  # each client in a transaction holds one server connection: all of them in turn
        values = [c.execute("SHOW synchronous_commit").fetchone() for c in clients]
        pids = {c.execute("SELECT pg_backend_pid()").fetchone() for c in clients}
    finally:
        for c in clients:
            c.close()
    assert len(pids) == len(servers)
    assert set(values) == {("on",)}
