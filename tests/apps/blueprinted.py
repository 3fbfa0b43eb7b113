"""An app that takes its tasks from a blueprint, under a namespace."""

from __future__ import annotations

import pgtq
from tests.apps import billing

app = pgtq.App()
app.add_tasks_from(billing.bp, namespace="billing")
