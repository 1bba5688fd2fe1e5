"""`GET /api/health`: 200 when everything this server needs works, 503 saying what does not."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..health import Health
from . import schemas
from .http import json_response


def router(health: Health) -> APIRouter:
    api = APIRouter(tags=["health"])

    @api.get("/api/health", responses={200: {"model": schemas.HealthAnswer}, 503: {"model": schemas.HealthAnswer}})
    async def report() -> Response:
        found = await run_in_threadpool(health.status)
        return json_response(found.body, 200 if found.ok else 503)

    return api
