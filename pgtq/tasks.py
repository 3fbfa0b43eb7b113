"""Tasks and how jobs are deferred: ``defer`` / ``defer_async`` and their ``_many`` forms.

Everything that decides (argument checks, JSON encoding, schedule) is the pure
:meth:`Deferrer.encode`; the four ``defer*`` methods only choose a connector.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, KeysView, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypedDict,
    TypeVar,
    cast,
    overload,
)

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from pgtq import codecs, observers, statements, validation
from pgtq.errors import AlreadyEnqueued, ConfigurationError, InvalidArguments
from pgtq.limits import Limit, parse_rate
from pgtq.model import Deferred, dumps
from pgtq.retry import Retry, RetryFunction, as_retry

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.jobs import JobContext
    from pgtq.workflows import Signature

#: A task's keyword arguments (its function's parameters, without a ``JobContext`` first)
#: and what it returns: ``Task[P, R]``, so mypy checks ``defer``'s arguments.
P = ParamSpec("P")
R = TypeVar("R")

RESERVED_ARGUMENTS = frozenset({"connection"})


class EagerRunner(Protocol):
    """What ``App.eager`` holds while ``pgtq.testing.eager`` is on: it runs deferred jobs at
    once, in-process (:class:`pgtq.testing.Eager`)."""

    def run(
        self, deferrer: Deferrer[..., Any], items: Sequence[DeferItem]
    ) -> list[Deferred[Any]]: ...

    async def run_async(
        self, deferrer: Deferrer[..., Any], items: Sequence[DeferItem]
    ) -> list[Deferred[Any]]: ...


class TaskDecorator(Protocol):
    """What ``@app.task(...)`` with options returns: it registers a function, typed as the
    bare ``@app.task`` is (``Task[P, R]``)."""

    @overload
    def __call__(
        self, func: Callable[Concatenate[JobContext[Any], P], Awaitable[R]], /
    ) -> Task[P, R]: ...

    @overload
    def __call__(self, func: Callable[Concatenate[JobContext[Any], P], R], /) -> Task[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, Awaitable[R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, func: Callable[P, R], /) -> Task[P, R]: ...


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
    #: Labels for people and filters (repeats dropped, the first kept); None: no tag.
    tags: tuple[str, ...] | None = None
    #: A JSON object for people and tools, stored with the job, never read by pgtq.
    meta: dict[str, Any] | None = None
    #: This job's own time limit (seconds) and attempt budget; None: the task's.
    timeout: float | None = None
    max_attempts: int | None = None
    #: The jobs that must succeed first (ids): the job waits ``blocked`` until then.
    depends_on: tuple[int, ...] | None = None
    #: What this job does when one of them ends failed, cancelled or aborted.
    on_parent_failure: statements.OnParentFailure = "cancel"

    @property
    def per_row(self) -> bool:
        """Has an option only ``insert_each`` writes (tags, meta, timeout, max_attempts)."""
        return not (
            self.tags is None
            and self.meta is None
            and self.timeout is None
            and self.max_attempts is None
        )


#: The keyword options of ``configure()``: the options an item of a per-job ``defer_many``
#: may give (``(kwargs, options)``).
CONFIGURE_OPTIONS = (
    "queue",
    "priority",
    "schedule_at",
    "schedule_in",
    "lock",
    "queueing_lock",
    "on_conflict",
    "unique_for",
    "concurrency_key",
    "tags",
    "meta",
    "timeout",
    "max_attempts",
    "depends_on",
    "on_parent_failure",
)

#: An item of ``defer_many``: a mapping of keyword arguments (the jobs take the deferrer's
#: options), or a ``(kwargs, options)`` pair, ``options`` being ``configure()`` keywords of
#: this job alone.
DeferItem = Mapping[str, Any] | tuple[Mapping[str, Any], Mapping[str, Any]]


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


class Task(Generic[P, R]):
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
        #: Reads a job's JSON arguments as the parameters' annotated types (a datetime, a
        #: dataclass, ...); None when every parameter takes its JSON as is: then a job pays
        #: nothing (:func:`pgtq.codecs.arguments_decoder`).
        self.decode_arguments = codecs.arguments_decoder(
            func, skip_first=self.pass_context, decoders=app.codec.decoders
        )
        #: Reads its stored result back as its return annotation, for ``app.jobs.wait``
        #: (None: the JSON is the value).
        self.decode_result = codecs.result_decoder(func, app.codec.decoders)
        # Checked once here, so a plain ``defer()`` checks only its arguments.
        try:
            validation.check_name("task name", name)
            self.defaults = JobOptions(
                queue=validation.check_queue(queue), priority=validation.check_priority(priority)
            )
        except InvalidArguments as exc:
            raise ConfigurationError(f"task {name!r}: {exc}") from None
        self._plain_deferrer: Deferrer[P, R] | None = None
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
        tags: Sequence[str] | None = None,
        meta: Mapping[str, Any] | None = None,
        timeout: timedelta | float | None = None,
        max_attempts: int | None = None,
        depends_on: Iterable[int | HasLeaves] | None = None,
        on_parent_failure: statements.OnParentFailure | None = None,
    ) -> Deferrer[P, R]:
        """Job options for the jobs deferred through the returned :class:`Deferrer`, each
        checked here (:mod:`pgtq.validation`): a bad one raises ``InvalidArguments`` naming
        it. ``schedule_in`` counts from the database server's clock when the job is
        inserted; a negative one means due now. ``tags``, ``meta``, ``timeout`` and
        ``max_attempts`` are stored on each job (``Job.tags``, ...). ``depends_on``: job ids
        (or workflow handles: their last jobs) that must succeed first; the job waits
        ``blocked`` until then, and ``on_parent_failure`` (``cancel``, ``run`` or ``hold``)
        says what it does if one ends failed, cancelled or aborted (see docs/workflows.md)."""
        return self.configure_from(
            {
                "queue": queue,
                "priority": priority,
                "schedule_at": schedule_at,
                "schedule_in": schedule_in,
                "lock": lock,
                "queueing_lock": queueing_lock,
                "on_conflict": on_conflict,
                "unique_for": unique_for,
                "concurrency_key": concurrency_key,
                "tags": tags,
                "meta": meta,
                "timeout": timeout,
                "max_attempts": max_attempts,
                "depends_on": depends_on,
                "on_parent_failure": on_parent_failure,
            }
        )

    def configure_from(self, given: Mapping[str, Any]) -> Deferrer[P, R]:
        """:meth:`configure` with its keywords in a mapping (an option None or left out
        keeps its default): the one place job options are checked, also those of each item
        of a per-job ``defer_many``."""
        unknown = sorted(set(given) - set(CONFIGURE_OPTIONS))
        if unknown:
            raise InvalidArguments(
                f"unknown option(s) {unknown}; configure() takes {', '.join(CONFIGURE_OPTIONS)}"
            )
        g = {name: value for name, value in given.items() if value is not None}
        if "schedule_at" in g and "schedule_in" in g:
            raise InvalidArguments("schedule_at, schedule_in: give one of them, not both")
        v = validation
        queue = v.check_queue(g["queue"]) if "queue" in g else self.defaults.queue
        priority = v.check_priority(g["priority"]) if "priority" in g else self.defaults.priority
        schedule_at = v.check_schedule_at(g["schedule_at"]) if "schedule_at" in g else None
        schedule_in = v.schedule_seconds(g["schedule_in"]) if "schedule_in" in g else None
        lock = v.check_key("lock", g.get("lock"))
        queueing_lock = v.check_key("queueing_lock", g.get("queueing_lock"))
        concurrency_key = v.check_key("concurrency_key", g.get("concurrency_key"))
        on_conflict = v.check_on_conflict(g.get("on_conflict", "raise"), queueing_lock)
        unique_for = (
            v.check_unique_for(g["unique_for"], queueing_lock) if "unique_for" in g else None
        )
        options = JobOptions(
            queue=queue,
            priority=priority,
            schedule_at=schedule_at,
            schedule_in=schedule_in,
            lock=lock,
            queueing_lock=queueing_lock,
            on_conflict=cast(OnConflict, on_conflict),
            unique_for=unique_for,
            concurrency_key=concurrency_key,
            tags=v.check_tags(g.get("tags")),
            meta=v.check_meta(g.get("meta"), self.app.max_args_bytes, self.app.codec.dumps),
            timeout=v.check_timeout(g["timeout"]) if "timeout" in g else None,
            max_attempts=(v.check_max_attempts(g["max_attempts"]) if "max_attempts" in g else None),
            depends_on=check_depends_on(g["depends_on"]) if "depends_on" in g else None,
            on_parent_failure=check_on_parent_failure(g.get("on_parent_failure", "cancel")),
        )
        if options.depends_on is not None and queueing_lock is not None:
            raise InvalidArguments(
                "depends_on: a job with dependencies cannot take a queueing_lock"
            )
        return Deferrer(self, options, g)

    def s(self, **kwargs: Any) -> Signature:
        """A job of this task not deferred yet, with these arguments and the task's
        options: a part of ``pgtq.chain(...)`` / ``pgtq.group(...)``."""
        return self._plain().s(**kwargs)

    def _plain(self) -> Deferrer[P, R]:
        """``configure()`` with no options, made once (``dataclasses.replace`` per defer
        showed in the single-enqueue profile)."""
        plain = self._plain_deferrer
        if plain is None or plain.options is not self.defaults:
            plain = self._plain_deferrer = Deferrer(self, self.defaults)
        return plain

    # The task's own defaults; ``configure()`` for anything else. Typed twice: without
    # ``connection=`` mypy checks the arguments against the task's function; with it (a
    # keyword a ParamSpec cannot carry beside the task's own), they are not checked.
    @overload
    def defer(self, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]: ...

    @overload
    def defer(self, *args: Any, connection: Connection | None, **kwargs: Any) -> Deferred[R]: ...

    def defer(self, *args: Any, **kwargs: Any) -> Deferred[R]:
        """Enqueue one job with these keyword arguments; its id. ``connection=``: inside
        your transaction (the job exists once you commit)."""
        return self._plain().defer(*args, **kwargs)

    @overload
    async def defer_async(self, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]: ...

    @overload
    async def defer_async(
        self, *args: Any, connection: AsyncConnection | None, **kwargs: Any
    ) -> Deferred[R]: ...

    async def defer_async(self, *args: Any, **kwargs: Any) -> Deferred[R]:
        """:meth:`defer` from async code (``connection=``: an ``AsyncConnection``)."""
        return await self._plain().defer_async(*args, **kwargs)

    def defer_many(
        self, arguments: Iterable[DeferItem], *, connection: Connection | None = None
    ) -> list[int]:
        """Enqueue one job per mapping of keyword arguments, in one statement; their ids, in
        order. All or none: one bad mapping refuses the call before anything is written.

        An item may be a ``(kwargs, options)`` pair, ``options`` the ``configure()`` keywords
        of that job alone (its own key, schedule, tags, ...): the call is then a per-job
        batch, whose ids are :class:`pgtq.Deferred` s, and in which no key held fails the
        call (``on_conflict="raise"`` acts as ``"skip"``; see :meth:`Deferrer.encode_each`)."""
        return self._plain().defer_many(arguments, connection=connection)

    async def defer_many_async(
        self, arguments: Iterable[DeferItem], *, connection: AsyncConnection | None = None
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


def _no_positional(task: Task[..., Any], args: tuple[Any, ...]) -> None:
    if args:
        raise InvalidArguments(
            f"task {task.name!r} takes keyword arguments only when deferred "
            f"(got {len(args)} positional): write defer(name=value, ...)"
        )


def _has_pairs(items: Sequence[Any]) -> bool:
    """A per-job batch: some item is a ``(kwargs, options)`` pair."""
    return any(isinstance(item, tuple) for item in items)


def resolve_keys(keys: Sequence[tuple[tuple[str, str], bool] | None]) -> list[int]:
    """Per position of a per-job batch, the position whose job it reports: itself, unless
    an other position holds the same key (``EachRow.space()``), for which one job is
    written: the last that replaces (``on_conflict="replace"``), else the first (``skip``
    and ``raise``). ``keys``: per position, its key and whether it replaces, or None.

    So no two rows of one statement touch one key, and the batch reads as its jobs deferred
    one after the other: a skip after the first is its duplicate, a replace overrides it."""
    first: dict[tuple[str, str], int] = {}
    replacing: dict[tuple[str, str], int] = {}
    for n, key in enumerate(keys):
        if key is not None:
            first.setdefault(key[0], n)
            if key[1]:
                replacing[key[0]] = n
    return [
        n if key is None else replacing.get(key[0], first[key[0]]) for n, key in enumerate(keys)
    ]


class HasLeaves(Protocol):
    """A workflow handle: ``depends_on`` waits for its last jobs (``leaves``)."""

    @property
    def leaves(self) -> tuple[int, ...]: ...


def check_depends_on(value: object) -> tuple[int, ...]:
    """Job ids (or handles with ``leaves``), in order, each once."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArguments(
            f"depends_on: a list of job ids or workflow handles, got {type(value).__name__}"
        )
    ids: list[int] = []
    for item in value:
        leaves = getattr(item, "leaves", None)
        found = leaves if leaves is not None else (item,)
        for job_id in found:
            if isinstance(job_id, bool) or not isinstance(job_id, int) or job_id <= 0:
                raise InvalidArguments(f"depends_on: a job id is a positive int, got {job_id!r}")
            ids.append(int(job_id))
    if not ids:
        raise InvalidArguments("depends_on: give at least one job")
    return tuple(dict.fromkeys(ids))


def check_on_parent_failure(value: object) -> statements.OnParentFailure:
    if value not in statements.ON_PARENT_FAILURE:
        raise InvalidArguments(
            f"on_parent_failure: one of {', '.join(statements.ON_PARENT_FAILURE)}, got {value!r}"
        )
    return value


def workflow_row(
    n: int, task_name: str, kwargs: Mapping[str, Any], o: JobOptions
) -> dict[str, Any]:
    """A job of ``insert_workflow`` as its JSON object (``n``: its position)."""
    row: dict[str, Any] = {
        "n": n,
        "task_name": task_name,
        "queue": o.queue,
        "priority": o.priority,
        "args": kwargs,
    }
    for name in ("schedule_in", "lock", "concurrency_key", "tags", "meta", "timeout"):
        value = getattr(o, name)
        if value is not None:
            row[name] = value
    if o.max_attempts is not None:
        row["max_attempts"] = o.max_attempts
    if o.schedule_at is not None:
        row["scheduled_at"] = o.schedule_at.isoformat()
    return row


def each_row(kwargs: Mapping[str, Any], o: JobOptions) -> statements.EachRow:
    """A job of ``insert_each``: its options, and the CTE that writes it."""
    mode: statements.EachMode = "plain"
    if o.queueing_lock is not None:
        mode = "replace" if o.on_conflict == "replace" else "keep"  # raise: keep, then settle
        if o.unique_for is not None:
            mode = "replace_period" if mode == "replace" else "keep_period"
    return statements.EachRow(
        mode=mode,
        queue=o.queue,
        priority=o.priority,
        args=kwargs,
        scheduled_at=o.schedule_at,
        schedule_in=o.schedule_in,
        lock=o.lock,
        queueing_lock=o.queueing_lock,
        concurrency_key=o.concurrency_key,
        unique_for=o.unique_for,
        tags=o.tags,
        meta=o.meta,
        timeout=o.timeout,
        max_attempts=o.max_attempts,
    )


def _deferred(job_id: int) -> Deferred[Any]:
    """``job_id`` as the :class:`Deferred` ``defer`` returns (a keyed defer made one)."""
    return job_id if isinstance(job_id, Deferred) else Deferred(job_id)


class Deferrer(Generic[P, R]):
    """A task with job options fixed: what ``Task.configure()`` returns."""

    def __init__(
        self, task: Task[P, R], options: JobOptions, given: Mapping[str, Any] | None = None
    ) -> None:
        self.task = task
        self.options = options
        #: The ``configure()`` keywords it was made with: what the options of an item of a
        #: per-job ``defer_many`` are laid over.
        self.given: Mapping[str, Any] = given or {}
        self._per_row = options.per_row or options.depends_on is not None

    def encode(self, arguments: Iterable[Mapping[str, Any]]) -> statements.NewJobs:
        """Check and encode jobs before anything is written: the one place defer decides
        (for jobs sharing options ``insert_jobs`` writes: not tags, meta, timeout or
        max_attempts, which ``insert_each`` does).

        With a ``queueing_lock`` at most one job of the call can wait: ``raise`` refuses a
        call of several, ``skip`` inserts the first, ``replace`` the last (the newest wins)."""
        o = self.options
        checked = self._one_key([self._checked(kwargs) for kwargs in arguments])
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

    def _one_key(self, checked: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The jobs of a call sharing one ``queueing_lock``: at most one of them may wait."""
        o = self.options
        if o.queueing_lock is not None and len(checked) > 1:
            if o.on_conflict == "raise":
                raise InvalidArguments(
                    f"queueing_lock: {len(checked)} jobs with one key, of which at most one "
                    "may wait: defer one, or configure(on_conflict='skip' or 'replace')"
                )
            checked = checked[-1:] if o.on_conflict == "replace" else checked[:1]
        return checked

    def encode_each(self, items: Sequence[DeferItem], *, batch: bool) -> statements.EachJobs:
        """Check and encode jobs for ``insert_each``, before anything is written.

        ``batch`` (a per-job ``defer_many``: some item is a ``(kwargs, options)`` pair): each
        item is its own job, with the options it gives laid over this deferrer's
        ``configure()`` keywords (``schedule_at`` and ``schedule_in`` as one), checked by
        :meth:`Task.configure_from`; an error names the item (``item 3: ...``, from 0). A
        repeated key is written once (:func:`resolve_keys`). Else every job takes this
        deferrer's options, as :meth:`encode` has them."""
        if batch:
            made: dict[int, JobOptions] = {}  # one configure() per options mapping given
            jobs = [self._item(n, item, made) for n, item in enumerate(items)]
        else:
            checked = self._one_key([self._checked(cast(Mapping[str, Any], k)) for k in items])
            jobs = [(kwargs, self.options) for kwargs in checked]
        self._check_each([kwargs for kwargs, _ in jobs], batch)
        plain = self.task.app.codec.plain  # the statement's own encoder knows no hook of yours
        rows = [each_row(plain(kwargs), o) for kwargs, o in jobs]
        keys = [(row.space(), row.mode.startswith("replace")) for row in rows]
        reports = resolve_keys([None if key is None else (key, r) for key, r in keys])
        carrier = observers.trace_context()
        return statements.EachJobs.make(
            self.task.name, dumps(carrier) if carrier else None, rows, reports
        )

    def _item(
        self, n: int, item: DeferItem, made: dict[int, JobOptions]
    ) -> tuple[dict[str, Any], JobOptions]:
        """Item ``n`` of a per-job batch: its keyword arguments and options, checked."""
        try:
            if not isinstance(item, tuple):
                return self._checked(item), self.options
            if len(item) != 2:
                raise InvalidArguments(
                    f"a (kwargs, options) pair has two parts, got a tuple of {len(item)}"
                )
            kwargs, given = item
            if not isinstance(given, Mapping):
                raise InvalidArguments(
                    f"options: must be a mapping of configure() options, got {type(given).__name__}"
                )
            options = made.get(id(given))
            if options is None:
                base = dict(self.given)
                if "schedule_at" in given or "schedule_in" in given:  # one schedule
                    base.pop("schedule_at", None)
                    base.pop("schedule_in", None)
                options = self.task.configure_from({**base, **given}).options
                made[id(given)] = options
            return self._checked(kwargs), options
        except InvalidArguments as exc:
            raise InvalidArguments(f"item {n}: {exc}") from None

    def _check_each(self, jobs: list[dict[str, Any]], batch: bool) -> None:
        """The jobs' arguments checked as :meth:`encode` checks them; in a batch, an error
        names the item."""
        if not batch:
            self._dumps(jobs)
            return
        limit, dumps = self.task.app.max_args_bytes, self.task.app.codec.dumps
        try:
            validation.encode_arguments(jobs, limit, dumps)
        except InvalidArguments:
            for n, kwargs in enumerate(jobs):
                try:
                    validation.encode_arguments([kwargs], limit, dumps)
                except InvalidArguments as exc:
                    raise InvalidArguments(f"item {n}: task {self.task.name!r}: {exc}") from None
            raise

    def encoded_arguments(self, items: Sequence[DeferItem]) -> str:
        """The JSON array of these jobs' arguments, each checked as ``defer`` checks it (its
        options too): what an eager run (``pgtq.testing.eager``) hands the task, decoded."""
        if self._per_row or _has_pairs(items):
            self.encode_each(items, batch=_has_pairs(items))
            kwargs = [item[0] if isinstance(item, tuple) else item for item in items]
            return self._dumps([self._checked(k) for k in kwargs])
        return self.encode(cast(list[Mapping[str, Any]], items)).args

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
        app = self.task.app
        try:
            return validation.encode_arguments(checked, app.max_args_bytes, app.codec.dumps)
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

    def _each(self, each: statements.EachJobs) -> statements.Query[list[statements.Written]]:
        return statements.insert_each_jobs(self.task.app.statements, each)

    @overload
    def defer(self, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]: ...

    @overload
    def defer(self, *args: Any, connection: Connection | None, **kwargs: Any) -> Deferred[R]: ...

    def defer(self, *args: Any, **kwargs: Any) -> Deferred[R]:
        """:meth:`Task.defer` with this deferrer's options."""
        _no_positional(self.task, args)
        connection: Connection | None = kwargs.pop("connection", None)
        if self.task.app.eager is not None:  # pgtq.testing.eager: run it here and now
            return cast(Deferred[R], self.task.app.eager.run(self, [kwargs])[0])
        if self._per_row:
            return _deferred(self._defer_each([kwargs], False, connection)[0])
        new = self.encode([kwargs])
        if new.queueing_lock is not None:
            return _deferred(
                self._settle(self.task.app.sync.run(self._keyed(new), connection), 1)[0]
            )
        return Deferred(self.task.app.sync.run(self._insert(new), connection)[0])

    @overload
    async def defer_async(self, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]: ...

    @overload
    async def defer_async(
        self, *args: Any, connection: AsyncConnection | None, **kwargs: Any
    ) -> Deferred[R]: ...

    async def defer_async(self, *args: Any, **kwargs: Any) -> Deferred[R]:
        """:meth:`Task.defer_async` with this deferrer's options."""
        _no_positional(self.task, args)
        connection: AsyncConnection | None = kwargs.pop("connection", None)
        if self.task.app.eager is not None:
            return cast(Deferred[R], (await self.task.app.eager.run_async(self, [kwargs]))[0])
        if self._per_row:
            return _deferred((await self._defer_each_async([kwargs], False, connection))[0])
        new = self.encode([kwargs])
        run = self.task.app.async_connector().run
        if new.queueing_lock is not None:
            return _deferred(self._settle(await run(self._keyed(new), connection), 1)[0])
        return Deferred((await run(self._insert(new), connection))[0])

    def defer_many(
        self, arguments: Iterable[DeferItem], *, connection: Connection | None = None
    ) -> list[int]:
        """:meth:`Task.defer_many` with this deferrer's options."""
        jobs = list(arguments)
        if self.task.app.eager is not None:
            return list(self.task.app.eager.run(self, jobs))
        batch = _has_pairs(jobs)
        if batch or self._per_row:
            return self._defer_each(jobs, batch, connection)
        new = self.encode(cast(list[Mapping[str, Any]], jobs))
        if not new.count:
            return []
        if new.queueing_lock is not None:
            return self._settle(self.task.app.sync.run(self._keyed(new), connection), len(jobs))
        return self.task.app.sync.run(self._insert(new), connection)

    async def defer_many_async(
        self, arguments: Iterable[DeferItem], *, connection: AsyncConnection | None = None
    ) -> list[int]:
        """:meth:`Task.defer_many_async` with this deferrer's options."""
        jobs = list(arguments)
        if self.task.app.eager is not None:
            return list(await self.task.app.eager.run_async(self, jobs))
        batch = _has_pairs(jobs)
        if batch or self._per_row:
            return await self._defer_each_async(jobs, batch, connection)
        new = self.encode(cast(list[Mapping[str, Any]], jobs))
        if not new.count:
            return []
        run = self.task.app.async_connector().run
        if new.queueing_lock is not None:
            return self._settle(await run(self._keyed(new), connection), len(jobs))
        return await run(self._insert(new), connection)

    def s(self, **kwargs: Any) -> Signature:
        """This job, not deferred: a part of ``pgtq.chain`` / ``pgtq.group``."""
        from pgtq.workflows import Signature

        return Signature(self, kwargs)

    def workflow_row(self, n: int, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Job ``n`` of a workflow, checked as ``defer`` checks it, as its JSON object."""
        if self.options.queueing_lock is not None:
            raise InvalidArguments("a job of a workflow cannot take a queueing_lock")
        checked = self._checked(kwargs)
        self._dumps([checked])
        return workflow_row(n, self.task.name, checked, self.options)

    def encode_dependent(self, items: Sequence[DeferItem]) -> statements.WorkflowJobs:
        """Jobs with ``depends_on``: one ``insert_workflow`` row each, every one depending on
        the same parents (checked as ``defer`` checks them)."""
        o = self.options
        assert o.depends_on is not None
        if _has_pairs(items):
            raise InvalidArguments(
                "depends_on: a defer_many of (kwargs, options) pairs cannot depend on jobs; "
                "use pgtq.group(...) or configure(depends_on=...) per call"
            )
        checked = [self._checked(cast(Mapping[str, Any], k)) for k in items]
        self._dumps(checked)
        rows = [workflow_row(n, self.task.name, kwargs, o) for n, kwargs in enumerate(checked)]
        edges = [
            {"child": n, "parent_id": parent, "on_parent_failure": o.on_parent_failure}
            for n in range(len(rows))
            for parent in o.depends_on
        ]
        carrier = observers.trace_context()
        return statements.WorkflowJobs(
            dumps(rows), dumps(edges), dumps(carrier) if carrier else None
        )

    def _dependent(self, ids: list[int], count: int) -> list[int]:
        if len(ids) != count:
            raise InvalidArguments(
                f"depends_on: no job has one of the ids {list(self.options.depends_on or ())}"
            )
        return ids

    def _defer_each(
        self, jobs: list[DeferItem], batch: bool, connection: Connection | None
    ) -> list[int]:
        if self.options.depends_on is not None:
            if not jobs:
                return []
            query = statements.insert_workflow(
                self.task.app.statements, self.encode_dependent(jobs)
            )
            return self._dependent(self.task.app.sync.run(query, connection), len(jobs))
        each = self.encode_each(jobs, batch=batch)
        if not each.reports:
            return []
        written = self.task.app.sync.run(self._each(each), connection)
        return self._settle_each(written, len(jobs), batch)

    async def _defer_each_async(
        self, jobs: list[DeferItem], batch: bool, connection: AsyncConnection | None
    ) -> list[int]:
        if self.options.depends_on is not None:
            if not jobs:
                return []
            query = statements.insert_workflow(
                self.task.app.statements, self.encode_dependent(jobs)
            )
            ids = await self.task.app.async_connector().run(query, connection)
            return self._dependent(ids, len(jobs))
        each = self.encode_each(jobs, batch=batch)
        if not each.reports:
            return []
        written = await self.task.app.async_connector().run(self._each(each), connection)
        return self._settle_each(written, len(jobs), batch)

    def _settle_each(
        self, written: list[statements.Written], positions: int, batch: bool
    ) -> list[int]:
        """What a defer through ``insert_each`` returns, per position of its call. In a
        per-job batch nothing fails: a job whose key was held (whatever its
        ``on_conflict``: ``raise`` acts as ``skip``, and a ``replace`` that may not replace
        the holder keeps it) reports the holder's id, as a duplicate. Else as
        :meth:`_settle` (``raise`` raises ``AlreadyEnqueued``)."""
        if batch:
            return [Deferred(w.id, duplicate=not w.fresh) for w in written]
        o = self.options
        if o.queueing_lock is None:
            return [w.id for w in written]
        w = written[0]
        blocked = o.on_conflict == "replace" and not w.fresh and not w.replaced
        return self._settle(None if blocked else (w.id, w.fresh), positions)

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
        first: Deferred[Any] = Deferred(job_id, duplicate=not fresh)
        return [first, *(Deferred(job_id, duplicate=True) for _ in range(positions - 1))]


#: ``middleware(ctx, call_next)``: runs around a task; ``call_next()`` runs the rest of the
#: chain and the task, and returns its result (an async middleware awaits it).
Middleware = Callable[["JobContext", Callable[[], Any]], Any]


def call_task(task: Task[..., Any], ctx: JobContext, args: Mapping[str, Any]) -> Any:
    """Call the task through its middleware (an async task returns its coroutine)."""
    if not task.middleware:  # the common case, without the chain's closure
        return _call_function(task, ctx, args)

    def call(i: int) -> Any:
        if i == len(task.middleware):
            return _call_function(task, ctx, args)
        return task.middleware[i](ctx, lambda: call(i + 1))

    return call(0)


def _call_function(task: Task[..., Any], ctx: JobContext, args: Mapping[str, Any]) -> Any:
    decode = task.decode_arguments
    if decode is not None:  # a parameter annotated datetime, UUID, a dataclass, ...
        args = decode(args)  # ArgumentDecodeError: this job's failure, naming the parameter
    return task.func(ctx, **args) if task.pass_context else task.func(**args)
