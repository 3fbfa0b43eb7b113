"""A Flask app that defers a job from a view: the sync API, no event loop anywhere.

Run it::

    export PGTQ_DSN=postgresql://localhost/mydb
    pgtq migrate
    flask --app examples.flask_app.app run            # the web app
    pgtq worker examples.flask_app.app:jobs           # a worker, in another terminal
    curl -X POST localhost:5000/signup -d email=ada@example.com
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request

import pgtq

jobs = pgtq.App()  # the DSN comes from PGTQ_DSN


@jobs.task(queue="emails", retry=pgtq.Retry(max_attempts=5, backoff="exponential"))
def send_welcome(ctx: pgtq.JobContext, email: str) -> dict[str, Any]:
    """Stands in for an SMTP call: what it returns is stored as the job's result."""
    return {"sent_to": email, "attempt": ctx.attempt}


web = Flask(__name__)


@web.post("/signup")
def signup() -> tuple[dict[str, Any], int]:
    email = request.form.get("email", "")
    if "@" not in email:
        return {"error": "an email address is needed"}, 400
    job_id = send_welcome.defer(email=email)
    return {"job": job_id}, 202


@web.get("/jobs/<int:job_id>")
def job_status(job_id: int) -> tuple[dict[str, Any], int]:
    job = jobs.jobs.get(job_id)
    if job is None:
        return {"error": "no such job"}, 404
    return {"status": job.status.value, "result": job.result}, 200
