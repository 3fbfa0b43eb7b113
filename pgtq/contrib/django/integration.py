"""pgtq's App on a Django project's database, and pgtq's statements on Django's connection.

A Django view writes inside ``transaction.atomic()`` on Django's own psycopg connection; a
job deferred there must commit or roll back with the view's rows. So the insert pgtq builds
(``statements.insert_jobs`` and its keyed and per-job forms, SQLAlchemy Core) is compiled to
the driver's SQL once (:class:`pgtq.fastpath.DriverSQL`, as the fast path does) and run on
Django's cursor: one definition of the SQL, no second INSERT, no ``transaction.on_commit``.

:class:`DjangoApp` is a :class:`pgtq.App` whose connectors know Django's connections:

- ``task.defer(...)`` inside ``atomic()`` runs on Django's connection of the app's database
  alias by itself; ``connection=django.db.connection`` (or ``connections["alias"]``) says
  so explicitly, outside ``atomic()`` too. Everything else uses pgtq's own pools.
- ``await task.defer_async(..., connection=django.db.connection)`` runs the insert in
  Django's sync thread (``sync_to_async``, thread-sensitive: the thread whose connection
  Django's async ORM uses). Without ``connection=`` it is pgtq's own async pool.
- the worker resolves a job named by a Django task's module path (``myapp.tasks.send``) to
  that task, registered on first sight (:meth:`DjangoApp.django_task`): tasks made with
  ``django.tasks``' ``@task`` need no ``@app.task``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import close_old_connections, connections
from django.utils import timezone
from django.utils.module_loading import import_string
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL

from pgtq.app import App
from pgtq.connectors import AsyncConnector, SyncConnector
from pgtq.contrib.django import compat
from pgtq.fastpath import DriverSQL, require_driver_form
from pgtq.jobs import JobContext
from pgtq.schema import DEFAULT_SCHEMA
from pgtq.statements import Query
from pgtq.tasks import Task

T = TypeVar("T")

#: The settings dictionary: ``PGTQ = {"DATABASE": "default", "SCHEMA": "pgtq", "DSN": None,
#: "OPTIONS": {...}}`` (``OPTIONS``: keywords of :class:`pgtq.App`, e.g. ``max_connections``,
#: ``listen_dsn``, ``prepared_statements``).
SETTINGS_NAME = "PGTQ"
SETTINGS_KEYS = frozenset({"DATABASE", "SCHEMA", "DSN", "OPTIONS"})

# pgtq's statements compiled for psycopg (``%(name)s`` placeholders), the paramstyle of
# Django's PostgreSQL backend; compiled once per statement, as on pgtq's own connections.
_DRIVER_SQL = DriverSQL(PGDialect_psycopg())  # type: ignore[no-untyped-call]


def pgtq_settings() -> dict[str, Any]:
    """``settings.PGTQ``, checked: an unknown key is a typo, refused by name."""
    given = getattr(settings, SETTINGS_NAME, None) or {}
    if not isinstance(given, Mapping):
        raise ImproperlyConfigured(f"settings.{SETTINGS_NAME} must be a dict")
    unknown = sorted(set(given) - SETTINGS_KEYS)
    if unknown:
        raise ImproperlyConfigured(
            f"settings.{SETTINGS_NAME}: unknown key(s) {unknown}; "
            f"known: {', '.join(sorted(SETTINGS_KEYS))}"
        )
    return dict(given)


def database_url(alias: str = "default") -> URL:
    """The psycopg URL of ``DATABASES[alias]`` (a PostgreSQL database, else refused)."""
    try:
        db = settings.DATABASES[alias]
    except KeyError:
        raise ImproperlyConfigured(f"settings.DATABASES has no database {alias!r}") from None
    return url_of(db, alias)


#: Options of Django's PostgreSQL backend that are not libpq's connection parameters.
_DJANGO_ONLY_OPTIONS = frozenset(
    {"server_side_binding", "pool", "isolation_level", "assume_role", "cursor_factory"}
)


def url_of(db: Mapping[str, Any], alias: str = "default") -> URL:
    """The psycopg URL of one ``DATABASES`` entry (a connection's ``settings_dict``)."""
    engine = str(db.get("ENGINE", ""))
    if "postgresql" not in engine and "postgis" not in engine:
        raise ImproperlyConfigured(
            f"pgtq needs PostgreSQL: DATABASES[{alias!r}] uses {engine!r} "
            "(use django.db.backends.postgresql)"
        )
    options = db.get("OPTIONS") or {}
    query = {
        k: str(v)
        for k, v in options.items()
        if isinstance(v, str | int) and not isinstance(v, bool) and k not in _DJANGO_ONLY_OPTIONS
    }
    return URL.create(
        "postgresql+psycopg",
        username=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=int(db["PORT"]) if db.get("PORT") else None,
        database=db.get("NAME") or None,
        query=query,
    )


def is_django_connection(connection: Any) -> bool:
    """A Django database connection (a ``connections[alias]`` wrapper, or the
    ``django.db.connection`` proxy), not a SQLAlchemy one."""
    return (
        connection is not None
        and hasattr(connection, "in_atomic_block")
        and hasattr(connection, "vendor")
    )


def run_on_django(connection: Any, query: Query[T]) -> T:
    """Run one of pgtq's statements on a Django connection, in its current transaction.

    ``connection`` is resolved by its alias in the calling thread (Django's connections are
    per thread), so the ``django.db.connection`` proxy given in async code names the
    connection of the thread ``sync_to_async`` runs this in. Only queries with a driver
    form (parameters psycopg takes as they are: the inserts) run here.
    """
    require_driver_form(query)
    target = connections[connection.alias]
    if target.vendor != "postgresql":
        raise ImproperlyConfigured(
            f"pgtq runs on PostgreSQL: database {connection.alias!r} is {target.vendor}"
        )
    sql, params = _DRIVER_SQL.named(query)
    with target.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.description is not None else ()
    return query.mapper(rows)


class DjangoSyncConnector(SyncConnector):
    """The sync connector with one more place to run: Django's connection (see module doc).

    ``django_alias`` is set by :class:`DjangoApp` (this class is the app's connector with
    one method more, so it has no state of its own to build)."""

    django_alias: str = "default"

    def run(self, query: Query[T], connection: Any = None) -> T:
        if connection is not None:
            if is_django_connection(connection):
                return run_on_django(connection, query)
        elif query.driver and connections[self.django_alias].in_atomic_block:
            return run_on_django(connections[self.django_alias], query)
        return super().run(query, connection)


class DjangoAsyncConnector(AsyncConnector):
    """The async connector; ``connection=`` a Django connection runs the statement in
    Django's sync thread (where the async ORM's connection lives)."""

    async def run(self, query: Query[T], connection: Any = None) -> T:
        if connection is not None and is_django_connection(connection):
            run = sync_to_async(run_on_django, thread_sensitive=True)
            return cast(T, await run(connection, query))
        return await super().run(query, connection)


class DjangoApp(App):
    """A :class:`pgtq.App` on a Django database: its connectors run pgtq's inserts on
    Django's connection where a transaction of Django's is open (or one is given), and its
    worker runs the tasks of Django's Tasks framework by their module path."""

    def __init__(self, dsn: str | URL | None = None, *, database: str = "default", **options: Any):
        middleware = [close_django_connections, *options.pop("middleware", ())]
        super().__init__(dsn, middleware=middleware, **options)
        #: The alias in ``settings.DATABASES`` whose connection joins transactions.
        self.database = database
        self._registering = threading.local()
        self._register_lock = threading.RLock()

    @property
    def sync(self) -> SyncConnector:
        connector = super().sync
        if not isinstance(connector, DjangoSyncConnector):
            connector.__class__ = DjangoSyncConnector  # the same connector, one method more
            cast(DjangoSyncConnector, connector).django_alias = self.database
        return connector

    def async_connector(self) -> AsyncConnector:
        connector = super().async_connector()
        if not isinstance(connector, DjangoAsyncConnector):
            connector.__class__ = DjangoAsyncConnector
        return connector

    def lookup_task(self, name: str) -> Task[..., Any] | None:
        """By name or alias, else a Django task of that module path (registered now)."""
        task = super().lookup_task(name)
        if task is None and "." in name and not getattr(self._registering, "on", False):
            task = self.django_task(name)
        return task

    def django_task(self, module_path: str) -> Task[..., Any] | None:
        """The pgtq task that runs the Django task at ``module_path``, registered on first
        use; None when the path names no Django task."""
        with self._register_lock:
            found = self.tasks.get(module_path)
            if found is not None:
                return found
            try:
                obj = import_string(module_path)
            except ImportError:
                return None
            if not compat.is_task(obj):
                return None
            return self.task_for(obj)

    def task_for(self, django_task: Any) -> Task[..., Any]:
        """The pgtq task for a Django task object (named by its module path), registered
        on first use: what the backend defers and the worker runs."""
        name: str = django_task.module_path
        with self._register_lock:
            found = self.tasks.get(name)
            if found is not None:
                return found
            self._registering.on = True
            try:
                return self.task(name=name, queue=django_task.queue_name, pass_context=True)(
                    _runner(django_task)
                )
            finally:
                self._registering.on = False


def _runner(django_task: Any) -> Callable[..., Any]:
    """The function pgtq runs for a Django task: its ``args`` and ``kwargs`` as stored, a
    ``TaskContext`` first when the task ``takes_context``, the return value made JSON as
    Django's backends make it (a sync one gets :func:`close_django_connections` as every
    sync task of a :class:`DjangoApp`). Django's ``task_started`` and ``task_finished`` are
    sent around each attempt, as a worker of Django's own backends sends them."""
    func = django_task.func

    def arguments(ctx: JobContext[Any], args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
        if django_task.takes_context:
            return [task_context(ctx, django_task, args, kwargs), *args]
        return list(args)

    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(ctx: JobContext[Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
            running = _started(ctx, django_task, args, kwargs)
            try:
                value = compat.normalize_json(await func(*arguments(ctx, args, kwargs), **kwargs))
            except BaseException:
                _finished(django_task, running, compat.TaskResultStatus.FAILED)
                raise
            _finished(django_task, running, compat.TaskResultStatus.SUCCESSFUL)
            return value

        _drop_wrapped(run_async)
        return run_async

    @functools.wraps(func)
    def run_sync(ctx: JobContext[Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        running = _started(ctx, django_task, args, kwargs)
        try:
            value = compat.normalize_json(func(*arguments(ctx, args, kwargs), **kwargs))
        except BaseException:
            _finished(django_task, running, compat.TaskResultStatus.FAILED)
            raise
        _finished(django_task, running, compat.TaskResultStatus.SUCCESSFUL)
        return value

    _drop_wrapped(run_sync)
    return run_sync


def _sender(django_task: Any) -> type:
    """What Django's task signals are sent by: the task's backend class."""
    return type(compat.task_backends[django_task.backend])


def _started(
    ctx: JobContext[Any], django_task: Any, args: list[Any], kwargs: dict[str, Any]
) -> Any:
    running = running_result(ctx, django_task, args, kwargs)
    compat.task_started.send_robust(_sender(django_task), task_result=running)
    return running


def _finished(django_task: Any, running: Any, status: Any) -> None:
    """``task_finished`` with the attempt's status (a receiver's error is logged by Django's
    ``send_robust``, never the job's)."""
    ended = dataclasses.replace(running, status=status, finished_at=timezone.now())
    compat.task_finished.send_robust(_sender(django_task), task_result=ended)


def close_django_connections(ctx: JobContext[Any], call_next: Callable[[], Any]) -> Any:
    """The sync middleware of a :class:`DjangoApp`: Django's connections of the task's
    thread closed when stale or broken, before and after the task, as Django does around a
    request (a worker thread lives longer than ``CONN_MAX_AGE``, and a task that broke its
    connection must not leave it to the next one)."""
    close_old_connections()
    try:
        return call_next()
    finally:
        close_old_connections()


def _drop_wrapped(fn: Callable[..., Any]) -> None:
    """Keep the wrapper's own signature (``ctx, args, kwargs``) for pgtq's argument check;
    ``functools.wraps`` only lends it the task's name and docstring."""
    del fn.__wrapped__  # type: ignore[attr-defined]


def task_context(
    ctx: JobContext[Any], django_task: Any, args: list[Any], kwargs: dict[str, Any]
) -> Any:
    """Django's ``TaskContext`` for a running pgtq job: its result is RUNNING, its
    ``attempt`` pgtq's attempt number (the worker ids of earlier attempts are not read: a
    query per job; ``get_result`` has them)."""
    return compat.TaskContext(task_result=running_result(ctx, django_task, args, kwargs))


def running_result(
    ctx: JobContext[Any], django_task: Any, args: list[Any], kwargs: dict[str, Any]
) -> Any:
    """Django's ``TaskResult`` of a running pgtq job (RUNNING, started now)."""
    now = timezone.now()
    return compat.TaskResult(
        task=django_task,
        id=str(ctx.job_id),
        status=compat.TaskResultStatus.RUNNING,
        enqueued_at=None,
        started_at=now,
        finished_at=None,
        last_attempted_at=now,
        args=args,
        kwargs=kwargs,
        backend=django_task.backend,
        errors=[],
        worker_ids=[ctx.worker_id] * max(ctx.attempt, 1),
    )


_APPS: dict[str, DjangoApp] = {}
_APPS_LOCK = threading.Lock()


def get_app(database: str | None = None) -> DjangoApp:
    """The project's pgtq app on ``DATABASES[database]`` (default: ``PGTQ["DATABASE"]``,
    else ``"default"``), made once per alias from ``settings.PGTQ``."""
    conf = pgtq_settings()
    alias = database or conf.get("DATABASE") or "default"
    with _APPS_LOCK:
        app = _APPS.get(alias)
        if app is None:
            dsn = conf.get("DSN") if database in (None, conf.get("DATABASE")) else None
            app = DjangoApp(
                dsn or database_url(alias),
                database=alias,
                schema=conf.get("SCHEMA") or DEFAULT_SCHEMA,
                **(conf.get("OPTIONS") or {}),
            )
            _APPS[alias] = app
        return app


def reset_apps() -> None:
    """Forget the apps made (closing them): after a change of settings, in tests."""
    with _APPS_LOCK:
        apps = list(_APPS.values())
        _APPS.clear()
    for app in apps:
        app.close()


__all__ = [
    "DjangoApp",
    "DjangoAsyncConnector",
    "DjangoSyncConnector",
    "close_django_connections",
    "database_url",
    "get_app",
    "is_django_connection",
    "pgtq_settings",
    "reset_apps",
    "run_on_django",
    "task_context",
    "url_of",
]
