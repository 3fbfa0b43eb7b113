"""The web dashboard (``pgtq.web``) through plain ASGI calls: every page and every action, the
reads behind them (throughput, search), CSRF, read-only mode, basic auth, mounting under a
prefix, and ``pgtq web``'s refusal to expose actions without auth.

Requests go through httpx's ASGITransport into the real app, on the real database.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.dialects import postgresql
from starlette.applications import Starlette
from starlette.routing import Mount
from typer.testing import CliRunner

import pgtq
import pgtq.web
from pgtq.cli import cli
from pgtq.jobs import InvalidFilter
from pgtq.model import Status
from pgtq.reports import Throughput
from pgtq.statements import statements_for
from pgtq.web import security
from pgtq.web.views import PAGE_SIZE
from tests.conftest import eventually
from tests.sides import Side
from tests.test_operations import SQL, finish, finished_jobs, tasks

BASE = "http://localhost"


def client_for(web: Any, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=web), base_url=BASE, **options)


@pytest.fixture
async def client(app: pgtq.App) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(pgtq.web.asgi(app)) as c:
        yield c


async def token(client: httpx.AsyncClient, path: str = "/") -> str:
    """Load a page, as a browser would before posting one of its forms: the CSRF token."""
    page = await client.get(path)
    assert page.status_code == 200
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    cookie = client.cookies.get("pgtq_csrf")
    assert cookie
    if found:  # read-only pages have no form
        assert found.group(1) == cookie
    return cookie


def job_ids(html: str) -> list[int]:
    """The ids of the jobs list's rows, in order."""
    return [int(i) for i in re.findall(r'<tr data-job="(\d+)">', html)]


def statuses(sql: SQL) -> dict[int, str]:
    return dict(sql("SELECT id, status FROM pgtq.jobs"))  # type: ignore[arg-type]


# == the reads behind the pages (sync and async twins) ==========================================


async def test_throughput_counts_jobs_that_ended_per_bucket(
    app: pgtq.App, side: Side, sql: SQL
) -> None:
    send, resize = tasks(app)
    ids = await side.defer_many(send, [{"to": str(i)} for i in range(6)])
    other = await side.defer(resize, n=1)
    finish(sql, ids[:2], "succeeded", ago=30)
    finish(sql, ids[2:3], "failed", ago=30)
    finish(sql, ids[3:4], "succeeded", ago=20 * 60)
    finish(sql, ids[4:5], "cancelled", ago=30)  # never ran: not counted
    finish(sql, ids[5:6], "succeeded", ago=2 * 3600)  # out of the window
    finish(sql, [other], "aborted", ago=30)

    found: Throughput = await side.call(app.jobs, "throughput")
    assert (found.window, found.bucket) == (3600.0, 60.0)
    assert len(found.buckets) in (60, 61)  # the first minute of the window may be cut
    starts = [b.start for b in found.buckets]
    assert starts == sorted(starts) and all(s.second == 0 for s in starts)
    assert found.total == 5
    assert (found.count(Status.SUCCEEDED), found.count(Status.FAILED)) == (3, 1)
    assert found.count(Status.ABORTED) == 1
    assert found.count(Status.CANCELLED) == 0
    assert sum(1 for b in found.buckets if b.total) in (2, 3)  # ~30 s ago may straddle

    emails = await side.call(app.jobs, "throughput", 3600, 600, queue="emails")
    assert emails.total == 4 and len(emails.buckets) in (6, 7)
    with pytest.raises(InvalidFilter, match="positive"):
        await side.call(app.jobs, "throughput", 0)
    with pytest.raises(InvalidFilter, match="buckets"):
        await side.call(app.jobs, "throughput", 86400 * 30, 1)


async def test_list_searches_in_arguments_literally(app: pgtq.App, side: Side) -> None:
    send, _ = tasks(app)
    a, b, c, d = await side.defer_many(
        send, [{"to": "Ann@Example.com"}, {"to": "bob"}, {"to": "50%_off"}, {"to": "500 off"}]
    )

    async def ids(**filters: Any) -> list[int]:
        return [j.id for j in await side.call(app.jobs, "list", **filters)]

    assert await ids(search="example") == [a]  # ignoring case
    assert await ids(search="o") == [a, b, c, d]
    assert await ids(search="%") == [c]  # a wildcard is taken literally
    assert await ids(search="_o") == [c]
    assert await ids(search='"to"', newest_first=True, limit=2) == [d, c]
    assert await ids(search="") == [a, b, c, d]  # empty: no filter
    assert await ids(search="nobody") == []


@pytest.fixture(scope="module")
def big_table(make_database: Any) -> Iterator[str]:
    """200k jobs that ended over the last days, a few hundred in the last hour."""
    yield finished_jobs(make_database, 200_000, every=2)


def _scans(plan: dict[str, Any]) -> Iterator[tuple[str, str | None]]:
    yield plan["Node Type"], plan.get("Relation Name")
    for child in plan.get("Plans", []):
        yield from _scans(child)


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("by_queue", [False, True])
def test_the_chart_never_scans_the_whole_table(
    big_table: str, by_queue: bool, plan_mode: str
) -> None:
    statement = statements_for("pgtq").throughput(by_queue)
    compiled = statement.compile(dialect=postgresql.dialect(paramstyle="pyformat"))
    params = {"window": 3600.0, "bucket": 60.0, "queue": "q1"}
    with psycopg.connect(big_table) as conn:
        conn.execute(f"SET plan_cache_mode = {plan_mode}")
        [(plan,)] = conn.execute(
            "EXPLAIN (FORMAT JSON) " + compiled.string, {**compiled.params, **params}
        ).fetchall()
        rows = conn.execute(compiled.string, {**compiled.params, **params}).fetchall()
        conn.rollback()
    scans = set(_scans(plan[0]["Plan"]))
    assert ("Seq Scan", "jobs") not in scans, scans
    # One job ended every 2 s: ~1800 in the hour (a few fewer as the clock moved on).
    expected = 600 if by_queue else 1800
    assert expected - 10 <= sum(n for _, status, n in rows if status) <= expected


# == pages ======================================================================================


async def test_overview_shows_queues_their_depth_and_the_chart(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, resize = tasks(app)
    ids = await send.defer_many_async([{"to": str(i)} for i in range(4)])
    await resize.defer_async(n=1)
    finish(sql, ids[:1], "failed", ago=120)
    finish(sql, ids[1:2], "succeeded", ago=60)
    await app.queues.pause_async("images")

    page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<h1>Overview</h1>" in html
    assert 'href="/jobs?queue=emails&amp;status=todo">2<' in html
    assert 'href="/jobs?queue=emails&amp;status=failed">1<' in html
    assert 'href="/jobs?queue=images&amp;status=todo">1<' in html
    assert '<span class="status paused">paused</span>' in html
    assert "2 job(s) ended in the last hour" in html
    assert html.count('<rect class="succeeded"') == 1 and html.count('<rect class="failed"') == 1
    assert html.count('<g class="bar">') in (60, 61)
    # Actions: pause the active queue, resume the paused one.
    assert 'action="/queues/pause"' in html and 'action="/queues/resume"' in html


async def test_jobs_list_filters_by_queue_status_and_task(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, resize = tasks(app)
    a, b = await send.defer_many_async([{"to": "a"}, {"to": "b"}])
    c = await resize.defer_async(n=1)
    d = await resize.configure(queue="emails").defer_async(n=2)
    finish(sql, [b, c], "failed")

    async def ids(query: str) -> list[int]:
        page = await client.get("/jobs" + query)
        assert page.status_code == 200
        return job_ids(page.text)

    assert await ids("") == [d, c, b, a]  # newest first
    assert await ids("?queue=emails") == [d, b, a]
    assert await ids("?status=failed") == [c, b]
    assert await ids("?status=failed&queue=emails") == [b]
    assert await ids("?task=resize") == [d, c]
    assert await ids("?queue=&status=&task=&q=") == [d, c, b, a]  # an empty form
    assert await ids("?queue=nowhere") == []
    page = await client.get("/jobs?status=failed")
    assert '<option value="failed" selected>' in page.text
    # A retry button on each failed row, none on the others.
    assert f'action="/jobs/{b}/retry"' in page.text and f'action="/jobs/{c}/retry"' in page.text
    assert f'action="/jobs/{a}/retry"' not in (await client.get("/jobs")).text

    bad = await client.get("/jobs?status=finished")
    assert bad.status_code == 400 and "unknown status" in bad.text
    assert (await client.get("/jobs?after=abc")).status_code == 400


async def test_jobs_list_pages_by_keyset(app: pgtq.App, client: httpx.AsyncClient) -> None:
    send, _ = tasks(app)
    ids = await send.defer_many_async([{"to": str(i)} for i in range(PAGE_SIZE + 7)])
    newest = list(reversed(ids))

    first = await client.get("/jobs?queue=emails")
    assert job_ids(first.text) == newest[:PAGE_SIZE]
    [link] = re.findall(r'href="(/jobs\?[^"]+)" rel="next"', first.text)
    link = link.replace("&amp;", "&")
    assert link == f"/jobs?queue=emails&after={newest[PAGE_SIZE - 1]}"
    second = await client.get(link)
    assert job_ids(second.text) == newest[PAGE_SIZE:]
    assert 'rel="next"' not in second.text  # the last page
    assert 'href="/jobs?queue=emails">« newest' in second.text


async def test_jobs_list_searches_in_arguments(app: pgtq.App, client: httpx.AsyncClient) -> None:
    send, _ = tasks(app)
    ann, _bob, sale = await send.defer_many_async([{"to": "ann"}, {"to": "bob"}, {"to": "50%"}])
    assert job_ids((await client.get("/jobs?q=ANN")).text) == [ann]
    assert job_ids((await client.get("/jobs?q=%25")).text) == [sale]
    page = await client.get("/jobs?q=nobody")
    assert job_ids(page.text) == [] and "No job matches." in page.text
    assert 'value="nobody"' in page.text  # the form keeps the search


async def test_job_page_shows_arguments_result_error_and_timeline(
    app: pgtq.App, client: httpx.AsyncClient
) -> None:
    @app.task(retry=pgtq.Retry(max_attempts=2, base=0))
    def flaky(ctx: pgtq.JobContext, to: str) -> None:
        raise ValueError(f"no route to {to} (attempt {ctx.attempt})")

    @app.task
    def double(n: int) -> dict[str, int]:
        return {"doubled": n * 2}

    failed = await flaky.defer_async(to="mars")
    done = await double.defer_async(n=21)
    await app.run_worker_async(wait=False)

    html = (await client.get(f"/jobs/{failed}")).text
    assert f"<h1>Job {failed} " in html and '<dd id="job-status">failed</dd>' in html
    assert "&#34;to&#34;: &#34;mars&#34;" in html  # the arguments, as escaped JSON
    assert "ValueError: no route to mars (attempt 2)" in html
    assert '<pre id="traceback">Traceback (most recent call last)' in html
    timeline = html[html.index('<ol class="timeline"') :]
    kinds = re.findall(r"<li class=\"(\w+)\">", timeline)
    assert kinds == ["deferred", "started", "retried", "started", "failed"]
    assert "no route to mars (attempt 1)" in timeline  # the first attempt's error
    assert f'action="/jobs/{failed}/retry"' in html

    html = (await client.get(f"/jobs/{done}")).text
    assert '<pre id="result">{\n  &#34;doubled&#34;: 42\n}</pre>' in html
    assert 'id="actions"' not in html  # a succeeded job takes no action

    missing = await client.get("/jobs/999999")
    assert missing.status_code == 404 and "No job with id 999999." in missing.text
    assert (await client.get("/jobs/abc")).status_code == 404


async def test_job_arguments_are_escaped(app: pgtq.App, client: httpx.AsyncClient) -> None:
    send, _ = tasks(app)
    evil = "<script>alert('x')</script>"
    job_id = await send.defer_async(to=evil)
    await app.queues.pause_async("<b>queue</b>")
    for path in (f"/jobs/{job_id}", "/jobs", f"/jobs?q={evil}", "/"):
        html = (await client.get(path)).text
        assert "<script>" not in html and "<b>queue" not in html, path
    assert "&lt;script&gt;" in (await client.get(f"/jobs/{job_id}")).text
    assert "&lt;b&gt;queue&lt;/b&gt;" in (await client.get("/")).text


async def test_workers_page_shows_heartbeat_age_and_running_jobs(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    sql(
        "INSERT INTO pgtq.workers (id, hostname, pid, queues, last_heartbeat) VALUES "
        "('w-live', 'box-1', 11, '{emails}', now() - interval '3 seconds'), "
        "('w-gone', 'box-2', 22, NULL, now() - interval '5 minutes')"
    )
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w-live', started_at = now()")

    html = (await client.get("/workers")).text
    rows = {re.search(r"<td>(w-\w+)</td>", r).group(1): r for r in html.split("<tr>")[2:]}  # type: ignore[union-attr]
    live = rows["w-live"]
    assert '<span class="status alive">alive</span>' in live and "box-1" in live
    assert re.search(r">[345] s ago<", live)
    assert f'href="/jobs/{job_id}">{job_id}</a> send' in live
    gone = rows["w-gone"]
    assert '<span class="status stale">silent</span>' in gone and ">5 min ago<" in gone
    assert ">all<" in gone and "idle" in gone


async def test_periodic_page_shows_the_next_tick(app: pgtq.App, client: httpx.AsyncClient) -> None:
    @app.periodic(cron="0 4 * * *", periodic_id="nightly", kwargs={"full": True})
    @app.task
    def backup(timestamp: int, full: bool) -> None: ...

    @app.periodic(cron="* * * * * */10")  # every 10 seconds
    @app.task
    def poll(timestamp: int) -> None: ...

    html = (await client.get("/periodic")).text
    now = datetime.now(UTC)
    nightly = now.replace(hour=4, minute=0, second=0, microsecond=0)
    if nightly <= now:
        nightly += timedelta(days=1)
    rows = re.findall(r"<tr>\s*<td>(\w+)</td>.*?</tr>", html, re.S)
    assert rows == ["poll", "backup"]  # the nearest tick first
    assert f"{nightly:%Y-%m-%d %H:%M:%S} UTC" in html
    assert "<code>0 4 * * *</code>" in html and "nightly" in html
    assert "{&#34;full&#34;: true}" in html

    bare = pgtq.App(app.url)
    async with client_for(pgtq.web.asgi(bare)) as c:
        assert "declares no periodic task" in (await c.get("/periodic")).text
    await bare.close_async()


# == actions ====================================================================================


async def test_retry_abort_and_cancel(app: pgtq.App, client: httpx.AsyncClient, sql: SQL) -> None:
    send, _ = tasks(app)
    failed, waiting, running, other = await send.defer_many_async(
        [{"to": "a"}, {"to": "b"}, {"to": "c"}, {"to": "d"}]
    )
    finish(sql, [failed], "failed")
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = %s", running)
    csrf = {"csrf_token": await token(client)}

    done = await client.post(f"/jobs/{failed}/retry", data=csrf)
    assert done.status_code == 303
    assert done.headers["location"] == f"/jobs/{failed}?notice=retried"
    assert statuses(sql)[failed] == "todo"
    page = await client.get(done.headers["location"])
    assert f"Job {failed} is waiting again (todo)." in page.text
    assert '<dd id="job-status">todo</dd>' in page.text

    again = await client.post(f"/jobs/{failed}/retry", data=csrf)  # a todo job: no retry
    assert again.headers["location"].endswith("notice=not-retried")
    assert "only failed, aborted or cancelled" in (await client.get(again.headers["location"])).text

    done = await client.post(f"/jobs/{waiting}/cancel", data=csrf)
    assert done.headers["location"] == f"/jobs/{waiting}?notice=cancelled"
    done = await client.post(f"/jobs/{running}/abort", data=csrf)
    assert done.headers["location"] == f"/jobs/{running}?notice=aborted"
    done = await client.post(f"/jobs/{running}/cancel", data=csrf)  # running: abort, not cancel
    assert done.headers["location"].endswith("notice=not-cancelled")
    done = await client.post(f"/jobs/{other}/abort", data=csrf)  # waiting: cancelled at once
    assert done.status_code == 303
    assert statuses(sql) == {
        failed: "todo",
        waiting: "cancelled",
        running: "doing",
        other: "cancelled",
    }
    assert sql("SELECT abort_requested FROM pgtq.jobs WHERE id = %s", running) == [(True,)]

    for action in ("retry", "abort", "cancel"):
        missing = await client.post(f"/jobs/999999/{action}", data=csrf)
        assert missing.status_code == 404
    assert (await client.post(f"/jobs/{failed}/delete", data=csrf)).status_code in (404, 405)


async def test_pause_and_resume_a_queue(app: pgtq.App, client: httpx.AsyncClient) -> None:
    csrf = await token(client)
    done = await client.post("/queues/pause", data={"csrf_token": csrf, "queue": "emails"})
    assert done.status_code == 303 and done.headers["location"] == "/?notice=paused"
    assert [(q.name, q.paused) for q in await app.queues.list_async()] == [("emails", True)]
    assert "Queue paused" in (await client.get(done.headers["location"])).text
    again = await client.post("/queues/pause", data={"csrf_token": csrf, "queue": "emails"})
    assert again.headers["location"] == "/?notice=already-paused"

    done = await client.post("/queues/resume", data={"csrf_token": csrf, "queue": "emails"})
    assert done.headers["location"] == "/?notice=resumed"
    assert [(q.name, q.paused) for q in await app.queues.list_async()] == [("emails", False)]
    nameless = await client.post("/queues/resume", data={"csrf_token": csrf})
    assert nameless.status_code == 400


async def test_pause_resume_and_run_a_periodic_schedule_now(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    @app.periodic(cron="0 4 * * *", periodic_id="nightly", kwargs={"full": True})
    @app.task(queue="backups")
    def backup(timestamp: int, full: bool) -> None: ...

    csrf = await token(client, "/periodic")
    page = (await client.get("/periodic")).text
    assert 'action="/periodic/pause"' in page and 'action="/periodic/run-now"' in page
    assert 'name="periodic_id" value="nightly"' in page and "active" in page
    schedule = {"csrf_token": csrf, "task": "backup", "periodic_id": "nightly"}

    done = await client.post("/periodic/pause", data=schedule)
    assert (
        done.status_code == 303 and done.headers["location"] == "/periodic?notice=schedule-paused"
    )
    [info] = await app.periodic.list_async()
    assert info.paused
    page = (await client.get(done.headers["location"])).text
    assert "Schedule paused" in page and '<span class="status paused">paused</span>' in page
    assert 'action="/periodic/resume"' in page and 'action="/periodic/pause"' not in page
    again = await client.post("/periodic/pause", data=schedule)
    assert again.headers["location"] == "/periodic?notice=schedule-already-paused"

    ran = await client.post("/periodic/run-now", data=schedule)
    [(job_id, queue)] = sql("SELECT id, queue FROM pgtq.jobs")
    assert ran.status_code == 303 and ran.headers["location"] == f"/jobs/{job_id}?notice=run-now"
    assert queue == "backups"
    assert f"Job {job_id} deferred now" in (await client.get(ran.headers["location"])).text
    assert f'href="/jobs/{job_id}">job {job_id}</a>' in (await client.get("/periodic")).text

    done = await client.post("/periodic/resume", data=schedule)
    assert done.headers["location"] == "/periodic?notice=schedule-resumed"
    assert not (await app.periodic.list_async())[0].paused
    again = await client.post("/periodic/resume", data=schedule)
    assert again.headers["location"] == "/periodic?notice=schedule-not-paused"

    unknown = await client.post("/periodic/pause", data={**schedule, "periodic_id": "weekly"})
    assert unknown.status_code == 404 and "(&#39;weekly&#39;)" in unknown.text
    nameless = await client.post("/periodic/pause", data={"csrf_token": csrf})
    assert nameless.status_code == 400
    nul = await client.post("/periodic/pause", data={**schedule, "task": "back\x00up"})
    assert nul.status_code == 400
    forged = await client.post("/periodic/run-now", data={**schedule, "csrf_token": "wrong"})
    assert forged.status_code == 403
    for action in ("pause", "resume", "run-now"):
        assert (await client.get(f"/periodic/{action}?task=backup")).status_code == 405
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(1,)]
    assert not (await app.periodic.list_async())[0].paused


async def test_actions_need_the_csrf_token_of_their_cookie(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    finish(sql, [job_id], "failed")
    good = await token(client)
    forged = "nonce." + "0" * 64  # well formed, not signed by this dashboard
    other_dashboard = security.Csrf(b"another secret").new_token()

    async def post(data: dict[str, str], **headers: str) -> httpx.Response:
        return await client.post(f"/jobs/{job_id}/retry", data=data, headers=headers)

    refused = [
        await post({}),  # no token
        await post({"csrf_token": "wrong"}),
        await post({"csrf_token": good + "x"}),
        await post({"csrf_token": good}, **{"sec-fetch-site": "cross-site"}),
    ]
    client.cookies.set("pgtq_csrf", forged)
    refused.append(await post({"csrf_token": forged}))  # double-submitted, but not signed
    client.cookies.set("pgtq_csrf", other_dashboard)
    refused.append(await post({"csrf_token": other_dashboard}))
    client.cookies.delete("pgtq_csrf")
    refused.append(await post({"csrf_token": good}))  # no cookie
    refused.append(
        await client.post("/queues/pause", data={"csrf_token": "wrong", "queue": "emails"})
    )
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert "CSRF token is missing or does not match" in refused[0].text
    assert statuses(sql) == {job_id: "failed"}
    assert await app.queues.list_async() == []

    client.cookies.set("pgtq_csrf", good)
    assert (
        await post({"csrf_token": good}, **{"sec-fetch-site": "same-origin"})
    ).status_code == 303


async def test_the_csrf_cookie_is_kept_and_guarded(client: httpx.AsyncClient) -> None:
    first = await client.get("/")
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "set-cookie" not in (await client.get("/jobs")).headers  # a valid one is kept


async def test_get_never_changes_anything(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    finish(sql, [job_id], "failed")
    csrf = await token(client)
    for path in (
        f"/jobs/{job_id}/retry?csrf_token={csrf}",
        f"/jobs/{job_id}/cancel",
        f"/jobs/{job_id}/abort",
        f"/queues/pause?queue=emails&csrf_token={csrf}",
        "/queues/resume?queue=emails",
    ):
        assert (await client.get(path)).status_code == 405, path
    assert statuses(sql) == {job_id: "failed"}
    assert await app.queues.list_async() == []


async def test_read_only_shows_no_action_and_refuses_every_post(app: pgtq.App, sql: SQL) -> None:
    send, _ = tasks(app)

    @app.periodic(cron="0 4 * * *", periodic_id="nightly")
    @app.task
    def backup(timestamp: int) -> None: ...

    job_id = await send.defer_async(to="a")
    finish(sql, [job_id], "failed")
    async with client_for(pgtq.web.asgi(app, read_only=True)) as client:
        for path in ("/", "/jobs", f"/jobs/{job_id}", "/jobs?status=failed"):
            page = await client.get(path)
            assert page.status_code == 200
            assert "<form" not in page.text.replace('<form class="filters', ""), path
            assert "read-only" in page.text
        csrf = client.cookies["pgtq_csrf"]
        for action in ("retry", "abort", "cancel"):
            refused = await client.post(f"/jobs/{job_id}/{action}", data={"csrf_token": csrf})
            assert refused.status_code == 403 and "read-only" in refused.text
        for action in ("pause", "resume"):
            refused = await client.post(
                f"/queues/{action}", data={"csrf_token": csrf, "queue": "emails"}
            )
            assert refused.status_code == 403
        page = await client.get("/periodic")
        assert "<form" not in page.text and "nightly" in page.text
        for action in ("pause", "resume", "run-now"):
            refused = await client.post(
                f"/periodic/{action}",
                data={"csrf_token": csrf, "task": "backup", "periodic_id": "nightly"},
            )
            assert refused.status_code == 403 and "read-only" in refused.text
    assert statuses(sql) == {job_id: "failed"}
    assert await app.queues.list_async() == []
    assert sql("SELECT count(*) FROM pgtq.periodic_schedules") == [(0,)]


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def test_basic_auth_guards_every_page_and_action(app: pgtq.App, sql: SQL) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    finish(sql, [job_id], "failed")
    web = pgtq.web.asgi(app, auth="admin:s3cret:with-colon")
    async with client_for(web) as anonymous:
        for path in ("/", "/jobs", f"/jobs/{job_id}", "/workers", "/periodic"):
            denied = await anonymous.get(path)
            assert denied.status_code == 401, path
            assert denied.headers["www-authenticate"].startswith('Basic realm="pgtq"')
        for headers in (
            basic("admin", "wrong"),
            basic("root", "s3cret:with-colon"),
            basic("admin", "s3cret"),
            {"Authorization": "Bearer s3cret"},
            {"Authorization": "Basic not-base64!"},
        ):
            assert (await anonymous.get("/", headers=headers)).status_code == 401
        denied = await anonymous.post(f"/jobs/{job_id}/retry", data={"csrf_token": "x"})
        assert denied.status_code == 401
    async with client_for(web, headers=basic("admin", "s3cret:with-colon")) as user:
        csrf = await token(user)
        for path in ("/jobs", f"/jobs/{job_id}", "/workers", "/periodic"):
            assert (await user.get(path)).status_code == 200
        assert (
            await user.post(f"/jobs/{job_id}/retry", data={"csrf_token": csrf})
        ).status_code == 303
    assert statuses(sql) == {job_id: "todo"}


async def test_mounted_in_a_host_app_under_a_prefix(app: pgtq.App, sql: SQL) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    finish(sql, [job_id], "failed")
    host = Starlette(routes=[Mount("/admin/pgtq", app=pgtq.web.asgi(app))])
    async with client_for(host) as client:
        page = await client.get("/admin/pgtq/jobs?status=failed")
        assert page.status_code == 200
        assert f'href="/admin/pgtq/jobs/{job_id}"' in page.text
        assert 'href="/admin/pgtq/workers"' in page.text
        assert f'action="/admin/pgtq/jobs/{job_id}/retry"' in page.text
        assert "Path=/admin/pgtq" in page.headers["set-cookie"]
        csrf = client.cookies["pgtq_csrf"]
        done = await client.post(f"/admin/pgtq/jobs/{job_id}/retry", data={"csrf_token": csrf})
        assert done.headers["location"] == f"/admin/pgtq/jobs/{job_id}?notice=retried"
        assert (await client.get("/admin/pgtq/")).status_code == 200
    assert statuses(sql) == {job_id: "todo"}


# == who may serve actions where ================================================================


@pytest.mark.parametrize(
    ("host", "exposed"),
    [
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("[::1]", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("192.168.1.10", True),
        ("dashboard.example.com", True),
    ],
)
def test_actions_without_auth_are_served_on_loopback_only(host: str, exposed: bool) -> None:
    assert security.is_loopback(host) is not exposed
    if exposed:
        with pytest.raises(security.Exposed, match=r"--auth USER:PASSWORD.*--read-only"):
            security.check_exposure(host, read_only=False, auth=None)
    else:
        security.check_exposure(host, read_only=False, auth=None)
    security.check_exposure(host, read_only=True, auth=None)
    security.check_exposure(host, read_only=False, auth=security.Credentials("a", "b"))


def test_credentials_are_user_colon_password() -> None:
    assert security.parse_credentials("a:b:c") == security.Credentials("a", "b:c")
    assert security.parse_credentials(("a", "b")) == security.Credentials("a", "b")
    assert "b:c" not in repr(security.parse_credentials("a:b:c"))
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(pgtq.ConfigurationError):
            security.parse_credentials(bad)


def test_pgtq_web_refuses_actions_on_an_open_address_without_auth(dsn: str) -> None:
    result = CliRunner().invoke(
        cli, ["web", "tests.apps.basic:app", "--host", "0.0.0.0"], env={"PGTQ_DSN": dsn}
    )
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "refusing to serve the web dashboard's actions" in message
    assert "0.0.0.0, which is not a loopback address, without authentication" in message
    assert "--auth USER:PASSWORD (or set PGTQ_WEB_AUTH), or --read-only" in message
    assert "Traceback" not in result.output

    bad = CliRunner().invoke(
        cli, ["web", "--host", "0.0.0.0", "--auth", "nocolon"], env={"PGTQ_DSN": dsn}
    )
    assert bad.exit_code == 1 and "USER:PASSWORD" in bad.output


def test_the_server_config_applies_the_same_rule(app: pgtq.App) -> None:
    from pgtq.web import server

    with pytest.raises(security.Exposed):
        server.config(app, host="0.0.0.0")
    with pytest.raises(security.HostsNotGiven):  # every address: say which names it answers
        server.config(app, host="0.0.0.0", read_only=True)
    names = ["dash.example.com"]
    exposed = server.config(app, host="0.0.0.0", read_only=True, port=9999, allowed_hosts=names)
    assert (exposed.host, exposed.port) == ("0.0.0.0", 9999)
    guarded = server.config(
        app, host="0.0.0.0", auth=security.Credentials("a", "b"), allowed_hosts=names
    )
    assert guarded.host == "0.0.0.0"
    assert server.config(app, root_path="/pgtq").root_path == "/pgtq"


async def test_a_database_without_pgtq_tables_is_a_page_saying_so(
    make_database: Callable[[], Any],
) -> None:
    bare = pgtq.App(make_database())
    async with client_for(pgtq.web.asgi(bare)) as client:
        for path in ("/", "/jobs", "/jobs/1", "/workers"):
            page = await client.get(path)
            assert page.status_code == 503, path
            assert "run `pgtq migrate`" in page.text
    await bare.close_async()


def test_pgtq_web_on_a_database_without_pgtq_tables_is_one_line(
    make_database: Callable[[], Any],
) -> None:
    url = make_database().render_as_string(hide_password=False)
    result = CliRunner().invoke(cli, ["web", "--dsn", url], env={"PGTQ_DSN": None})
    assert result.exit_code == 1
    assert "pgtq migrate" in result.output and "Traceback" not in result.output


async def test_every_response_forbids_scripts_framing_and_caching(app: pgtq.App) -> None:
    guarded = pgtq.web.asgi(app, auth="a:b")
    async with client_for(pgtq.web.asgi(app)) as client, client_for(guarded) as anonymous:
        csrf = await token(client)
        responses = [
            await client.get("/"),
            await client.get("/jobs/1"),  # 404
            await client.get("/nowhere"),
            await client.post("/queues/pause", data={"csrf_token": csrf, "queue": "q"}),  # 303
            await anonymous.get("/"),  # 401
        ]
    assert [r.status_code for r in responses] == [200, 404, 404, 303, 401]
    for response in responses:
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src" not in policy
        assert "frame-ancestors 'self'" in policy
        assert response.headers["x-frame-options"] == "SAMEORIGIN"
        assert response.headers["cache-control"] == "no-store"


async def test_out_of_range_input_is_a_client_error(client: httpx.AsyncClient) -> None:
    huge = str(2**63)
    assert (await client.get(f"/jobs/{huge}")).status_code == 404
    assert (await client.get(f"/jobs?after={huge}")).status_code == 400
    csrf = await token(client)
    assert (await client.post(f"/jobs/{huge}/retry", data={"csrf_token": csrf})).status_code == 404
    for query in ("q=%00", "queue=a%00b", "task=%00"):
        assert (await client.get(f"/jobs?{query}")).status_code == 200, query


async def test_a_page_reloads_itself_when_asked(client: httpx.AsyncClient) -> None:
    assert '<meta http-equiv="refresh" content="10">' in (await client.get("/?refresh=10")).text
    assert 'http-equiv="refresh"' not in (await client.get("/workers?refresh=")).text
    for bad in ("1", "abc", "99999", "-5", "²", "10.5", "9" * 5000):
        page = await client.get("/workers?refresh=" + bad)
        assert page.status_code == 400, bad
        assert "refresh must be a whole number from 2 to 3600" in page.text
        assert 'http-equiv="refresh"' not in page.text


# == tags, metadata and progress (issue 21 part 5) ==============================================
# Tags and meta are set with SQL after the defer, per job (configure(tags=...) is tested in
# tests/test_tags.py and tests/test_defer_each.py).


def tag(sql: SQL, job_id: int, tags: list[str], meta: Any = None) -> None:
    sql(
        "UPDATE pgtq.jobs SET tags = %s, meta = %s::jsonb WHERE id = %s",
        tags,
        None if meta is None else json.dumps(meta),
        job_id,
    )


async def test_jobs_list_filters_by_tags_and_shows_them_as_chips(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, _ = tasks(app)
    a, b, c = await send.defer_many_async([{"to": "a"}, {"to": "b"}, {"to": "c"}])
    tag(sql, a, ["eu", "vip"])
    tag(sql, b, ["eu"])
    page = await client.get("/jobs?tag=eu")
    assert job_ids(page.text) == [b, a]
    assert job_ids((await client.get("/jobs?tag=eu&tag=vip")).text) == [a]
    assert job_ids((await client.get("/jobs?tag=&tag=")).text) == [c, b, a]  # an empty form
    # A chip links to its tag's jobs; the form keeps each tag asked for, and one more field.
    assert '<a class="chip" href="/jobs?tag=vip">vip</a>' in page.text
    assert '<input name="tag" value="eu">' in page.text
    assert '<input name="tag" value="" placeholder="any">' in page.text
    # "All matching" posts the tags with the rest of the filter, and acts on those only.
    assert '<input type="hidden" name="tag" value="eu">' in page.text
    form = {"csrf_token": await token(client, "/jobs"), "action": "cancel", "scope": "matching"}
    done = await client.post("/jobs/many", data={**form, "tag": ["eu", "vip"]})
    assert done.status_code == 303
    assert done.headers["location"] == "/jobs?tag=eu&tag=vip&notice=many-cancelled&n=1"
    assert statuses(sql) == {a: "cancelled", b: "todo", c: "todo"}
    many = "&".join(f"tag=t{i}" for i in range(21))
    assert (await client.get("/jobs?" + many)).status_code == 400


async def test_job_page_shows_tags_and_metadata(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    tag(sql, job_id, ["eu", "batch 7"], {"customer": 42, "source": "import"})
    html = (await client.get(f"/jobs/{job_id}")).text
    assert '<a class="chip" href="/jobs?tag=batch+7">batch 7</a>' in html
    meta = "{\n  &#34;customer&#34;: 42,\n  &#34;source&#34;: &#34;import&#34;\n}"
    assert f'<pre id="meta">{meta}</pre>' in html
    plain = await send.defer_async(to="b")
    html = (await client.get(f"/jobs/{plain}")).text
    assert 'id="tags"' not in html and 'id="meta"' not in html


async def test_tags_meta_and_progress_messages_are_escaped(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, _ = tasks(app)
    evil = "<script>alert('x')</script>"
    job_id = await send.defer_async(to="a")
    tag(sql, job_id, [evil, '"><img src=x onerror=alert(1)>'], {evil: evil})
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', attempts = 1, worker_id = 'w', progress = %s "
        "WHERE id = %s",
        json.dumps({"fraction": 0.5, "message": evil, "attempt": 1}),
        job_id,
    )
    for path in (f"/jobs/{job_id}", "/jobs", f"/jobs?tag={evil}"):
        html = (await client.get(path)).text
        assert "<script>" not in html and "<img" not in html, path
    html = (await client.get(f"/jobs/{job_id}")).text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</a>" in html  # the chip's text
    assert 'title="&lt;script&gt;' in html  # the progress bar's message


async def test_running_jobs_show_their_progress(
    app: pgtq.App, client: httpx.AsyncClient, sql: SQL
) -> None:
    send, _ = tasks(app)
    running, retried, done = await send.defer_many_async([{"to": "a"}, {"to": "b"}, {"to": "c"}])
    sql(
        "UPDATE pgtq.jobs SET status = 'doing', attempts = 2, worker_id = 'w', progress = "
        "jsonb_build_object('fraction', 0.4, 'message', 'rows', 'attempt', id - %s + 2) "
        "WHERE id IN (%s, %s)",
        running,
        running,
        retried,
    )  # ``retried``: the record is of attempt 3, not the one running (2)
    finish(sql, [done], "succeeded")
    last = json.dumps({"fraction": 1, "message": "all"})
    sql("UPDATE pgtq.jobs SET progress = %s WHERE id = %s", last, done)
    page = (await client.get("/jobs")).text
    bar = '<progress class="job-progress" max="1" value="0.4" title="rows">40%</progress>'
    rows = dict(re.findall(r'<tr data-job="(\d+)">(.*?)</tr>', page, re.S))
    assert bar in rows[str(running)]
    assert "<progress" not in rows[str(retried)] and "<progress" not in rows[str(done)]
    assert 'id="live"' in page and 'href="/jobs?refresh=2">follow their progress' in page
    html = (await client.get(f"/jobs/{running}")).text
    assert '<dd id="progress">' + bar in html and f'href="/jobs/{running}?refresh=2">follow' in html
    live = (await client.get(f"/jobs/{running}?refresh=2")).text
    assert '<meta http-equiv="refresh" content="2">' in live and "follow live" not in live
    html = (await client.get(f"/jobs/{done}")).text
    assert '<dt>last progress</dt><dd id="progress">100% all</dd>' in html
    assert 'id="live"' not in (await client.get("/jobs?status=succeeded")).text


async def test_the_dashboard_follows_a_task_reporting_progress(
    app: pgtq.App, client: httpx.AsyncClient
) -> None:
    """Through a real worker: the page shows the bar the task's last report draws."""
    release = threading.Event()

    @app.task
    def crunch(ctx: pgtq.JobContext) -> None:
        for i in range(101):
            ctx.set_progress(0.4 * i / 100, f"row {i}")
        release.wait(30)

    job_id = await crunch.defer_async()
    worker = asyncio.create_task(app.run_worker_async(wait=False))
    try:

        async def shown() -> bool:
            html = (await client.get(f"/jobs/{job_id}")).text
            return 'value="0.4" title="row 100">40%</progress>' in html

        await eventually(shown)
    finally:
        release.set()
        await worker
