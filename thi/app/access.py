"""Who may talk to the search page: the Host allow-list, same-origin state changes, an access
token, and a cap on every request body. One pure ASGI middleware (``Guard``) applies them
before any route runs.

* **Host allow-list** (DNS rebinding): a page on evil.example that rebinds its name to
  127.0.0.1 sends ``Host: evil.example``; only the names the server was started for pass
  (loopback names, plus ``--allow-host``). Bound beyond loopback, any Host passes unless
  ``--allow-host`` lists them, and the token is required instead.
* **Cross-origin state changes**: a POST whose ``Origin`` (or, lacking it, ``Referer``) names
  another host, or whose ``Sec-Fetch-Site`` is ``cross-site``/``same-site``, gets 403. Scripts
  (curl, httpx) send none of these headers and pass.
* **Token**: when set (``--token``, or generated when bound beyond loopback), every route but
  the favicon needs it: ``Authorization: Bearer TOKEN``, the ``icl_token`` cookie (the page
  sets it when opened as ``/?token=TOKEN``) or ``?token=TOKEN``.
* **Body cap**: a declared ``Content-Length`` over ``MAX_BODY_BYTES`` gets 413 before reading;
  a body streamed without one is cut off at the same size.
"""
from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Iterable, Optional
from urllib.parse import parse_qs, urlsplit

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_BODY_BYTES = MAX_IMAGE_BYTES + 256 * 1024   # the image plus the form's text fields
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "icl_token"
OPEN_PATHS = ("/favicon.ico",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


@dataclass
class AccessPolicy:
    """``hosts``: accepted Host names (lower case, no port), None for any; ``token``: required
    access token, or None."""

    hosts: Optional[frozenset] = frozenset(LOOPBACK_NAMES)
    token: Optional[str] = None
    notes: list = field(default_factory=list)   # what start-up should print

    def refusal(self, method: str, path: str, headers: dict, query: bytes) -> Optional[tuple]:
        """(status, message) when the request must be refused, else None."""
        name = _host_name(headers.get("host", ""))
        if self.hosts is not None and name not in self.hosts:
            return 421 if name else 400, (
                f"this server answers only to {', '.join(sorted(self.hosts))} "
                f"(Host header {name or 'missing'!r}); start it with --allow-host NAME to add one")
        if method not in SAFE_METHODS:
            cross = _cross_origin(headers)
            if cross:
                return 403, f"refused a cross-origin {method}: {cross}"
        if self.token is not None and path not in OPEN_PATHS:
            given = request_token(headers, query)
            if given is None or not secrets.compare_digest(given.encode(), self.token.encode()):
                return 401, ("this server needs its access token: open the URL printed at "
                             "start-up (/?token=...) or send 'Authorization: Bearer TOKEN'")
        return None


def plan_access(host: str, token: Optional[str] = None,
                allow_hosts: Iterable[str] = ()) -> AccessPolicy:
    """The policy for a server bound to ``host``: loopback needs no token unless one is given;
    beyond loopback a token is required (generated and printed when not given)."""
    extra = {_host_name(h) for h in allow_hosts if h}
    if token is not None and len(token) < 8:
        raise SystemExit("--token must have at least 8 characters")
    notes = []
    if is_loopback(host):
        hosts = frozenset({*LOOPBACK_NAMES, host.lower().strip("[]"), *extra})
    else:
        hosts = frozenset({*LOOPBACK_NAMES, *extra}) if extra else None
        if token is None:
            token = secrets.token_urlsafe(18)
            notes.append(f"generated access token: {token}")
        notes.insert(0, f"WARNING: --host {host} reaches beyond this machine: anyone on the "
                        f"network can reach the page; it requires the access token "
                        f"(open /?token=TOKEN once, or send 'Authorization: Bearer TOKEN'); "
                        f"traffic is not encrypted (plain HTTP)")
        if hosts is None:
            notes.append("any Host name is accepted (the token guards access); --allow-host "
                         "NAME restricts it")
    return AccessPolicy(hosts=hosts, token=token, notes=notes)


def request_token(headers: dict, query: bytes) -> Optional[str]:
    """The token a request carries: bearer header, cookie or ``token`` query parameter."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    from starlette.requests import cookie_parser

    cookie = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE)
    if cookie:
        return cookie
    values = parse_qs(query.decode("latin-1")).get("token") if query else None
    return values[0] if values else None


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if not host:
        return ""
    try:
        return (urlsplit("//" + host).hostname or "").strip("[]")
    except ValueError:
        return host


def _cross_origin(headers: dict) -> Optional[str]:
    site = headers.get("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site is {site!r}"
    host = headers.get("host", "").strip().lower()
    for name in ("origin", "referer"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            netloc = urlsplit(value.strip()).netloc.lower()
        except ValueError:
            netloc = ""
        if netloc != host:
            return f"{name.capitalize()} {value[:100]!r} is not this server ({host!r})"
        return None  # Origin decides when present; Referer only without it
    return None


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware applying an ``AccessPolicy`` and the body cap to every HTTP request."""

    def __init__(self, app, policy: AccessPolicy, max_body: int = MAX_BODY_BYTES):
        self.app, self.policy, self.max_body = app, policy, int(max_body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        problem = self.policy.refusal(scope["method"], scope["path"], headers,
                                      scope.get("query_string", b""))
        length = headers.get("content-length")
        if problem is None and length is not None:
            if not length.strip().isdigit():
                problem = 400, "Content-Length is not a number"
            elif int(length) > self.max_body:
                problem = 413, self._too_large(int(length))
        if problem is not None:
            return await _reply(send, *problem)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _reply(send, 413, self._too_large(received))

    def _too_large(self, size: int) -> str:
        return (f"the request body is {size} bytes or more; at most {self.max_body} "
                f"(an image of at most {MAX_IMAGE_BYTES} bytes plus the form)")


async def _reply(send, status: int, message: str) -> None:
    from fastapi.responses import JSONResponse

    response = JSONResponse({"detail": message}, status_code=status)
    await response({"type": "http"}, None, send)
