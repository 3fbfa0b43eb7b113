"""The hot statements' plans at 100k rows: the partial indexes, no sequential scan, no sort.

Checked with custom plans and with generic ones (what a prepared statement may switch to):
statuses are SQL literals, so the partial indexes match either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.dialects import postgresql

import pgtq
from pgtq.statements import ListKey, Rare, SelectionKey, statements_for


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@pytest.fixture(scope="module")
def big_db(make_database: Any) -> Iterator[str]:
    url = make_database()
    app = pgtq.App(url)
    app.migrate()

    @app.task
    def noop(n: int) -> None: ...

    for queue in ("a", "b"):
        for start in range(0, 50_000, 10_000):
            noop.configure(queue=queue).defer_many([{"n": i} for i in range(start, start + 10_000)])
    app.close()
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        # Half the jobs finished: the table is twice the size of what waits.
        conn.execute("UPDATE pgtq.jobs SET status = 'succeeded' WHERE id % 2 = 0")
        # Workflows: a fifth of the waiting jobs blocked, each on the next waiting job.
        conn.execute(
            "UPDATE pgtq.jobs SET status = 'blocked', pending_parents = 1, workflow_id = id "
            "WHERE id % 10 = 1"
        )
        conn.execute(
            "INSERT INTO pgtq.job_dependencies (parent_id, child_id) "
            "SELECT id + 2, id FROM pgtq.jobs WHERE status = 'blocked'"
        )
        conn.execute("UPDATE pgtq.jobs SET children = 1, workflow_id = id - 2 WHERE id % 10 = 3")
        conn.execute("VACUUM ANALYZE pgtq.jobs")
        conn.execute("VACUUM ANALYZE pgtq.job_dependencies")
    yield libpq


S = statements_for("pgtq")
OUTCOMES = {
    "me": "w",
    "ids": list(range(1, 200, 2)),
    "statuses": ["succeeded"] * 100,
    "results": [None] * 100,
    "errors": [None] * 100,
    "retry_in": [None] * 100,
}
CASES = {
    "claim, all queues": (S.claim(None, 100), {"me": "w"}, "jobs_claim_idx"),
    "claim, one queue": (
        S.claim(["a"], 100),
        {"me": "w", "only_queue": "a"},
        "jobs_queue_claim_idx",
    ),
    "claim, two queues": (
        S.claim(["a", "b"], 100),
        {"me": "w", "queues": ["a", "b"]},
        "jobs_claim_idx",
    ),
    "complete": (S.complete, OUTCOMES, None),
    # The parents of 20 blocked jobs: their children found by the edges' primary key.
    "complete, releasing": (
        S.completion(False, Rare(releasing=True)),
        {**OUTCOMES, "ids": list(range(3, 200, 10))},
        "job_dependencies_pkey",
    ),
    "cancel, settling": (S.cancel, {"job_id": 3}, "job_dependencies_pkey"),
    # A parent's retry restores what its failure cancelled; its deletion settles its children.
    "retry, restoring": (S.retry, {"job_id": 3}, "job_dependencies_pkey"),
    "delete, settling": (
        S.bulk("delete", SelectionKey(ids=True)),
        {"only_ids": [3, 13]},
        "job_dependencies_pkey",
    ),
    "list, one workflow": (
        S.list_jobs(ListKey(workflow=True)),
        {"only_workflow": 1, "limit": 100},
        "jobs_workflow_idx",
    ),
}


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("case", list(CASES))
def test_hot_statements_use_the_partial_indexes(big_db: str, case: str, plan_mode: str) -> None:
    statement, params, index = CASES[case]
    compiled = statement.compile(dialect=postgresql.dialect(paramstyle="pyformat"))
    values = {**compiled.params, **params}
    with psycopg.connect(big_db) as conn:
        conn.execute(f"SET plan_cache_mode = {plan_mode}")
        [(plan,)] = conn.execute("EXPLAIN (FORMAT JSON) " + compiled.string, values).fetchall()
        conn.rollback()
    nodes = list(_nodes(plan[0]["Plan"]))
    scans = {(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes}
    tables = ("jobs", "job_dependencies")
    assert not any(kind == "Seq Scan" and rel in tables for kind, rel, _ in scans), scans
    assert not any(kind == "Bitmap Heap Scan" and rel == "jobs" for kind, rel, _ in scans), scans
    if index is not None:
        assert any(kind.startswith("Index") and name == index for kind, _, name in scans), scans
        # The order comes from the index: no sort of the waiting jobs before the LIMIT.
        sorts = [n for n in nodes if n["Node Type"] == "Sort"]
        assert not any("jobs.priority DESC" in " ".join(n["Sort Key"]) for n in sorts), sorts
