"""The tasks of the FastAPI example: imported by the web app (to defer) and by the worker.

Worker, in its own process::

    pgtq worker examples.fastapi_app.tasks:app
"""

from __future__ import annotations

import asyncio

import pgtq

app = pgtq.App()  # the DSN comes from PGTQ_DSN


@app.task(queue="images")
async def make_thumbnail(image_id: int, size: int = 128) -> dict[str, int]:
    """An async task: runs on the worker's event loop."""
    await asyncio.sleep(0)  # stands in for fetching, resizing and storing the image
    return {"image_id": image_id, "size": size}
