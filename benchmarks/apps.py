"""The app the command-line burn-down loads: ``pgtq worker benchmarks.apps:app``.

Two no-op tasks with the benchmark's task names (``benchmarks.libs.base.ASYNC_TASK`` and
``SYNC_TASK``), so the driver fills the queue with the pgtq adapter's enqueuer. The app has
no DSN of its own: the command gets ``--dsn``, the in-process twin (``benchmarks.inprocess``)
calls ``app.use_dsn``. Importable from the repository root (``python -m`` from there, or
``PYTHONPATH`` set to it), as a user's ``myproject.tasks:app`` is from theirs.
"""

from __future__ import annotations

import pgtq

app = pgtq.App()


@app.task(name="noop_async")
async def noop_async(n: int) -> None:
    return None


@app.task(name="noop_sync")
def noop_sync(n: int) -> None:
    return None
