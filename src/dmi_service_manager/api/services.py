"""The service endpoints: `GET /api/` lists them, `POST /api/<service>_local|_remote` submits a job."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..jobs.service import JobService
from . import schemas
from .http import base_url, json_body, json_response


def router(jobs: JobService) -> APIRouter:
    api = APIRouter(tags=["services"])

    @api.get("/api/", responses={200: {"model": schemas.EndpointsAnswer}})
    async def list_endpoints() -> Response:
        return json_response({"endpoints": ["check_gpu_mem", *jobs.endpoints]})

    @api.get("/api/services", responses={200: {"model": schemas.ServicesAnswer}})
    async def list_services() -> Response:
        """Each service: image, GPU needs, what runs and waits, and its latest failures (dashboard, `dsm services`)."""
        return json_response({"services": await run_in_threadpool(jobs.services)})

    @api.post("/api/{endpoint}", status_code=202, responses={202: {"model": schemas.SubmitAnswer},
                                                             **schemas.errors(400, 404, 413, 503)},
              openapi_extra=schemas.json_body(schemas.SubmitBody))
    async def submit(request: Request, endpoint: str) -> Response:
        """Store the job and answer at once: the queue, not the request, waits for capacity."""
        body = await json_body(request)
        job = await run_in_threadpool(jobs.submit, endpoint, body, dict(request.query_params))
        result_url = f"{base_url(request)}/api/jobs/{job.id}"
        return json_response({"key": job.id, "result_url": result_url, "status": job.status.value}, 202)

    return api
