"""The shop's tasks: Django's Tasks framework (``@task``) and pgtq's own API, side by side.

``manage.py pgtq worker`` imports every installed app's ``tasks`` module and runs both kinds.
"""

from __future__ import annotations

from django.utils import timezone

try:  # Django >= 6.0
    from django.tasks import task  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # Django 5.2: the django-tasks backport
    from django_tasks import task  # type: ignore[import-not-found, unused-ignore, no-redef]

from orders.models import Order
from pgtq.contrib.django import app


@task(queue_name="emails", priority=10)
def confirm_order(order_id: int) -> dict[str, object]:
    """Uses the ORM: the order exists, since the job committed with it."""
    order = Order.objects.get(pk=order_id)
    order.confirmed_at = timezone.now()
    order.save(update_fields=["confirmed_at"])
    return {"order": order.pk, "email": order.email}


@task(takes_context=True)
def attempt_number(context, label: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {"label": label, "attempt": context.attempt, "id": context.task_result.id}


@task()
async def double(n: int) -> int:
    return n * 2


@task()
def refuse(reason: str) -> None:
    raise ValueError(reason)


# pgtq's own API on the same database: retries, locks, periodic tasks, ...
@app.task(queue="default", retry=3)
def count_orders() -> int:
    return Order.objects.count()
