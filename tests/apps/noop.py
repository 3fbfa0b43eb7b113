"""Async no-op jobs (the command-line burn-down) and a task that fails (the log lines)."""

from __future__ import annotations

import pgtq

app = pgtq.App()  # the database comes from PGTQ_DSN / --dsn


@app.task()
async def noop() -> None:
    return None


@app.task()
async def explode(reason: str) -> None:
    raise ValueError(reason)


@app.task(retry=pgtq.Retry(max_attempts=2, backoff="fixed", base=0, jitter=0))
async def flaky() -> None:
    """Fails each attempt; the first is retried at once."""
    raise RuntimeError("try again")


def tuned() -> pgtq.App:
    """The app with defaults for its workers, as a factory sets them."""
    app.worker_options.update(concurrency=3, batch_size=2, heartbeat_interval=4.0)
    return app
