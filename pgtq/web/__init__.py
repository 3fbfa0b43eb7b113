"""``pgtq.web``: a small web dashboard (``pip install 'pgtq[web]'``).

``pgtq web myproject.tasks:app`` serves it; :func:`asgi` builds the ASGI app, to mount in a
Starlette or FastAPI app of your own (``host.mount("/pgtq", pgtq.web.asgi(app))``), where your
middleware can guard it. Server-rendered HTML over the async operations API: overview, jobs,
a job, workers, periodic tasks; and the actions retry, abort, cancel, pause and resume (of a
queue or a periodic schedule) and run now (a schedule), each a CSRF-protected POST, none in
read-only mode. Requests whose ``Host`` is not on the
dashboard's allow-list (loopback names by default) are refused with 400: DNS rebinding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Route

from pgtq.errors import InvalidArguments, PgtqError
from pgtq.jobs import InvalidFilter
from pgtq.web.security import (
    SECRET_ENV,
    BasicAuth,
    Credentials,
    Csrf,
    SecurityHeaders,
    allowed_hosts_for,
    parse_credentials,
)
from pgtq.web.views import BadRequest, Dashboard

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
    allowed_hosts: Sequence[str] = (),
) -> Starlette:
    """The dashboard of ``app`` as an ASGI app.

    ``read_only``: no action is shown, and every POST is refused (403). ``auth``: HTTP basic
    auth (``"user:password"`` or a pair) on every request; without it, mount the dashboard
    behind your own app's authentication. ``secret`` signs the CSRF tokens (default:
    ``PGTQ_WEB_SECRET``, else random per process): set one when several processes serve the
    dashboard. ``close_on_shutdown``: dispose of the app's async engine when the server
    stops (only when run as the server's own app: a mounted app's lifespan is its host's).

    ``allowed_hosts``: the host names and addresses the dashboard answers besides the
    loopback names (``localhost``, ``127.0.0.1``, ``[::1]``), any port; a request with another
    ``Host`` header gets 400 before anything is read or done, and a POST whose ``Origin`` names
    another host gets 403 (DNS rebinding, cross-site forms). ``"*.example.com"`` allows the
    subdomains, ``"*"`` any host (when the app it is mounted in checks ``Host`` itself).
    An empty user or password in ``auth`` raises ConfigurationError.
    """
    credentials = parse_credentials(auth) if auth is not None else None
    hosts = allowed_hosts_for(None, allowed_hosts)
    csrf = Csrf(secret if secret is not None else os.environ.get(SECRET_ENV))
    dashboard = Dashboard(app, read_only=read_only, csrf=csrf, title=title, allowed_hosts=hosts)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if close_on_shutdown:
            await app.close_loop_connector()

    routes = [
        Route("/", dashboard.page(dashboard.overview), name="overview"),
        Route("/jobs", dashboard.page(dashboard.jobs), name="jobs"),
        # Before /jobs/{job_id}/...: "many" is no job id.
        Route("/jobs/many", dashboard.jobs_action, methods=["POST"]),
        # A string: Starlette's int convertor fails (500) on a number of thousands of digits.
        Route("/jobs/{job_id}", dashboard.page(dashboard.job), name="job"),
        Route("/workers", dashboard.page(dashboard.workers), name="workers"),
        Route("/periodic", dashboard.page(dashboard.periodic), name="periodic"),
        *(
            Route(f"/jobs/{{job_id}}/{action}", dashboard.job_action(action), methods=["POST"])
            for action in ("retry", "abort", "cancel")
        ),
        *(
            Route(f"/queues/{action}", dashboard.queue_action(action), methods=["POST"])
            for action in ("pause", "resume")
        ),
        *(
            Route(f"/periodic/{action}", dashboard.periodic_action(action), methods=["POST"])
            for action in ("pause", "resume", "run-now")
        ),
    ]
    web = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            PgtqError: dashboard.unavailable,
            BadRequest: dashboard.bad_request,
            InvalidFilter: dashboard.bad_request,
            InvalidArguments: dashboard.bad_request,
        },
    )
    if credentials is not None:
        web.add_middleware(BasicAuth, credentials=credentials)
    # Before basic auth and everything else: a request for another site's name is DNS
    # rebinding (or a misdirected request), answered 400 without reading or doing anything.
    web.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    web.add_middleware(SecurityHeaders)  # outermost: also on the 400 and the 401
    return web
