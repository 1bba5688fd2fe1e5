"""The admin's console at `/`: queue, running jobs with their live log, finished jobs, GPUs, services, uploads.

Plain HTML, JS and CSS from `static/`, no build step, nothing from elsewhere (the server may be offline).
The page is only a shell: everything it shows it reads from the JSON API with the token the admin pastes in,
so the shell and its files are open even with REQUIRE_TOKEN (see api/auth.py), and the API decides the rest.
The page is rendered with DOM calls and textContent only: the CSP below allows no inline script, no other
origin, and (Trusted Types) no HTML strings assigned to the DOM, so a hostile job message stays text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from ..errors import NotFound

_STATIC = Path(__file__).resolve().parent.parent / "static"

CSP = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",
    "trusted-types 'none'",
))
_COMMON = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgraded server serves its own page at once
}
# The only files served under /static/: a fixed list, so no path from the client ever reaches the disk.
_FILES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


@dataclass(frozen=True)
class _File:
    body: bytes
    media_type: str
    etag: str

    @classmethod
    def read(cls, name: str, media_type: str) -> _File:
        body = (_STATIC / name).read_bytes()
        return cls(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def response(self, request: Request, headers: dict[str, str]) -> Response:
        shown = {**_COMMON, **headers, "ETag": self.etag}
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=shown)
        return Response(self.body, media_type=self.media_type, headers=shown)


def router() -> APIRouter:
    api = APIRouter()
    page = _File.read("dashboard.html", "text/html; charset=utf-8")
    files = {name: _File.read(name, media_type) for name, media_type in _FILES.items()}

    @api.get("/", include_in_schema=False)
    @api.get("/dashboard", include_in_schema=False)
    async def dashboard(request: Request) -> Response:
        return page.response(request, {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY"})

    @api.get("/dashboard/", include_in_schema=False)
    async def dashboard_slash() -> Response:
        # The page's files are named relative to it (so it works below a proxy's prefix): not served here.
        return Response(status_code=308, headers={"Location": "../dashboard"})

    @api.get("/static/{name}", include_in_schema=False)
    async def static(request: Request, name: str) -> Response:
        found = files.get(name)
        if found is None:
            raise NotFound(f"no static file {name!r}")
        return found.response(request, {})

    return api
