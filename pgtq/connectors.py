"""The only module that does I/O against PostgreSQL.

A connector runs a :class:`~pgtq.statements.Query` (one statement, atomic on its own, so it
runs on an autocommit connection: one round trip) or a function over a sync ``Connection``
inside one transaction. The two connectors differ only in how they wait for the database; both
turn driver errors into the few pgtq errors a user can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pgtq.errors import (
    AlreadyEnqueued,
    ConfigurationError,
    DatabaseUnreachable,
    PgtqError,
    SchemaNotMigrated,
)
from pgtq.statements import Query

T = TypeVar("T")

SYNC_DRIVER = "postgresql+psycopg"
ASYNC_DRIVERS = {"asyncpg": "postgresql+asyncpg", "psycopg": "postgresql+psycopg"}

# Query parameters libpq understands but asyncpg's connect() does not take as keywords.
_ASYNCPG_UNSUPPORTED = ("connect_timeout", "application_name", "options")


# -- URLs: the missing side of an app is derived from the side it was given ------------------


def sync_url(url: str | URL) -> URL:
    """The psycopg 3 URL for the same database."""
    u = make_url(url)
    _check_postgres(u)
    query = {k: v for k, v in u.query.items() if k != "prepared_statement_cache_size"}
    return u.set(drivername=SYNC_DRIVER, query=query)


def async_url(url: str | URL) -> URL:
    """The async URL for the same database: asyncpg, unless the URL names psycopg."""
    u = make_url(url)
    _check_postgres(u)
    driver = (
        "psycopg"
        if u.drivername in ("postgresql+psycopg", "postgresql+psycopg_async")
        else "asyncpg"
    )
    query = dict(u.query)
    if driver == "asyncpg":
        query = {k: v for k, v in query.items() if k not in _ASYNCPG_UNSUPPORTED}
    return u.set(drivername=ASYNC_DRIVERS[driver], query=query)


def _check_postgres(u: URL) -> None:
    if u.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"pgtq needs a PostgreSQL URL, got {u.drivername!r}")


def describe(url: URL) -> str:
    """Where the database is, for error messages (never the password)."""
    host = url.host or url.query.get("host") or "local socket"
    if isinstance(host, tuple):
        host = host[0]
    return f"{host}:{url.port or 5432}/{url.database or ''}"


def create_sync_engine(url: str | URL, connect_timeout: float) -> Engine:
    return sa.create_engine(
        sync_url(url),
        pool_pre_ping=True,
        connect_args={"connect_timeout": max(1, int(connect_timeout))},
    )


def create_async_engine_for(
    url: str | URL, connect_timeout: float, pool_size: int = 10
) -> AsyncEngine:
    u = async_url(url)
    args: dict[str, Any] = (
        {"timeout": connect_timeout}
        if u.drivername == ASYNC_DRIVERS["asyncpg"]
        else {"connect_timeout": max(1, int(connect_timeout))}
    )
    return create_async_engine(
        u, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size, connect_args=args
    )


# -- errors -----------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip() or type(orig).__name__
    return text.splitlines()[0]


class _Translator:
    """Turns driver errors into pgtq's. Shared by both connectors."""

    def __init__(self, url: URL, schema: str) -> None:
        self.url = url
        self.schema = schema

    def unreachable(self, exc: BaseException) -> DatabaseUnreachable:
        return DatabaseUnreachable(
            f"cannot connect to PostgreSQL at {describe(self.url)}: {_first_line(exc)}"
        )

    def translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, sa_exc.IntegrityError) and "queueing_lock" in str(exc.orig):
            return AlreadyEnqueued(
                "a job with this queueing_lock is already waiting: " + _first_line(exc)
            )
        if isinstance(exc, sa_exc.ProgrammingError) and (
            getattr(exc.orig, "sqlstate", None) == "42P01"
            or getattr(exc.orig, "pgcode", None) == "42P01"
            or "UndefinedTable" in type(exc.orig).__name__
        ):
            return SchemaNotMigrated(
                f"pgtq's tables are missing in schema {self.schema!r} of "
                f"{describe(self.url)}: run `pgtq migrate` (or app.migrate()) first"
            )
        return exc


C = TypeVar("C")


def _checked(connection: Any, kind: type[C], methods: str) -> C:
    """A user's connection must match the API they called: a mix-up fails loudly, not late."""
    if not isinstance(connection, kind):
        raise TypeError(
            f"connection= takes a SQLAlchemy {kind.__name__} with {methods} methods, "
            f"got {type(connection).__name__}"
        )
    return connection


_CONNECT_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, OSError, asyncio.TimeoutError)


# -- the sync connector -----------------------------------------------------------------------


class SyncConnector:
    """Runs statements on a SQLAlchemy ``Engine`` (psycopg 3)."""

    def __init__(self, engine: Engine, *, schema: str, owned: bool) -> None:
        self.engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.owned = owned
        self._errors = _Translator(engine.url, schema)

    def run(self, query: Query[T], connection: Connection | None = None) -> T:
        if connection is not None:
            return self._execute(_checked(connection, Connection, "the sync"), query)
        with self._connect(self._autocommit) as conn:
            return self._execute(conn, query)

    def run_in_transaction(
        self, fn: Callable[[Connection], T], connection: Connection | None = None
    ) -> T:
        """Run ``fn`` in one transaction: the caller's, or a new one committed at the end."""
        if connection is not None:
            return self._call(fn, _checked(connection, Connection, "the sync"))
        with self._connect(self.engine) as conn, conn.begin():
            return self._call(fn, conn)

    @contextlib.contextmanager
    def _connect(self, engine: Engine) -> Iterator[Connection]:
        try:
            conn = engine.connect()
        except _CONNECT_ERRORS as exc:
            raise self._errors.unreachable(exc) from None
        with conn:
            yield conn

    def _execute(self, conn: Connection, query: Query[T]) -> T:
        return self._call(lambda c: query.mapper(c.execute(query.statement, query.params)), conn)

    def _call(self, fn: Callable[[Connection], T], conn: Connection) -> T:
        try:
            return fn(conn)
        except sa_exc.DBAPIError as exc:
            translated = self._errors.translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    def close(self) -> None:
        if self.owned:
            self.engine.dispose()


# -- the async connector ----------------------------------------------------------------------


class Listener:
    """A dedicated connection that LISTENs; ``close()`` ends it."""

    def __init__(self, conn: AsyncConnection, task: asyncio.Task[None] | None) -> None:
        self._conn = conn
        self._task = task
        self.closed = asyncio.Event()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self._conn.invalidate()
        with contextlib.suppress(Exception):
            await self._conn.close()
        self.closed.set()


class AsyncConnector:
    """Runs statements on a SQLAlchemy ``AsyncEngine`` (asyncpg, or psycopg async)."""

    def __init__(self, engine: AsyncEngine, *, schema: str, owned: bool) -> None:
        self.engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.owned = owned
        self._errors = _Translator(engine.url, schema)

    async def run(self, query: Query[T], connection: AsyncConnection | None = None) -> T:
        if connection is not None:
            return await self._execute(_checked(connection, AsyncConnection, "the *_async"), query)
        async with self._connect(self._autocommit) as conn:
            return await self._execute(conn, query)

    async def run_in_transaction(
        self, fn: Callable[[Connection], T], connection: AsyncConnection | None = None
    ) -> T:
        """Run the sync function ``fn`` in one transaction, through SQLAlchemy's greenlet bridge."""
        if connection is not None:
            user = _checked(connection, AsyncConnection, "the *_async")
            return await self._call(lambda: user.run_sync(fn))
        async with self._connect(self.engine) as conn, conn.begin():
            return await self._call(lambda: conn.run_sync(fn))

    @contextlib.asynccontextmanager
    async def _connect(self, engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
        try:
            conn = await engine.connect()
        except _CONNECT_ERRORS as exc:
            raise self._errors.unreachable(exc) from None
        try:
            yield conn
        finally:
            await conn.close()

    async def _execute(self, conn: AsyncConnection, query: Query[T]) -> T:
        async def go() -> T:
            return query.mapper(await conn.execute(query.statement, query.params))

        return await self._call(go)

    async def _call(self, go: Callable[[], Awaitable[T]]) -> T:
        try:
            return await go()
        except sa_exc.DBAPIError as exc:
            translated = self._errors.translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def listen(self, channels: list[str], on_notify: Callable[[str, str], None]) -> Listener:
        """LISTEN on a connection of its own (taken out of the pool, closed by ``close()``)."""
        async with self._connect_listener() as (conn, driver):
            task: asyncio.Task[None] | None = None
            if hasattr(driver, "add_listener"):  # asyncpg
                for channel in channels:
                    await driver.add_listener(
                        channel, lambda _c, _pid, ch, payload: on_notify(ch, payload)
                    )
            else:  # psycopg
                await driver.set_autocommit(True)
                for channel in channels:
                    await driver.execute(f'LISTEN "{channel}"')

                async def pump() -> None:
                    async for n in driver.notifies():
                        on_notify(n.channel, n.payload)

                task = asyncio.create_task(pump(), name="pgtq-listener")
            return Listener(conn, task)
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _connect_listener(self) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        try:
            conn = await self.engine.connect()
        except _CONNECT_ERRORS as exc:
            raise self._errors.unreachable(exc) from None
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        raw.detach()  # never goes back to the pool: LISTEN state stays on this connection
        yield conn, driver

    async def close(self) -> None:
        if self.owned:
            await self.engine.dispose()


__all__ = [
    "AsyncConnector",
    "Listener",
    "PgtqError",
    "SyncConnector",
    "async_url",
    "create_async_engine_for",
    "create_sync_engine",
    "sync_url",
]
