"""``manage.py pgtq ...`` in the example project: a worker started by ``manage.py pgtq worker``
runs a ``django.tasks`` task (and one of pgtq's own API) and ``get_result`` sees its return
value; the other commands reach the project's database with no DSN given."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.django.conftest import PROJECT, SQL

ROOT = Path(__file__).resolve().parents[2]


def manage_env(url: URL) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGTQ_")}
    env["PYTHONPATH"] = str(ROOT)
    env["DATABASE_URL"] = url.render_as_string(hide_password=False)
    env["DJANGO_SETTINGS_MODULE"] = "shop.settings"
    env["COLUMNS"] = "200"
    return env


def manage(url: URL, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python manage.py ARGS`` in the example project, as a user runs it."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env=manage_env(url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.unit
def test_arguments_name_the_projects_app() -> None:
    from pgtq.contrib.django.management.commands.pgtq import APP_PATH, cli_arguments

    assert cli_arguments(["worker", "-c", "4"]) == ["worker", APP_PATH, "-c", "4"]
    assert cli_arguments(["web", "--port", "8080"]) == ["web", APP_PATH, "--port", "8080"]
    assert cli_arguments(["stats", "--json"]) == ["stats", "--json", "--app", APP_PATH]
    assert cli_arguments(["migrate"]) == ["migrate", "--app", APP_PATH]
    assert cli_arguments(["jobs", "list", "--status", "failed"]) == [
        "jobs",
        "list",
        "--status",
        "failed",
        "--app",
        APP_PATH,
    ]
    assert cli_arguments(["periodic", "list"]) == ["periodic", "list", APP_PATH]
    assert cli_arguments(["jobs"]) == ["jobs"]  # the group's help
    assert cli_arguments(["--help"]) == ["--help"]


@pytest.mark.slow
def test_worker_runs_django_tasks_and_get_result_sees_them(project: URL, django_sql: SQL) -> None:
    from orders.models import Order
    from orders.tasks import confirm_order, count_orders, double

    order = Order.objects.create(email="w@example.com", total_cents=1)
    confirmed = confirm_order.enqueue(order.pk)
    doubled = double.enqueue(8)
    counted = count_orders.defer()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "pgtq", "worker", "--concurrency", "4"],
        cwd=PROJECT,
        env=manage_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (confirmed.status == "SUCCESSFUL" and doubled.status == "SUCCESSFUL"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker did not run the tasks"
            time.sleep(0.1)
            confirmed.refresh()
            doubled.refresh()
        health = manage(project, "pgtq", "healthcheck")
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert confirmed.return_value == {"order": order.pk, "email": "w@example.com"}
    assert len(confirmed.worker_ids) == 1
    assert doubled.return_value == 16
    assert django_sql("SELECT status, result FROM pgtq.jobs WHERE id = %s", counted) == [
        ("succeeded", 1)
    ]
    order.refresh_from_db()
    assert order.confirmed_at is not None


@pytest.mark.slow
def test_commands_reach_the_projects_database(
    project: URL, capsys: pytest.CaptureFixture[str]
) -> None:
    """``manage.py migrate`` as a user runs it; the other commands through the command's own
    entry point in this process (the same arguments, a second each less)."""
    from orders.tasks import double

    from pgtq.contrib.django.management.commands.pgtq import run

    def pgtq(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = run(list(args))
        return code, capsys.readouterr().out

    result = double.enqueue(1)
    migrate = manage(project, "pgtq", "migrate")
    assert migrate.returncode == 0, migrate.stderr
    code, out = pgtq("stats", "--json")
    assert code == 0, out
    queues = {q["name"]: q for q in json.loads(out)["queues"]}
    assert queues["default"]["counts"]["todo"] == 1
    code, out = pgtq("jobs", "list")
    assert code == 0 and "orders.tasks.double" in out, out
    code, out = pgtq("jobs", "show", result.id)
    assert code == 0 and "orders.tasks.double" in out, out
    code, out = pgtq("healthcheck")  # no worker runs
    assert code == 1, out
