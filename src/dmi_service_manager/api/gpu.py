"""`GET /api/check_gpu_mem/<service>`: the answers 4CAT's processors match, to the letter."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..config import GPU_DISABLED_REASON
from ..errors import GpuUnavailable
from ..jobs import placement
from .http import ctx, json_response

router = APIRouter()


@router.get("/api/check_gpu_mem/{service}")
async def check_gpu_mem(service: str, request: Request) -> Response:
    context = ctx(request)
    config = context.config
    if service not in config.docker_endpoints:
        return json_response({"reason": "Service not found"}, 404)
    if not config.service_uses_gpu(service):
        # Processors match this exact sentence and then carry on without a GPU.
        return json_response({"reason": GPU_DISABLED_REASON}, 400)
    settings = config.docker_endpoints[service]
    try:
        cards, source = await run_in_threadpool(context.gpus.cards, settings.image_name)
    except GpuUnavailable as exc:
        # Not a 503: 4CAT reads that as "out of GPU memory". This is a server problem, and 4CAT quotes it.
        return json_response({"status": "error", "reason": f"GPU check failed: {exc.message}",
                              "message": exc.message}, 500)
    jobs = await run_in_threadpool(context.store.active)
    holding = [placement.Holding.of(j) for j in jobs if j.holds_capacity]
    reserved = placement.reserved(holding, [placement.Card(id=c.id, total=c.total) for c in cards])
    queued = sum(
        1 for j in jobs
        if not j.holds_capacity and j.service in config.docker_endpoints and config.service_uses_gpu(j.service or "")
    )
    demand = placement.Demand(job_id=0, service=service, uses_gpu=True, gpus=settings.gpus,
                              gpu_memory=settings.gpu_memory)
    never = placement.never_fits(demand, [placement.Card(id=c.id, total=c.total) for c in cards])

    def free(card_id: str, total: int, measured: int | None) -> int:
        return measured if measured is not None else max(total - reserved.get(card_id, 0), 0)

    per_card = [{**card.as_dict(), "gpu_free_mem": free(card.id, card.total, card.free),
                 "reserved_mem": reserved.get(card.id, 0)} for card in cards]
    best = max(cards, key=lambda c: (free(c.id, c.total, c.free), c.total), default=None)
    memory = {
        "gpu_total_mem": best.total if best else 0,
        "gpu_free_mem": free(best.id, best.total, best.free) if best else 0,
        "gpus": per_card,
        "source": source,
        "jobs_running": len(holding),
        "gpu_jobs_queued": queued,
    }
    if never:
        return json_response({"reason": f"GPU not available for {service}: {never}", "memory": memory}, 503)
    return json_response({"reason": "GPU available", "memory": memory})
