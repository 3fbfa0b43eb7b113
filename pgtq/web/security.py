"""Who may use the dashboard and how its forms are protected: HTTP basic auth, CSRF tokens,
and the rule that keeps write actions off an open network port.

Pure helpers and one ASGI middleware; no database, no templates.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgtq.errors import ConfigurationError

__all__ = [
    "AUTH_ENV",
    "BasicAuth",
    "Credentials",
    "Csrf",
    "Exposed",
    "SecurityHeaders",
    "check_exposure",
    "is_loopback",
    "parse_credentials",
]

#: ``pgtq web --auth``'s environment variable: ``user:password``.
AUTH_ENV = "PGTQ_WEB_AUTH"
#: The secret that signs CSRF tokens, shared by several processes serving one dashboard.
SECRET_ENV = "PGTQ_WEB_SECRET"


class Exposed(ConfigurationError):
    """Write actions on a non-loopback address with no authentication: refused."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """The one user of HTTP basic auth."""

    user: str
    password: str = ""

    def __repr__(self) -> str:  # never print a password in a log or a traceback
        return f"Credentials(user={self.user!r}, password='***')"


def parse_credentials(text: str | tuple[str, str] | Credentials) -> Credentials:
    """``user:password`` (the password may contain ``:``) or a pair, as Credentials."""
    if isinstance(text, Credentials):
        return text
    if isinstance(text, tuple):
        user, password = text
    else:
        user, sep, password = text.partition(":")
        if not sep:
            raise ConfigurationError("give the web dashboard's credentials as USER:PASSWORD")
    if not user or not password:
        raise ConfigurationError("the web dashboard's user and password must not be empty")
    return Credentials(user, password)


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


class BasicAuth:
    """ASGI middleware: every HTTP request needs the credentials (compared in constant time)."""

    def __init__(self, app: ASGIApp, credentials: Credentials, realm: str = "pgtq") -> None:
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
