"""Who may use the dashboard and how its forms are protected: HTTP basic auth, CSRF tokens,
the Host allow-list (DNS rebinding), and the rule that keeps write actions off an open
network port.

Pure helpers and one ASGI middleware; no database, no templates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgtq.errors import ConfigurationError

__all__ = [
    "AUTH_ENV",
    "LOOPBACK_HOSTS",
    "BasicAuth",
    "Credentials",
    "Csrf",
    "Exposed",
    "HostsNotGiven",
    "SecurityHeaders",
    "allowed_hosts_for",
    "check_exposure",
    "host_pattern",
    "is_loopback",
    "origin_allowed",
    "parse_credentials",
]

#: ``pgtq web --auth``'s environment variable: ``user:password``.
AUTH_ENV = "PGTQ_WEB_AUTH"
#: The secret that signs CSRF tokens, shared by several processes serving one dashboard.
SECRET_ENV = "PGTQ_WEB_SECRET"


class Exposed(ConfigurationError):
    """Write actions on a non-loopback address with no authentication: refused."""


class HostsNotGiven(ConfigurationError):
    """Listening on every address (``0.0.0.0``, ``::``) with no ``--allowed-host``: refused."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """The one user of HTTP basic auth."""

    user: str
    password: str = ""

    def __repr__(self) -> str:  # never print a password in a log or a traceback
        return f"Credentials(user={self.user!r}, password='***')"


def parse_credentials(text: str | tuple[str, str] | Credentials) -> Credentials:
    """``user:password`` (the password may contain ``:``) or a pair, as Credentials.

    An empty user or password is refused (ConfigurationError), never read as "no auth".
    """
    if isinstance(text, Credentials):
        user, password = text.user, text.password
    elif isinstance(text, tuple):
        user, password = text
    else:
        user, sep, password = text.partition(":")
        if not sep:
            raise ConfigurationError("give the web dashboard's credentials as USER:PASSWORD")
    if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
        raise ConfigurationError("the web dashboard's user and password must not be empty")
    return text if isinstance(text, Credentials) else Credentials(user, password)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host``: ``localhost`` or a loopback address.

    Any other name counts as reachable from elsewhere: what it resolves to may change.
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, *, read_only: bool, auth: Credentials | None) -> None:
    """Refuse to serve write actions with no authentication where others can reach them."""
    if read_only or auth is not None or is_loopback(host):
        return
    raise Exposed(
        f"refusing to serve the web dashboard's actions (retry, abort, cancel, pause) on "
        f"{host}, which is not a loopback address, without authentication: anyone who can "
        f"reach it could change your jobs. Pass --auth USER:PASSWORD (or set {AUTH_ENV}), "
        "or --read-only, or listen on 127.0.0.1"
    )


#: The names of this machine a browser sends in ``Host`` (any port): always allowed, since no
#: other site can make a browser send them (a DNS rebinding attack sends its own name).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")

_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


def host_pattern(name: str) -> str:
    """An allowed host (``--allowed-host``) as the Host check compares it: lower case, an
    IPv6 address in brackets, no port; ``*.example.com`` allows the subdomains of
    ``example.com``, and ``*`` any host at all."""
    text = name.strip().lower()
    if text == "*":
        return text
    try:
        address = ipaddress.ip_address(text[1:-1] if text.startswith("[") else text)
    except ValueError:
        pass
    else:
        return f"[{address}]" if address.version == 6 else str(address)
    rest = text[2:] if text.startswith("*.") else text
    if not _HOST_NAME.fullmatch(rest) or ".." in rest:
        raise ConfigurationError(
            f"{name!r} is not a host name or address for --allowed-host: give a name as it "
            "appears in the dashboard's address, without scheme or port (dashboard.example.com, "
            "*.example.com, 192.168.1.10), or * for any"
        )
    return text


def _listens_everywhere(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_unspecified
    except ValueError:
        return False


def allowed_hosts_for(listen: str | None, extra: Iterable[str] = ()) -> list[str]:
    """The Host header values the dashboard answers (any port), others get 400.

    The loopback names (:data:`LOOPBACK_HOSTS`), the address or name it listens on
    (``listen``), and ``extra`` (``--allowed-host``). Listening on every address (``0.0.0.0``,
    ``::``) says nothing of the names clients use: ``extra`` must then be given
    (:class:`HostsNotGiven`). ``*`` in ``extra`` allows any host.
    """
    given = [host_pattern(name) for name in extra]
    if "*" in given:
        return ["*"]
    allowed = list(LOOPBACK_HOSTS)
    if listen is not None and listen.strip():
        if _listens_everywhere(listen):
            if not given:
                raise HostsNotGiven(
                    f"pgtq web on {listen} listens on every address of this machine: say which "
                    "host names or addresses its users reach it by, with --allowed-host NAME "
                    "(repeatable, e.g. --allowed-host dashboard.example.com), or --allowed-host "
                    "'*' to accept any (behind a proxy that checks the Host header itself); "
                    "requests for any other Host are refused, which blocks DNS rebinding"
                )
        else:
            given.insert(0, host_pattern(listen))
    for name in given:
        if name not in allowed:
            allowed.append(name)
    return allowed


def _matches(host: str, allowed: Iterable[str]) -> bool:
    return any(
        pattern == "*"
        or host == pattern
        or (pattern.startswith("*.") and host.endswith(pattern[1:]))
        for pattern in allowed
    )


def origin_allowed(origin: str, allowed: Iterable[str]) -> bool:
    """Whether a POST's ``Origin`` header names an allowed host (``null`` never does)."""
    try:
        parts = urlsplit(origin.strip())
        host = parts.hostname
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    return _matches(f"[{host}]" if ":" in host else host, allowed)


class BasicAuth:
    """ASGI middleware: every HTTP request needs the credentials (compared in constant time)."""

    def __init__(self, app: ASGIApp, credentials: Credentials, realm: str = "pgtq") -> None:
        credentials = parse_credentials(credentials)  # never an empty user or password
        self.app = app
        self._user = credentials.user.encode()
        self._password = credentials.password.encode()
        self.realm = realm

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, _, password = decoded.partition(b":")
        # Both compared every time, so the time taken says nothing of which was wrong.
        user_ok = hmac.compare_digest(user, self._user)
        password_ok = hmac.compare_digest(password, self._password)
        return user_ok & password_ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allows(Request(scope).headers.get("authorization")):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "Authentication required",
            status_code=401,
            headers={"WWW-Authenticate": f'Basic realm="{self.realm}", charset="UTF-8"'},
        )
        await response(scope, receive, send)


#: Sent with every response. The pages run no script at all, so the policy forbids any (a
#: backstop should escaping ever miss); no other site may frame them (clickjacking of the
#: action buttons); job data is not kept in caches.
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        b"form-action 'self'; frame-ancestors 'self'; base-uri 'none'",
    ),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
)


class SecurityHeaders:
    """ASGI middleware: adds :data:`HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in HEADERS if n not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Csrf:
    """Double-submit CSRF tokens: a signed random token in a cookie and in each form.

    A POST is accepted only when its form field equals its cookie and the cookie carries this
    dashboard's signature: another site can make a browser send the cookie, but can neither
    read it nor forge one (the secret signs it), so it cannot fill in the field.
    """

    COOKIE = "pgtq_csrf"
    FIELD = "csrf_token"

    def __init__(self, secret: bytes | str | None = None) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        self._secret = secret or secrets.token_bytes(32)

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()

    def new_token(self) -> str:
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._sign(nonce)}"

    def is_valid(self, token: str | None) -> bool:
        if not token:
            return False
        nonce, _, signature = token.partition(".")
        return bool(nonce) and hmac.compare_digest(signature, self._sign(nonce))

    def token_for(self, request: Request) -> tuple[str, bool]:
        """The request's token (from its cookie), or a new one; and whether it is new."""
        cookie = request.cookies.get(self.COOKIE)
        if cookie is not None and self.is_valid(cookie):
            return cookie, False
        return self.new_token(), True

    def set_cookie(self, request: Request, response: Response, token: str) -> None:
        response.set_cookie(
            self.COOKIE,
            token,
            path=request.scope.get("root_path") or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def check(self, request: Request, submitted: object) -> bool:
        """Whether a POST carries the token of its cookie, and comes from no other site."""
        if request.headers.get("sec-fetch-site") == "cross-site":
            return False
        cookie = request.cookies.get(self.COOKIE)
        if not isinstance(submitted, str) or cookie is None or not self.is_valid(cookie):
            return False
        return hmac.compare_digest(submitted.encode(), cookie.encode())
