"""`GET /api/check_gpu_mem/<service>`: the answers 4CAT's processors match, to the letter."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ..jobs.service import JobService
from . import schemas
from .http import json_response


def router(jobs: JobService) -> APIRouter:
    api = APIRouter(tags=["gpu"])

    @api.get("/api/check_gpu_mem/{service}", responses={code: {"model": schemas.GpuAnswer}
                                                        for code in (200, 400, 404, 500, 503)})
    async def check_gpu_mem(service: str) -> Response:
        check = await run_in_threadpool(jobs.gpu_check, service)
        if check.outcome == "available":
            return json_response({"reason": check.reason, "memory": check.memory})
        if check.outcome == "disabled":  # processors match this exact sentence and carry on without a GPU
            return json_response({"reason": check.reason}, 400)
        if check.outcome == "unknown_service":
            return json_response({"reason": check.reason}, 404)
        if check.outcome == "never_fits":  # 4CAT reads a 503 as "out of GPU memory": only for never
            return json_response({"reason": check.reason, "memory": check.memory}, 503)
        # A server problem, not a full GPU (which 503 would say); 4CAT quotes the reason.
        return json_response({"status": "error", "reason": f"GPU check failed: {check.reason}",
                              "message": check.reason}, 500)

    @api.get("/api/gpus", responses={200: {"model": schemas.GpusAnswer}})
    async def gpus() -> Response:
        """Each card: memory in total, in use (where NVML measures it), held by this server's placement, and
        for which jobs (dashboard, `dsm gpus`). Without a GPU, `problem` says why."""
        return json_response(await run_in_threadpool(jobs.gpus_overview))

    return api
