"""The only module that does I/O against PostgreSQL.

A connector runs a :class:`~pgtq.statements.Query` (one statement, atomic on its own, so it
runs on an autocommit connection: one round trip) or a function over a sync ``Connection``
inside one transaction. The two connectors differ only in how they wait for the database; both
turn driver errors into the few pgtq errors a user can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from json.scanner import make_scanner
from typing import Any, TypeVar, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
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
from pgtq.model import dumps
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


#: A pooled connection idle longer than this is pinged before use. One used more recently is
#: trusted without the extra round trip (HikariCP's "alive bypass window"): a ping on every
#: checkout would cost a single ``defer`` a quarter of its time.
PING_AFTER_IDLE = 1.0
_LAST_USED = "pgtq_last_used"


def _ping_when_idle(engine: Engine) -> None:
    dialect = engine.dialect

    def on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        last = record.info.get(_LAST_USED)
        if last is None or time.monotonic() - last < PING_AFTER_IDLE:
            return  # fresh, or used a moment ago
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise sa_exc.DisconnectionError(f"stale pooled connection: {exc}") from exc

    def on_checkin(dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_LAST_USED] = time.monotonic()

    event.listen(engine.pool, "checkout", on_checkout)
    event.listen(engine.pool, "checkin", on_checkin)


def create_sync_engine(
    url: str | URL, connect_timeout: float, *, prepared_statements: bool = True
) -> Engine:
    args: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout))}
    if not prepared_statements:
        args["prepare_threshold"] = None  # psycopg: never prepare (PgBouncer transaction mode)
    engine = sa.create_engine(sync_url(url), connect_args=args)
    _ping_when_idle(engine)
    return engine


def create_async_engine_for(
    url: str | URL,
    connect_timeout: float,
    *,
    pool_size: int = 10,
    prepared_statements: bool = True,
) -> AsyncEngine:
    """The async engine pgtq makes; ``prepared_statements=False`` for PgBouncer in transaction
    mode, where a prepared statement may land on another server connection."""
    u = async_url(url)
    args: dict[str, Any]
    if u.drivername == ASYNC_DRIVERS["asyncpg"]:
        args = {"timeout": connect_timeout}
        if not prepared_statements:
            args["statement_cache_size"] = 0  # asyncpg: unnamed statements only
            u = u.update_query_dict({"prepared_statement_cache_size": "0"})
    else:
        args = {"connect_timeout": max(1, int(connect_timeout))}
        if not prepared_statements:
            args["prepare_threshold"] = None
    engine = create_async_engine(u, pool_size=pool_size, max_overflow=pool_size, connect_args=args)
    _ping_when_idle(engine.sync_engine)
    return engine


# -- errors -----------------------------------------------------------------------------------


def first_line(exc: BaseException) -> str:
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
            f"cannot connect to PostgreSQL at {describe(self.url)}: {first_line(exc)}"
        )

    def translate(self, exc: BaseException) -> BaseException:
        """pgtq's error for a driver error (SQLAlchemy-wrapped or raw), else ``exc`` itself."""
        orig = getattr(exc, "orig", None) or exc
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if sqlstate == "23505" and "queueing_lock" in str(orig):
            return AlreadyEnqueued(
                "a job with this queueing_lock is already waiting: " + first_line(exc)
            )
        if sqlstate == "42P01":
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


def execute(connection: Connection, query: Query[T]) -> T:
    """Run one query on a connection a multi-step function was given (inside
    ``run_in_transaction``, on either side)."""
    return query.mapper(connection.execute(query.statement, query.params))


# -- the driver fast path --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Compiled:
    statement: Any  # held, so its id() cannot be reused while this entry lives
    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]


class _DriverSQL:
    """Statements compiled once, to run on the driver connection without SQLAlchemy's
    per-call execution (about 0.3 ms of CPU per single enqueue). Statements are built once
    per schema (statements.py), so this holds a handful of entries."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[int, _Compiled] = {}

    def compile(self, statement: Any) -> _Compiled:
        found = self._compiled.get(id(statement))
        if found is None or found.statement is not statement:
            compiled = statement.compile(dialect=self._dialect)
            names = tuple(compiled.positiontup or ())
            found = _Compiled(statement, compiled.string, names, compiled.params)
            if len(self._compiled) >= 256:  # not a statement cached by statements.py
                self._compiled.clear()
            self._compiled[id(statement)] = found
        return found

    def positional(self, query: Query[Any]) -> tuple[str, list[Any]]:
        """asyncpg: ``$n`` placeholders."""
        c = self.compile(query.statement)
        params = query.params
        return c.sql, [params[n] if n in params else c.defaults[n] for n in c.names]

    def named(self, query: Query[Any]) -> tuple[str, dict[str, Any]]:
        """psycopg: ``%(name)s`` placeholders."""
        c = self.compile(query.statement)
        return c.sql, {**c.defaults, **query.params}


#: SQLSTATE classes of errors that may pass: connection, transaction rollback (deadlock,
#: serialization), insufficient resources, operator intervention (shutdown), system error.
_PASSING_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def is_data_error(exc: BaseException) -> bool:
    """An error of the statement's values, which running it again will not fix: PostgreSQL
    refused them (a data exception, a limit, a constraint), or the driver could not encode
    them. The worker isolates such a write instead of retrying it forever."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, UnicodeError) or isinstance(exc.__cause__, UnicodeError):
        return True
    code = sqlstate(exc)
    return code is not None and code[:2] not in _PASSING_CLASSES


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of an error PostgreSQL sent (SQLAlchemy-wrapped or raw, either driver)."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) and len(code) == 5 else None


def _server_error(exc: BaseException) -> bool:
    """An error PostgreSQL sent (it has a SQLSTATE): the connection is still good."""
    return getattr(exc, "sqlstate", None) is not None


# -- the sync connector -----------------------------------------------------------------------


class SyncConnector:
    """Runs statements on a SQLAlchemy ``Engine`` (psycopg 3)."""

    def __init__(self, engine: Engine, *, schema: str, owned: bool) -> None:
        self.engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.owned = owned
        self._errors = _Translator(engine.url, schema)
        self._driver = _DriverSQL(engine.dialect) if engine.dialect.driver == "psycopg" else None

    def run(self, query: Query[T], connection: Connection | None = None) -> T:
        if connection is not None:
            return self._execute(_checked(connection, Connection, "the sync"), query)
        if query.driver and self._driver is not None:
            return self._run_on_driver(self._driver, query)
        with self._connect(self._autocommit) as conn:
            return self._execute(conn, query)

    def _run_on_driver(self, driver_sql: _DriverSQL, query: Query[T]) -> T:
        """One autocommit statement on the pooled psycopg connection itself."""
        sql, params = driver_sql.named(query)
        try:
            raw = self.engine.raw_connection()
        except (*_CONNECT_ERRORS, psycopg.OperationalError) as exc:  # not wrapped by SQLAlchemy
            raise self._errors.unreachable(exc) from None
        try:
            driver = raw.driver_connection
            assert driver is not None
            driver.autocommit = True  # client-side only: no round trip
            try:
                rows = driver.execute(sql, params).fetchall()
            finally:
                if not driver.closed:
                    driver.autocommit = False
        except Exception as exc:
            if not _server_error(exc):
                raw.invalidate()  # dropped or stuck: never back to the pool
            translated = self._errors.translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            raw.close()
        return query.mapper(rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in a transaction: committed when the block ends, rolled back if it
        raises (a transactional task's own writes and its job's completion share it)."""
        with self._connect(self.engine) as conn, conn.begin():
            yield conn

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
    """A dedicated connection that LISTENs. ``lost`` is set when the connection dies (the
    caller listens again); ``close()`` ends it."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self._task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()
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
        self.driver_sql = _DriverSQL(engine.dialect)
        self._on_asyncpg = engine.dialect.driver == "asyncpg"
        # The enqueue fast path's own driver connections (LIFO), at most as many in use at
        # once as the engine's pool holds: a pooled checkout through SQLAlchemy's greenlet
        # bridge costs about as much CPU as the insert itself.
        self._idle: list[_AsyncpgConnection] = []
        size = getattr(engine.pool, "size", None)
        self._slots = asyncio.Semaphore(max(1, size()) if callable(size) else 5)

    async def run(self, query: Query[T], connection: AsyncConnection | None = None) -> T:
        if connection is not None:
            return await self._execute(_checked(connection, AsyncConnection, "the *_async"), query)
        if query.driver and self._on_asyncpg:
            return await self._run_on_driver(query)
        async with self._connect(self._autocommit) as conn:
            return await self._execute(conn, query)

    async def _run_on_driver(self, query: Query[T]) -> T:
        """One statement straight on an asyncpg connection (outside a transaction block,
        asyncpg commits each statement)."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else _AsyncpgConnection(self, ping=True)
            try:
                result = await conn.run(query)
            except BaseException as exc:
                if not _server_error(exc.__cause__ or exc):
                    await conn.close()  # cancelled mid-statement, or lost: open a new one
                    raise
                self._idle.append(conn)
                raise
            self._idle.append(conn)
            return result

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._connect(self.engine) as conn, conn.begin():
            yield conn

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
        conn, driver = await self._open_detached()
        listener = Listener(conn)
        try:
            if hasattr(driver, "add_listener"):  # asyncpg
                driver.add_termination_listener(lambda _conn: listener.lost.set())
                for channel in channels:
                    await driver.add_listener(
                        channel, lambda _c, _pid, ch, payload: on_notify(ch, payload)
                    )
            else:  # psycopg
                await driver.set_autocommit(True)
                for channel in channels:
                    await driver.execute(f'LISTEN "{channel}"')

                async def pump() -> None:
                    try:
                        async for n in driver.notifies():
                            on_notify(n.channel, n.payload)
                    finally:
                        listener.lost.set()

                listener._task = asyncio.create_task(pump(), name="pgtq-listener")
        except BaseException:
            await listener.close()
            raise
        return listener

    async def _open_detached(self) -> tuple[AsyncConnection, Any]:
        """A connection taken out of the pool for good, and its driver connection."""
        try:
            conn = await self.engine.connect()
        except _CONNECT_ERRORS as exc:
            raise self._errors.unreachable(exc) from None
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        raw.detach()  # never goes back to the pool: its session state stays its own
        return conn, driver

    async def dedicated(
        self, *, session: tuple[str, ...] = (), jsonb_text: bool = False
    ) -> DedicatedConnection:
        """A connection of its own for a hot loop (the worker's claims, its completions).

        On asyncpg it runs each statement's compiled SQL straight on the driver, prepared once
        per connection: no pool checkout, no SQLAlchemy execution per call. Elsewhere it
        falls back to the pooled path.

        ``session``: SQL run each time the connection is opened (its settings stay its own);
        ignored on the pooled fallback. ``jsonb_text``: ``jsonb`` values come as text, read
        by JSON's C scanner (the claims' arguments: ~0.75 µs a job less than SQLAlchemy's
        binary decoder and ``json.loads``).
        """
        if self.engine.dialect.driver != "asyncpg":
            return _PooledConnection(self)
        return _AsyncpgConnection(self, session=session, jsonb_text=jsonb_text)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
        if self.owned:
            await self.engine.dispose()


class DedicatedConnection:
    """What the worker's hot loops run their queries on."""

    async def run(self, query: Query[T]) -> T:
        raise NotImplementedError

    async def close(self) -> None:
        """Release the connection; safe to call twice."""


class _PooledConnection(DedicatedConnection):
    def __init__(self, connector: AsyncConnector) -> None:
        self._connector = connector

    async def run(self, query: Query[T]) -> T:
        return await self._connector.run(query)


# The C scanner json.loads uses (typeshed types make_scanner's argument oddly).
_scan_json: Callable[[str, int], tuple[Any, int]] = make_scanner(cast(Any, json.JSONDecoder()))


def _loads_jsonb(text: str) -> Any:
    """PostgreSQL's text of a ``jsonb`` value (canonical: no leading blank), read by the C
    scanner alone; anything it refuses goes to ``json.loads`` for the proper error."""
    try:
        return _scan_json(text, 0)[0]
    except StopIteration:
        return json.loads(text)


class _AsyncpgConnection(DedicatedConnection):
    """A driver connection out of the pool, opened on first use and again after a loss."""

    def __init__(
        self,
        connector: AsyncConnector,
        *,
        ping: bool = False,
        session: tuple[str, ...] = (),
        jsonb_text: bool = False,
    ) -> None:
        self._connector = connector
        self._session = session
        self._jsonb_text = jsonb_text
        self._conn: AsyncConnection | None = None
        self._driver: Any = None
        # Pinged before use when idle past PING_AFTER_IDLE, as pooled connections are.
        self._ping = ping
        self._used = 0.0

    async def _ready(self) -> Any:
        if self._driver is not None and not self._driver.is_closed():
            if not self._ping or time.monotonic() - self._used < PING_AFTER_IDLE:
                return self._driver
            try:
                await self._driver.execute("SELECT 1")
                return self._driver
            except Exception:
                pass  # gone while idle: a new one, nothing was sent
        await self.close()
        self._conn, self._driver = await self._connector._open_detached()
        for sql in self._session:
            await self._driver.execute(sql)
        if self._jsonb_text:
            await self._driver.set_type_codec(
                "jsonb", schema="pg_catalog", encoder=dumps, decoder=_loads_jsonb, format="text"
            )
        return self._driver

    async def run(self, query: Query[T]) -> T:
        sql, args = self._connector.driver_sql.positional(query)
        driver = self._driver
        if (
            driver is None
            or driver.is_closed()
            or (self._ping and time.monotonic() - self._used >= PING_AFTER_IDLE)
        ):
            driver = await self._ready()
        try:
            rows = await driver.fetch(sql, *args)
            self._used = time.monotonic()
        except Exception as exc:
            # Not an error PostgreSQL sent: the connection is in an unknown state (dropped,
            # or stuck mid-operation). Replace it on the next call.
            if driver.is_closed() or not _server_error(exc):
                await self.close()
            translated = self._connector._errors.translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        return query.mapper(rows)

    async def close(self) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()


__all__ = [
    "AsyncConnector",
    "Listener",
    "PgtqError",
    "SyncConnector",
    "async_url",
    "create_async_engine_for",
    "create_sync_engine",
    "first_line",
    "is_data_error",
    "sqlstate",
    "sync_url",
]
