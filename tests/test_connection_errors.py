"""Enqueue errors: a caller catches one pgtq class, and a killed pooled connection costs no
defer. Real PostgreSQL; the backends killed are always this test database's own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

import pgtq
from pgtq.connectors import _not_sent, connection_failed, is_data_error
from tests.conftest import eventually, libpq

# Every session of the test database but ours; the pids signalled.
TERMINATE_OTHERS = (
    "SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{}') "
    "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
# The sessions of the test database (never another database's on a shared server).
ACTIVITY = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"

DRIVERS = ["psycopg-sync", "asyncpg", "psycopg-async"]
PATHS = [
    ("psycopg-sync", "defer"),
    ("psycopg-sync", "defer_many"),
    ("asyncpg", "defer_async"),
    ("asyncpg", "defer_many_async"),
    ("psycopg-async", "defer_async"),
    ("psycopg-async", "defer_many_async"),
]


def _app(dsn: str, driver: str) -> pgtq.App:
    if driver == "psycopg-async":
        dsn = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    return pgtq.App(dsn)


def _enqueue(task: pgtq.Task[..., Any], path: str, n: int) -> Callable[[], Awaitable[list[int]]]:
    async def go() -> list[int]:
        if path == "defer":
            return [await asyncio.to_thread(task.defer, n=n)]
        if path == "defer_many":
            return list(await asyncio.to_thread(task.defer_many, [{"n": n}, {"n": n}]))
        if path == "defer_async":
            return [await task.defer_async(n=n)]
        return list(await task.defer_many_async([{"n": n}, {"n": n}]))

    return go


async def _kill_others(sql: Any) -> None:
    """Terminate the app's sessions, and wait until they are gone (their goodbye sent)."""
    killed = set(sql(TERMINATE_OTHERS)[0][0])
    assert killed, "the app had no session to kill"

    def gone() -> bool:
        alive = {r[0] for r in sql(ACTIVITY)}
        return not killed & alive

    await eventually(gone)


@pytest.mark.parametrize(("driver", "path"), PATHS, ids=[f"{d}-{p}" for d, p in PATHS])
async def test_a_killed_pooled_connection_costs_no_defer(
    dsn: str, sql: Any, driver: str, path: str
) -> None:
    app = _app(dsn, driver)
    try:

        @app.task()
        def noop(n: int) -> None: ...

        ids: list[int] = []
        for round_ in range(3):
            ids += await _enqueue(noop, path, round_)()  # the pool holds a connection now
            await _kill_others(sql)
        ids += await _enqueue(noop, path, 99)()  # retried on a fresh connection, once
        stored = [r[0] for r in sql("SELECT id FROM pgtq.jobs ORDER BY id")]
        assert stored == sorted(ids)  # each exactly once
        assert len(set(ids)) == len(ids) == (4 if path in ("defer", "defer_async") else 8)
    finally:
        await app.close_async()


@pytest.mark.parametrize(("driver", "path"), PATHS, ids=[f"{d}-{p}" for d, p in PATHS])
async def test_an_unreachable_server_raises_database_unreachable(driver: str, path: str) -> None:
    app = _app("postgresql://postgres@127.0.0.1:1/nowhere", driver)
    try:

        @app.task()
        def noop(n: int) -> None: ...

        with pytest.raises(pgtq.DatabaseUnreachable):
            await _enqueue(noop, path, 1)()
    finally:
        await app.close_async()


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_connection_lost_after_sending_is_not_retried(
    dsn: str, sql: Any, migrated_url: Any, driver: str
) -> None:
    """The insert was sent, then its backend killed: pgtq cannot know whether it committed,
    so it raises DatabaseUnreachable and does not send it again (no job twice)."""
    app = _app(dsn, driver)
    locker = psycopg.connect(libpq(migrated_url))
    try:

        @app.task()
        def noop(n: int) -> None: ...

        locker.execute("LOCK TABLE pgtq.jobs IN ACCESS EXCLUSIVE MODE")  # inserts wait
        path = "defer" if driver == "psycopg-sync" else "defer_async"
        pending = asyncio.ensure_future(_enqueue(noop, path, 1)())
        waiting = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE 'WITH inserted AS%%'"
        )
        await eventually(lambda: bool(sql(waiting)))
        [(pid,)] = sql(waiting)
        sql("SELECT pg_terminate_backend(%s)", pid)
        with pytest.raises(pgtq.DatabaseUnreachable):
            await pending
        locker.rollback()
        assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]  # not sent a second time
        assert await _enqueue(noop, path, 2)()  # and the next defer works
    finally:
        locker.close()
        await app.close_async()


def test_connection_failures_are_told_from_statement_errors() -> None:
    from asyncpg import exceptions as ae

    switch = ae.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    closed = ae.InterfaceError("cannot perform operation: connection is closed")
    gone = [
        ae.AdminShutdownError("terminating connection due to administrator command"),
        ae.CannotConnectNowError("the database system is shutting down"),
        ae.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        switch,
        closed,
        psycopg.OperationalError("consuming input failed: server closed the connection"),
        ConnectionResetError(),
    ]
    for exc in gone:
        assert connection_failed(exc), exc
        wrapped = sa_exc.DBAPIError("INSERT", {}, exc)
        assert connection_failed(wrapped), exc
        assert not is_data_error(exc) and not is_data_error(wrapped), exc  # transient
    statement = [
        ae.UniqueViolationError("duplicate key"),
        ae.DataError("invalid input for query argument $1"),
        ae.QueryCanceledError("canceling statement due to statement timeout"),
        ValueError("x"),
    ]
    for exc in statement:
        assert not connection_failed(exc), exc
    # Only what the driver refused to send is tried again.
    assert _not_sent(switch) and _not_sent(closed)
    assert not _not_sent(ae.ConnectionDoesNotExistError("closed in the middle of operation"))
    assert not _not_sent(ae.AdminShutdownError("terminating connection"))
    assert not _not_sent(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert _not_sent(psycopg.OperationalError("the connection is closed"))
    assert not is_data_error(pgtq.DatabaseUnreachable("lost"))


def test_the_sync_defer_is_thread_safe_after_a_kill(dsn: str, sql: Any) -> None:
    """Several threads deferring after every pooled connection was killed: all succeed."""
    app = pgtq.App(dsn)
    try:

        @app.task()
        def noop(n: int) -> None: ...

        threads = [threading.Thread(target=noop.defer, kwargs={"n": i}) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sql(TERMINATE_OTHERS)
        done: list[int] = []
        errors: list[BaseException] = []

        def defer(i: int) -> None:
            try:
                done.append(noop.defer(n=i))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=defer, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # A kill may land while a statement is on the wire: that defer says so, never twice.
        assert all(isinstance(e, pgtq.DatabaseUnreachable) for e in errors), errors
        assert sql("SELECT count(*) FROM pgtq.jobs")[0][0] == 5 + len(done)
    finally:
        app.close()
