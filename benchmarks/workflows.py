"""The workflow figures' backlogs (``--figures workflow``): chords and chains of no-op jobs.

The backlog is the command-line app's own task (``benchmarks.apps:noop_async``, the one
``pgtq worker benchmarks.apps:app`` runs), deferred with pgtq's public API as a user defers a
workflow: ``pgtq.group(*members).then(callback).defer_async()`` for a chord,
``pgtq.chain(*steps).defer_async()`` for a chain, one statement per workflow. Every job has
its own ``n`` (0 to jobs - 1), as in the plain backlog, so the driver's check of a burn-down
(every ``n`` once, every row ``succeeded`` with one attempt) holds as it is.

What only a workflow can get wrong is checked from the rows after the drain
(:func:`check_drained`): every edge's child started after its parent finished, no child
still counts a parent, and the shape is the one deferred (so a figure cannot be measured on
a backlog that lost its edges). :func:`check_filled` checks the shape before the drain: the
jobs waiting on a parent are ``blocked``, the others ``todo``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pgtq
from benchmarks.apps import app, noop_async
from benchmarks.libs.base import Fetch

Shape = Literal["chords", "chains"]

#: Jobs per workflow: a chord is 99 members and their callback, a chain 10 steps.
WIDTH: dict[Shape, int] = {"chords": 100, "chains": 10}


@dataclass(frozen=True)
class Expected:
    """What a backlog of ``jobs`` in workflows of one shape holds, counted from its spans."""

    workflows: int
    edges: int  # rows of job_dependencies
    children: int  # jobs with a parent: blocked until it is released
    max_parents: int  # a chord's callback: its members; a chain's step: the one before

    def as_dict(self) -> dict[str, int]:
        return {
            "workflows": self.workflows,
            "edges": self.edges,
            "children": self.children,
            "max_parents": self.max_parents,
        }


def spans(jobs: int, width: int) -> list[range]:
    """The ``n`` of each workflow: consecutive runs of ``width`` (the last may be shorter)."""
    return [range(start, min(start + width, jobs)) for start in range(0, jobs, width)]


def workflow(shape: Shape, ns: range) -> pgtq.Chain:
    """One workflow over ``ns``: a chord (all but the last ``n`` as members, the last as the
    callback) or a chain (each ``n`` after the one before). A span of one is a lone job."""
    steps = [noop_async.s(n=n) for n in ns]
    if shape == "chords" and len(steps) > 1:
        return pgtq.group(*steps[:-1]).then(steps[-1])
    return pgtq.chain(*steps)


def expected(shape: Shape, jobs: int) -> Expected:
    """The shape a correct fill has: the driver compares the rows with it."""
    sizes = [len(s) for s in spans(jobs, WIDTH[shape])]
    edges = sum(k - 1 for k in sizes)
    if shape == "chords":
        children = sum(1 for k in sizes if k > 1)
        most = max((k - 1 for k in sizes), default=0)
    else:
        children, most = edges, 1 if edges else 0
    return Expected(len(sizes), edges, children, most)


async def defer(dsn: str, shape: Shape, jobs: int) -> None:
    """Defer the backlog into ``dsn`` with the app the worker loads, one workflow at a time
    (the app pointed there for the fill only: the driver process may fill many databases)."""
    with app.pointed_at(schema=app.schema, dsn=dsn):
        try:
            for ns in spans(jobs, WIDTH[shape]):
                await workflow(shape, ns).defer_async()
        finally:
            await app.close_loop_connector()


def check_filled(fetch: Fetch, shape: Shape, jobs: int) -> list[str]:
    """Before the drain: the children are ``blocked``, every other job ``todo``."""
    want = expected(shape, jobs)
    blocked, todo = fetch(
        "SELECT count(*) FILTER (WHERE status = 'blocked'),"
        " count(*) FILTER (WHERE status = 'todo') FROM pgtq.jobs"
    )
    if (blocked, todo) != (want.children, jobs - want.children):
        return [
            f"after the fill: {blocked} blocked and {todo} todo jobs, expected"
            f" {want.children} and {jobs - want.children}"
        ]
    return []


#: Per edge, joined to both rows: whether the child started before its parent finished (or
#: either time is missing), and the gap from the parent's end to the child's start.
EDGES_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE c.started_at IS NULL OR p.finished_at IS NULL
                        OR c.started_at < p.finished_at),
       count(DISTINCT e.child_id),
       extract(epoch FROM percentile_cont(0.5)
               WITHIN GROUP (ORDER BY c.started_at - p.finished_at))::float8,
       (SELECT count(*) FROM pgtq.job_dependencies),
       (SELECT coalesce(max(k), 0) FROM
          (SELECT count(*) AS k FROM pgtq.job_dependencies GROUP BY child_id) AS per_child),
       (SELECT count(*) FROM pgtq.jobs WHERE coalesce(pending_parents, 0) <> 0)
FROM pgtq.job_dependencies AS e
JOIN pgtq.jobs AS p ON p.id = e.parent_id
JOIN pgtq.jobs AS c ON c.id = e.child_id
"""


def check_drained(fetch: Fetch, shape: Shape, jobs: int) -> tuple[list[str], dict[str, Any]]:
    """After the drain, from the rows: no child started before a parent finished, none still
    counts a parent, the edges are the ones deferred. Also the median release gap (a parent's
    ``finished_at`` to its child's ``started_at``), for the record."""
    want = expected(shape, jobs)
    joined, early, children, gap, edges, most, pending = fetch(EDGES_SQL)
    problems = []
    if early:
        problems.append(f"{early} edge(s) whose child started before its parent finished")
    if pending:
        problems.append(f"{pending} job(s) still counting a pending parent")
    got = (edges, joined, children, most)
    if got != (want.edges, want.edges, want.children, want.max_parents):
        problems.append(
            f"edges {edges} ({joined} joined to both rows), children {children}, at most"
            f" {most} parents a child; expected {want.edges}, {want.children},"
            f" {want.max_parents}"
        )
    facts = {"release_gap_p50_ms": None if gap is None else round(gap * 1000, 3)}
    return problems, facts
