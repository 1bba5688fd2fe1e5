"""`GET /api/health`: is everything this server needs working? 200 if so, 503 saying what is not."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..errors import GpuUnavailable
from .http import ctx, json_response

router = APIRouter()


@router.get("/api/health")
async def health(request: Request) -> Response:
    context = ctx(request)
    problems: list[str] = []
    docker_ok, docker_note = await run_in_threadpool(context.docker_state)
    if not docker_ok:
        problems.append(f"Docker: {docker_note}")
    try:
        await run_in_threadpool(context.store.instance_id)  # a write transaction
        counts = await run_in_threadpool(context.store.counts)
        database: dict[str, Any] = {"ok": True, "path": str(context.config.database_file), "jobs": counts}
    except Exception as exc:
        problems.append(f"database: {exc}")
        database = {"ok": False, "error": str(exc)}
    gpu: dict[str, Any] = {"enabled": context.config.gpu_enabled}
    if context.config.gpu_enabled:
        try:
            cards, source = await run_in_threadpool(context.gpus.cards)
            gpu.update(ok=True, source=source, cards=[c.as_dict() for c in cards])
        except GpuUnavailable as exc:
            gpu.update(ok=False, error=exc.message)
            problems.append(f"GPU: {exc.message}")
    scheduler = context.leadership.holder_pid()
    body = {
        "status": "ok" if not problems else "error",
        "message": "all is well" if not problems else "; ".join(problems),
        "instance": context.instance_id,
        "docker": {"ok": docker_ok, "note": docker_note},
        "database": database,
        "gpu": gpu,
        "scheduler": {"pid": scheduler, "here": context.scheduler is not None},
    }
    if problems:
        body["reason"] = body["message"]
    return json_response(body, 200 if not problems else 503)
