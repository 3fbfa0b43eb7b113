"""``pgtq web``: the dashboard served by uvicorn, after the exposure check."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn

from pgtq.errors import ConfigurationError
from pgtq.web import asgi
from pgtq.web.security import Credentials, allowed_hosts_for, check_exposure

if TYPE_CHECKING:
    from pgtq.app import App

__all__ = ["PortUnavailable", "Site", "check_port", "config"]


class PortUnavailable(ConfigurationError):
    """``pgtq web`` cannot listen where it was asked (the port is taken, say)."""


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, an address the server could not listen on (another process holds
    the port): checked before the banner, instead of uvicorn's error after it (exit 3). Each
    address ``host`` names is bound as uvicorn binds it, then released."""
    if port == 0:  # any free port: nothing to check
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise PortUnavailable(
            f"cannot listen on {host!r}: {exc.strerror or exc}: check --host"
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                shown = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
                taken = " (another server is on it)" if exc.errno == errno.EADDRINUSE else ""
                raise PortUnavailable(
                    f"cannot listen on {shown}:{port}: {exc.strerror or exc}{taken}: "
                    "pass another --port"
                ) from None


@dataclass(frozen=True)
class Site:
    """Where and how the dashboard is served, checked when made, so ``pgtq web`` refuses an
    exposed server before it touches the database: :class:`~pgtq.web.security.Exposed` for
    write actions on a non-loopback address without auth, :class:`~pgtq.web.security.HostsNotGiven`
    on every address (``0.0.0.0``) without ``allowed_hosts``. ``allowed_hosts`` becomes every
    Host name answered: the loopback names, ``host`` and those given
    (see :func:`~pgtq.web.security.allowed_hosts_for`)."""

    host: str = "127.0.0.1"
    port: int = 8080
    read_only: bool = False
    auth: Credentials | None = None
    root_path: str = ""
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_exposure(self.host, read_only=self.read_only, auth=self.auth)
        answered = tuple(allowed_hosts_for(self.host, self.allowed_hosts))
        object.__setattr__(self, "allowed_hosts", answered)

    def uvicorn_config(self, app: App, *, log_level: str = "info") -> uvicorn.Config:
        """The uvicorn configuration serving ``app``'s dashboard here."""
        dashboard = asgi(
            app, read_only=self.read_only, auth=self.auth, allowed_hosts=list(self.allowed_hosts)
        )
        return uvicorn.Config(
            dashboard,
            host=self.host,
            port=self.port,
            root_path=self.root_path,
            log_level=log_level,
            proxy_headers=False,
            server_header=False,
        )


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
    """The uvicorn configuration of the dashboard, after :class:`Site`'s checks."""
    site = Site(host, port, read_only, auth, root_path, tuple(allowed_hosts))
    return site.uvicorn_config(app, log_level=log_level)
