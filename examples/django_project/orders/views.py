"""Views that create an order and enqueue its confirmation in one transaction."""

from __future__ import annotations

import json

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from orders.models import Order
from orders.tasks import confirm_order


class Refused(Exception):
    """The view changed its mind: everything in its transaction rolls back."""


@csrf_exempt
@require_POST
def create_order(request: HttpRequest) -> HttpResponse:
    """The order and its job commit together, or neither exists (``?fail=1`` rolls back)."""
    try:
        with transaction.atomic():
            order = Order.objects.create(
                email=request.POST["email"], total_cents=int(request.POST["total_cents"])
            )
            result = confirm_order.enqueue(order.pk)
            if request.POST.get("fail"):
                raise Refused("rolled back on request")
    except Refused:
        return JsonResponse({"error": "rolled back"}, status=409)
    return JsonResponse({"order": order.pk, "task": result.id}, status=202)


@csrf_exempt
@require_POST
async def create_order_async(request: HttpRequest) -> HttpResponse:
    """An async view: the async ORM, then ``aenqueue``."""
    body = json.loads(request.body or b"{}")
    order = await Order.objects.acreate(email=body["email"], total_cents=body["total_cents"])
    result = await confirm_order.aenqueue(order.pk)
    return JsonResponse({"order": order.pk, "task": result.id}, status=202)


@require_GET
def task_status(request: HttpRequest, result_id: str) -> HttpResponse:
    result = confirm_order.get_result(result_id)
    body: dict[str, object] = {"status": str(result.status), "attempts": result.attempts}
    if result.is_finished and result.status == "SUCCESSFUL":
        body["return_value"] = result.return_value
    return JsonResponse(body)
