"""The web dashboard in a real browser: ``pgtq web`` serving on 127.0.0.1, Playwright driving
Debian's Chromium (``/usr/bin/chromium``; Playwright's own browser download is never used).

Skipped, saying why, only where Playwright or that Chromium is missing (the nox ``tests``
session installs both when it can, and says so first; ``PGTQ_NO_SYSTEM_INSTALL=1`` tells it not
to install Chromium). In CI (``CI`` set) a missing Chromium fails the test: CI installs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

import pgtq
from tests.system_packages import NO_SYSTEM_INSTALL, without_package

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent

SQL = Callable[..., list[tuple[Any, ...]]]


def without_chromium(environ: Mapping[str, str]) -> tuple[bool, str]:
    """(fail?, why) where chromium is missing (:func:`tests.system_packages.without_package`)."""
    return without_package("chromium", CHROMIUM, "the browser test", environ)


@pytest.mark.unit
@pytest.mark.parametrize("opt_out", ["1", "yes"])
def test_the_opt_out_is_named_in_the_skip(opt_out: str) -> None:
    fail, why = without_chromium({NO_SYSTEM_INSTALL: opt_out})
    assert not fail
    assert f"{NO_SYSTEM_INSTALL} is set" in why and CHROMIUM in why


@pytest.mark.unit
@pytest.mark.parametrize("environ", [{}, {NO_SYSTEM_INSTALL: "0"}, {NO_SYSTEM_INSTALL: ""}])
def test_without_the_opt_out_the_skip_says_how_to_get_chromium(environ: dict[str, str]) -> None:
    fail, why = without_chromium(environ)
    assert not fail
    assert "installs it with apt-get" in why and f"{NO_SYSTEM_INSTALL}=1" in why


@pytest.mark.unit
@pytest.mark.parametrize("opt_out", ["", "1"])
def test_ci_fails_without_chromium_opt_out_or_not(opt_out: str) -> None:
    fail, why = without_chromium({"CI": "true", NO_SYSTEM_INSTALL: opt_out})
    assert fail and why.endswith("CI must run the browser test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(dsn: str, tmp_path: Path) -> Iterator[str]:
    """``pgtq web tests.apps.basic:app`` on a free port of 127.0.0.1; its base URL."""
    port = _free_port()
    env = {**os.environ, "PGTQ_DSN": dsn, "PYTHONPATH": str(ROOT)}
    env.pop("PGTQ_WEB_AUTH", None)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgtq", "web", "tests.apps.basic:app", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pgtq web exited: {(tmp_path / 'server.log').read_text()}")
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"pgtq web did not answer: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_retry_a_failed_job_from_the_browser(
    server: str, dsn: str, sql: SQL, tmp_path: Path
) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed"
    )
    if not os.path.exists(CHROMIUM):
        fail, why = without_chromium(os.environ)
        if fail:
            pytest.fail(why)
        pytest.skip(why)
    expect = sync_api.expect

    app = pgtq.App(dsn)

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    try:
        ok, broken = add.defer_many([{"a": 1, "b": 2}, {"a": 2, "b": "<b>x</b>"}])
    finally:
        app.close()
    sql(
        "UPDATE pgtq.jobs SET status = 'failed', attempts = 1, finished_at = now(), "
        """error = '{"type": "TypeError", "message": "unsupported operand", """
        """"traceback": "Traceback (most recent call last):\\n  ..."}' WHERE id = %s""",
        broken,
    )
    sql(
        "UPDATE pgtq.jobs SET status = 'succeeded', attempts = 1, finished_at = now() "
        "WHERE id = %s",
        ok,
    )

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server + "/")
            expect(page.get_by_role("heading", name="Overview")).to_be_visible()
            expect(page.locator("svg.chart rect.succeeded")).to_have_count(1)
            page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)

            page.get_by_role("navigation").get_by_role("link", name="Jobs").click()
            page.locator("select[name=status]").select_option("failed")
            page.get_by_role("button", name="Filter").click()
            expect(page).to_have_url(server + "/jobs?queue=&status=failed&task=&q=&tag=")
            rows = page.locator("#jobs tbody tr")
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("<b>x</b>")  # shown as text, never as markup
            page.screenshot(path=str(tmp_path / "failed-jobs.png"), full_page=True)

            rows.first.get_by_role("button", name="Retry").click()
            expect(page.locator("#job-status")).to_have_text("todo")
            expect(page.get_by_role("status")).to_contain_text(f"Job {broken} is waiting again")
            page.screenshot(path=str(tmp_path / "retried.png"), full_page=True)
        finally:
            browser.close()
    assert sql("SELECT status FROM pgtq.jobs WHERE id = %s", broken) == [("todo",)]
    assert (tmp_path / "retried.png").stat().st_size > 10_000
