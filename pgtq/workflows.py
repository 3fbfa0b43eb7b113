"""Composition: ``pgtq.chain``, ``pgtq.group`` and ``group(...).then(callback)`` (a chord).

A workflow is a graph of jobs over the same mechanism as ``configure(depends_on=...)``: each
edge a row of ``job_dependencies``, each job with parents inserted ``blocked``. ``defer``
inserts every job and edge of it in one statement (``insert_workflow``), so in one
transaction, and returns a :class:`Workflow` handle: ``wait``, ``status``, ``cancel``, each
with its async twin. Building the graph is pure (:func:`plan`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from pgtq import observers, statements
from pgtq.errors import InvalidArguments, JobTimeout
from pgtq.model import Status, dumps

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.tasks import Deferrer


@dataclass(frozen=True)
class Signature:
    """A job not deferred yet: a task with its options (``configure()``) and arguments.
    Made by ``task.s(**kwargs)`` or ``task.configure(...).s(**kwargs)``; its
    ``on_parent_failure`` (when configured) is that of the edges into it."""

    deferrer: Deferrer[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def app(self) -> App:
        return self.deferrer.task.app


@dataclass(frozen=True)
class _Node:
    """A part of a workflow: its jobs (positions) with no parent inside it (``roots``) and
    with no child inside it (``leaves``)."""

    roots: tuple[int, ...]
    leaves: tuple[int, ...]


@dataclass
class Plan:
    """A workflow's jobs in position order and its edges ``(child, parent position or None,
    parent id or None, on_parent_failure)``: what ``insert_workflow`` writes."""

    jobs: list[Signature] = field(default_factory=list)
    edges: list[tuple[int, int | None, int | None, str]] = field(default_factory=list)
    leaves: tuple[int, ...] = ()


class _Composite:
    """What chains and groups share: deferring, in one statement."""

    parts: tuple[Signature | Chain | Group, ...]
    on_parent_failure: statements.OnParentFailure | None

    def _app(self) -> App:
        first = _signatures(self)
        if not first:
            raise InvalidArguments("a workflow needs at least one job")
        app = first[0].app
        if any(sig.app is not app for sig in first):
            raise InvalidArguments("a workflow's jobs must all be of one app")
        return app

    def defer(self, *, connection: Connection | None = None) -> Workflow:
        """Insert every job of the workflow in one statement; its handle."""
        app = self._app()
        p, query = _query(app, self)
        ids = app.sync.run(query, connection)
        return _handle(app, p, ids)

    async def defer_async(self, *, connection: AsyncConnection | None = None) -> Workflow:
        """:meth:`defer` for async code."""
        app = self._app()
        p, query = _query(app, self)
        ids = await app.async_connector().run(query, connection)
        return _handle(app, p, ids)


@dataclass(frozen=True, init=False)
class Chain(_Composite):
    """Each part runs once the one before has succeeded (its last jobs)."""

    parts: tuple[Signature | Chain | Group, ...]
    on_parent_failure: statements.OnParentFailure | None

    def __init__(
        self,
        *parts: Signature | Chain | Group,
        on_parent_failure: statements.OnParentFailure | None = None,
    ) -> None:
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "on_parent_failure", on_parent_failure)


@dataclass(frozen=True, init=False)
class Group(_Composite):
    """Parts that run side by side; ``then(callback)`` runs the callback once every part
    has succeeded (a chord), ``ctx.parent_results()`` giving their results."""

    parts: tuple[Signature | Chain | Group, ...]
    on_parent_failure: statements.OnParentFailure | None

    def __init__(
        self,
        *parts: Signature | Chain | Group,
        on_parent_failure: statements.OnParentFailure | None = None,
    ) -> None:
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "on_parent_failure", on_parent_failure)

    def then(
        self,
        callback: Signature | Chain | Group,
        *,
        on_parent_failure: statements.OnParentFailure | None = None,
    ) -> Chain:
        """The chord: ``callback`` after every part (``on_parent_failure="run"``: after
        every part ended, whatever its end)."""
        return Chain(self, callback, on_parent_failure=on_parent_failure or self.on_parent_failure)


def chain(
    *parts: Signature | Chain | Group, on_parent_failure: statements.OnParentFailure | None = None
) -> Chain:
    """``chain(a.s(x=1), b.s(), c.s())``: a, then b, then c (each after the one before
    succeeded; what a failure does: ``on_parent_failure``, default ``cancel``)."""
    return Chain(*parts, on_parent_failure=on_parent_failure)


def group(
    *parts: Signature | Chain | Group, on_parent_failure: statements.OnParentFailure | None = None
) -> Group:
    """``group(a.s(), b.s())``: side by side; ``.then(callback)`` for a chord."""
    return Group(*parts, on_parent_failure=on_parent_failure)


def _signatures(part: Signature | _Composite) -> list[Signature]:
    if isinstance(part, Signature):
        return [part]
    return [sig for p in part.parts for sig in _signatures(p)]


def plan(workflow: _Composite) -> Plan:
    """The jobs and edges of a workflow (pure)."""
    p = Plan()
    node = _add(p, workflow, workflow.on_parent_failure or "cancel")
    p.leaves = node.leaves
    return p


def _add(p: Plan, part: Signature | _Composite, policy: str) -> _Node:
    if isinstance(part, Signature):
        n = len(p.jobs)
        p.jobs.append(part)
        o = part.deferrer.options
        for parent_id in o.depends_on or ():
            p.edges.append((n, None, parent_id, _edge_policy(part, policy)))
        return _Node((n,), (n,))
    policy = part.on_parent_failure or policy
    if not part.parts:
        raise InvalidArguments(f"an empty {type(part).__name__.lower()}")
    nodes: list[_Node] = []
    for sub in part.parts:
        node = _add(p, sub, policy)
        if isinstance(part, Chain) and nodes:
            for child in node.roots:
                child_policy = _edge_policy(p.jobs[child], policy)
                p.edges.extend((child, parent, None, child_policy) for parent in nodes[-1].leaves)
        nodes.append(node)
    if isinstance(part, Chain):
        return _Node(nodes[0].roots, nodes[-1].leaves)
    return _Node(
        tuple(n for node in nodes for n in node.roots),
        tuple(n for node in nodes for n in node.leaves),
    )


def _edge_policy(sig: Signature, policy: str) -> str:
    """A job configured with ``on_parent_failure`` keeps it on its edges; else the
    workflow's."""
    return (
        sig.deferrer.options.on_parent_failure
        if "on_parent_failure" in sig.deferrer.given
        else policy
    )


def _query(app: App, workflow: _Composite) -> tuple[Plan, statements.Query[list[int]]]:
    """Check and encode every job as ``defer`` does, before anything is written."""
    p = plan(workflow)
    rows = []
    for n, sig in enumerate(p.jobs):
        try:
            rows.append(sig.deferrer.workflow_row(n, sig.kwargs))
        except InvalidArguments as exc:
            raise InvalidArguments(f"job {n} of the workflow: {exc}") from None
    edges = [
        {"child": c, "parent": pn, "parent_id": pid, "on_parent_failure": policy}
        for c, pn, pid, policy in p.edges
    ]
    carrier = observers.trace_context()
    params = statements.WorkflowJobs(dumps(rows), dumps(edges), dumps(carrier) if carrier else None)
    return p, statements.insert_workflow(app.statements, params)


def _handle(app: App, p: Plan, ids: Sequence[int]) -> Workflow:
    if len(ids) != len(p.jobs):
        raise InvalidArguments("depends_on: no job has one of the ids the workflow depends on")
    return Workflow(app, ids[0], tuple(ids), tuple(ids[n] for n in p.leaves))


@dataclass(frozen=True)
class Workflow:
    """A deferred workflow: its id (``Job.workflow_id``, ``jobs.list(workflow=...)``), its
    jobs in the order given, and its last jobs (``leaves``: what ``wait`` returns the
    results of, and what ``depends_on=[handle]`` waits for)."""

    app: App
    id: int
    job_ids: tuple[int, ...]
    leaves: tuple[int, ...]

    def status(self) -> dict[Status, int]:
        """How many of its jobs have each status."""
        return {s: n for s, (n, _) in self.app.jobs.counts_of(self.job_ids).items()}

    async def status_async(self) -> dict[Status, int]:
        counts = await self.app.jobs.counts_of_async(self.job_ids)
        return {s: n for s, (n, _) in counts.items()}

    def wait(self, timeout: float | None = None) -> Any:
        """Block until its last jobs ended: the result of the last one (a chain, a chord),
        or the list of them (a group); JobFailed if one did not succeed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = [self.app.jobs.wait(i, timeout=_left(deadline)) for i in self.leaves]
        return results[0] if len(results) == 1 else results

    async def wait_async(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for job_id in self.leaves:
            results.append(await self.app.jobs.wait_async(job_id, timeout=_left(deadline)))
        return results[0] if len(results) == 1 else results

    def cancel(self) -> list[int]:
        """Cancel its waiting and blocked jobs, ask its running ones to stop: the ids."""
        return self.app.jobs.abort_many(ids=self.job_ids)

    async def cancel_async(self) -> list[int]:
        return await self.app.jobs.abort_many_async(ids=self.job_ids)


def _left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise JobTimeout("the workflow did not end in time")
    return left


__all__ = ["Batch", "Chain", "Group", "Signature", "Workflow", "chain", "group", "plan"]


class Batch:
    """Jobs deferred over time, with callbacks that run once: ``on_complete`` after every
    member ended (whatever its end: ``ctx.parent_results()`` has None for a member that did
    not succeed), ``on_failure`` after every member ended if one did not succeed (else it
    ends ``cancelled``). The batch stays open until closed (the end of its ``with`` block,
    or :meth:`close`): a callback waits for the close and for every member.

    Built on the workflows' edges: the batch is a record (a job of task ``pgtq.batch`` no
    worker runs, :attr:`id`) that is each callback's first parent; each member is one more
    parent of each callback; closing ends the record, which settles that edge. So the
    callbacks are released by the statement that settles their last edge, exactly once
    however many workers finish the last members at once. A block that raises closes the
    batch as failed (``on_failure`` runs, ``on_complete`` too)."""

    def __init__(
        self,
        app: App,
        on_complete: Signature | None = None,
        on_failure: Signature | None = None,
        *,
        batch_id: int | None = None,
        callbacks: Mapping[int, str] | None = None,
    ) -> None:
        self.app = app
        self._on_complete, self._on_failure = on_complete, on_failure
        #: The batch's record (its id names the batch: ``Batch.of(app, id)``).
        self.id: int | None = batch_id
        # The callbacks' job ids, each with the policy of its edges (``run``: on_complete,
        # ``failure``: on_failure).
        self._callbacks: dict[int, str] = dict(callbacks or {})

    @property
    def callbacks(self) -> tuple[int, ...]:
        """The callbacks' job ids (on_complete first)."""
        return tuple(self._callbacks)

    @classmethod
    def of(cls, app: App, batch_id: int) -> Batch:
        """A batch opened elsewhere (another process), to defer more or close it."""
        return cls(app, batch_id=batch_id, callbacks=_callbacks(app.jobs.dependencies(batch_id)))

    @classmethod
    async def of_async(cls, app: App, batch_id: int) -> Batch:
        edges = await app.jobs.dependencies_async(batch_id)
        return cls(app, batch_id=batch_id, callbacks=_callbacks(edges))

    # -- open ------------------------------------------------------------------------------

    def _opening(self) -> statements.Query[list[int]]:
        if self.id is not None:
            raise InvalidArguments(f"batch {self.id} is open already")
        rows: list[dict[str, Any]] = [
            {"n": 0, "task_name": statements.BATCH_TASK, "queue": "default", "priority": 0,
             "args": {}, "held": 1}
        ]  # fmt: skip
        edges: list[dict[str, Any]] = []
        for callback, policy in ((self._on_complete, "run"), (self._on_failure, "failure")):
            if callback is None:
                continue
            n = len(rows)
            rows.append(callback.deferrer.workflow_row(n, callback.kwargs))
            edges.append({"child": n, "parent": 0, "on_parent_failure": policy})
        params = statements.WorkflowJobs(dumps(rows), dumps(edges))
        return statements.insert_workflow(self.app.statements, params)

    def _opened(self, ids: list[int]) -> Batch:
        policies = [p for c, p in ((self._on_complete, "run"), (self._on_failure, "failure")) if c]
        self.id, self._callbacks = ids[0], dict(zip(ids[1:], policies, strict=True))
        return self

    def open(self, *, connection: Connection | None = None) -> Batch:
        """Write the batch's record and callbacks (one statement)."""
        return self._opened(self.app.sync.run(self._opening(), connection))

    async def open_async(self, *, connection: AsyncConnection | None = None) -> Batch:
        return self._opened(await self.app.async_connector().run(self._opening(), connection))

    def __enter__(self) -> Batch:
        return self.open() if self.id is None else self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(failed=kind is not None)

    async def __aenter__(self) -> Batch:
        return await self.open_async() if self.id is None else self

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        await self.close_async(failed=kind is not None)

    # -- members ---------------------------------------------------------------------------

    def _member(self, part: Signature) -> tuple[Plan, statements.Query[list[int]]]:
        if self.id is None:
            raise InvalidArguments("open the batch first (with app.batch(...) as b)")
        row = part.deferrer.workflow_row(0, part.kwargs)
        edges: list[dict[str, Any]] = [
            {"child": 0, "parent_id": parent, "on_parent_failure": _edge_policy(part, "cancel")}
            for parent in part.deferrer.options.depends_on or ()
        ]
        for callback, policy in self._callbacks.items():
            edges.append({"child_id": callback, "parent": 0, "on_parent_failure": policy})
        params = statements.WorkflowJobs(dumps([row]), dumps(edges), open_batch=self.id)
        return Plan([part], [], (0,)), statements.insert_workflow(self.app.statements, params)

    def defer(self, part: Signature, *, connection: Connection | None = None) -> int:
        """Defer a member (``task.s(...)``): one statement; InvalidArguments once closed."""
        _, query = self._member(part)
        return self._added(self.app.sync.run(query, connection))

    async def defer_async(
        self, part: Signature, *, connection: AsyncConnection | None = None
    ) -> int:
        _, query = self._member(part)
        return self._added(await self.app.async_connector().run(query, connection))

    def _added(self, ids: list[int]) -> int:
        if not ids:
            raise InvalidArguments(f"batch {self.id} is closed: it takes no more jobs")
        return ids[0]

    # -- close -----------------------------------------------------------------------------

    def close(self, *, failed: bool = False) -> bool:
        """No more members: the callbacks run once every member ended. False if it was
        closed already."""
        assert self.id is not None, "the batch was never opened"
        return self.app.sync.run(statements.close_batch(self.app.statements, self.id, failed))

    async def close_async(self, *, failed: bool = False) -> bool:
        assert self.id is not None, "the batch was never opened"
        query = statements.close_batch(self.app.statements, self.id, failed)
        return await self.app.async_connector().run(query)


def _callbacks(edges: Sequence[statements.Dependency]) -> dict[int, str]:
    """A batch record's children (its callbacks) with their edges' policy."""
    return {d.id: d.on_parent_failure for d in edges if d.kind == "child"}
