"""The web dashboard against hostile requests (issue 16): the Host allow-list that blocks DNS
rebinding, the Origin check on actions, 400 (never 500) for bad numbers, queue names and
schedule names, and
empty credentials refused instead of read as "no auth".

Requests go through httpx's ASGITransport into the real app, on the real database; the
``pgtq web`` tests run the real command up to the server's start and probe the app it built.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from typer.testing import CliRunner

import pgtq
import pgtq.web
from pgtq.cli import cli
from pgtq.web import security, server
from tests.test_operations import SQL, finish, tasks
from tests.test_web import client_for, statuses, token

SECRET = "arguments-nobody-else-may-read"


@pytest.fixture
async def client(app: pgtq.App) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(pgtq.web.asgi(app)) as c:
        yield c


async def secret_job(app: pgtq.App) -> int:
    send, _ = tasks(app)
    return await send.defer_async(to=SECRET)


# == the Host allow-list =========================================================================


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8080", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:8080", "[::1]:8080"],
)
async def test_loopback_names_are_answered_by_default(app: pgtq.App, host: str) -> None:
    job_id = await secret_job(app)
    async with client_for(pgtq.web.asgi(app)) as client:
        page = await client.get(f"/jobs/{job_id}", headers={"host": host})
    assert page.status_code == 200
    assert SECRET in page.text


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",
        "attacker.example:8080",
        "localhost.attacker.example",
        "127.0.0.1.nip.io",
        "127.0.0.2",  # loopback, but not a name the default server is reached by
        "[::2]",
        "",
        "local host",
    ],
)
async def test_any_other_host_is_refused_before_anything_is_read(app: pgtq.App, host: str) -> None:
    job_id = await secret_job(app)
    async with client_for(pgtq.web.asgi(app)) as client:
        for path in ("/", "/jobs", f"/jobs/{job_id}", "/workers", "/periodic", "/nowhere"):
            page = await client.get(path, headers={"host": host})
            assert page.status_code == 400, (host, path)
            assert SECRET not in page.text
            assert "pgtq_csrf" not in page.headers.get("set-cookie", "")
            # Still sent with the security headers (SecurityHeaders is outermost).
            assert page.headers["cache-control"] == "no-store"


async def test_a_refused_host_never_reaches_the_database(
    make_database: Callable[[], Any],
) -> None:
    """On a database without pgtq's tables a page is a 503 saying so: a refused Host is a 400,
    so no query was even tried."""
    bare = pgtq.App(make_database())
    async with client_for(pgtq.web.asgi(bare)) as client:
        assert (await client.get("/")).status_code == 503
        assert (await client.get("/", headers={"host": "attacker.example"})).status_code == 400
    await bare.close_async()


async def test_a_rebound_post_cancels_nothing(app: pgtq.App, sql: SQL) -> None:
    """DNS rebinding: the attacker's page, now same-origin with the dashboard, read a token and
    posts it; the browser sends the attacker's name as Host."""
    send, _ = tasks(app)
    waiting, failed = await send.defer_many_async([{"to": "a"}, {"to": "b"}])
    finish(sql, [failed], "failed")
    async with client_for(pgtq.web.asgi(app)) as client:
        csrf = {"csrf_token": await token(client)}
        rebound = {"host": "attacker.example:8080"}
        for path, data in (
            (f"/jobs/{waiting}/cancel", csrf),
            (f"/jobs/{waiting}/abort", csrf),
            (f"/jobs/{failed}/retry", csrf),
            ("/queues/pause", {**csrf, "queue": "emails"}),
        ):
            refused = await client.post(path, data=data, headers=rebound)
            assert refused.status_code == 400, path
        assert statuses(sql) == {waiting: "todo", failed: "failed"}
        assert not any(q.paused for q in await app.queues.list_async())
        # The same request with the dashboard's own name goes through.
        done = await client.post(f"/jobs/{waiting}/cancel", data=csrf)
        assert done.status_code == 303
    assert statuses(sql) == {waiting: "cancelled", failed: "failed"}


async def test_allowed_hosts_extend_the_loopback_names(app: pgtq.App) -> None:
    web = pgtq.web.asgi(app, allowed_hosts=["Dash.Example.com", "*.corp.example", "10.0.0.7"])

    async def status(host: str) -> int:
        async with client_for(web) as client:
            return (await client.get("/workers", headers={"host": host})).status_code

    for host in ("dash.example.com:443", "a.corp.example", "b.a.corp.example", "10.0.0.7:80"):
        assert await status(host) == 200, host
    assert await status("localhost:8080") == 200  # loopback names stay allowed
    for host in ("example.com", "corp.example", "evil.dash.example.com", "10.0.0.8"):
        assert await status(host) == 400, host

    anything = pgtq.web.asgi(app, allowed_hosts=["*"])  # the host app checks Host itself
    async with client_for(anything) as client:
        assert (await client.get("/workers", headers={"host": "x.example"})).status_code == 200


def test_allowed_host_patterns() -> None:
    assert security.host_pattern(" Dash.Example.COM ") == "dash.example.com"
    assert security.host_pattern("::1") == "[::1]"
    assert security.host_pattern("[0:0::1]") == "[::1]"
    assert security.host_pattern("*.example.com") == "*.example.com"
    assert security.host_pattern("*") == "*"
    for bad in ("", " ", "http://x.example", "x.example:80", "a b", "*example.com", "a.*.b", ".."):
        with pytest.raises(pgtq.ConfigurationError, match="--allowed-host"):
            security.host_pattern(bad)

    loopback = list(security.LOOPBACK_HOSTS)
    assert security.allowed_hosts_for("127.0.0.1") == loopback
    assert security.allowed_hosts_for("localhost") == loopback
    assert security.allowed_hosts_for("::1") == loopback
    assert security.allowed_hosts_for("127.0.0.2") == [*loopback, "127.0.0.2"]
    assert security.allowed_hosts_for("192.168.1.10", ["a.example"]) == [
        *loopback,
        "192.168.1.10",
        "a.example",
    ]
    assert security.allowed_hosts_for("0.0.0.0", ["a.example"]) == [*loopback, "a.example"]
    assert security.allowed_hosts_for("0.0.0.0", ["a.example", "*"]) == ["*"]
    for everywhere in ("0.0.0.0", "::", "[::]"):
        with pytest.raises(security.HostsNotGiven, match="--allowed-host NAME"):
            security.allowed_hosts_for(everywhere)


async def test_a_post_from_another_origin_is_refused(app: pgtq.App, sql: SQL) -> None:
    send, _ = tasks(app)
    job_id = await send.defer_async(to="a")
    async with client_for(pgtq.web.asgi(app)) as client:
        csrf = {"csrf_token": await token(client)}
        for origin in ("http://attacker.example", "null", "http://localhost.attacker.example"):
            refused = await client.post(
                f"/jobs/{job_id}/cancel", data=csrf, headers={"origin": origin}
            )
            assert refused.status_code == 403, origin
            assert "allowed hosts (pgtq web --allowed-host)" in refused.text
        assert statuses(sql) == {job_id: "todo"}
        done = await client.post(
            f"/jobs/{job_id}/cancel", data=csrf, headers={"origin": "http://localhost:8080"}
        )
        assert done.status_code == 303
    assert statuses(sql) == {job_id: "cancelled"}


# == bad numbers and names: 400 or 404, never 500 ================================================


@pytest.mark.parametrize(
    "query",
    [
        "after=²",
        "after=-1",
        "after=1e3",
        "after=0x10",
        "after=%EF%BC%91",  # a full-width digit one
        f"after={2**63}",
        "after=" + "9" * 5000,
        "refresh=²",
        "refresh=-10",
        "refresh=" + "9" * 5000,
        "status=bogus",
    ],
)
async def test_a_bad_number_in_the_query_is_400(client: httpx.AsyncClient, query: str) -> None:
    page = await client.get(f"/jobs?{query}")
    assert page.status_code == 400
    assert "must be" in page.text or "status" in page.text
    assert len(page.text) < 20_000  # the bad value is not echoed whole


async def test_every_page_checks_its_refresh(client: httpx.AsyncClient) -> None:
    for path in ("/", "/jobs", "/jobs/1", "/workers", "/periodic"):
        assert (await client.get(f"{path}?refresh=²")).status_code == 400, path
    assert (await client.get("/workers?refresh= 10 ")).status_code == 200


async def test_a_job_id_no_job_can_have_is_404(client: httpx.AsyncClient) -> None:
    csrf = {"csrf_token": await token(client)}
    for job_id in ("0", "²", "-1", "1e3", str(2**63), "9" * 5000, "abc"):
        page = await client.get(f"/jobs/{job_id}")
        assert page.status_code == 404, job_id
        assert "No job with id" in page.text
        for action in ("retry", "abort", "cancel"):
            done = await client.post(f"/jobs/{job_id}/{action}", data=csrf)
            assert done.status_code == 404, (job_id, action)


async def test_a_queue_name_is_checked_before_pausing(
    app: pgtq.App, client: httpx.AsyncClient
) -> None:
    csrf = await token(client)

    async def post(action: str, name: str) -> httpx.Response:
        return await client.post(f"/queues/{action}", data={"csrf_token": csrf, "queue": name})

    for action in ("pause", "resume"):
        too_long = await post(action, "q" * 10_000)
        assert too_long.status_code == 400
        assert "at most 255 bytes of UTF-8; this one is 10,000" in too_long.text
        assert (await post(action, "é" * 128)).status_code == 400  # 256 bytes
        nul = await post(action, "a\x00b")
        assert nul.status_code == 400 and "NUL" in nul.text
        assert (await post(action, "   ")).status_code == 400
    assert await app.queues.list_async() == []
    assert (await post("pause", "é" * 127)).status_code == 303  # 254 bytes
    assert [q.name for q in await app.queues.list_async()] == ["é" * 127]


async def test_the_periodic_actions_are_guarded_like_the_others(app: pgtq.App, sql: SQL) -> None:
    @app.periodic(cron="0 4 * * *")
    @app.task
    def backup(timestamp: int) -> None: ...

    async with client_for(pgtq.web.asgi(app)) as client:
        form = {"csrf_token": await token(client, "/periodic"), "task": "backup"}
        for action in ("pause", "resume", "run-now"):
            path = f"/periodic/{action}"
            rebound = await client.post(path, data=form, headers={"host": "attacker.example"})
            assert rebound.status_code == 400, path
            other = await client.post(
                path, data=form, headers={"origin": "http://attacker.example"}
            )
            assert other.status_code == 403, path
            too_long = await client.post(path, data={**form, "task": "t" * 10_000})
            assert too_long.status_code == 400 and "at most 1000 bytes" in too_long.text
            blank = await client.post(path, data={**form, "task": "  "})
            assert blank.status_code == 400
        assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]
        assert sql("SELECT count(*) FROM pgtq.periodic_schedules") == [(0,)]
        done = await client.post("/periodic/pause", data=form)  # no periodic_id: the one without
        assert done.status_code == 303
    assert [p.paused for p in await app.periodic.list_async()] == [True]


# == empty credentials ===========================================================================


def test_empty_credentials_are_refused_by_the_factory(app: pgtq.App) -> None:
    for auth in ("", ":", "user:", ":password", ("", ""), ("user", ""), ("", "pw")):
        with pytest.raises(pgtq.ConfigurationError):
            pgtq.web.asgi(app, auth=auth)
    with pytest.raises(pgtq.ConfigurationError, match="must not be empty"):
        pgtq.web.asgi(app, auth=security.Credentials("", "pw"))
    with pytest.raises(pgtq.ConfigurationError, match="must not be empty"):
        security.BasicAuth(Starlette(), security.Credentials("user", ""))


# == pgtq web ====================================================================================


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[uvicorn.Config]]:
    """``pgtq web`` runs for real up to ``uvicorn.Server.run``, which only records its config
    (no port is opened): the app it would serve is probed through ASGI. The busy-port check
    binds for real, so it is skipped here: these tests name addresses this machine need not
    have (10.0.0.7) and a port another program may hold; tests/test_queues_messages.py
    covers it."""
    configs: list[uvicorn.Config] = []
    monkeypatch.setattr(server, "check_port", lambda host, port: None)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: configs.append(self.config))
    monkeypatch.delenv("PGTQ_WEB_AUTH", raising=False)
    yield configs


def host_statuses(config: uvicorn.Config, hosts: list[str]) -> list[int]:
    """The status of ``/jobs/none`` (a 404 read from no table) for each Host header."""

    async def probe() -> list[int]:
        async with client_for(config.app) as client:
            return [
                (await client.get("/jobs/none", headers={"host": h})).status_code for h in hosts
            ]

    return asyncio.run(probe())


def pgtq_web(dsn: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, ["web", "--dsn", dsn, *args], env=env or {})


def test_pgtq_web_answers_loopback_names_by_default(dsn: str, served: list[Any]) -> None:
    result = pgtq_web(dsn)
    assert result.exit_code == 0, result.output
    assert "hosts localhost, 127.0.0.1, [::1]" in " ".join(result.output.split())
    [config] = served
    hosts = ["localhost:8080", "127.0.0.1:8080", "[::1]:8080", "attacker.example", "10.0.0.7"]
    assert host_statuses(config, hosts) == [404, 404, 404, 400, 400]


def test_pgtq_web_allowed_host_is_repeatable(dsn: str, served: list[Any]) -> None:
    result = pgtq_web(dsn, "--allowed-host", "dash.example.com", "--allowed-host", "*.corp.example")
    assert result.exit_code == 0, result.output
    [config] = served
    hosts = ["dash.example.com", "x.corp.example:80", "localhost", "attacker.example"]
    assert host_statuses(config, hosts) == [404, 404, 404, 400]


def test_pgtq_web_on_a_specific_address_answers_it(dsn: str, served: list[Any]) -> None:
    result = pgtq_web(dsn, "--host", "10.0.0.7", "--read-only")
    assert result.exit_code == 0, result.output
    [config] = served
    assert host_statuses(config, ["10.0.0.7:8080", "attacker.example"]) == [404, 400]


def test_pgtq_web_on_every_address_needs_allowed_hosts(dsn: str, served: list[Any]) -> None:
    result = pgtq_web(dsn, "--host", "0.0.0.0", "--read-only")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "listens on every address" in message and "--allowed-host NAME" in message
    assert "Traceback" not in result.output
    bad = pgtq_web(dsn, "--allowed-host", "http://x.example:80")
    assert bad.exit_code == 1 and "is not a host name or address" in " ".join(bad.output.split())
    assert served == []

    ok = pgtq_web(dsn, "--host", "0.0.0.0", "--read-only", "--allowed-host", "dash.example.com")
    assert ok.exit_code == 0, ok.output
    [config] = served
    assert host_statuses(config, ["dash.example.com", "attacker.example"]) == [404, 400]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--auth", ""], {}, "USER:PASSWORD"),
        (["--auth", ":"], {}, "must not be empty"),
        (["--auth", "user:"], {}, "must not be empty"),
        (["--auth", ":secret"], {}, "must not be empty"),
        ([], {"PGTQ_WEB_AUTH": ""}, "PGTQ_WEB_AUTH is set but empty"),
        ([], {"PGTQ_WEB_AUTH": "user:"}, "must not be empty"),
    ],
)
def test_pgtq_web_refuses_empty_credentials(
    dsn: str, served: list[Any], args: list[str], env: dict[str, str], message: str
) -> None:
    result = pgtq_web(dsn, *args, env=env)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert served == []  # never served, with or without auth
