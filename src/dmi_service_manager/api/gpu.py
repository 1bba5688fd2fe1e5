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
                                                        for code in (200, 400, 404, 503)})
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
        # No card can be seen at all (no NVML, no inventory): the service can never fit here either, and the
        # protocol's answer for that is a 503 whose reason says why, never a 5xx of the server's own.
        return json_response({"reason": f"GPU not available: {check.reason}",
                              "memory": {"gpu_total_mem": 0, "gpu_free_mem": 0}}, 503)

    @api.get("/api/gpus", responses={200: {"model": schemas.GpusAnswer}})
    async def gpus() -> Response:
        """Each card: memory in total, in use (where NVML measures it), held by this server's placement, and
        for which jobs (dashboard, `dsm gpus`). Without a GPU, `problem` says why."""
        return json_response(await run_in_threadpool(jobs.gpus_overview))

    return api
