"""`GET /metrics`: Prometheus's text format, behind the same allow-list and optional token as every route."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..metrics import CONTENT_TYPE, Metrics


def router(metrics: Metrics) -> APIRouter:
    api = APIRouter(tags=["metrics"])

    @api.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def scrape() -> Response:
        """Jobs by state, starts, ends and failures, waits and run times, GPU memory, file transfers and request
        durations of every worker (names: README, "Metrics")."""
        return Response(await run_in_threadpool(metrics.scrape), media_type=CONTENT_TYPE)

    return api
