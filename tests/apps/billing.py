"""Tasks in a module that does not know the app: a blueprint."""

from __future__ import annotations

import pgtq

bp = pgtq.Blueprint()


@bp.task(queue="billing", aliases=["charge_card"])
def charge(order_id: int) -> str:
    return f"charged {order_id}"
