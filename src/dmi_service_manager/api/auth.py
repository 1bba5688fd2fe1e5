"""Bearer tokens on every route, decided in one place before routing.

The rule (README, "Tokens"): a token that is sent is always checked, so a wrong or revoked one is a
401 wherever it is sent, and a right one whose scope is too small is a 403. Reading needs `read`,
submitting and uploading `submit`, deleting `admin`. Whether a request may come without one:
- cancelling and deleting (every DELETE) and TES (but its service-info) never may;
- with REQUIRE_TOKEN, nothing else may either, but for the pages that carry no data (the dashboard's
  shell, the API description) and the progress that containers post from this host;
- otherwise everything else may: 4CAT's client sends no token, and the IP allow-list guards it.
Only `Authorization: Bearer` is a token; any other scheme is treated as no token.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from ..access import LOOPBACK_ROUTES, is_loopback
from ..errors import DsmError, Forbidden, Unauthorized
from ..tokens import NEEDS_TOKEN, Principal, Tokens
from .http import CALLER_KEY, json_response

PRINCIPAL_KEY = "dsm.principal"  # the Principal a valid token stands for, when one was sent
TES_PREFIX = "/ga4gh/tes/v1"
OPEN_PAGES = frozenset({"/", "/dashboard", "/dashboard/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                        f"{TES_PREFIX}/service-info"})
OPEN_PREFIXES = ("/static/",)
READING = frozenset({"GET", "HEAD", "OPTIONS"})


def scope_needed(method: str) -> str:
    if method in READING:
        return "read"
    return "admin" if method == "DELETE" else "submit"


class Gate:
    """Whether a request needs a token, and what scope."""

    def __init__(self, *, require_token: bool, tes_enabled: bool) -> None:
        self.require_token = require_token
        self.tes_enabled = tes_enabled

    def always(self, method: str, path: str) -> bool:
        if method == "DELETE":
            return True
        return self.tes_enabled and path.startswith(TES_PREFIX + "/") and path not in OPEN_PAGES

    def optional(self, method: str, path: str, address: str) -> bool:
        """May this request come without a token?"""
        if self.always(method, path):
            return False
        if not self.require_token or path in OPEN_PAGES or path.startswith(OPEN_PREFIXES):
            return True
        return (method, path) in LOOPBACK_ROUTES and is_loopback(address)


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the root path a proxy mounts the app under."""
    root, path = scope.get("root_path", ""), scope["path"]
    return str(path[len(root):] if root and path.startswith(root) else path)


def principal(scope: Scope) -> Principal | None:
    """Who the request's token stands for (checked by the middleware), or None when it sent none."""
    found = scope.get(PRINCIPAL_KEY)
    return found if isinstance(found, Principal) else None


def acting(scope: Scope, on_behalf_of: str | None = None) -> str:
    """Who did it, for a job's record: whom the client names, the token's name, the address."""
    who = principal(scope)
    address = str(scope.get(CALLER_KEY) or "unknown")
    source = f"token {who.name}, {address}" if who else address
    return f"{on_behalf_of} ({source})" if on_behalf_of else f"token {who.name} ({address})" if who else address


class TokenMiddleware:
    """Runs after the access middleware (the allow-list first, so refused hosts learn nothing)."""

    def __init__(self, app: ASGIApp, tokens: Tokens, gate: Gate) -> None:
        self.app = app
        self.tokens = tokens
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                # Only a bearer credential is a token. Another scheme (Basic, from a URL with user:pass@ or a
                # proxy's own login, which the original ignored) counts as none, so 4CAT keeps working.
                scheme = value.split(None, 1)[0].lower() if value.strip() else b""
                if scheme == b"bearer":
                    authorization = value.decode("latin-1")
                break
        method, path = scope["method"], _route_path(scope)
        try:
            if authorization is None:
                if not self.gate.optional(method, path, str(scope.get(CALLER_KEY) or "")):
                    raise Unauthorized(NEEDS_TOKEN)
            else:
                found = await run_in_threadpool(self.tokens.verify, authorization)
                found.require(scope_needed(method))
                scope[PRINCIPAL_KEY] = found
        except (Unauthorized, Forbidden) as exc:
            await _refuse(exc, scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _refuse(exc: DsmError, scope: Scope, receive: Receive, send: Send) -> None:
    response = json_response(exc.body(), exc.status_code)
    if exc.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="dsm"'
    await response(scope, receive, send)
