"""``pgtq web``: the dashboard served by uvicorn, after the exposure check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvicorn

from pgtq.web import asgi
from pgtq.web.security import Credentials, allowed_hosts_for, check_exposure

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = ["config"]


def config(
    app: App,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    read_only: bool = False,
    auth: Credentials | None = None,
    root_path: str = "",
    log_level: str = "info",
    allowed_hosts: Sequence[str] = (),
) -> uvicorn.Config:
    """The uvicorn configuration of the dashboard; raises :class:`~pgtq.web.security.Exposed`
    for write actions on a non-loopback address without auth, and
    :class:`~pgtq.web.security.HostsNotGiven` on every address (``0.0.0.0``) without
    ``allowed_hosts``. The dashboard answers the loopback names, ``host`` itself and
    ``allowed_hosts`` (the Host header; see :func:`~pgtq.web.security.allowed_hosts_for`)."""
    check_exposure(host, read_only=read_only, auth=auth)
    hosts = allowed_hosts_for(host, allowed_hosts)
    return uvicorn.Config(
        asgi(app, read_only=read_only, auth=auth, allowed_hosts=hosts),
        host=host,
        port=port,
        root_path=root_path,
        log_level=log_level,
        proxy_headers=False,
        server_header=False,
    )
