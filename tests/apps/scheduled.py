"""An app with periodic schedules, for ``pgtq periodic ...`` (no DSN in the code)."""

from __future__ import annotations

import pgtq

app = pgtq.App()


@app.periodic(cron="0 9 * * *", periodic_id="eu", timezone="Europe/Paris", kwargs={"region": "eu"})
@app.periodic(cron="0 9 * * *", periodic_id="us", timezone="America/New_York",
              kwargs={"region": "us"})  # fmt: skip
@app.task(queue="reports")
def report(timestamp: int, region: str) -> None: ...


@app.periodic(cron="*/5 * * * *")
@app.task
async def tick(timestamp: int) -> None: ...
