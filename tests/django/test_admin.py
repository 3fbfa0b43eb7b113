"""pgtq in Django's admin (the example project, Django's test client): the pages render, the
filters and the search work, a job's page shows its history, the actions change jobs and
queues through pgtq's API, and only for users with their permission."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy.engine import URL

import pgtq.testing
from tests.django.conftest import SQL

pytestmark = pytest.mark.timeout(60)


def client_for(*permissions: str, superuser: bool = False) -> Any:
    from django.contrib.auth.models import Permission, User
    from django.test import Client

    name = f"u{uuid.uuid4().hex[:10]}"
    if superuser:
        user = User.objects.create_superuser(name, f"{name}@example.com", "pw")
    else:
        user = User.objects.create_user(name, password="pw", is_staff=True)
        for codename in permissions:
            user.user_permissions.add(Permission.objects.get(codename=codename))
    client = Client()
    client.force_login(user)
    return client


def act(client: Any, model: str, action: str, *ids: object) -> Any:
    return client.post(
        f"/admin/pgtq/{model}/",
        {"action": action, "_selected_action": [str(i) for i in ids]},
        follow=True,
    )


def test_pages_render_with_filters_search_and_history(project: URL) -> None:
    from orders.tasks import double, refuse

    from pgtq.contrib.django import app

    failed = refuse.enqueue("needle-in-args")
    waiting = double.enqueue(3)
    pgtq.testing.drain(app, queues=["default"])
    double.enqueue(4)
    app.queues.pause("emails")
    client = client_for(superuser=True)

    for model in ("job", "jobevent", "worker", "queue"):
        page = client.get(f"/admin/pgtq/{model}/")
        assert page.status_code == 200, (model, page.content[:500])
    jobs = client.get("/admin/pgtq/job/?status__exact=failed")
    assert jobs.status_code == 200
    assert jobs.context["cl"].result_count == 1
    found = client.get("/admin/pgtq/job/?q=needle-in")
    assert [j.pk for j in found.context["cl"].result_list] == [int(failed.id)]
    by_task = client.get("/admin/pgtq/job/?task_name__exact=orders.tasks.double")
    assert by_task.context["cl"].result_count == 2
    waiting_ones = client.get("/admin/pgtq/job/?task_name__exact=orders.tasks.double&status=todo")
    assert waiting_ones.context["cl"].result_count == 1
    queues = client.get("/admin/pgtq/queue/")
    assert b"emails" in queues.content

    page = client.get(f"/admin/pgtq/job/{failed.id}/change/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "history" in text and "ValueError: needle-in-args" in text
    assert "started" in text and "failed" in text
    assert client.get(f"/admin/pgtq/job/{waiting.id}/change/").status_code == 200


def test_actions_retry_abort_cancel_and_pause(project: URL, django_sql: SQL) -> None:
    from orders.tasks import double, refuse

    from pgtq.contrib.django import app

    failed = refuse.enqueue("once")
    pgtq.testing.drain(app)
    waiting, other = double.enqueue(1), double.enqueue(2)
    client = client_for(superuser=True)

    response = act(client, "job", "retry_jobs", failed.id)
    assert "Retried 1 of 1 selected job(s)" in response.content.decode()
    assert refuse.get_result(failed.id).status == "READY"
    act(client, "job", "abort_jobs", waiting.id)
    act(client, "job", "cancel_jobs", other.id)
    statuses = django_sql("SELECT id, status FROM pgtq.jobs ORDER BY id")
    assert statuses == [
        (int(failed.id), "todo"),
        (int(waiting.id), "cancelled"),
        (int(other.id), "cancelled"),
    ]

    app.queues.pause("emails")  # a row in pgtq.queues
    app.queues.resume("emails")
    act(client, "queue", "pause_queues", "emails")
    assert django_sql("SELECT paused FROM pgtq.queues WHERE name = 'emails'") == [(True,)]
    act(client, "queue", "resume_queues", "emails")
    assert django_sql("SELECT paused FROM pgtq.queues WHERE name = 'emails'") == [(False,)]


def test_actions_need_their_permission(project: URL, django_sql: SQL) -> None:
    from orders.tasks import refuse

    from pgtq.contrib.django import app

    failed = refuse.enqueue("x")
    pgtq.testing.drain(app)
    viewer = client_for("view_job")
    page = viewer.get("/admin/pgtq/job/")
    assert page.status_code == 200
    assert b"retry_jobs" not in page.content  # not offered
    act(viewer, "job", "retry_jobs", failed.id)
    assert django_sql("SELECT status FROM pgtq.jobs") == [("failed",)]
    assert client_for().get("/admin/pgtq/job/").status_code == 403  # staff, no permission

    retrier = client_for("view_job", "retry_job")
    assert b"retry_jobs" in retrier.get("/admin/pgtq/job/").content
    assert b"abort_jobs" not in retrier.get("/admin/pgtq/job/").content
    act(retrier, "job", "retry_jobs", failed.id)
    assert django_sql("SELECT status FROM pgtq.jobs") == [("todo",)]
    # read-only: no add, change or delete, whoever asks
    admin = client_for(superuser=True)
    assert admin.get("/admin/pgtq/job/add/").status_code == 403
    assert admin.post(f"/admin/pgtq/job/{failed.id}/delete/").status_code == 403
