"""Workflows (issue 24): dependencies, the ``blocked`` status, release by the completion
statement, failure propagation (cancel, run, hold), retry resuming, ``ctx.parent_results``;
both sides, against PostgreSQL."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

import pgtq
from pgtq.model import Status
from tests.conftest import libpq
from tests.sides import Side
from tests.test_operations import SQL


def make_tasks(app: pgtq.App, runs: list[tuple[str, Any]]) -> dict[str, Any]:
    @app.task()
    def ok(ctx: pgtq.JobContext, n: int = 0) -> int:
        runs.append(("ok", n))
        return n

    @app.task(retry=None)
    def boom(ctx: pgtq.JobContext, n: int = 0) -> None:
        runs.append(("boom", n))
        raise RuntimeError("boom")

    @app.task()
    def gather(ctx: pgtq.JobContext, n: int = 0) -> list[Any]:
        results = ctx.parent_results()
        runs.append(("gather", results))
        return list(results.values())

    @app.task()
    async def gather_async(ctx: pgtq.JobContext, n: int = 0) -> list[Any]:
        results = await ctx.parent_results_async()
        runs.append(("gather_async", results))
        return list(results.values())

    return {"ok": ok, "boom": boom, "gather": gather, "gather_async": gather_async}


async def status(side: Side, app: pgtq.App, job_id: int) -> Status:
    job = await side.get(app, job_id)
    assert job is not None
    return job.status


async def test_a_child_waits_blocked_and_runs_after_its_parents(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    a = await side.defer(t["ok"], n=1)
    b = await side.defer(t["ok"], n=2)
    child = await side.defer(t["gather"].configure(depends_on=[a, b]))
    assert await status(side, app, child) is Status.BLOCKED
    assert sql("SELECT pending_parents FROM pgtq.jobs WHERE id = %s", child) == [(2,)]
    assert sql("SELECT children FROM pgtq.jobs WHERE id IN (%s, %s)", a, b) == [(1,), (1,)]
    await side.run_worker(app, wait=False)
    assert await status(side, app, child) is Status.SUCCEEDED
    assert runs[-1] == ("gather", {a: 1, b: 2})
    (job,) = [j for j in await side.call(app.jobs, "list") if j.id == child]
    assert job.workflow_id == a


async def test_async_task_reads_its_parents_results(app: pgtq.App, side: Side) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    a = await side.defer(t["ok"], n=5)
    child = await side.defer(t["gather_async"].configure(depends_on=[a]))
    await side.run_worker(app, wait=False)
    assert await status(side, app, child) is Status.SUCCEEDED
    assert ("gather_async", {a: 5}) in runs


async def test_a_parent_already_succeeded_counts_as_settled(app: pgtq.App, side: Side) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    a = await side.defer(t["ok"], n=1)
    await side.run_worker(app, wait=False)
    child = await side.defer(t["ok"].configure(depends_on=[a]), n=2)
    assert await status(side, app, child) is Status.TODO


async def test_unknown_parent_writes_nothing(app: pgtq.App, side: Side, sql: SQL) -> None:
    t = make_tasks(app, [])
    a = await side.defer(t["ok"])
    with pytest.raises(pgtq.InvalidArguments, match="depends_on"):
        await side.defer(t["ok"].configure(depends_on=[a, 10**9]))
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(1,)]
    assert sql("SELECT children FROM pgtq.jobs WHERE id = %s", a) == [(None,)]


@pytest.mark.parametrize(
    ("policy", "child_status", "grandchild_status"),
    [
        ("cancel", Status.CANCELLED, Status.CANCELLED),
        ("run", Status.SUCCEEDED, Status.SUCCEEDED),
        ("hold", Status.BLOCKED, Status.BLOCKED),
    ],
)
async def test_a_failed_parent_propagates_as_its_edge_says(
    app: pgtq.App,
    side: Side,
    policy: pgtq.statements.OnParentFailure,
    child_status: Status,
    grandchild_status: Status,
) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    bad = await side.defer(t["boom"])
    child = await side.defer(t["ok"].configure(depends_on=[bad], on_parent_failure=policy), n=1)
    grandchild = await side.defer(t["ok"].configure(depends_on=[child]), n=2)
    await side.run_worker(app, wait=False)
    assert await status(side, app, bad) is Status.FAILED
    assert await status(side, app, child) is child_status
    assert await status(side, app, grandchild) is grandchild_status
    if policy == "cancel":
        job = await side.get(app, child)
        assert job is not None and job.error is not None
        assert job.error["type"] == "ParentFailed"


async def test_retrying_a_failed_parent_resumes_a_held_child(app: pgtq.App, side: Side) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    flaky_calls: list[int] = []

    @app.task(retry=None)
    def flaky() -> str:
        flaky_calls.append(1)
        if len(flaky_calls) == 1:
            raise RuntimeError("first time")
        return "fine"

    parent = await side.defer(flaky)
    child = await side.defer(t["gather"].configure(depends_on=[parent], on_parent_failure="hold"))
    await side.run_worker(app, wait=False)
    assert await status(side, app, child) is Status.BLOCKED
    assert await side.retry(app, parent)
    await side.run_worker(app, wait=False)
    assert await status(side, app, parent) is Status.SUCCEEDED
    assert await status(side, app, child) is Status.SUCCEEDED
    assert runs[-1] == ("gather", {parent: "fine"})


async def test_retrying_a_parent_counts_a_run_edge_again(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    t = make_tasks(app, [])
    bad = await side.defer(t["boom"])
    slow = await side.defer(t["ok"].configure(queue="later"))
    child = await side.defer(t["ok"].configure(depends_on=[bad, slow], on_parent_failure="run"))
    await side.run_worker(app, wait=False, queues=["default"])
    assert sql("SELECT status, pending_parents FROM pgtq.jobs WHERE id = %s", child) == [
        ("blocked", 1)
    ]
    assert await side.retry(app, bad)
    assert sql("SELECT status, pending_parents FROM pgtq.jobs WHERE id = %s", child) == [
        ("blocked", 2)
    ]


def flaky_task(app: pgtq.App, name: str, fails: int = 1) -> Any:
    """A task that fails its first ``fails`` runs, then returns ``name``."""
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= fails:
            raise RuntimeError(f"{name} fails")
        return name

    return app.task(name=name, retry=None)(flaky)


def counts(sql: SQL, *ids: int) -> list[tuple[str, int | None]]:
    return [
        sql("SELECT status, pending_parents FROM pgtq.jobs WHERE id = %s", job_id)[0]
        for job_id in ids
    ]


async def test_retrying_a_failed_parent_restores_what_its_failure_cancelled(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """A diamond below the parent, and a job it cancelled through a child: all go back to
    blocked, with their counts, and run in order once the parent succeeds."""
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    parent = await side.defer(flaky_task(app, "parent"))
    left = await side.defer(t["ok"].configure(depends_on=[parent]), n=1)
    right = await side.defer(t["ok"].configure(depends_on=[parent]), n=2)
    join = await side.defer(t["gather"].configure(depends_on=[left, right]))
    user_cancelled = await side.defer(t["ok"].configure(depends_on=[parent], queue="other"))
    await side.call(app.jobs, "cancel", user_cancelled)
    await side.run_worker(app, wait=False)
    assert counts(sql, left, right, join) == [("cancelled", 1), ("cancelled", 1), ("cancelled", 2)]

    assert await side.retry(app, parent)
    assert counts(sql, parent, left, right, join) == [
        ("todo", None),
        ("blocked", 1),
        ("blocked", 1),
        ("blocked", 2),
    ]
    assert (await side.get(app, join)).error is None  # type: ignore[union-attr]
    assert counts(sql, user_cancelled) == [("cancelled", 1)]  # not the failure's doing
    await side.run_worker(app, wait=False)
    assert [await status(side, app, i) for i in (parent, left, right, join)] == [
        Status.SUCCEEDED
    ] * 4
    assert sorted(runs[:2]) == [("ok", 1), ("ok", 2)]
    assert runs[2:] == [("gather", {left: 1, right: 2})]


async def test_a_child_keeps_counting_its_parents_while_cancelled(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """A parent that succeeds after its sibling's failure cancelled the child is counted,
    so the failed parent's retry leaves the child waiting for that one alone."""
    t = make_tasks(app, [])
    bad = await side.defer(flaky_task(app, "bad"))
    later = await side.defer(t["ok"].configure(queue="later"))
    child = await side.defer(t["ok"].configure(depends_on=[bad, later]), n=3)
    await side.run_worker(app, wait=False, queues=["default"])
    assert counts(sql, child) == [("cancelled", 2)]
    await side.run_worker(app, wait=False, queues=["later"])
    assert counts(sql, child) == [("cancelled", 1)]
    assert await side.retry(app, bad)
    assert counts(sql, child) == [("blocked", 1)]
    await side.run_worker(app, wait=False)
    assert await status(side, app, child) is Status.SUCCEEDED


async def test_a_child_another_failed_parent_cancels_stays_cancelled(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """Retrying one of two failed parents leaves their child (and what it cancelled)
    cancelled; retrying the other then restores both."""
    t = make_tasks(app, [])
    one = await side.defer(flaky_task(app, "one"))
    two = await side.defer(flaky_task(app, "two"))
    child = await side.defer(t["ok"].configure(depends_on=[one, two]))
    grandchild = await side.defer(t["ok"].configure(depends_on=[child]))
    runs_anyway = await side.defer(t["ok"].configure(depends_on=[child], on_parent_failure="run"))
    await side.run_worker(app, wait=False)
    assert counts(sql, child, grandchild) == [("cancelled", 2), ("cancelled", 1)]
    assert await status(side, app, runs_anyway) is Status.SUCCEEDED  # its edge settled once

    assert await side.retry(app, one)
    assert counts(sql, child, grandchild) == [("cancelled", 2), ("cancelled", 1)]
    assert await side.retry(app, two)
    assert counts(sql, one, two, child, grandchild) == [
        ("todo", None),
        ("todo", None),
        ("blocked", 2),
        ("blocked", 1),
    ]
    await side.run_worker(app, wait=False)
    assert [await status(side, app, i) for i in (child, grandchild, runs_anyway)] == [
        Status.SUCCEEDED
    ] * 3


async def test_a_bulk_retry_resumes_each_workflow_once(app: pgtq.App, side: Side, sql: SQL) -> None:
    """``retry_many`` of every failed job: the parents of a shared child retried in one
    statement restore it once."""
    t = make_tasks(app, [])
    one = await side.defer(flaky_task(app, "one"))
    two = await side.defer(flaky_task(app, "two"))
    child = await side.defer(t["ok"].configure(depends_on=[one, two]))
    await side.run_worker(app, wait=False)
    assert sorted(await side.call(app.jobs, "retry_many", status="failed")) == [one, two]
    assert counts(sql, child) == [("blocked", 2)]
    await side.run_worker(app, wait=False)
    assert await status(side, app, child) is Status.SUCCEEDED


async def test_deleting_a_parent_settles_its_children_and_its_edges(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """A parent deleted before it ran counts as cancelled (no child waits for it forever);
    one that failed cancels the children it held; the edges go with their parent."""
    t = make_tasks(app, [])
    waiting = await side.defer(t["ok"].configure(queue="never"))
    child = await side.defer(t["ok"].configure(depends_on=[waiting]))
    runs_anyway = await side.defer(t["ok"].configure(depends_on=[waiting], on_parent_failure="run"))
    bad = await side.defer(t["boom"])
    held = await side.defer(t["ok"].configure(depends_on=[bad], on_parent_failure="hold"))
    await side.run_worker(app, wait=False, queues=["default"])
    assert counts(sql, held) == [("blocked", 1)]

    assert await side.call(app.jobs, "delete_many", ids=[waiting]) == [waiting]
    assert counts(sql, child, runs_anyway) == [("cancelled", 1), ("todo", 0)]
    assert sql("SELECT count(*) FROM pgtq.job_dependencies WHERE parent_id = %s", waiting) == [(0,)]
    sql("UPDATE pgtq.jobs SET finished_at = now() - interval '2 days' WHERE id = %s", bad)
    assert await side.call(app.jobs, "delete_old_jobs", 3600, include_failed=True) == 1
    assert counts(sql, held) == [("cancelled", 1)]
    assert sql("SELECT count(*) FROM pgtq.job_dependencies WHERE parent_id = %s", bad) == [(0,)]


async def test_cancelling_a_parent_cancels_its_blocked_children(app: pgtq.App, side: Side) -> None:
    t = make_tasks(app, [])
    parent = await side.defer(t["ok"])
    child = await side.defer(t["ok"].configure(depends_on=[parent]))
    held = await side.defer(t["ok"].configure(depends_on=[parent], on_parent_failure="hold"))
    await side.call(app.jobs, "cancel", parent)
    assert await status(side, app, child) is Status.CANCELLED
    assert await status(side, app, held) is Status.BLOCKED
    await side.abort(app, held)  # a blocked job can be cancelled itself
    assert await status(side, app, held) is Status.CANCELLED


async def test_jobs_without_children_are_written_by_the_plain_statement(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    """The plain completion refuses a job with children (the worker writes it with the
    releasing variant): checked on the statements themselves."""
    s = app.statements
    t = make_tasks(app, [])
    parent = await side.defer(t["ok"])
    await side.defer(t["ok"].configure(depends_on=[parent]))
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w', attempts = 1 WHERE id = %s", parent
    )
    outcomes = pgtq.statements.Outcomes.empty()
    outcomes.add(parent, Status.SUCCEEDED, "1", attempt=1)
    written = app.sync.run(pgtq.statements.complete_jobs(s, "w", outcomes))
    assert written == []
    rest = pgtq.statements.refused_outcomes(outcomes, written)
    assert rest is not None and rest.ids == [parent]
    again = app.sync.run(pgtq.statements.complete_jobs(s, "w", rest, releasing=True))
    assert again == [parent]
    assert sql("SELECT status FROM pgtq.jobs ORDER BY id") == [("succeeded",), ("todo",)]


# -- composition: chain, group, then ------------------------------------------------------


def test_plan_of_a_chain_of_a_group_and_a_callback() -> None:
    app = pgtq.App("postgresql://unused/none")
    t = make_tasks(app, [])
    ok = t["ok"]
    p = pgtq.workflows.plan(pgtq.chain(ok.s(n=0), pgtq.group(ok.s(n=1), ok.s(n=2)), ok.s(n=3)))
    assert [sig.kwargs["n"] for sig in p.jobs] == [0, 1, 2, 3]
    assert sorted((c, parent) for c, parent, _, _ in p.edges) == [(1, 0), (2, 0), (3, 1), (3, 2)]
    assert p.leaves == (3,)
    chord = pgtq.group(ok.s(n=0), ok.s(n=1)).then(ok.configure(on_parent_failure="run").s(n=2))
    p = pgtq.workflows.plan(chord)
    assert {policy for *_, policy in p.edges} == {"run"}
    assert p.leaves == (2,)


async def test_chain_runs_in_order_and_passes_results(app: pgtq.App, side: Side, sql: SQL) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    flow = pgtq.chain(t["ok"].s(n=1), t["gather"].s(), t["gather"].s())
    handle = await side.call(flow, "defer")
    assert len(handle.job_ids) == 3 and handle.id == handle.job_ids[0]
    assert sql("SELECT status FROM pgtq.jobs ORDER BY id") == [
        ("todo",),
        ("blocked",),
        ("blocked",),
    ]
    assert await side.call(handle, "status") == {Status.TODO: 1, Status.BLOCKED: 2}
    await side.run_worker(app, wait=False)
    assert await side.call(handle, "wait", timeout=10) == [[1]]
    first, second, _ = handle.job_ids
    assert runs == [("ok", 1), ("gather", {first: 1}), ("gather", {second: [1]})]
    listed = await side.call(app.jobs, "list", workflow=handle.id)
    assert [j.id for j in listed] == list(handle.job_ids)


async def test_group_then_callback_is_a_chord(app: pgtq.App, side: Side) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    members = [t["ok"].s(n=i) for i in range(5)]
    handle = await side.call(pgtq.group(*members).then(t["gather"].s()), "defer")
    await side.run_worker(app, wait=False)
    assert await side.call(handle, "wait", timeout=10) == [0, 1, 2, 3, 4]
    assert [r for r in runs if r[0] == "gather"] == [
        ("gather", dict(zip(handle.job_ids[:5], range(5), strict=True)))
    ]


async def test_a_group_waits_for_every_member(app: pgtq.App, side: Side) -> None:
    t = make_tasks(app, [])
    handle = await side.call(pgtq.group(t["ok"].s(n=1), t["ok"].s(n=2)), "defer")
    await side.run_worker(app, wait=False)
    assert await side.call(handle, "wait", timeout=10) == [1, 2]


async def test_cancelling_a_workflow_cancels_its_jobs(app: pgtq.App, side: Side) -> None:
    t = make_tasks(app, [])
    handle = await side.call(pgtq.chain(t["ok"].s(), t["ok"].s(), t["ok"].s()), "defer")
    assert sorted(await side.call(handle, "cancel")) == list(handle.job_ids)
    assert await side.call(handle, "status") == {Status.CANCELLED: 3}


async def test_a_workflow_is_one_transaction(app: pgtq.App, side: Side, sql: SQL) -> None:
    """A bad job anywhere in it: nothing of it is written."""
    t = make_tasks(app, [])
    with pytest.raises(pgtq.InvalidArguments, match="job 1 of the workflow"):
        await side.call(pgtq.chain(t["ok"].s(), t["ok"].s(nope=1)), "defer")
    with pytest.raises(pgtq.InvalidArguments, match="depends_on"):
        await side.call(pgtq.chain(t["ok"].s(), t["ok"].configure(depends_on=[10**9]).s()), "defer")
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]
    assert sql("SELECT count(*) FROM pgtq.job_dependencies") == [(0,)]


async def test_depends_on_a_workflow_handle_waits_for_its_last_jobs(
    app: pgtq.App, side: Side
) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    handle = await side.call(pgtq.group(t["ok"].s(n=1), t["ok"].s(n=2)), "defer")
    after = await side.defer(t["gather"].configure(depends_on=[handle]))
    await side.run_worker(app, wait=False)
    assert await side.wait(app, after) == [1, 2]


# -- visible: the dashboard's graph, `pgtq jobs show` --------------------------------------


async def test_the_job_page_draws_the_workflow_as_svg(app: pgtq.App) -> None:
    pytest.importorskip("starlette")
    from tests.test_web import client_for

    t = make_tasks(app, [])
    flow = pgtq.group(t["ok"].s(n=1), t["boom"].s()).then(t["gather"].s())
    handle = await flow.defer_async()
    await app.run_worker_async(wait=False, install_signal_handlers=False)
    a, b, callback = handle.job_ids
    async with client_for(pgtq.web.asgi(app)) as client:
        html = (await client.get(f"/jobs/{callback}")).text
        assert '<svg xmlns="http://www.w3.org/2000/svg" class="workflow"' in html
        assert f'<g class="node succeeded" data-job="{a}">' in html
        assert f'<g class="node failed" data-job="{b}">' in html
        assert f'<g class="node cancelled" data-job="{callback}">' in html
        assert f'data-parent="{a}" data-child="{callback}"' in html
        assert f'data-parent="{b}" data-child="{callback}"' in html
        assert "<script" not in html.split('class="card workflow"')[1].split("</div>")[0]
        listed = (await client.get(f"/jobs?workflow={handle.id}")).text
        assert all(f"/jobs/{i}" in listed for i in handle.job_ids)
        plain = await t["ok"].defer_async()
        assert "workflow-graph" not in (await client.get(f"/jobs/{plain}")).text
        waiting = await t["ok"].configure(depends_on=[plain]).defer_async()
        page = (await client.get(f"/jobs/{waiting}")).text
        assert (
            f"/jobs/{waiting}/cancel" in page
            and f'<g class="node blocked" data-job="{waiting}">' in page
        )


def test_jobs_show_lists_parents_and_children(dsn: str, sql: SQL) -> None:
    from tests.test_cli import APP, invoke

    for _ in range(3):
        assert invoke("defer", APP, "add", '{"a": 1, "b": 2}', dsn=dsn).exit_code == 0
    sql(
        "INSERT INTO pgtq.job_dependencies (parent_id, child_id, on_parent_failure) "
        "VALUES (1, 2, 'cancel'), (2, 3, 'hold')"
    )
    sql("UPDATE pgtq.jobs SET workflow_id = 1")
    result = invoke("jobs", "show", "2", dsn=dsn)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "workflow 1" in out
    assert out.index("parents:") < out.index("  1 add todo") < out.index("children:")
    assert "  3 add todo [hold]" in out


async def test_cancel_follows_cancel_edges_down_and_settles_run_edges(
    app: pgtq.App, side: Side
) -> None:
    t = make_tasks(app, [])
    bad = await side.defer(t["boom"])
    child = await side.defer(t["ok"].configure(depends_on=[bad]))
    runs_anyway = await side.defer(t["ok"].configure(depends_on=[child], on_parent_failure="run"))
    held = await side.defer(t["ok"].configure(depends_on=[child], on_parent_failure="hold"))
    await side.run_worker(app, wait=False)
    assert await status(side, app, child) is Status.CANCELLED
    assert await status(side, app, runs_anyway) is Status.SUCCEEDED
    assert await status(side, app, held) is Status.BLOCKED


def _completion_buffers(app: pgtq.App, t: dict[str, Any], dsn: str, sql: SQL, width: int) -> int:
    """Shared buffers one parent's completion touches in a ``width``-wide fan-in."""
    from sqlalchemy.dialects import postgresql

    handle = pgtq.group(*(t["ok"].s() for _ in range(width))).then(t["ok"].s()).defer()
    parent = handle.job_ids[width // 2]
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w', attempts = 1 WHERE id = %s", parent
    )
    sql("VACUUM ANALYZE pgtq.jobs, pgtq.job_dependencies")
    outcomes = pgtq.statements.Outcomes.empty()
    outcomes.add(parent, Status.SUCCEEDED, "1", attempt=1)
    query = pgtq.statements.complete_jobs(app.statements, "w", outcomes, releasing=True)
    compiled = query.statement.compile(dialect=postgresql.dialect(paramstyle="pyformat"))
    values = {**compiled.params, **query.params}
    with psycopg.connect(libpq(dsn)) as conn:  # rolled back: nothing is written
        explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + compiled.string
        [(plan,)] = conn.execute(explain, values).fetchall()
        conn.rollback()
    top = plan[0]["Plan"]
    assert sql("SELECT pending_parents FROM pgtq.jobs WHERE id = %s", handle.leaves[0]) == [
        (width,)
    ]
    return int(top["Shared Hit Blocks"] + top["Shared Read Blocks"])


async def test_a_wide_fan_in_costs_each_completion_what_a_narrow_one_does(
    app: pgtq.App, dsn: str, sql: SQL
) -> None:
    """No counting of the other parents: one completion of a 10,000-wide fan-in touches
    about as many buffers as one of a 10-wide one (the child's counter, one edge)."""
    t = make_tasks(app, [])
    narrow = _completion_buffers(app, t, dsn, sql, 10)
    sql("TRUNCATE pgtq.jobs, pgtq.job_dependencies RESTART IDENTITY")
    wide = _completion_buffers(app, t, dsn, sql, 10_000)
    assert wide <= narrow + 10, (narrow, wide)


async def test_failing_a_waiting_parent_by_hand_settles_its_children(
    app: pgtq.App, side: Side
) -> None:
    t = make_tasks(app, [])
    parent = await side.defer(t["ok"])
    child = await side.defer(t["ok"].configure(depends_on=[parent]))
    runs_anyway = await side.defer(t["ok"].configure(depends_on=[parent], on_parent_failure="run"))
    assert await side.call(app.jobs, "fail", parent, "no")
    assert await status(side, app, child) is Status.CANCELLED
    assert await status(side, app, runs_anyway) is Status.TODO


# -- batches --------------------------------------------------------------------------------


async def open_batch(side: Side, batch: pgtq.Batch) -> pgtq.Batch:
    opened: pgtq.Batch = await side.call(batch, "open")
    return opened


async def test_a_batch_runs_on_complete_once_after_its_close_and_members(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, [])

    @app.task()
    def done(ctx: pgtq.JobContext, label: str) -> int:
        results = ctx.parent_results()
        runs.append((label, results))
        return len(results)

    b = await open_batch(side, app.batch(on_complete=done.s(label="complete"),
                                         on_failure=done.s(label="failure")))  # fmt: skip
    members = [await side.call(b, "defer", t["ok"].s(n=i)) for i in range(3)]
    await side.run_worker(app, wait=False)
    # Members done, the batch still open: the callbacks wait.
    assert sql("SELECT status FROM pgtq.jobs WHERE id = ANY(%s)", list(b.callbacks)) == [
        ("blocked",),
        ("blocked",),
    ]
    late = await side.call(b, "defer", t["ok"].s(n=3))  # deferred over time
    assert await side.call(b, "close")
    assert not await side.call(b, "close")  # once
    with pytest.raises(pgtq.InvalidArguments, match="closed"):
        await side.call(b, "defer", t["ok"].s(n=4))
    await side.run_worker(app, wait=False)
    complete, failure = b.callbacks
    assert await status(side, app, complete) is Status.SUCCEEDED
    assert await status(side, app, failure) is Status.CANCELLED  # nothing failed
    assert runs == [("complete", dict(zip([*members, late], range(4), strict=True)))]
    assert await status(side, app, b.id or 0) is Status.SUCCEEDED  # the batch's record


async def test_a_failed_member_runs_on_failure_once(app: pgtq.App, side: Side) -> None:
    runs: list[tuple[str, Any]] = []
    t = make_tasks(app, runs)
    b = await open_batch(side, app.batch(on_failure=t["gather"]))
    await side.call(b, "defer", t["ok"].s(n=1))
    bad = await side.call(b, "defer", t["boom"].s())
    await side.call(b, "close")
    await side.run_worker(app, wait=False)
    (failure,) = b.callbacks
    assert await status(side, app, failure) is Status.SUCCEEDED
    gathered = [r for r in runs if r[0] == "gather"]
    assert len(gathered) == 1 and gathered[0][1][bad] is None


def test_a_batch_block_that_raises_closes_it_failed(app: pgtq.App, sql: SQL) -> None:
    t = make_tasks(app, [])
    with pytest.raises(RuntimeError), app.batch(on_failure=t["ok"].s(n=9)) as b:
        b.defer(t["ok"].s())
        raise RuntimeError("the block failed")
    assert sql("SELECT status FROM pgtq.jobs WHERE id = %s", b.id) == [("cancelled",)]
    reopened = pgtq.Batch.of(app, b.id or 0)
    assert reopened.callbacks == b.callbacks
    with pytest.raises(pgtq.InvalidArguments, match="closed"):
        reopened.defer(t["ok"].s())


async def test_async_with_batch(app: pgtq.App) -> None:
    t = make_tasks(app, [])
    async with app.batch(on_complete=t["ok"].s(n=7)) as b:
        await b.defer_async(t["ok"].s(n=1))
    await app.run_worker_async(wait=False, install_signal_handlers=False)
    assert await app.jobs.wait_async(b.callbacks[0], timeout=10) == 7


async def test_a_retried_member_that_succeeds_leaves_on_failure_cancelled(
    app: pgtq.App, side: Side
) -> None:
    flaky_calls: list[int] = []
    t = make_tasks(app, [])

    @app.task(retry=None)
    def flaky() -> str:
        flaky_calls.append(1)
        if len(flaky_calls) == 1:
            raise RuntimeError("first time")
        return "fine"

    b = await open_batch(side, app.batch(on_complete=t["ok"].s(n=1), on_failure=t["ok"].s(n=2)))
    member = await side.call(b, "defer", flaky.s())
    await side.run_worker(app, wait=False)  # the member fails; the batch is still open
    assert await side.retry(app, member)
    assert not await side.retry(app, b.id)  # a batch's record is never retried
    await side.call(b, "close")
    await side.run_worker(app, wait=False)
    complete, failure = b.callbacks
    assert await status(side, app, complete) is Status.SUCCEEDED
    assert await status(side, app, failure) is Status.CANCELLED


def test_a_child_added_while_its_parent_completes_fails_the_completion_once(
    app: pgtq.App, sql: SQL
) -> None:
    """The completion began (its snapshot taken) before the child's insert committed: it sees
    the parent's ``children`` raised but not the edge, and fails with SQLSTATE 40001 rather
    than leave the child blocked; written again, it settles the child."""
    import threading

    t = make_tasks(app, [])
    parent = t["ok"].defer()
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w', attempts = 1 WHERE id = %s", parent
    )
    outcomes = pgtq.statements.Outcomes.empty()
    outcomes.add(parent, Status.SUCCEEDED, "1", attempt=1)
    completion = pgtq.statements.complete_jobs(app.statements, "w", outcomes, releasing=True)
    failure: list[BaseException] = []

    def complete() -> None:
        try:
            app.sync.run(completion)
        except BaseException as exc:
            failure.append(exc)

    with app.sync.transaction() as conn:
        child = t["ok"].configure(depends_on=[parent]).defer(connection=conn)  # parent locked
        writer = threading.Thread(target=complete)
        writer.start()
        deadline = time.monotonic() + 10
        while not sql(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        ):
            assert time.monotonic() < deadline, ("the completion never waited", failure)
            time.sleep(0.01)
    writer.join(10)
    assert len(failure) == 1 and "SerializationFailure" in repr(failure[0]), failure
    assert sql("SELECT status FROM pgtq.jobs WHERE id = %s", parent) == [("doing",)]
    assert app.sync.run(completion) == [parent]  # written again: the edge is seen now
    assert sql("SELECT status FROM pgtq.jobs WHERE id = %s", child) == [("todo",)]


async def test_a_parent_ended_on_its_way_out_settles_its_children(app: pgtq.App, sql: SQL) -> None:
    """Aborted before it started (a worker gives it back: ``release``), or failed as
    unclaimable: either end settles the children in the same statement."""
    s, t = app.statements, make_tasks(app, [])
    released = t["ok"].defer()
    child = t["ok"].configure(depends_on=[released]).defer()
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w', attempts = 1, "
        "abort_requested = true WHERE id = %s",
        released,
    )
    assert app.sync.run(pgtq.statements.release_jobs(s, "w", [released])) == [released]
    assert sql(
        "SELECT status FROM pgtq.jobs WHERE id IN (%s, %s) ORDER BY id", released, child
    ) == [
        ("aborted",),
        ("cancelled",),
    ]
    unclaimable = t["ok"].defer()
    runs = t["ok"].configure(depends_on=[unclaimable], on_parent_failure="run").defer()
    sql(  # 3,200 bytes that do not compress: over what the claim's index takes
        "UPDATE pgtq.jobs SET lock = (SELECT string_agg(md5(random()::text), '') "
        "FROM generate_series(1, 100)) WHERE id = %s",
        unclaimable,
    )
    assert app.sync.run(pgtq.statements.fail_unclaimable_jobs(s)) == [unclaimable]
    assert sql("SELECT status FROM pgtq.jobs WHERE id = %s", runs) == [("todo",)]


@pytest.mark.unit
async def test_the_completer_writes_what_was_refused_with_the_releasing_variant() -> None:
    """One statement for a batch without jobs with children; the refused rest (here job 2)
    goes again with ``Rare.releasing``, alone."""
    from pgtq.completer import Completer
    from pgtq.model import ClaimedJob
    from pgtq.outcomes import Outcome

    queries: list[pgtq.statements.Query[Any]] = []
    refused = {2}

    class Connection:
        async def run(self, query: pgtq.statements.Query[Any]) -> list[int]:
            queries.append(query)
            ids = list(query.params["ids"])
            plain = query.statement is s.complete  # refuses a job with children
            return [i for i in ids if i not in refused] if plain else ids

    s = pgtq.statements.statements_for("pgtq")
    c = Completer(s, lambda: "w", (), on_written=lambda frees: None)
    c.connection = Connection()  # type: ignore[assignment]
    for n in (1, 2, 3):
        c.add(ClaimedJob(n, "t", "default", {}, 1, 0, None), Outcome(Status.SUCCEEDED, "1"))
    await c.write(give_up_after=None)
    assert [q.params["ids"] for q in queries] == [[1, 2, 3], [2]]
    assert queries[0].statement is s.complete
    assert queries[1].statement is s.completion(False, pgtq.statements.Rare(releasing=True))
