"""Tasks and how jobs are deferred: ``defer`` / ``defer_async`` and their ``_many`` forms.

Everything that decides (argument checks, JSON encoding, schedule) is the pure
:meth:`Deferrer.encode`; the four ``defer*`` methods only choose a connector.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, KeysView, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar, cast

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from pgtq import observers, statements, validation
from pgtq.errors import AlreadyEnqueued, ConfigurationError, InvalidArguments
from pgtq.limits import Limit, parse_rate
from pgtq.model import Deferred, dumps
from pgtq.retry import Retry, RetryFunction, as_retry

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.jobs import JobContext

R = TypeVar("R")

RESERVED_ARGUMENTS = frozenset({"connection"})

#: Rescues a job gets by default before a lost worker fails it (``@app.task(max_rescues=)``).
DEFAULT_MAX_RESCUES = 3


class TaskOptions(TypedDict, total=False):
    """The keyword options of ``@app.task(...)`` and ``@blueprint.task(...)``, declared once:
    both decorators take ``**options: Unpack[TaskOptions]`` and hand them to :class:`Task`,
    whose signature holds their defaults and documents them."""

    queue: str
    priority: int
    retry: Retry | RetryFunction | int | None
    timeout: float | None
    pass_context: bool | None
    middleware: Sequence[Middleware]
    transactional: bool
    concurrency: int | None
    rate_limit: str | float | None
    key_concurrency: int | None
    key_rate_limit: str | float | None
    burst: int | None
    max_rescues: int


def check_task_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse an option ``@app.task``/``@bp.task`` does not have, when it is written (a
    blueprint registers its tasks later: a typo must not wait until then)."""
    unknown = sorted(set(options) - TaskOptions.__optional_keys__)
    if unknown:
        known = ", ".join(sorted(TaskOptions.__optional_keys__))
        raise ConfigurationError(
            f"task {name!r}: unknown option(s) {unknown}; the options: {known}"
        )


#: ``configure(on_conflict=...)``: see :attr:`JobOptions.on_conflict`.
OnConflict = Literal["raise", "skip", "replace"]


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What ``configure()`` can change for the jobs it defers."""

    queue: str
    priority: int = 0
    schedule_at: datetime | None = None
    #: Seconds from the database server's ``now()`` (not this machine's clock).
    schedule_in: float | None = None
    lock: str | None = None
    queueing_lock: str | None = None
    #: With a ``queueing_lock``, when a job with that key waits already: ``raise``
    #: :class:`AlreadyEnqueued`, ``skip`` (its id comes back), or ``replace`` its arguments,
    #: schedule and priority with this job's.
    on_conflict: OnConflict = "raise"
    #: Seconds: the ``queueing_lock`` is unique per period of this length (whatever the
    #: job's status but failed or ended early), not only among waiting jobs.
    unique_for: float | None = None
    concurrency_key: str | None = None


def _wants_context(func: Callable[..., Any]) -> bool:
    """A task gets a JobContext when its first parameter is annotated so or named ctx/context."""
    params = list(inspect.signature(func).parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        return False
    first = params[0]
    annotation = first.annotation
    if isinstance(annotation, str):
        named = annotation.rsplit(".", 1)[-1] == "JobContext"
    else:
        named = getattr(annotation, "__name__", "") == "JobContext"
    return named or first.name in ("ctx", "context")


class Task(Generic[R]):
    """A function registered on an app. Calling it runs it directly; ``defer`` enqueues it."""

    def __init__(
        self,
        app: App,
        func: Callable[..., R] | Callable[..., Awaitable[R]],
        *,
        name: str,
        queue: str = "default",
        priority: int = 0,
        retry: Retry | RetryFunction | int | None = None,
        timeout: float | None = None,
        pass_context: bool | None = None,
        middleware: Sequence[Middleware] = (),
        transactional: bool = False,
        concurrency: int | None = None,
        rate_limit: str | float | None = None,
        key_concurrency: int | None = None,
        key_rate_limit: str | float | None = None,
        burst: int | None = None,
        max_rescues: int = DEFAULT_MAX_RESCUES,
    ) -> None:
        self.app = app
        self.func = func
        if isinstance(max_rescues, bool) or not isinstance(max_rescues, int) or max_rescues < 0:
            raise ConfigurationError(f"task {name!r}: max_rescues must be a whole number >= 0")
        #: How many times a job of this task goes back to ``todo`` after its worker died
        #: running it, whatever its retry policy; one more loss fails it (a job that crashes
        #: its worker would otherwise crash every worker in turn).
        self.max_rescues = max_rescues
        # Fleet-wide limits, enforced in the claim of every worker that has this task: at most
        # ``concurrency`` running, at most ``rate_limit`` starts (``burst`` of them at once),
        # and at most ``key_concurrency`` running among its jobs sharing a ``concurrency_key``,
        # at most ``key_rate_limit`` starts per ``concurrency_key`` (``burst`` of them at once
        # too: one word for how bursty the task's starts may be, task-wide and per key).
        for label, cap in (("concurrency", concurrency), ("key_concurrency", key_concurrency)):
            if cap is not None and cap < 1:
                raise ConfigurationError(f"task {name!r}: {label} must be at least 1")
        try:
            rate, key_rate = parse_rate(rate_limit), parse_rate(key_rate_limit)
            own_burst = burst if rate is not None or key_rate is None else None
            self.limit = Limit(concurrency=concurrency, rate=rate, burst=own_burst)
            #: ``key_rate_limit``: the bucket of each ``concurrency_key`` (None: none).
            self.key_rate_limit = None if key_rate is None else Limit(rate=key_rate, burst=burst)
        except ValueError as exc:
            raise ConfigurationError(f"task {name!r}: {exc}") from None
        if key_rate is not None and "#" in name:
            raise ConfigurationError(
                f"task {name!r}: a task with a key_rate_limit has no '#' in its name (it "
                "separates the task from the key in the name of the key's bucket)"
            )
        self.key_concurrency = key_concurrency
        #: The task gets ``ctx.connection`` (a ``Connection`` in its thread, or an
        #: ``AsyncConnection``); its writes and its job's success commit together.
        self.transactional = transactional
        self.name = name
        self.is_async = inspect.iscoroutinefunction(func)
        self.retry = as_retry(retry)
        self.timeout = timeout
        self.pass_context = _wants_context(func) if pass_context is None else pass_context
        self.signature = inspect.signature(func)
        self._accepts = _keyword_check(self.signature, self.pass_context)
        # Checked once here, so a plain ``defer()`` checks only its arguments.
        try:
            validation.check_name("task name", name)
            self.defaults = JobOptions(
                queue=validation.check_queue(queue), priority=validation.check_priority(priority)
            )
        except InvalidArguments as exc:
            raise ConfigurationError(f"task {name!r}: {exc}") from None
        self._plain_deferrer: Deferrer | None = None
        clash = RESERVED_ARGUMENTS & set(self.signature.parameters)
        if clash:
            raise ConfigurationError(
                f"task {name!r}: the argument name(s) {sorted(clash)} are reserved by defer()"
            )
        if timeout is not None and timeout <= 0:
            raise ConfigurationError(f"task {name!r}: timeout must be > 0 seconds")
        kind = "async" if self.is_async else "sync"
        for mw in middleware:
            if inspect.iscoroutinefunction(mw) != self.is_async:
                raise ConfigurationError(
                    f"task {name!r} is {kind}, middleware {getattr(mw, '__name__', mw)!r} is "
                    f"not: a sync middleware wraps sync tasks (in their thread), an async one "
                    "wraps async tasks (on the loop)"
                )
        self.middleware = tuple(middleware)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<pgtq.Task {self.name!r} queue={self.defaults.queue!r}>"

    def configure(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        schedule_at: datetime | None = None,
        schedule_in: timedelta | float | None = None,
        lock: str | None = None,
        queueing_lock: str | None = None,
        on_conflict: OnConflict = "raise",
        unique_for: timedelta | float | None = None,
        concurrency_key: str | None = None,
    ) -> Deferrer:
        """Job options for the jobs deferred through the returned :class:`Deferrer`, each
        checked here (:mod:`pgtq.validation`): a bad one raises ``InvalidArguments`` naming
        it. ``schedule_in`` counts from the database server's clock when the job is
        inserted; a negative one means due now."""
        if schedule_at is not None and schedule_in is not None:
            raise InvalidArguments("schedule_at, schedule_in: give one of them, not both")
        options = replace(
            self.defaults,
            queue=self.defaults.queue if queue is None else validation.check_queue(queue),
            priority=(
                self.defaults.priority if priority is None else validation.check_priority(priority)
            ),
            schedule_at=None if schedule_at is None else validation.check_schedule_at(schedule_at),
            schedule_in=None if schedule_in is None else validation.schedule_seconds(schedule_in),
            lock=validation.check_key("lock", lock),
            queueing_lock=validation.check_key("queueing_lock", queueing_lock),
            concurrency_key=validation.check_key("concurrency_key", concurrency_key),
        )
        checked = validation.check_on_conflict(on_conflict, options.queueing_lock)
        period = (
            None
            if unique_for is None
            else validation.check_unique_for(unique_for, options.queueing_lock)
        )
        options = replace(options, on_conflict=cast(OnConflict, checked), unique_for=period)
        return Deferrer(self, options)

    def _plain(self) -> Deferrer:
        """``configure()`` with no options, made once (``dataclasses.replace`` per defer
        showed in the single-enqueue profile)."""
        plain = self._plain_deferrer
        if plain is None or plain.options is not self.defaults:
            plain = self._plain_deferrer = Deferrer(self, self.defaults)
        return plain

    # The task's own defaults; ``configure()`` for anything else.
    def defer(self, *args: Any, connection: Connection | None = None, **kwargs: Any) -> int:
        """Enqueue one job with these keyword arguments; its id. ``connection=``: inside
        your transaction (the job exists once you commit)."""
        return self._plain().defer(*args, connection=connection, **kwargs)

    async def defer_async(
        self, *args: Any, connection: AsyncConnection | None = None, **kwargs: Any
    ) -> int:
        """:meth:`defer` from async code (``connection=``: an ``AsyncConnection``)."""
        return await self._plain().defer_async(*args, connection=connection, **kwargs)

    def defer_many(
        self, arguments: Iterable[Mapping[str, Any]], *, connection: Connection | None = None
    ) -> list[int]:
        """Enqueue one job per mapping of keyword arguments, in one statement; their ids, in
        order. All or none: one bad mapping refuses the call before anything is written."""
        return self._plain().defer_many(arguments, connection=connection)

    async def defer_many_async(
        self, arguments: Iterable[Mapping[str, Any]], *, connection: AsyncConnection | None = None
    ) -> list[int]:
        """:meth:`defer_many` from async code."""
        return await self._plain().defer_many_async(arguments, connection=connection)

    def check_arguments(self, kwargs: Mapping[str, Any]) -> None:
        """Raise InvalidArguments unless the function can be called with these arguments."""
        if self._accepts is not None and self._accepts(kwargs.keys()):
            return  # the common case, without Signature.bind (a few µs a job in defer_many)
        try:
            if self.pass_context:
                self.signature.bind(None, **kwargs)
            else:
                self.signature.bind(**kwargs)
        except TypeError as exc:
            raise InvalidArguments(f"task {self.name!r}: arguments: {exc}") from None


def _keyword_check(
    signature: inspect.Signature, pass_context: bool
) -> Callable[[KeysView[str]], bool] | None:
    """A quick yes for keyword arguments the function surely takes; None when only
    ``Signature.bind`` can tell (positional-only parameters)."""
    params = list(signature.parameters.values())[1 if pass_context else 0 :]
    P = inspect.Parameter
    if any(p.kind is P.POSITIONAL_ONLY for p in params):
        return None
    named = frozenset(p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY))
    required = frozenset(
        p.name
        for p in params
        if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and p.default is P.empty
    )
    if any(p.kind is P.VAR_KEYWORD for p in params):
        # defer_many's mappings may hold any key: only ``bind`` names a key not a str.
        return lambda keys: required <= keys and all(type(k) is str for k in keys)
    return lambda keys: required <= keys and keys <= named


def _no_positional(task: Task[Any], args: tuple[Any, ...]) -> None:
    if args:
        raise InvalidArguments(
            f"task {task.name!r} takes keyword arguments only when deferred "
            f"(got {len(args)} positional): write defer(name=value, ...)"
        )


class Deferrer:
    """A task with job options fixed: what ``Task.configure()`` returns."""

    def __init__(self, task: Task[Any], options: JobOptions) -> None:
        self.task = task
        self.options = options

    def encode(self, arguments: Iterable[Mapping[str, Any]]) -> statements.NewJobs:
        """Check and encode jobs before anything is written: the one place defer decides.

        With a ``queueing_lock`` at most one job of the call can wait: ``raise`` refuses a
        call of several, ``skip`` inserts the first, ``replace`` the last (the newest wins)."""
        o = self.options
        checked = [self._checked(kwargs) for kwargs in arguments]
        if o.queueing_lock is not None and len(checked) > 1:
            if o.on_conflict == "raise":
                raise InvalidArguments(
                    f"queueing_lock: {len(checked)} jobs with one key, of which at most one "
                    "may wait: defer one, or configure(on_conflict='skip' or 'replace')"
                )
            checked = checked[-1:] if o.on_conflict == "replace" else checked[:1]
        carrier = observers.trace_context()
        return statements.NewJobs(
            queue=o.queue,
            task_name=self.task.name,
            priority=o.priority,
            scheduled_at=o.schedule_at,
            schedule_in=o.schedule_in,
            lock=o.lock,
            queueing_lock=o.queueing_lock,
            concurrency_key=o.concurrency_key,
            trace_context=dumps(carrier) if carrier else None,
            args=self._dumps(checked),
            count=len(checked),
        )

    def _checked(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if type(kwargs) is not dict:  # the common case skips the (slower) ABC check
            if not isinstance(kwargs, Mapping):
                raise InvalidArguments(
                    f"task {self.task.name!r}: defer_many takes mappings of keyword arguments, "
                    f"got {type(kwargs).__name__}"
                )
            kwargs = dict(kwargs)
        self.task.check_arguments(kwargs)
        return kwargs

    def _dumps(self, checked: list[dict[str, Any]]) -> str:
        """All the jobs' arguments in one JSON array: one call into the C encoder, then the
        checks of :func:`validation.encode_arguments` (a few substring scans when fine)."""
        try:
            return validation.encode_arguments(checked, self.task.app.max_args_bytes)
        except InvalidArguments as exc:
            raise InvalidArguments(f"task {self.task.name!r}: {exc}") from None

    def _insert(self, new: statements.NewJobs) -> statements.Query[list[int]]:
        return statements.insert_jobs(self.task.app.statements, new)

    def _keyed(self, new: statements.NewJobs) -> statements.Query[tuple[int, bool] | None]:
        o = self.options
        return statements.insert_keyed_job(
            self.task.app.statements,
            new,
            replace=o.on_conflict == "replace",
            unique_for=o.unique_for,
        )

    def defer(self, *args: Any, connection: Connection | None = None, **kwargs: Any) -> int:
        """:meth:`Task.defer` with this deferrer's options."""
        _no_positional(self.task, args)
        new = self.encode([kwargs])
        if new.queueing_lock is not None:
            return self._settle(self.task.app.sync.run(self._keyed(new), connection), 1)[0]
        return self.task.app.sync.run(self._insert(new), connection)[0]

    async def defer_async(
        self, *args: Any, connection: AsyncConnection | None = None, **kwargs: Any
    ) -> int:
        """:meth:`Task.defer_async` with this deferrer's options."""
        _no_positional(self.task, args)
        new = self.encode([kwargs])
        run = self.task.app.async_connector().run
        if new.queueing_lock is not None:
            return self._settle(await run(self._keyed(new), connection), 1)[0]
        return (await run(self._insert(new), connection))[0]

    def defer_many(
        self, arguments: Iterable[Mapping[str, Any]], *, connection: Connection | None = None
    ) -> list[int]:
        """:meth:`Task.defer_many` with this deferrer's options."""
        jobs = list(arguments)
        new = self.encode(jobs)
        if not new.count:
            return []
        if new.queueing_lock is not None:
            return self._settle(self.task.app.sync.run(self._keyed(new), connection), len(jobs))
        return self.task.app.sync.run(self._insert(new), connection)

    async def defer_many_async(
        self, arguments: Iterable[Mapping[str, Any]], *, connection: AsyncConnection | None = None
    ) -> list[int]:
        """:meth:`Task.defer_many_async` with this deferrer's options."""
        jobs = list(arguments)
        new = self.encode(jobs)
        if not new.count:
            return []
        run = self.task.app.async_connector().run
        if new.queueing_lock is not None:
            return self._settle(await run(self._keyed(new), connection), len(jobs))
        return await run(self._insert(new), connection)

    def _settle(self, row: tuple[int, bool] | None, positions: int) -> list[int]:
        """What a defer with a key returns, per position of its call (the one job inserted,
        then its duplicates), or the error its ``on_conflict`` says."""
        o = self.options
        held = "in this period" if o.unique_for is not None else "while it waits"
        if row is None:  # replace met a job it may not replace
            raise AlreadyEnqueued(
                f"queueing_lock {o.queueing_lock!r}: held by a job of another task or one no "
                "longer waiting, which on_conflict='replace' leaves alone"
            )
        job_id, fresh = row
        if not fresh and o.on_conflict == "raise":
            raise AlreadyEnqueued(
                f"queueing_lock {o.queueing_lock!r}: job {job_id} holds this key {held} "
                "(configure(on_conflict='skip') returns its id instead)",
                job_id=job_id,
            )
        first = Deferred(job_id, duplicate=not fresh)
        return [first, *(Deferred(job_id, duplicate=True) for _ in range(positions - 1))]


#: ``middleware(ctx, call_next)``: runs around a task; ``call_next()`` runs the rest of the
#: chain and the task, and returns its result (an async middleware awaits it).
Middleware = Callable[["JobContext", Callable[[], Any]], Any]


def call_task(task: Task[Any], ctx: JobContext, args: Mapping[str, Any]) -> Any:
    """Call the task through its middleware (an async task returns its coroutine)."""
    if not task.middleware:  # the common case, without the chain's closure
        return _call_function(task, ctx, args)

    def call(i: int) -> Any:
        if i == len(task.middleware):
            return _call_function(task, ctx, args)
        return task.middleware[i](ctx, lambda: call(i + 1))

    return call(0)


def _call_function(task: Task[Any], ctx: JobContext, args: Mapping[str, Any]) -> Any:
    return task.func(ctx, **args) if task.pass_context else task.func(**args)
