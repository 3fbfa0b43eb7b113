"""The only module that opens connections to PostgreSQL and runs statements on them.

A connector runs a :class:`~pgtq.statements.Query` (one statement, atomic on its own, so it
runs on an autocommit connection: one round trip) or a function over a sync ``Connection``
inside one transaction. The two connectors differ only in how they wait for the database; both
turn driver errors into the few pgtq errors a user can act on. A query with a driver form may
skip SQLAlchemy's execution: how it runs on the driver is :mod:`pgtq.fastpath`'s; which
connection it runs on, and what happens when that fails, is this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn, TypeVar, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, CursorResult, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import greenlet_spawn

from pgtq.errors import (
    AlreadyEnqueued,
    ConfigurationError,
    DatabaseUnreachable,
    PgtqError,
    SchemaNotMigrated,
)
from pgtq.fastpath import DriverSQL, fetch_asyncpg, fetch_psycopg, read_jsonb_as_text
from pgtq.fastpath import require_driver_form as _require_driver_form
from pgtq.statements import Query, Rows

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
        raise ConfigurationError(
            f"pgtq needs a PostgreSQL URL, got {u.drivername!r}: use the form {DSN_FORM}"
        )


#: The form of a DSN, shown by the errors that refuse one.
DSN_FORM = "postgresql://user:password@host:5432/dbname"

_PASSWORD = re.compile(r":[^:@/]*@")


class InvalidDSN(ConfigurationError, sa_exc.ArgumentError):
    """A DSN that is no database URL (no scheme, say). A :class:`pgtq.ConfigurationError`,
    and SQLAlchemy's ``ArgumentError`` as before (code catching that still does)."""


def parse_dsn(dsn: str | URL) -> URL:
    """The URL of a DSN, else :class:`InvalidDSN` showing the form expected (the DSN shown
    without what looks like its password)."""
    if isinstance(dsn, URL):
        return dsn
    try:
        return make_url(dsn)
    except sa_exc.ArgumentError:
        shown = _PASSWORD.sub(":***@", str(dsn))
        raise InvalidDSN(f"invalid database URL {shown!r}: use the form {DSN_FORM}") from None


def describe(url: URL) -> str:
    """Where the database is, for error messages (never the password)."""
    host = url.host or url.query.get("host") or "local socket"
    if isinstance(host, tuple):
        host = host[0]
    return f"{host}:{url.port or 5432}/{url.database or ''}"


#: A pooled connection idle longer than this is pinged before use. One used more recently is
#: trusted without the extra round trip (HikariCP's "alive bypass window"): a ping on every
#: checkout would cost a single ``defer`` a quarter of its time. A connection whose socket
#: has input waiting while idle is pinged however recent (see :func:`_pending_input`).
PING_AFTER_IDLE = 1.0
_LAST_USED = "pgtq_last_used"


def _pending_input(driver: Any) -> bool:
    """Something waits to be read on an idle driver connection's socket (or it is closed).

    An idle connection is sent nothing unasked but for rare notices, so input there is most
    likely the server's goodbye: the FATAL error of a terminated backend (57P01) or of a
    shutdown, then EOF. It is seen without a round trip (a poll of the socket, a microsecond),
    before a statement is sent, so a connection killed a moment ago is replaced instead of
    failing the statement sent on it (psycopg, sync or async, and asyncpg).
    """
    try:
        if getattr(driver, "closed", False) or getattr(driver, "broken", False):
            return True  # psycopg
        is_closed = getattr(driver, "is_closed", None)
        if callable(is_closed) and is_closed():
            return True  # asyncpg
        pgconn = getattr(driver, "pgconn", None)
        if pgconn is not None:
            fd = pgconn.socket
        else:
            transport = getattr(driver, "_transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is None:
                return False
            fd = sock.fileno()
        if fd < 0:
            return True
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)
    except Exception:
        return True  # cannot tell: the ping decides


def _guard_pool(engine: Engine) -> None:
    """Pooled connections that failed are never reused, dead ones never handed out.

    - On checkout, a connection idle past :data:`PING_AFTER_IDLE`, or with input waiting on
      its socket (:func:`_pending_input`), is pinged; if the ping fails SQLAlchemy's pool
      discards it and checks out another (nothing of the caller's was sent).
    - On an error, one of the connection classes (:func:`connection_failed`) marks it a
      disconnect, so SQLAlchemy invalidates it instead of returning it to the pool. Its
      dialects do not always: asyncpg's asks ``is_closed()``, false until the event loop has
      processed the close, and the connection came back to fail again ("cannot switch to
      state 12; another operation (2) is in progress").

    Installed once per engine, pgtq's or the caller's.
    """
    dialect = engine.dialect

    def on_checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        last = record.info.get(_LAST_USED)
        idle = last is not None and time.monotonic() - last >= PING_AFTER_IDLE
        if not idle and not _pending_input(record.driver_connection):
            return  # fresh, or used a moment ago and quiet since
        try:
            dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise sa_exc.DisconnectionError(f"stale pooled connection: {exc}") from exc

    def on_checkin(dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info[_LAST_USED] = time.monotonic()

    def on_error(context: sa.engine.ExceptionContext) -> None:
        if not context.is_disconnect and connection_failed(context.original_exception):
            context.is_disconnect = True

    if engine in _GUARDED:
        return
    _GUARDED.add(engine)
    event.listen(engine.pool, "checkout", on_checkout)
    event.listen(engine.pool, "checkin", on_checkin)
    event.listen(engine, "handle_error", on_error)


_GUARDED: weakref.WeakSet[Engine] = weakref.WeakSet()


def _pool_args(max_connections: int | None, default: dict[str, int]) -> dict[str, int]:
    """The pool of an engine pgtq makes: ``max_connections`` in all (none beyond), else the
    default (SQLAlchemy's own sizes on the sync side)."""
    if max_connections is None:
        return default
    return {"pool_size": max_connections, "max_overflow": 0}


def create_sync_engine(
    url: str | URL,
    connect_timeout: float,
    *,
    prepared_statements: bool = True,
    max_connections: int | None = None,
) -> Engine:
    args: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout))}
    if not prepared_statements:
        args["prepare_threshold"] = None  # psycopg: never prepare (PgBouncer transaction mode)
    engine = sa.create_engine(sync_url(url), connect_args=args, **_pool_args(max_connections, {}))
    _guard_pool(engine)
    return engine


def _async_connect_args(
    url: URL, connect_timeout: float, *, prepared_statements: bool = True
) -> tuple[URL, dict[str, Any]]:
    """The async URL of ``url`` and the driver's connect arguments."""
    u = async_url(url)
    args: dict[str, Any]
    if u.drivername == ASYNC_DRIVERS["asyncpg"]:
        args = {"timeout": connect_timeout}
        name = url.query.get("application_name")
        if isinstance(name, str) and name:  # asyncpg takes it as a server setting only
            args["server_settings"] = {"application_name": name}
        if not prepared_statements:
            args["statement_cache_size"] = 0  # asyncpg: unnamed statements only
            u = u.update_query_dict({"prepared_statement_cache_size": "0"})
    else:
        args = {"connect_timeout": max(1, int(connect_timeout))}
        if not prepared_statements:
            args["prepare_threshold"] = None
    return u, args


def create_async_engine_for(
    url: str | URL,
    connect_timeout: float,
    *,
    pool_size: int = 10,
    prepared_statements: bool = True,
    max_connections: int | None = None,
) -> AsyncEngine:
    """The async engine pgtq makes; ``prepared_statements=False`` for PgBouncer in transaction
    mode, where a prepared statement may land on another server connection. At most
    ``max_connections`` connections when given, else ``pool_size`` kept and as many again
    in overflow."""
    u, args = _async_connect_args(
        make_url(url), connect_timeout, prepared_statements=prepared_statements
    )
    pool = _pool_args(max_connections, {"pool_size": pool_size, "max_overflow": pool_size})
    engine = create_async_engine(u, connect_args=args, **pool)
    _guard_pool(engine.sync_engine)
    return engine


def create_listen_engine(url: str | URL, connect_timeout: float) -> AsyncEngine:
    """The engine of ``App(listen_dsn=...)``: no pool (a worker's LISTEN connection is opened
    from it and held for the worker's life; nothing else runs there)."""
    u, args = _async_connect_args(make_url(url), connect_timeout)
    return create_async_engine(u, connect_args=args, poolclass=sa.pool.NullPool)


# -- errors -----------------------------------------------------------------------------------


def first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip() or type(orig).__name__
    return text.splitlines()[0]


class _Translator:
    """Turns driver errors into pgtq's: the one place every run path goes through.

    A connection that fails (the server went away, restarted or shut down, the backend was
    terminated, the socket broke, the driver's state machine gave up) raises
    :class:`~pgtq.DatabaseUnreachable` whatever the driver, SQLAlchemy-wrapped or raw: a caller
    catches one pgtq class. Errors of the statement itself (a constraint, a bad value) keep
    their driver class, or become the pgtq error they mean (``AlreadyEnqueued``).

    **When a statement is tried again** (:meth:`call` with ``retry=True``, used by the
    connectors' own connections, never on a caller's ``connection=``): once, on a fresh
    connection, and only when the statement cannot have reached the server, so an insert is
    never enqueued twice:

    - a pooled connection found dead before use (closed, or its socket readable while idle:
      the server's goodbye or EOF is waiting, then a ping fails) is replaced before anything
      is sent (the pool's checkout hook and ``_AsyncpgConnection``); the caller never sees it;
    - the driver refused to send on a connection it knows is broken (:func:`_not_sent`:
      asyncpg's "cannot switch to state" and "connection is closed", psycopg's "the
      connection is closed"): tried once more on a new connection.

    A connection lost after the statement was sent is **not** retried: the server may have
    run and committed it before the reply was lost (an autocommit insert commits before its
    reply is read), so pgtq cannot tell, and raises ``DatabaseUnreachable``. A caller that
    must know can look the job up, or defer with a ``queueing_lock`` and try again.
    """

    def __init__(self, url: URL, schema: str) -> None:
        self.url = url
        self.schema = schema

    def unreachable(self, exc: BaseException) -> DatabaseUnreachable:
        return DatabaseUnreachable(
            f"cannot connect to PostgreSQL at {describe(self.url)}: {first_line(exc)}"
        )

    def lost(self, exc: BaseException) -> DatabaseUnreachable:
        return DatabaseUnreachable(
            f"lost the connection to PostgreSQL at {describe(self.url)}: {first_line(exc)}"
        )

    def translate(self, exc: BaseException) -> BaseException:
        """pgtq's error for a driver error (SQLAlchemy-wrapped or raw), else ``exc`` itself."""
        if isinstance(exc, PgtqError):
            return exc
        if connection_failed(exc):
            return self.lost(exc)
        orig = getattr(exc, "orig", None) or exc
        code = sqlstate(exc)
        if code == "23505" and "queueing_lock" in str(orig):
            return AlreadyEnqueued(
                "a job with this queueing_lock is already waiting: " + first_line(exc)
            )
        if code == "42P01":
            return SchemaNotMigrated(
                f"pgtq's tables are missing in schema {self.schema!r} of "
                f"{describe(self.url)}: run `pgtq migrate` (or app.migrate()) first"
            )
        return exc

    def opening(self, exc: BaseException) -> BaseException:
        """pgtq's error for a failure to open (or check out) a connection."""
        if isinstance(exc, PgtqError):
            return exc
        if isinstance(exc, _CONNECT_ERRORS) or connection_failed(exc):
            return self.unreachable(exc)
        return self.translate(exc)

    def raise_opening(self, exc: Exception) -> NoReturn:
        """Raise :meth:`opening`'s error for ``exc``."""
        err = self.opening(exc)
        if err is exc:
            raise exc
        raise err from cause(err, exc)

    def call(self, fn: Callable[[], T], *, retry: bool = False) -> T:
        """``fn()``, its errors translated; once more if it failed before sending (``retry``)."""
        try:
            return fn()
        except Exception as exc:
            if not (retry and _not_sent(exc)):
                self._raise(exc)
        try:
            return fn()
        except Exception as again:
            self._raise(again)

    async def acall(self, fn: Callable[[], Awaitable[T]], *, retry: bool = False) -> T:
        """The async :meth:`call`."""
        try:
            return await fn()
        except Exception as exc:
            if not (retry and _not_sent(exc)):
                self._raise(exc)
        try:
            return await fn()
        except Exception as again:
            self._raise(again)

    def _raise(self, exc: Exception) -> NoReturn:
        translated = self.translate(exc)
        if translated is exc:
            raise exc
        raise translated from cause(translated, exc)


def cause(translated: BaseException, exc: BaseException) -> BaseException | None:
    """What pgtq's error is raised from: nothing for ``DatabaseUnreachable`` (its message
    names the server and the driver's first line; the driver's traceback adds only noise),
    the driver's error for the rest."""
    return None if isinstance(translated, DatabaseUnreachable) else exc


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, SQLAlchemy's ``orig``, and their causes (the asyncpg adapter chains the
    driver's own error as the cause of the one it raises)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 8:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        yield e
        todo += [getattr(e, "orig", None), e.__cause__]


#: SQLSTATEs that mean the connection itself is gone: class 08 (connection exception), the
#: server shutting down or crashed (57P01 admin_shutdown, 57P02 crash_shutdown, 57P03
#: cannot_connect_now), the database dropped (57P04), the session timed out (57P05).
_GONE_CODES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})

# Messages of the drivers' errors raised before a statement is sent, on a connection they
# know is broken (asyncpg's protocol state check; its and psycopg's closed-connection checks).
_NOT_SENT = (
    "cannot switch to state",
    "another operation is in progress",
    "connection is closed",
    "the underlying connection is closed",
)


def _asyncpg_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    try:
        from asyncpg import exceptions as ae
    except ImportError:  # pragma: no cover - asyncpg is a dependency
        return (), ()
    # (unusable connection, misuse or bad input: never a connection failure)
    return (ae.InternalClientError, ae.InterfaceError), (
        ae.DataError,
        ae.ClientConfigurationError,
        ae.OutdatedSchemaCacheError,
        ae.UnsupportedClientFeatureError,
    )


_ASYNCPG_CLIENT, _ASYNCPG_NOT_CONNECTION = _asyncpg_errors()


def connection_failed(exc: BaseException) -> bool:
    """The connection failed, not the statement: PostgreSQL sent a connection-class SQLSTATE
    (08xxx, 57P01-57P05), or the driver lost it without one (psycopg's ``OperationalError``,
    asyncpg's ``InterfaceError``/``InternalClientError`` about the connection, ``OSError``, a
    timeout on connecting). An error PostgreSQL sent of any other class is the statement's."""
    code = sqlstate(exc)
    if code is not None:
        return code[:2] == "08" or code in _GONE_CODES
    for e in _causes(exc):
        if isinstance(e, sa_exc.DisconnectionError | OSError | asyncio.TimeoutError):
            return True
        if isinstance(e, _ASYNCPG_NOT_CONNECTION):
            return False
        if isinstance(e, _ASYNCPG_CLIENT):
            return "cannot switch to state" in str(e) or "connection" in str(e)
        if isinstance(e, psycopg.OperationalError) and sqlstate(e) is None:
            return True
    return False


def _not_sent(exc: BaseException) -> bool:
    """The driver refused to send the statement: the connection was broken before it."""
    if not connection_failed(exc) or sqlstate(exc) is not None:
        return False
    for e in _causes(exc):
        if isinstance(e, _ASYNCPG_CLIENT) or (
            isinstance(e, psycopg.OperationalError | psycopg.InterfaceError)
            and str(e).startswith("the connection is closed")
        ):
            return any(m in str(e) for m in _NOT_SENT)
    return False


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
    return query.mapper(rows_of(connection.execute(query.statement, query.params)))


def rows_of(result: CursorResult[Any]) -> Rows:
    """A SQLAlchemy result's rows, taken once, as every mapper reads them (a statement with
    no rows, an ``ALTER`` or a write without ``RETURNING``, has none)."""
    return result.all() if result.returns_rows else ()


# -- which errors mean what -------------------------------------------------------------------


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
    """An error PostgreSQL sent about the statement (it has a SQLSTATE, not of the connection
    classes): the connection is still good. Anything else leaves it in an unknown state."""
    return sqlstate(exc) is not None and not connection_failed(exc)


# -- the sync connector -----------------------------------------------------------------------


class SyncConnector:
    """Runs statements on a SQLAlchemy ``Engine`` (psycopg 3)."""

    def __init__(self, engine: Engine, *, schema: str, owned: bool) -> None:
        self.engine = engine
        _guard_pool(engine)
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.owned = owned
        self._errors = _Translator(engine.url, schema)
        self._driver = DriverSQL(engine.dialect) if engine.dialect.driver == "psycopg" else None

    def run(self, query: Query[T], connection: Connection | None = None) -> T:
        """Run one statement: on the caller's connection (in their transaction: errors
        translated, never retried), else on a pooled one, tried once more on a fresh
        connection if the first failed before sending it (see :class:`_Translator`)."""
        if connection is not None:
            return self._execute(_checked(connection, Connection, "the sync"), query)
        driver_sql = self._driver
        if query.driver and driver_sql is not None:
            return self._errors.call(lambda: self._run_on_driver(driver_sql, query), retry=True)

        def pooled() -> T:
            with self._connect(self._autocommit) as conn:
                return query.mapper(rows_of(conn.execute(query.statement, query.params)))

        return self._errors.call(pooled, retry=True)

    def _run_on_driver(self, driver_sql: DriverSQL, query: Query[T]) -> T:
        """One autocommit statement on the pooled psycopg connection itself (errors raw: the
        caller translates them)."""
        try:
            raw = self.engine.raw_connection()
        except Exception as exc:  # the pool's checkout (psycopg's errors are not wrapped)
            self._errors.raise_opening(exc)
        try:
            rows = fetch_psycopg(raw.driver_connection, driver_sql, query)
        except Exception as exc:
            if not _server_error(exc):
                raw.invalidate()  # dropped or stuck: never back to the pool
            raise
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
        """Run ``fn`` in one transaction: the caller's, or a new one committed at the end
        (its errors, the commit's included, translated; never retried)."""
        if connection is not None:
            return self._call(fn, _checked(connection, Connection, "the sync"))

        def go() -> T:
            with self._connect(self.engine) as conn, conn.begin():
                return fn(conn)

        return self._errors.call(go)

    @contextlib.contextmanager
    def _connect(self, engine: Engine) -> Iterator[Connection]:
        try:
            conn = engine.connect()
        except Exception as exc:
            self._errors.raise_opening(exc)
        with conn:
            yield conn

    def _execute(self, conn: Connection, query: Query[T]) -> T:
        return self._call(lambda c: execute(c, query), conn)

    def _call(self, fn: Callable[[Connection], T], conn: Connection) -> T:
        return self._errors.call(lambda: fn(conn))

    def listen_connection(self, url: URL | None, connect_timeout: float) -> psycopg.Connection[Any]:
        """A psycopg connection of its own for LISTEN, in autocommit, outside the app's pool
        (its LISTEN registrations never reach the pool's next user): to ``url`` (``App(
        listen_dsn=...)``), else one the engine's pool opens, detached from it at once (its
        place in the pool is free again). Not from a copy of the pool, as the async side does:
        a copy's first connection initializes the dialect again, racing the threads that use
        it. The caller closes it."""
        try:
            if url is None:
                record = self.engine.raw_connection()
                driver = cast("psycopg.Connection[Any]", record.driver_connection)
                record.detach()
            else:
                target = url.set(drivername="postgresql").render_as_string(hide_password=False)
                driver = psycopg.connect(target, connect_timeout=max(1, round(connect_timeout)))
            driver.rollback()  # a checkout's ping may have opened a transaction
            driver.autocommit = True
        except Exception as exc:
            self._errors.raise_opening(exc)
        return driver

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

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        schema: str,
        owned: bool,
        listen_engine: AsyncEngine | None = None,
    ) -> None:
        self.engine = engine
        _guard_pool(engine.sync_engine)
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.owned = owned
        self._errors = _Translator(engine.url, schema)
        # Where listen() connects (App(listen_dsn=...)): pgtq's, disposed by close().
        self._listen_engine = listen_engine
        self._listen_errors = (
            _Translator(listen_engine.url, schema) if listen_engine is not None else self._errors
        )
        self.driver_sql = DriverSQL(engine.dialect)
        self._on_asyncpg = engine.dialect.driver == "asyncpg"
        # Where the worker's own connections (claims, completer, LISTEN) are opened: a pool
        # with the engine's settings and events but none of its connections, so they never
        # take (or wait for) a place in the app's pool (docs/howto/connections.md).
        self._own: AsyncEngine | None = None
        # The fast path's pooled connection, kept checked out from one call to a call that
        # follows in the same step of the event loop (sequential defers): a checkout costs
        # ~60 µs of CPU, a third of a defer. Given back at the next step of the loop
        # (``_give_back``), so it is never held idle and no other user of the pool waits on it.
        self._kept: Any = None
        self._give_back_soon = False
        self._closing: set[asyncio.Task[Any]] = set()  # check-ins with I/O, referenced till done

    async def run(self, query: Query[T], connection: AsyncConnection | None = None) -> T:
        """Run one statement: on the caller's connection (errors translated, never retried),
        else on a connection of pgtq's, tried once more on a fresh connection if the first
        failed before sending it (see :class:`_Translator`)."""
        if connection is not None:
            return await self._execute(_checked(connection, AsyncConnection, "the *_async"), query)
        if query.driver and self._on_asyncpg:
            return await self._run_on_driver(query)  # retried by _AsyncpgConnection.run

        async def pooled() -> T:
            async with self._connect(self._autocommit) as conn:
                return query.mapper(rows_of(await conn.execute(query.statement, query.params)))

        return await self._errors.acall(pooled, retry=True)

    async def _run_on_driver(self, query: Query[T]) -> T:
        """One statement straight on a pooled asyncpg connection (outside a transaction
        block, asyncpg commits each statement): the pool's checkout, not SQLAlchemy's
        execution, so the engine's ``pool_size + max_overflow`` bounds it with the rest."""
        return await self._errors.acall(lambda: self._driver_once(query), retry=True)

    async def _driver_once(self, query: Query[T]) -> T:
        raw, self._kept = self._kept, None
        if raw is not None and _pending_input(raw.driver_connection):
            raw.invalidate()  # killed since the last call (the server's goodbye waits): a new one
            await self._check_in(raw)
            raw = None
        if raw is None:
            try:
                raw = await self.engine.raw_connection()
            except Exception as exc:
                self._errors.raise_opening(exc)
        try:
            rows = await fetch_asyncpg(raw.driver_connection, self.driver_sql, query)
        except BaseException as exc:
            if not _server_error(exc):
                raw.invalidate()  # cancelled mid-statement, or lost: never back to the pool
            await self._check_in(raw)
            raise
        if self._kept is None:
            self._kept = raw  # for a defer that follows at once; given back otherwise
            if not self._give_back_soon:
                self._give_back_soon = True
                asyncio.get_running_loop().call_soon(self._give_back)
        else:
            await self._check_in(raw)
        return query.mapper(rows)

    def _give_back(self) -> None:
        """The loop moved on, or another statement of pgtq's needs the pool: the kept
        connection goes back to it (so pgtq's own statements never grow the pool)."""
        self._give_back_soon = False
        raw, self._kept = self._kept, None
        if raw is not None:
            if self._checks_in_quietly():
                raw.close()
            else:
                task = asyncio.get_running_loop().create_task(greenlet_spawn(raw.close))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def _checks_in_quietly(self) -> bool:
        """A connection back in the pool stays open: no I/O (no transaction to roll back)."""
        pool = self.engine.pool
        return isinstance(pool, QueuePool) and pool.checkedin() < pool.size()

    async def _check_in(self, raw: Any) -> None:
        if self._checks_in_quietly():
            raw.close()
        else:
            await greenlet_spawn(raw.close)  # the pool closes it: I/O, in SQLAlchemy's bridge

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self._connect(self.engine) as conn, conn.begin():
            yield conn

    async def run_in_transaction(
        self, fn: Callable[[Connection], T], connection: AsyncConnection | None = None
    ) -> T:
        """Run the sync function ``fn`` in one transaction, through SQLAlchemy's greenlet
        bridge (its errors, the commit's included, translated; never retried)."""
        if connection is not None:
            user = _checked(connection, AsyncConnection, "the *_async")
            return await self._call(lambda: user.run_sync(fn))

        async def go() -> T:
            async with self._connect(self.engine) as conn, conn.begin():
                return await conn.run_sync(fn)

        return await self._errors.acall(go)

    @contextlib.asynccontextmanager
    async def _connect(self, engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
        if self._kept is not None:
            self._give_back()  # the fast path's kept connection serves this checkout
        try:
            conn = await engine.connect()
        except Exception as exc:
            self._errors.raise_opening(exc)
        try:
            yield conn
        finally:
            await conn.close()

    async def _execute(self, conn: AsyncConnection, query: Query[T]) -> T:
        async def go() -> T:
            return query.mapper(rows_of(await conn.execute(query.statement, query.params)))

        return await self._call(go)

    async def _call(self, go: Callable[[], Awaitable[T]]) -> T:
        return await self._errors.acall(go)

    async def listen(self, channels: list[str], on_notify: Callable[[str, str], None]) -> Listener:
        """LISTEN on a connection of its own, closed by ``close()``: to the listen DSN when
        there is one, else taken out of the pool (outside its count: see
        docs/howto/connections.md)."""
        if self._listen_engine is not None:
            conn, driver = await self._open_detached(self._listen_engine, self._listen_errors)
        else:
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

    async def _open_detached(
        self, engine: AsyncEngine | None = None, errors: _Translator | None = None
    ) -> tuple[AsyncConnection, Any]:
        """A connection of its own, outside the app's pool (from the listen engine, else
        with the app engine's settings, see ``_own``), and its driver connection."""
        if engine is None:
            if self._own is None:
                pool = self.engine.sync_engine.pool.recreate()  # same creator and events
                self._own = create_async_engine(self.engine.url, pool=pool)
            engine = self._own
        try:
            conn = await engine.connect()
        except Exception as exc:
            (errors or self._errors).raise_opening(exc)
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        raw.detach()  # never goes back to the pool: its session state stays its own
        return conn, driver

    async def dedicated(
        self, *, session: tuple[str, ...] = (), jsonb_text: bool = False
    ) -> DedicatedConnection:
        """A connection of its own for a hot loop (the worker's claims, its completions).

        It runs only queries with a driver form (``Query.driver``; any other raises
        :class:`~pgtq.fastpath.NoDriverForm`). On asyncpg it runs each one's compiled SQL
        straight on the driver, prepared once per connection: no pool checkout, no
        SQLAlchemy execution per call (pgtq.fastpath), on a connection opened here, outside
        the app's pool (reopened after a loss). Elsewhere it falls back to the pooled path.

        ``session``: SQL run each time the connection is opened (its settings stay its own);
        ignored on the pooled fallback. ``jsonb_text``: ``jsonb`` values come as text, read
        by JSON's C scanner (:func:`~pgtq.fastpath.read_jsonb_as_text`).
        """
        if self.engine.dialect.driver != "asyncpg":
            return _PooledConnection(self)
        conn = _AsyncpgConnection(self, session=session, jsonb_text=jsonb_text)
        try:
            # Opened now: a worker holds its connections from its start (a fixed count, and
            # a server at its connection cap refuses the worker there, not mid-run).
            await self._errors.acall(conn._ready, retry=True)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            await self._check_in(kept)
        if self._own is not None:
            await self._own.dispose()  # none of the worker's, detached: only its empty pool
            self._own = None
        if self.owned:
            await self.engine.dispose()
        if self._listen_engine is not None:
            await self._listen_engine.dispose()


class DedicatedConnection:
    """What the worker's hot loops run their queries on: only queries with a driver form
    (``Query.driver``), whatever the driver; any other raises ``NoDriverForm``."""

    async def run(self, query: Query[T]) -> T:
        raise NotImplementedError

    async def close(self) -> None:
        """Release the connection; safe to call twice."""


class _PooledConnection(DedicatedConnection):
    def __init__(self, connector: AsyncConnector) -> None:
        self._connector = connector

    async def run(self, query: Query[T]) -> T:
        _require_driver_form(query)
        return await self._connector.run(query)


class _AsyncpgConnection(DedicatedConnection):
    """A driver connection of its own (the worker's claims, its completer), outside the
    app's pool, opened on first use and again after a loss."""

    def __init__(
        self,
        connector: AsyncConnector,
        *,
        session: tuple[str, ...] = (),
        jsonb_text: bool = False,
    ) -> None:
        self._connector = connector
        self._session = session
        self._jsonb_text = jsonb_text
        self._conn: AsyncConnection | None = None
        self._driver: Any = None

    async def _ready(self) -> Any:
        """The driver connection, known alive before anything is sent on it: a new one when
        there is none, it closed, or it has input waiting (the server's goodbye, most
        likely) and a ping fails."""
        driver = self._driver
        if driver is not None and not driver.is_closed():
            if not _pending_input(driver):
                return driver
            try:
                await driver.execute("SELECT 1")
                return driver
            except Exception:
                pass  # gone while idle: a new one, nothing was sent
        await self.close()
        self._conn, self._driver = await self._connector._open_detached()
        for sql in self._session:
            await self._driver.execute(sql)
        if self._jsonb_text:
            await read_jsonb_as_text(self._driver)
        return self._driver

    async def run(self, query: Query[T]) -> T:
        """Run one statement; once more on a new connection if the first failed before
        sending it; connection failures raise ``DatabaseUnreachable`` (see _Translator)."""
        if not query.driver:  # checked here: this runs every defer
            _require_driver_form(query)
        return await self._connector._errors.acall(lambda: self._run_once(query), retry=True)

    async def _run_once(self, query: Query[T]) -> T:
        driver = await self._ready()
        try:
            rows = await fetch_asyncpg(driver, self._connector.driver_sql, query)
        except BaseException as exc:
            # Not an error PostgreSQL sent about the statement (lost, cancelled mid-statement,
            # or the driver stuck mid-operation): the connection is in an unknown state, and
            # is never used again (a new one on the next call).
            if driver.is_closed() or not _server_error(exc):
                await self.close()
            raise
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
    "connection_failed",
    "create_async_engine_for",
    "create_listen_engine",
    "create_sync_engine",
    "first_line",
    "is_data_error",
    "rows_of",
    "sqlstate",
    "sync_url",
]
