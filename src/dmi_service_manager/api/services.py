"""The service endpoints: `GET /api/` lists them, `POST /api/<service>_local|_remote` submits a job."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from .http import base_url, ctx, json_body, json_response

router = APIRouter()


@router.get("/api/")
async def list_endpoints(request: Request) -> Response:
    context = ctx(request)
    endpoints = ["check_gpu_mem", *context.jobs.endpoints]
    return json_response({"endpoints": endpoints})


@router.post("/api/{endpoint}")
async def submit(endpoint: str, request: Request) -> Response:
    """Store the job and answer at once: the queue, not the request, waits for capacity."""
    body = await json_body(request)
    context = ctx(request)
    job = await run_in_threadpool(context.jobs.submit, endpoint, body, dict(request.query_params))
    result_url = f"{base_url(request)}/api/jobs/{job.id}"
    return json_response({"key": job.id, "result_url": result_url, "status": job.status.value}, 202)
