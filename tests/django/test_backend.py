"""pgtq as the backend of Django's Tasks framework, in the example project on real PostgreSQL:
enqueue joins ``transaction.atomic()`` (rollback: no job, commit: exactly one), ``aenqueue``
from an async view, ``get_result``/``aget_result`` read what a worker did, and the backend
contract (the ``supports_*`` flags, ``validate_task``, missing and mismatched results)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.engine import URL

import pgtq.testing
from tests.django.conftest import SQL

pytestmark = pytest.mark.timeout(60)


def jobs(sql: SQL) -> list[tuple[Any, ...]]:
    return sql("SELECT task_name, queue, priority, args, status FROM pgtq.jobs ORDER BY id")


class Rollback(Exception):
    pass


def test_rollback_leaves_no_job_commit_leaves_one(project: URL, django_sql: SQL) -> None:
    from django.db import transaction
    from orders.models import Order
    from orders.tasks import confirm_order

    with pytest.raises(Rollback), transaction.atomic():
        order = Order.objects.create(email="a@example.com", total_cents=100)
        confirm_order.enqueue(order.pk)
        assert django_sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]  # not committed yet
        raise Rollback
    assert jobs(django_sql) == []
    assert Order.objects.count() == 0

    with transaction.atomic():
        order = Order.objects.create(email="b@example.com", total_cents=200)
        result = confirm_order.enqueue(order.pk)
        assert django_sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]
    assert jobs(django_sql) == [
        ("orders.tasks.confirm_order", "emails", 10, {"args": [order.pk], "kwargs": {}}, "todo")
    ]
    assert result.id == str(django_sql("SELECT id FROM pgtq.jobs")[0][0])
    assert result.status == "READY"


def test_enqueue_outside_atomic_commits_at_once(project: URL, django_sql: SQL) -> None:
    from orders.tasks import attempt_number

    attempt_number.enqueue("x")
    assert [j[0] for j in jobs(django_sql)] == ["orders.tasks.attempt_number"]


def test_views_commit_or_roll_back_with_their_rows(project: URL, django_sql: SQL) -> None:
    from django.test import Client

    client = Client()
    response = client.post("/orders", {"email": "c@example.com", "total_cents": "5", "fail": "1"})
    assert response.status_code == 409
    assert django_sql("SELECT count(*) FROM orders_order") == [(0,)]
    assert jobs(django_sql) == []

    response = client.post("/orders", {"email": "c@example.com", "total_cents": "5"})
    assert response.status_code == 202, response.content
    body = response.json()
    assert django_sql("SELECT count(*) FROM orders_order") == [(1,)]
    assert django_sql("SELECT id, args FROM pgtq.jobs") == [
        (int(body["task"]), {"args": [body["order"]], "kwargs": {}})
    ]
    assert client.get(f"/tasks/{body['task']}").json() == {"status": "READY", "attempts": 0}

    from pgtq.contrib.django import app

    assert pgtq.testing.drain(app).by_status == {"succeeded": 1}
    assert client.get(f"/tasks/{body['task']}").json() == {
        "status": "SUCCESSFUL",
        "attempts": 1,
        "return_value": {"order": body["order"], "email": "c@example.com"},
    }
    confirmed = django_sql("SELECT confirmed_at IS NOT NULL FROM orders_order")
    assert confirmed == [(True,)]  # the task used the ORM


async def test_async_view_enqueues_with_aenqueue(project: URL, django_sql: SQL) -> None:
    from django.test import AsyncClient
    from orders.tasks import confirm_order

    client = AsyncClient()
    response = await client.post(
        "/orders/async",
        json.dumps({"email": "d@example.com", "total_cents": 7}),
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    body = response.json()
    assert django_sql("SELECT id, task_name FROM pgtq.jobs") == [
        (int(body["task"]), "orders.tasks.confirm_order")
    ]
    result = await confirm_order.aget_result(body["task"])
    assert result.status == "READY"
    assert result.args == [body["order"]]

    from pgtq.contrib.django import app

    assert (await pgtq.testing.drain_async(app)).by_status == {"succeeded": 1}
    await result.arefresh()
    assert result.status == "SUCCESSFUL"
    assert result.return_value == {"order": body["order"], "email": "d@example.com"}


def test_results_of_success_failure_context_and_async_tasks(project: URL) -> None:
    from orders.tasks import attempt_number, double, refuse

    from pgtq.contrib.django import app

    ctx = attempt_number.enqueue(label="first")
    doubled = double.enqueue(21)
    refused = refuse.enqueue("no stock")
    assert pgtq.testing.drain(app).by_status == {"succeeded": 2, "failed": 1}

    ctx.refresh()
    assert ctx.status == "SUCCESSFUL"
    assert ctx.return_value == {"label": "first", "attempt": 1, "id": ctx.id}
    assert ctx.attempts == 1 and ctx.worker_ids[0]
    assert ctx.started_at is not None and ctx.finished_at is not None
    assert ctx.enqueued_at is not None and ctx.is_finished

    assert double.get_result(doubled.id).return_value == 42

    failed = refuse.get_result(refused.id)
    assert failed.status == "FAILED"
    assert failed.is_finished
    with pytest.raises(ValueError, match="Task failed"):
        _ = failed.return_value
    assert len(failed.errors) == 1
    assert failed.errors[0].exception_class is ValueError
    assert "no stock" in failed.errors[0].traceback


def test_priority_queue_and_run_after(project: URL, django_sql: SQL) -> None:
    from django.utils import timezone
    from orders.tasks import double

    later = timezone.now() + timedelta(hours=1)
    result = double.using(priority=-50, queue_name="emails", run_after=later).enqueue(1)
    row = django_sql("SELECT priority, queue, scheduled_at FROM pgtq.jobs")[0]
    assert row[:2] == (-50, "emails")
    assert abs((row[2] - later).total_seconds()) < 0.001
    got = double.get_result(result.id)
    assert (got.task.priority, got.task.queue_name) == (-50, "emails")
    assert got.status == "READY"


def test_backend_contract(project: URL) -> None:
    from orders.tasks import confirm_order, double

    from pgtq.contrib.django import PgtqBackend
    from pgtq.contrib.django.compat import (
        InvalidTaskError,
        TaskResultDoesNotExist,
        task_backends,
    )

    backend = task_backends["default"]
    assert isinstance(backend, PgtqBackend)
    assert backend.supports_defer and backend.supports_async_task
    assert backend.supports_get_result and backend.supports_priority
    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result("12345")
    with pytest.raises(TaskResultDoesNotExist):
        backend.get_result("not-a-number")
    with pytest.raises(InvalidTaskError):
        double.using(queue_name="unlisted")  # QUEUES lists default and emails
    with pytest.raises(InvalidTaskError):
        double.using(priority=101)
    result = double.enqueue(2)
    with pytest.raises(Exception, match="Task does not match"):
        confirm_order.get_result(result.id)
    with pytest.raises(TypeError):
        double.enqueue(object())  # not JSON: refused before anything is written


def test_pgtq_api_defer_joins_atomic(project: URL, django_sql: SQL) -> None:
    """pgtq's own ``task.defer()`` inside ``atomic()`` runs on Django's connection."""
    from django.db import connection, transaction
    from orders.tasks import count_orders

    with pytest.raises(Rollback), transaction.atomic():
        count_orders.defer()
        raise Rollback
    assert jobs(django_sql) == []
    with transaction.atomic():
        job_id = count_orders.defer()
        count_orders.defer_many([{}, {}])
        assert django_sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]
    assert django_sql("SELECT count(*) FROM pgtq.jobs") == [(3,)]
    keyed = count_orders.configure(queueing_lock="once", on_conflict="skip")
    with transaction.atomic():
        first = keyed.defer(connection=connection)
        again = keyed.defer(connection=connection)
    assert first == again and again.duplicate  # type: ignore[attr-defined]
    assert job_id == 2  # the rolled-back insert took id 1 (a sequence never rolls back)


async def test_pgtq_api_defer_async_on_djangos_connection(project: URL, django_sql: SQL) -> None:
    from django.db import connection
    from orders.tasks import count_orders

    job_id = await count_orders.defer_async(connection=connection)  # type: ignore[arg-type]
    other = await count_orders.defer_async()  # pgtq's own async pool
    assert django_sql("SELECT id FROM pgtq.jobs ORDER BY id") == [(job_id,), (other,)]


def test_the_worker_sends_djangos_started_and_finished_signals(project: URL) -> None:
    from orders.tasks import double, refuse

    from pgtq.contrib.django import app
    from pgtq.contrib.django.compat import task_finished, task_started

    heard: list[tuple[str, str, str]] = []

    def started(sender: type, task_result: Any, **kwargs: Any) -> None:
        heard.append(("started", task_result.id, str(task_result.status)))

    def finished(sender: type, task_result: Any, **kwargs: Any) -> None:
        heard.append(("finished", task_result.id, str(task_result.status)))
        raise RuntimeError("a receiver's bug is not the job's")

    task_started.connect(started)
    task_finished.connect(finished)
    try:
        ok = double.enqueue(2)
        bad = refuse.enqueue("no stock")
        assert pgtq.testing.drain(app).by_status == {"succeeded": 1, "failed": 1}
    finally:
        task_started.disconnect(started)
        task_finished.disconnect(finished)
    assert sorted(heard) == sorted(
        [
            ("started", ok.id, "RUNNING"),
            ("finished", ok.id, "SUCCESSFUL"),
            ("started", bad.id, "RUNNING"),
            ("finished", bad.id, "FAILED"),
        ]
    )
