"""The examples run: Flask (test client), FastAPI (httpx's ASGI transport, the worker in another
process) and an Alembic project migrating its own tables and pgtq's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import alembic.command
import psycopg
import pytest
from alembic.config import Config
from sqlalchemy.engine import URL

import pgtq.testing
from pgtq import migrations
from tests.conftest import libpq

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def fresh_example_modules() -> Iterator[None]:
    """Each test imports the examples anew: their apps are module-level, as in a real project."""
    yield
    for name in [m for m in sys.modules if m.startswith("examples.")]:
        del sys.modules[name]


# -- Flask --------------------------------------------------------------------------------------


def test_flask_view_defers_a_job(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flask")
    monkeypatch.setenv("PGTQ_DSN", dsn)
    from examples.flask_app.app import jobs, web

    with pgtq.testing.migrated_schema(jobs):
        client = web.test_client()
        assert client.post("/signup", data={"email": "nope"}).status_code == 400
        response = client.post("/signup", data={"email": "ada@example.com"})
        assert response.status_code == 202
        job_id = response.get_json()["job"]
        assert client.get(f"/jobs/{job_id}").get_json() == {"status": "todo", "result": None}

        stats = pgtq.testing.drain(jobs)

        assert stats.by_status == {"succeeded": 1}
        assert client.get(f"/jobs/{job_id}").get_json() == {
            "status": "succeeded",
            "result": {"sent_to": "ada@example.com", "attempt": 1},
        }
        assert client.get("/jobs/999").status_code == 404


# -- FastAPI ------------------------------------------------------------------------------------


@pytest.fixture
def worker_process(dsn: str) -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(app_path: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PGTQ_DSN": dsn, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgtq", "worker", app_path,
             "--fetch-job-polling-interval", "0.5"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err


async def test_fastapi_endpoint_defers_and_a_worker_process_runs_it(
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    worker_process: Callable[[str], subprocess.Popen[str]],
) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    monkeypatch.setenv("PGTQ_DSN", dsn)
    from examples.fastapi_app.main import api, lifespan
    from examples.fastapi_app.tasks import app as jobs

    worker_process("examples.fastapi_app.tasks:app")
    # httpx's ASGI transport sends no lifespan events: run the app's lifespan around it.
    async with lifespan(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/images/7/thumbnail", params={"size": 64})
            assert response.status_code == 202
            job_id = response.json()["job"]
            result = await jobs.jobs.wait_async(job_id, timeout=30)
            assert result == {"image_id": 7, "size": 64}
            status = (await client.get(f"/jobs/{job_id}")).json()
            assert status == {"status": "succeeded", "result": {"image_id": 7, "size": 64}}
            assert (await client.get("/jobs/999")).status_code == 404


# -- an Alembic project -------------------------------------------------------------------------


def example_config(url: URL) -> Config:
    """The example's alembic.ini as shipped, on a test database.

    pgtq is installed editable here, so ``pgtq:_alembic/versions`` (the wheel's directory) does
    not exist: that entry is pointed at the checkout's revisions, as the example's README says.
    """
    ini = EXAMPLES / "alembic_project" / "alembic.ini"
    cfg = Config(str(ini))
    cfg.attributes["configure_logger"] = False
    locations = cfg.get_main_option("version_locations") or ""
    assert "pgtq:_alembic/versions" in locations
    cfg.set_main_option(
        "version_locations",
        locations.replace("pgtq:_alembic/versions", migrations.version_location()),
    )
    return cfg


def test_alembic_project_migrates_its_tables_and_pgtqs(
    make_database: Callable[[], URL], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_database()
    monkeypatch.setenv(
        "DATABASE_URL",
        url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False),
    )
    monkeypatch.delenv(migrations.SCHEMA_ENV, raising=False)
    monkeypatch.syspath_prepend(str(ROOT))
    cfg = example_config(url)

    alembic.command.upgrade(cfg, "heads")

    with psycopg.connect(libpq(url)) as conn:
        tables = {
            f"{schema}.{name}"
            for schema, name in conn.execute(
                "SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN ('public', 'pgtq')"
            )
        }
        versions = {v for (v,) in conn.execute("SELECT version_num FROM public.alembic_version")}
    assert {"public.orders", "pgtq.jobs", "pgtq.workers", "pgtq.queues"} <= tables
    assert versions == {"app_0001"} | migrations.heads()
    alembic.command.check(cfg)  # autogenerate: no difference, pgtq's schema left alone

    # The application defers in its own transaction: the order and its job commit together.
    app = pgtq.App(url)

    @app.task()
    def confirm(order_id: int) -> None: ...

    with app.sync.engine.begin() as conn:
        from examples.alembic_project.models import orders

        job_id = confirm.defer(order_id=1, connection=conn)
        conn.execute(orders.insert().values(id=1, email="a@x", confirmation_job_id=job_id))
    job = app.jobs.get(job_id)
    assert job is not None and job.args == {"order_id": 1}
    app.close()


def test_every_example_is_tested() -> None:
    """A new example needs a test here."""
    tested = {"flask_app", "fastapi_app", "alembic_project", "django_project"}  # tests/django
    found = {p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert found == tested
