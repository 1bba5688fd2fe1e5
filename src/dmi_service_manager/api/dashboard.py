"""A one-page dashboard for the admin: health, the queue, recent jobs. Read-only, no extra deps."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import HTMLResponse

_PAGE = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"


def router() -> APIRouter:
    api = APIRouter()

    @api.get("/", include_in_schema=False)
    @api.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(_PAGE.read_text(encoding="utf-8"), headers={
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        })

    return api
