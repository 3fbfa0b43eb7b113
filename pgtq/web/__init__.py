"""``pgtq.web``: a small web dashboard (``pip install 'pgtq[web]'``).

``pgtq web myproject.tasks:app`` serves it; :func:`asgi` builds the ASGI app, to mount in a
Starlette or FastAPI app of your own (``host.mount("/pgtq", pgtq.web.asgi(app))``), where your
middleware can guard it. Server-rendered HTML over the async operations API: overview, jobs,
a job, workers, periodic tasks; and the actions retry, abort, cancel, pause and resume, each a
CSRF-protected POST, none in read-only mode.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.routing import Route

from pgtq.errors import PgtqError
from pgtq.web.security import (
    SECRET_ENV,
    BasicAuth,
    Credentials,
    Csrf,
    SecurityHeaders,
    parse_credentials,
)
from pgtq.web.views import Dashboard

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = ["asgi"]


def asgi(
    app: App,
    *,
    read_only: bool = False,
    auth: str | tuple[str, str] | Credentials | None = None,
    secret: str | bytes | None = None,
    title: str | None = None,
    close_on_shutdown: bool = True,
) -> Starlette:
    """The dashboard of ``app`` as an ASGI app.

    ``read_only``: no action is shown, and every POST is refused (403). ``auth``: HTTP basic
    auth (``"user:password"`` or a pair) on every request; without it, mount the dashboard
    behind your own app's authentication. ``secret`` signs the CSRF tokens (default:
    ``PGTQ_WEB_SECRET``, else random per process): set one when several processes serve the
    dashboard. ``close_on_shutdown``: dispose of the app's async engine when the server
    stops (only when run as the server's own app: a mounted app's lifespan is its host's).
    """
    credentials = parse_credentials(auth) if auth is not None else None
    csrf = Csrf(secret if secret is not None else os.environ.get(SECRET_ENV))
    dashboard = Dashboard(app, read_only=read_only, csrf=csrf, title=title)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if close_on_shutdown:
            await app.close_loop_connector()

    routes = [
        Route("/", dashboard.overview, name="overview"),
        Route("/jobs", dashboard.jobs, name="jobs"),
        Route("/jobs/{job_id:int}", dashboard.job, name="job"),
        Route("/workers", dashboard.workers, name="workers"),
        Route("/periodic", dashboard.periodic, name="periodic"),
        *(
            Route(f"/jobs/{{job_id:int}}/{action}", dashboard.job_action(action), methods=["POST"])
            for action in ("retry", "abort", "cancel")
        ),
        *(
            Route(f"/queues/{action}", dashboard.queue_action(action), methods=["POST"])
            for action in ("pause", "resume")
        ),
    ]
    web = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={PgtqError: dashboard.unavailable},
    )
    if credentials is not None:
        web.add_middleware(BasicAuth, credentials=credentials)
    web.add_middleware(SecurityHeaders)  # outermost: also on the 401 of basic auth
    return web
