"""``pgtq.App``: the registry of tasks and the owner of the two connectors."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, Literal, Unpack, cast, overload

from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from pgtq import statements
from pgtq.codecs import Codec, Decoder, Encoder
from pgtq.connectors import (
    AsyncConnector,
    SyncConnector,
    async_url,
    create_async_engine_for,
    create_listen_engine,
    create_sync_engine,
    parse_dsn,
)
from pgtq.errors import ConfigurationError, InvalidArguments, UnknownTask
from pgtq.jobs import JobContext, JobManager
from pgtq.model import dumps
from pgtq.queues import QueueManager
from pgtq.schedules import PeriodicManager
from pgtq.schema import DEFAULT_SCHEMA, InvalidSchemaName, validate_schema_name
from pgtq.tasks import (
    EagerRunner,
    Middleware,
    P,
    R,
    Task,
    TaskDecorator,
    TaskOptions,
    check_task_options,
)
from pgtq.validation import DEFAULT_MAX_ARGS_BYTES, check_max_args_bytes
from pgtq.watcher import Watchers

if TYPE_CHECKING:
    from pgtq.blueprints import Blueprint
    from pgtq.cron import PeriodicTask
    from pgtq.migrations import Phase
    from pgtq.periodic import CleanupOptions
    from pgtq.worker import WorkerStats
    from pgtq.workflows import Batch, Signature


DSN_ENV = "PGTQ_DSN"
#: Where workers LISTEN when ``App(listen_dsn=...)`` is not given: a DSN, or ``off`` to poll.
LISTEN_DSN_ENV = "PGTQ_LISTEN_DSN"
#: Whether engines pgtq makes prepare statements when ``App(prepared_statements=...)`` is not
#: given: ``off`` behind PgBouncer in transaction mode (so every ``pgtq`` command works there).
PREPARED_STATEMENTS_ENV = "PGTQ_PREPARED_STATEMENTS"
_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn)


def _where(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a task's function, to name it in an error."""
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def _check_max_connections(
    value: int | None, engine: Engine | None, async_engine: AsyncEngine | None
) -> int | None:
    """``App(max_connections=...)``: a whole number of at least 1, for engines pgtq makes."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"max_connections must be a whole number of at least 1, got {value!r}"
        )
    if engine is not None and async_engine is not None:
        raise ConfigurationError(
            "max_connections bounds the engines pgtq makes, and both engines are yours: "
            "size their pools instead (pool_size=..., max_overflow=...)"
        )
    return value


def _prepared_statements(value: bool | None) -> bool:
    """``App(prepared_statements=...)``, else ``PGTQ_PREPARED_STATEMENTS`` (on/off), else on."""
    if value is not None:
        if not isinstance(value, bool):
            raise ConfigurationError(f"prepared_statements takes True or False, got {value!r}")
        return value
    env = os.environ.get(PREPARED_STATEMENTS_ENV, "").strip().lower()
    if not env:
        return True
    if env not in _SWITCH:
        given = os.environ[PREPARED_STATEMENTS_ENV]
        raise ConfigurationError(f"{PREPARED_STATEMENTS_ENV} takes on or off, got {given!r}")
    return _SWITCH[env]


def _listen_target(
    listen_dsn: str | URL | Literal[False] | None, *, pooled: bool
) -> tuple[URL | None, bool]:
    """Where workers LISTEN (None: the app's database) and whether they do: the parameter,
    else ``PGTQ_LISTEN_DSN`` (a DSN, or ``off``), else the app's database, unless it is
    ``pooled`` (behind a transaction pooler: ``prepared_statements=False``), where a LISTEN
    never delivers and leaves the pooled server connection listening for its next client:
    then not at all (the workers poll)."""
    if listen_dsn is None:
        env = os.environ.get(LISTEN_DSN_ENV, "").strip()
        if not env:
            return None, not pooled
        if env.lower() == "off":
            return None, False
        listen_dsn = env
    if listen_dsn is False:
        return None, False
    if isinstance(listen_dsn, bool) or not isinstance(listen_dsn, str | URL) or not listen_dsn:
        raise ConfigurationError(
            f"listen_dsn takes a DSN (a direct connection to PostgreSQL for LISTEN), or False "
            f"not to LISTEN (workers then poll), got {listen_dsn!r}"
        )
    url = parse_dsn(listen_dsn)
    async_url(url)  # a PostgreSQL URL, or ConfigurationError now rather than in a worker
    return url, True


class App:
    """Tasks, and the database they are queued in.

    Give a DSN, a SQLAlchemy ``Engine``, an ``AsyncEngine``, or both engines; the missing side
    is derived from the URL (psycopg 3 for sync, asyncpg for async unless the URL names
    psycopg). With none of them, ``PGTQ_DSN`` is read. Engines you pass are yours: pgtq never
    disposes them.

    ``max_connections``: the most connections each engine pgtq makes may open (the sync one,
    and the async one of each event loop), the enqueue fast path included; an engine you pass
    is bounded by its own ``pool_size + max_overflow``. A worker's own connections come on
    top (docs/howto/connections.md).

    ``listen_dsn``: where workers LISTEN for new jobs: a direct connection to PostgreSQL when
    the DSN goes through PgBouncer in transaction mode; ``False`` not to LISTEN at all (the
    worker polls every ``fetch_job_polling_interval``). Not given: ``PGTQ_LISTEN_DSN`` (a DSN,
    or ``off``), else the app's own database, but not with ``prepared_statements=False``
    (behind a transaction pooler, where LISTEN never delivers): the workers poll then.

    ``prepared_statements``: False behind PgBouncer in transaction mode. Not given:
    ``PGTQ_PREPARED_STATEMENTS`` (``on``/``off``), else True.

    ``encoder``: a ``json`` ``default=`` hook for argument, ``meta`` and result values that
    are neither JSON nor a type pgtq encodes itself (datetime, date, time, UUID, Decimal,
    Enum, dataclasses, pydantic models); ``decoders``: ``{annotation: function}``, how a
    worker reads such a value back for a parameter annotated so (laid over pgtq's own).
    Set them before registering tasks (docs/concepts.md, "Argument types").
    ``notify_completions``: this app's workers announce the jobs that end (one NOTIFY per
    completion batch), so ``app.jobs.wait``, ``wait_many`` and ``watch`` wake without
    polling (their LISTEN goes where ``listen_dsn`` says). False: no NOTIFY; waiters then
    learn of the end within ``pgtq.watcher.RECHECK_INTERVAL``.
    """

    def __init__(
        self,
        dsn: str | URL | None = None,
        *,
        engine: Engine | None = None,
        async_engine: AsyncEngine | None = None,
        schema: str = DEFAULT_SCHEMA,
        connect_timeout: float = 10.0,
        middleware: Sequence[Middleware] = (),
        prepared_statements: bool | None = None,
        result_max_bytes: int | None = 1_000_000,
        max_args_bytes: int | None = DEFAULT_MAX_ARGS_BYTES,
        max_connections: int | None = None,
        listen_dsn: str | URL | Literal[False] | None = None,
        encoder: Encoder | None = None,
        decoders: Mapping[Any, Decoder] | None = None,
        notify_completions: bool = True,
    ) -> None:
        #: A task result larger than this (as JSON) fails its job with a clear error: results
        #: live in the jobs table, which must stay small to stay fast. None: no limit.
        self.result_max_bytes = result_max_bytes
        #: A job whose arguments are larger than this (as JSON) is refused at defer with
        #: ``InvalidArguments``, for the same reason: pass a reference to big data (a key, a
        #: URL), not the data. None: no limit.
        try:
            self.max_args_bytes = check_max_args_bytes(max_args_bytes)
        except InvalidArguments as exc:
            raise ConfigurationError(str(exc)) from None
        #: ``pgtq.testing.eager``: while set, ``defer`` runs the job at once, in-process.
        self.eager: EagerRunner | None = None
        #: How this app writes JSON (its ``encoder``) and reads arguments back by annotation
        #: (its ``decoders``): :mod:`pgtq.codecs`.
        try:
            self.codec = Codec(dumps, encoder, decoders)
        except TypeError as exc:
            raise ConfigurationError(str(exc)) from None
        #: False behind PgBouncer in transaction mode: engines pgtq makes then never keep
        #: prepared statements (yours are yours to configure). Not given:
        #: ``PGTQ_PREPARED_STATEMENTS`` (on/off), else True.
        self.prepared_statements = _prepared_statements(prepared_statements)
        #: App-wide middleware: each wraps the tasks of its own kind (sync or async), outside
        #: a task's own middleware. Applied to tasks registered after it.
        self.middleware = list(middleware)
        try:
            self.schema = validate_schema_name(schema)
        except InvalidSchemaName as exc:
            raise ConfigurationError(str(exc)) from None
        if dsn is None and engine is None and async_engine is None:
            dsn = os.environ.get(DSN_ENV) or None
        self._url: URL | None = parse_dsn(dsn) if dsn is not None else None
        self._engine = engine
        self._async_engine = async_engine
        #: The most connections each engine pgtq makes may open (None: SQLAlchemy's pool
        #: defaults, see docs/howto/connections.md).
        self.max_connections = _check_max_connections(max_connections, engine, async_engine)
        #: Where workers LISTEN (None: the app's own database), and whether they do at all.
        self.listen_url, self.listens = _listen_target(
            listen_dsn, pooled=not self.prepared_statements
        )
        self.connect_timeout = connect_timeout
        if not isinstance(notify_completions, bool):
            raise ConfigurationError(
                f"notify_completions takes True or False, got {notify_completions!r}"
            )
        #: This app's workers announce the jobs that ended (one NOTIFY per completion
        #: statement), so ``app.jobs.wait`` and its kin wake without polling.
        self.notify_completions = notify_completions
        self.statements = statements.statements_for(self.schema)
        self.tasks: dict[str, Task[..., Any]] = {}
        #: Old names a job may still carry (``@app.task(aliases=[...])``), each to its task's
        #: name: the worker runs a job deferred under an alias with that task.
        self.aliases: dict[str, str] = {}
        #: Defaults for this app's workers (``run_worker``, ``run_worker_async``, ``pgtq
        #: worker``), e.g. ``state``, ``startup_hooks``, ``shutdown_hooks``: how a worker
        #: factory hands its resources to the tasks. Options given to the worker win.
        self.worker_options: dict[str, Any] = {}
        #: The schedules declared with ``@app.periodic`` (run by ``periodic.run_scheduler``).
        self.periodic_tasks: list[PeriodicTask] = []
        self.jobs = JobManager(self)
        #: The LISTEN of the waiters of ``app.jobs.wait`` & co (pgtq/watcher.py).
        self.watchers = Watchers(self)
        self.queues = QueueManager(self)
        #: ``@app.periodic(cron=...)`` declares a schedule; ``app.periodic.list()``,
        #: ``pause``, ``resume`` and ``run_now`` (and their ``_async`` twins) steer them.
        self.periodic = PeriodicManager(self)
        self._sync: SyncConnector | None = None
        # An asyncpg connection belongs to the event loop that opened it, so an app-owned
        # async engine is made per loop (a worker thread's loop, a test's loop, ...).
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncConnector] = (
            weakref.WeakKeyDictionary()
        )

    # -- where the database is ------------------------------------------------------------------

    @property
    def url(self) -> URL:
        if self._url is not None:
            return self._url
        if self._engine is not None:
            return self._engine.url
        if self._async_engine is not None:
            return self._async_engine.url
        raise ConfigurationError(
            f"no database configured: pass pgtq.App(dsn=...) or an engine, or set {DSN_ENV}, "
            "or use pgtq.App.embedded() for an embedded PostgreSQL in ./.pgtq"
        )

    @property
    def sync(self) -> SyncConnector:
        """The sync connector (made on first use)."""
        if self._sync is None:
            if self._engine is not None:
                self._sync = SyncConnector(self._engine, schema=self.schema, owned=False)
            else:
                engine = create_sync_engine(
                    self.url,
                    self.connect_timeout,
                    prepared_statements=self.prepared_statements,
                    max_connections=self.max_connections,
                )
                self._sync = SyncConnector(engine, schema=self.schema, owned=True)
        return self._sync

    def async_connector(self) -> AsyncConnector:
        """The async connector of the running event loop (made on first use in that loop)."""
        loop = asyncio.get_running_loop()
        connector = self._async.get(loop)
        if connector is None:
            listen = None
            if self.listen_url is not None:
                listen = create_listen_engine(self.listen_url, self.connect_timeout)
            if self._async_engine is not None:
                connector = AsyncConnector(
                    self._async_engine, schema=self.schema, owned=False, listen_engine=listen
                )
            else:
                engine = create_async_engine_for(
                    self.url,
                    self.connect_timeout,
                    prepared_statements=self.prepared_statements,
                    max_connections=self.max_connections,
                )
                connector = AsyncConnector(
                    engine, schema=self.schema, owned=True, listen_engine=listen
                )
            self._async[loop] = connector
        return connector

    @classmethod
    def embedded(cls, path: str | os.PathLike[str] | None = None, **options: Any) -> App:
        """An app on the embedded PostgreSQL in ``path`` (default ``./.pgtq``), started or
        reused, and migrated when its schema is not at head (``pip install 'pgtq[embedded]'``).

        The server the CLI and ``pgtq demo`` use where no DSN is configured, so a script of
        your own, its tests and ``pgtq worker`` share one database with no PostgreSQL
        installed. It ignores ``PGTQ_DSN``: for local work; give a DSN in production.
        ``options`` are the constructor's (``schema=``, ``middleware=``, ...).
        """
        from pgtq import embedded, revisions

        given = sorted({"dsn", "engine", "async_engine"} & set(options))
        if given:
            raise ConfigurationError(
                f"App.embedded() makes its own database: drop {', '.join(given)} "
                "(or use pgtq.App(dsn=...) for your own server)"
            )
        app = cls(embedded.embedded_dsn(path or embedded.DEFAULT_PATH), **options)
        try:
            status = app.sync.run_in_transaction(
                lambda conn: revisions.schema_status(conn, app.schema)
            )
            if status.state != "ahead" and status.found != status.heads:
                app.migrate()
        except BaseException:
            app.close()
            raise
        return app

    def use_dsn(self, dsn: str | URL) -> None:
        """Point the app at another database (``pgtq --dsn``): engines are made again on use.

        Engines the app made are disposed of; engines you passed are forgotten, not disposed.
        """
        self.close()
        self._url = parse_dsn(dsn)
        self._engine = None
        self._async_engine = None
        self._async.clear()

    @contextlib.contextmanager
    def pointed_at(self, *, schema: str, dsn: str | URL | None = None) -> Iterator[App]:
        """Point this app (and so its tasks, ``app.jobs``, its workers) at another schema, and
        database with ``dsn``, for the length of a block; put back as it was after, the
        engines made meanwhile disposed (how :func:`pgtq.testing.migrated_schema` works)."""
        saved = (self.schema, self.statements, self._url, self._engine, self._async_engine)
        self.close()
        if dsn is not None:
            self.use_dsn(dsn)
        self.schema = validate_schema_name(schema)
        self.statements = statements.statements_for(self.schema)
        try:
            yield self
        finally:
            self.close()
            self._async.clear()
            self.schema, self.statements, self._url, self._engine, self._async_engine = saved

    # -- opening and closing ----------------------------------------------------------------------

    def open(self) -> App:
        """Connect once, so a bad DSN fails here with a clear message rather than later."""
        self.sync.run(statements.is_migrated(self.statements))
        return self

    def close(self) -> None:
        """Dispose of the engines pgtq made (never of yours)."""
        self.watchers.close()
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def open_async(self) -> App:
        await self.async_connector().run(statements.is_migrated(self.statements))
        return self

    async def close_async(self) -> None:
        await self.close_loop_connector()
        self.close()

    async def close_loop_connector(self) -> None:
        """Dispose of the running loop's async engine (if pgtq made it), before the loop ends."""
        await self.watchers.close_loop()
        connector = self._async.pop(asyncio.get_running_loop(), None)
        if connector is not None:
            await connector.close()

    def __enter__(self) -> App:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> App:
        return await self.open_async()

    async def __aexit__(self, *exc: object) -> None:
        await self.close_async()

    def batch(
        self,
        *,
        on_complete: Task[..., Any] | Signature | None = None,
        on_failure: Task[..., Any] | Signature | None = None,
    ) -> Batch:
        """A batch of jobs deferred over time (``with app.batch(...) as b: b.defer(t.s())``,
        or ``async with``), whose callbacks run once: ``on_complete`` after every member
        ended, ``on_failure`` after every member ended if one did not succeed (a task, or
        ``task.s(...)`` for arguments). See docs/workflows.md."""
        from pgtq.workflows import Batch, Signature

        def signature(callback: Task[..., Any] | Signature | None) -> Signature | None:
            if callback is None or isinstance(callback, Signature):
                return callback
            return callback.s()

        if on_complete is None and on_failure is None:
            raise InvalidArguments("app.batch: give on_complete=, on_failure= or both")
        return Batch(self, signature(on_complete), signature(on_failure))

    # -- tasks ------------------------------------------------------------------------------------

    # Typed so that ``Task[P, R]`` carries the function's parameters (a ``JobContext``
    # first one left out: the worker passes it) and what it returns (awaited, for an
    # async task): mypy then checks ``defer``'s arguments and ``jobs.wait``'s result.
    @overload
    def task(
        self, func: Callable[Concatenate[JobContext[Any], P], Awaitable[R]], /
    ) -> Task[P, R]: ...

    @overload
    def task(self, func: Callable[Concatenate[JobContext[Any], P], R], /) -> Task[P, R]: ...

    @overload
    def task(self, func: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def task(self, func: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        aliases: Sequence[str] = (),
        **options: Unpack[TaskOptions],
    ) -> TaskDecorator: ...

    def task(  # type: ignore[misc]  # mypy misreads the keyword-only overload
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        aliases: Sequence[str] = (),
        **options: Unpack[TaskOptions],
    ) -> Task[..., Any] | TaskDecorator:
        """Register a sync or async function as a task (``@app.task`` or ``@app.task(...)``).

        ``options``: :class:`pgtq.tasks.TaskOptions` (queue, priority, retry, timeout, limits,
        max_rescues ...; their defaults are :class:`pgtq.Task`'s). The app's middleware of
        the same kind (sync or async) wraps the task's own. ``aliases``: names the task had
        before (jobs deferred under one still run it after a rename). A name or alias already
        taken by another task is refused, naming both.
        """

        def register(f: Callable[..., Any]) -> Task[..., Any]:
            task_name = name or f.__name__
            if isinstance(aliases, str):
                raise ConfigurationError(
                    f"task {task_name!r}: aliases takes a list of names, not one string"
                )
            check_task_options(task_name, options)
            self.check_task_names(task_name, aliases, f)
            merged = TaskOptions(**options)  # a copy: the decorator may be applied again
            merged["middleware"] = [
                *(m for m in self.middleware if _is_async(m) == _is_async(f)),
                *options.get("middleware", ()),
            ]
            task: Task[..., Any] = Task(self, f, name=task_name, **merged)
            self.tasks[task_name] = task
            self.aliases.update(dict.fromkeys(aliases, task_name))
            return task

        return register(func) if func is not None else cast(TaskDecorator, register)

    def check_task_names(
        self,
        name: str,
        aliases: Sequence[str],
        func: Callable[..., Any],
        *,
        only_aliases: bool = False,
    ) -> None:
        """Raise ConfigurationError, naming both tasks, if ``name`` or an alias is taken
        (``only_aliases``: ``name`` is the task's own, registered already)."""
        seen: set[str] = set()
        for candidate in aliases if only_aliases else (name, *aliases):
            if not isinstance(candidate, str) or not candidate:
                raise ConfigurationError(
                    f"task {name!r} ({_where(func)}): a task name or alias must be a non-empty "
                    f"string, got {candidate!r}"
                )
            if candidate in seen:
                raise ConfigurationError(
                    f"task {name!r} ({_where(func)}) lists the name {candidate!r} twice"
                )
            seen.add(candidate)
            owner = self.lookup_task(candidate)
            if owner is None:
                continue
            taken = "name" if candidate == owner.name else f"alias of {owner.name!r}"
            mine = "name" if candidate == name else "alias"
            raise ConfigurationError(
                f"the task name {candidate!r} is already registered ({taken}, "
                f"{_where(owner.func)}); {_where(func)} asks for it as its {mine}: "
                "pass name=... (or namespace=... to add_tasks_from) to tell them apart"
            )

    def lookup_task(self, name: str) -> Task[..., Any] | None:
        """The task a job named ``name`` runs (the worker's lookup): by name, else by alias."""
        task = self.tasks.get(name)
        if task is None and name in self.aliases:
            task = self.tasks.get(self.aliases[name])
        return task

    def get_task(self, name: str) -> Task[..., Any]:
        """The task of that name or alias; ``UnknownTask`` (listing the known ones) if none."""
        task = self.lookup_task(name)
        if task is None:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTask(f"no task named {name!r} (known tasks: {known})")
        return task

    def add_task_alias(self, task: Task[..., Any] | str, alias: str) -> None:
        """Let jobs named ``alias`` run ``task`` (a task or a task's name): for a rename
        decided outside the task's module, e.g. a task that moved into a namespace."""
        target = self.get_task(task) if isinstance(task, str) else task
        if self.tasks.get(target.name) is not target:
            raise ConfigurationError(f"task {target.name!r} is not registered on this app")
        self.check_task_names(target.name, (alias,), target.func, only_aliases=True)
        self.aliases[alias] = target.name

    def add_tasks_from(self, blueprint: Blueprint, *, namespace: str | None = None) -> None:
        """Register a blueprint's tasks here, as ``@app.task`` would, named
        ``namespace:name`` (aliases too) when a namespace is given. All or nothing: a clash
        registers none of them."""
        blueprint.register_on(self, namespace=namespace)

    def add_cleanup_task(self, **options: Unpack[CleanupOptions]) -> Task[..., Any]:
        """Register the builtin periodic task ``pgtq.cleanup``: at each tick it deletes jobs
        that ended more than ``older_than`` ago (succeeded ones; failed ones with
        ``include_failed``; cancelled and aborted ones with ``include_cancelled``), and with
        ``results_older_than`` drops older results while keeping their jobs
        (:class:`pgtq.periodic.CleanupOptions`)."""
        from pgtq import periodic

        return periodic.add_cleanup_task(self, **options)

    # -- schema -----------------------------------------------------------------------------------

    def migrate(
        self, connection: Connection | None = None, *, phase: Phase | None = None
    ) -> list[str]:
        """Upgrade pgtq's schema to the newest revision (what ``pgtq migrate`` does).

        ``phase="pre"``: only the revisions that are safe while workers of the previous
        release run; ``"post"``: the rest (see :func:`pgtq.migrations.upgrade`). Returns the
        revisions applied, oldest first.
        """
        from pgtq import migrations

        return self.sync.run_in_transaction(
            lambda conn: migrations.upgrade(conn, self.schema, phase=phase), connection
        )

    async def migrate_async(self, *, phase: Phase | None = None) -> list[str]:
        from pgtq import migrations

        return await self.async_connector().run_in_transaction(
            lambda conn: migrations.upgrade(conn, self.schema, phase=phase)
        )

    # -- workers ----------------------------------------------------------------------------------

    def run_worker(self, **options: Any) -> WorkerStats:
        """Run a worker in this thread until stopped (SIGTERM/SIGINT) or, with wait=False, drained.

        The worker is asynchronous (uvloop when installed): sync tasks run in its thread pool.
        """
        from pgtq.worker import run_in_new_loop

        options = {**self.worker_options, **options}
        options.setdefault("install_signal_handlers", True)
        return run_in_new_loop(self, options)

    async def run_worker_async(self, **options: Any) -> WorkerStats:
        """Run a worker on the running loop; cancelling this coroutine shuts it down gracefully."""
        from pgtq.worker import Worker

        return await Worker(self, **{**self.worker_options, **options}).run()
