"""``tags=`` in ``app.jobs.list`` and the bulk controls (sync and async), ``--tag`` on
``pgtq jobs list|retry|cancel|abort|delete``, and the plans: a tag filter is served by the GIN
index over tagged jobs (``jobs_tags_idx``).

Tags are written with SQL after ``defer`` here: switch to ``configure(tags=...)`` once it lands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.dialects import postgresql

import pgtq
from pgtq.jobs import InvalidFilter, NoFilter
from pgtq.model import Status
from pgtq.statements import ListKey, SelectionKey, statements_for
from tests.sides import Side
from tests.test_cli import APP, invoke
from tests.test_cli_operations import fresh_app_modules  # noqa: F401 (autouse fixture)
from tests.test_operations import SQL, finish, tasks


def tag(sql: SQL, job_id: int, *tags: str, meta: dict[str, Any] | None = None) -> None:
    """What ``configure(tags=..., meta=...)`` stores, set after the defer (the filters'
    tests pick tags per job; ``test_configured_tags_are_what_the_filters_find`` defers
    them)."""
    sql(
        "UPDATE pgtq.jobs SET tags = %s, meta = %s::jsonb WHERE id = %s",
        list(tags),
        None if meta is None else json.dumps(meta),
        job_id,
    )


async def test_list_selects_the_jobs_having_every_tag(app: pgtq.App, side: Side, sql: SQL) -> None:
    send, _ = tasks(app)
    a, b, c, d = await side.defer_many(send, [{"to": str(i)} for i in range(4)])
    tag(sql, a, "eu", "vip")
    tag(sql, b, "eu")
    tag(sql, c, "us", "vip")  # d: no tag at all
    finish(sql, [b], "failed")

    async def ids(**filters: Any) -> list[int]:
        return [j.id for j in await side.call(app.jobs, "list", **filters)]

    assert await ids(tags=["eu"]) == [a, b]
    assert await ids(tags=["vip", "eu"]) == [a]
    assert await ids(tags=("vip",), newest_first=True) == [c, a]
    assert await ids(tags=["eu", "eu"]) == [a, b]  # duplicates are one tag
    assert await ids(tags=["eu"], status="failed") == [b]
    assert await ids(tags=["nowhere"]) == []
    assert await ids(tags=[]) == [a, b, c, d]  # no tag asked: no filter
    [job] = await side.call(app.jobs, "list", ids=[a])
    assert job.tags == ["eu", "vip"]


async def test_bulk_controls_take_tags(app: pgtq.App, side: Side, sql: SQL) -> None:
    send, _ = tasks(app)
    a, b, c = await side.defer_many(send, [{"to": str(i)} for i in range(3)])
    for job_id in (a, b, c):
        tag(sql, job_id, "batch-7" if job_id != c else "batch-8")
    finish(sql, [a, b, c], "failed")
    assert await side.call(app.jobs, "retry_many", tags=["batch-7"], dry_run=True) == [a, b]
    assert await side.call(app.jobs, "retry_many", tags=["batch-7"], status="failed") == [a, b]
    assert await side.call(app.jobs, "cancel_many", tags=["batch-7"]) == [a, b]
    assert await side.call(app.jobs, "abort_many", tags=["batch-8"]) == []  # failed: not taken
    assert await side.call(app.jobs, "delete_many", tags=["batch-8"]) == [c]
    jobs = {j.id: j.status for j in await side.call(app.jobs, "list")}
    assert jobs == {a: Status.CANCELLED, b: Status.CANCELLED}
    with pytest.raises(NoFilter):
        await side.call(app.jobs, "delete_many", tags=[])


@pytest.mark.parametrize(
    ("tags", "fragment"),
    [
        ("eu", r"tags must be a list of tags, got 'eu': tags=\['eu'\]"),
        (b"eu", "tags must be a list of tags"),
        ({"eu": 1}, "tags must be a list of tags"),
        (7, "tags must be a list of tags"),
        ([""], "tags must be non-empty strings"),
        ([1], "tags must be a str, got 1"),
        (["a\x00b"], "tags must not contain a NUL"),
        (["\ud800"], "tags must be valid Unicode"),
    ],
)
async def test_tags_are_checked_before_anything_is_sent(
    app: pgtq.App, side: Side, tags: Any, fragment: str
) -> None:
    for method, extra in (("list", {}), ("retry_many", {}), ("delete_many", {"dry_run": True})):
        with pytest.raises(InvalidFilter, match=fragment):
            await side.call(app.jobs, method, tags=tags, **extra)


# == the plans: the GIN index over tagged jobs ===================================================


@pytest.fixture(scope="module")
def tagged_db(make_database: Any) -> Iterator[str]:
    """100k jobs, a tenth of them tagged, ten with a rare tag."""
    url = make_database()
    app = pgtq.App(url)
    app.migrate()
    app.close()
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgtq.jobs (queue, task_name, status, tags) "
            "SELECT 'q', 't', (ARRAY['todo', 'succeeded', 'failed'])[1 + i % 3], "
            "CASE WHEN i % 10000 = 0 THEN ARRAY['rare', 'common'] "
            "WHEN i % 10 = 0 THEN ARRAY['common'] END "
            "FROM generate_series(1, 100000) AS i"
        )
        conn.execute("VACUUM ANALYZE pgtq.jobs")
    yield libpq


S = statements_for("pgtq")
TAG_PLANS = {
    "list": (S.list_jobs(ListKey(tags=True)), {"only_tags": ["rare"], "limit": 50}),
    "list, newest first": (
        S.list_jobs(ListKey(tags=True, newest_first=True)),
        {"only_tags": ["rare"], "limit": 50},
    ),
    "retry": (S.bulk("retry", SelectionKey(tags=True)), {"only_tags": ["rare"]}),
    "delete, preview": (S.bulk("delete", SelectionKey(tags=True), True), {"only_tags": ["rare"]}),
}


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("case", list(TAG_PLANS))
def test_a_tag_filter_is_served_by_the_tags_index(
    tagged_db: str, case: str, plan_mode: str
) -> None:
    statement, params = TAG_PLANS[case]
    compiled = statement.compile(dialect=postgresql.dialect(paramstyle="pyformat"))
    with psycopg.connect(tagged_db) as conn:
        conn.execute(f"SET plan_cache_mode = {plan_mode}")
        [(plan,)] = conn.execute(
            "EXPLAIN (FORMAT JSON) " + compiled.string, {**compiled.params, **params}
        ).fetchall()
        conn.rollback()

    def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    found = [(n["Node Type"], n.get("Index Name")) for n in nodes(plan[0]["Plan"])]
    assert ("Bitmap Index Scan", "jobs_tags_idx") in found, found
    assert not any(kind == "Seq Scan" for kind, _ in found), found


# == the command line: --tag, repeatable, on list and every control =============================


def test_cli_tag_filters_list_and_controls(dsn: str, sql: SQL) -> None:
    for _ in range(3):
        assert invoke("defer", APP, "add", '{"a": 1, "b": 2}', dsn=dsn).exit_code == 0
    a, b, c = (row[0] for row in sql("SELECT id FROM pgtq.jobs ORDER BY id"))
    tag(sql, a, "eu", "vip")
    tag(sql, b, "eu")
    listed = invoke("jobs", "list", "--tag", "eu", "--tag", "vip", "--json", dsn=dsn)
    assert listed.exit_code == 0, listed.output
    assert [j["id"] for j in json.loads(listed.stdout)] == [a]
    table = invoke("jobs", "list", "--tag", "eu", dsn=dsn)
    assert "#eu #vip" in table.stdout and str(c) not in table.stdout.split()
    done = invoke("jobs", "cancel", "--tag", "eu", "--yes", "--json", dsn=dsn)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == [a, b]
    for action in ("retry", "abort", "delete"):
        result = invoke("jobs", action, "--tag", "nowhere", "--dry-run", "--json", dsn=dsn)
        assert result.exit_code == 0 and json.loads(result.stdout) == [], result.output
    bad = invoke("jobs", "list", "--tag", "", dsn=dsn)
    assert bad.exit_code != 0 and "tags must be non-empty strings" in bad.stderr


async def test_configured_tags_are_what_the_filters_find(app: pgtq.App, side: Side) -> None:
    send, _ = tasks(app)
    one = await side.defer(send.configure(tags=["eu", "vip"], meta={"tenant": 7}), to="a")
    more = await side.defer_many(
        send, [({"to": "b"}, {"tags": ["eu"]}), {"to": "c"}, ({"to": "d"}, {"tags": ["vip"]})]
    )
    found = await side.call(app.jobs, "list", tags=["eu"])
    assert [j.id for j in found] == [one, more[0]]
    assert [j.id for j in await side.call(app.jobs, "list", tags=["vip", "eu"])] == [one]
    assert found[0].meta == {"tenant": 7}
    cancelled = await side.call(app.jobs, "cancel_many", tags=["vip"])
    assert sorted(cancelled) == sorted([one, more[2]])
