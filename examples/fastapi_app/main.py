"""A FastAPI app that defers jobs with ``defer_async``; a worker runs them in another process.

Run it::

    export PGTQ_DSN=postgresql://localhost/mydb
    pgtq migrate
    uvicorn examples.fastapi_app.main:api              # the web app
    pgtq worker examples.fastapi_app.tasks:app         # the worker, in another terminal
    curl -X POST localhost:8000/images/7/thumbnail
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException

from examples.fastapi_app.tasks import app as jobs
from examples.fastapi_app.tasks import make_thumbnail


@asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    # Connect at startup (a bad DSN fails here, not at the first request) and release the
    # connections of this event loop at shutdown.
    async with jobs:
        yield


api = FastAPI(lifespan=lifespan)


@api.post("/images/{image_id}/thumbnail", status_code=202)
async def thumbnail(image_id: int, size: int = 128) -> dict[str, int]:
    job_id = await make_thumbnail.defer_async(image_id=image_id, size=size)
    return {"job": job_id}


@api.get("/jobs/{job_id}")
async def job_status(job_id: int) -> dict[str, Any]:
    job = await jobs.jobs.get_async(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    return {"status": job.status.value, "result": job.result}
