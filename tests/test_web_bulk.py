"""The jobs list's bulk form: retry, cancel, abort or delete the jobs ticked, or every job the
list's filter matches, behind the same read-only switch, CSRF check and origin check as the
single-job actions. Through plain ASGI calls on the real database."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

import pgtq
import pgtq.web
from tests.test_operations import SQL, finish, tasks
from tests.test_web import client_for, statuses, token


@pytest.fixture
async def client(app: pgtq.App) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(pgtq.web.asgi(app)) as c:
        yield c


async def csrf_of(client: httpx.AsyncClient) -> dict[str, str]:
    return {"csrf_token": await token(client, "/jobs")}


async def test_the_list_ticks_rows_into_one_form_with_the_filter(
    app: pgtq.App, client: httpx.AsyncClient
) -> None:
    send, _ = tasks(app)
    a, b = await send.defer_many_async([{"to": "a"}, {"to": "b"}])
    page = (await client.get("/jobs?queue=emails&status=todo")).text
    assert '<form id="many"' in page and 'action="/jobs/many"' in page
    boxes = re.findall(r'<input type="checkbox" name="ids" value="(\d+)" form="many"', page)
    assert sorted(int(i) for i in boxes) == [a, b]
    assert '<input type="hidden" name="queue" value="emails">' in page
    assert '<input type="hidden" name="status" value="todo">' in page
    for action in ("retry", "cancel", "abort", "delete"):
        assert f'name="action" value="{action}"' in page


async def test_an_action_on_the_jobs_ticked(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, _ = tasks(app)
    failed, aborted, waiting = await send.defer_many_async([{"to": "a"}, {"to": "b"}, {"to": "c"}])
    finish(sql, [failed], "failed")
    finish(sql, [aborted], "aborted")
    ticked = [str(i) for i in (failed, aborted, waiting)]
    form = {**await csrf_of(client), "action": "retry", "ids": ticked}
    done = await client.post("/jobs/many", data=form)
    assert done.status_code == 303
    assert done.headers["location"] == "/jobs?notice=many-retried&n=2"
    assert statuses(sql) == {failed: "todo", aborted: "todo", waiting: "todo"}
    assert "2 job(s) retried" in (await client.get(done.headers["location"])).text

    form = {**await csrf_of(client), "action": "cancel", "ids": [str(waiting)]}
    done = await client.post("/jobs/many", data=form)
    assert done.headers["location"] == "/jobs?notice=many-cancelled&n=1"
    assert statuses(sql)[waiting] == "cancelled"


async def test_an_action_on_every_job_the_filter_matches(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, resize = tasks(app)
    ids = await send.defer_many_async([{"to": str(i)} for i in range(60)])  # over a page
    running = ids[0]
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = %s", running)
    image = await resize.defer_async(n=1)
    form = {**await csrf_of(client), "action": "delete", "scope": "matching", "queue": "emails"}
    done = await client.post("/jobs/many", data=form)
    assert done.status_code == 303
    assert done.headers["location"] == "/jobs?queue=emails&notice=many-deleted&n=59"
    assert statuses(sql) == {running: "doing", image: "todo"}  # never a running job
    # No filter, "every job matching" chosen: every job the action takes.
    form = {**await csrf_of(client), "action": "abort", "scope": "matching"}
    done = await client.post("/jobs/many", data=form)
    assert done.headers["location"] == "/jobs?notice=many-aborted&n=2"
    assert statuses(sql) == {running: "doing", image: "cancelled"}
    assert sql("SELECT abort_requested FROM pgtq.jobs WHERE id = %s", running) == [(True,)]


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"action": "drop", "ids": "1"}, "Which action?"),
        ({"ids": "1"}, "Which action?"),
        ({"action": "retry"}, "No job ticked"),
        ({"action": "retry", "ids": "x1"}, "a ticked job id must be a whole number"),
        ({"action": "delete", "scope": "matching", "status": "doing"}, "never deleted"),
        ({"action": "retry", "scope": "matching", "status": "todo"}, "retry_many acts only on"),
        ({"action": "retry", "scope": "matching", "status": "nope"}, "unknown status"),
    ],
)
async def test_a_bad_form_is_400_and_changes_nothing(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL, form: dict[str, str], message: str
) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    refused = await client.post("/jobs/many", data={**await csrf_of(client), **form})
    assert refused.status_code == 400
    assert message in refused.text
    assert statuses(sql) == {job_id: "todo"}


async def test_the_bulk_form_is_refused_as_every_action_is(app: pgtq.App, sql: SQL) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    form = {"action": "delete", "scope": "matching"}
    async with client_for(pgtq.web.asgi(app)) as client:
        good = await token(client, "/jobs")
        refused = [
            await client.post("/jobs/many", data=form),  # no token
            await client.post("/jobs/many", data={**form, "csrf_token": "wrong"}),
            await client.post(
                "/jobs/many",
                data={**form, "csrf_token": good},
                headers={"origin": "https://evil.example"},
            ),
            await client.post(
                "/jobs/many",
                data={**form, "csrf_token": good},
                headers={"sec-fetch-site": "cross-site"},
            ),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        assert (await client.get("/jobs/many")).status_code in (404, 405)  # GET changes nothing
    async with client_for(pgtq.web.asgi(app, read_only=True)) as client:
        page = await client.get("/jobs")
        assert 'form="many"' not in page.text and '<form id="many"' not in page.text
        csrf = client.cookies["pgtq_csrf"]
        refused_ro = await client.post("/jobs/many", data={**form, "csrf_token": csrf})
        assert refused_ro.status_code == 403 and "read-only" in refused_ro.text
    assert statuses(sql) == {job_id: "todo"}
