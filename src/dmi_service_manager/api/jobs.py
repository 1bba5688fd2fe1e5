"""Job routes: poll, list, the details query, progress from containers, cancel, logs."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..errors import BadRequest
from .http import caller, ctx, json_body, json_response

router = APIRouter()

FOLLOW_POLL_SECONDS = 0.5
FOLLOWERS = 8


@functools.cache
def _followers() -> anyio.CapacityLimiter:
    """Threads for following logs; made on first use, inside the event loop."""
    return anyio.CapacityLimiter(FOLLOWERS)


@router.get("/api/jobs/{job_id:int}")
async def get_job(job_id: int, request: Request) -> Response:
    """The poll 4CAT sends every 5 to 30 s per job: first in the route table, no thread hop."""
    context = ctx(request)
    job = context.jobs.get(job_id)
    if context.jobs.needs_poll_record(job, time.time()):
        await run_in_threadpool(context.jobs.record_poll, job.id)
    return json_response({"status": "success", "job": job.wire()})


@router.get("/api/jobs/details_query/")
@router.get("/api/jobs/details_query")
async def details_query(request: Request) -> Response:
    """4CAT sends a GET with a JSON body; query parameters work too, for people with curl."""
    body = await json_body(request)
    if body is None:
        body = dict(request.query_params)
    if not isinstance(body, dict) or "details_key" not in body or "details_value" not in body:
        raise BadRequest("send details_key (a JSON path) and details_value, as a JSON body or query parameters")
    jobs = ctx(request).jobs.details_query(body["details_key"], body["details_value"])
    return json_response({"status": "success", "jobs": [job.wire() for job in jobs]})


@router.delete("/api/jobs/{job_id:int}")
async def cancel_job(job_id: int, request: Request) -> Response:
    by = request.query_params.get("by")
    who = f"{by} ({caller(request)})" if by else caller(request)
    job = await run_in_threadpool(ctx(request).jobs.cancel, job_id, who)
    return json_response({"status": "success", "job": job.wire()}, 200 if job.status.final else 202)


@router.get("/api/jobs/{job_id:int}/logs")
async def job_logs(job_id: int, request: Request) -> Response:
    """The container's output while it runs (`follow=1` streams it); the stored output once final."""
    context = ctx(request)
    job = context.jobs.get(job_id)
    tail_text = request.query_params.get("tail")
    if tail_text is not None and not tail_text.isdigit():
        raise BadRequest("tail must be a whole number of lines")
    tail = int(tail_text) if tail_text is not None else None
    follow = request.query_params.get("follow", "").lower() in ("1", "true", "yes")
    if job.status.final or job.container_id is None:
        return Response(_stored_output(job.results_dict(), tail), media_type="text/plain; charset=utf-8")
    container_id = job.container_id

    lines = iter(context.runtime.follow_logs(container_id, tail, follow))

    async def stream() -> AsyncIterator[bytes]:
        while True:
            # A thread blocks on Docker for each read; a limiter of their own keeps followers from
            # taking the threads that submits and cancels need.
            chunk = await anyio.to_thread.run_sync(next, lines, None, limiter=_followers())
            if chunk is None:
                break
            yield chunk
            if await request.is_disconnected():
                return
        if follow:  # the container is gone; say how the job ended once it is recorded
            for _ in range(int(30 / FOLLOW_POLL_SECONDS)):
                final = context.store.get(job.id)
                if final is not None and final.status.final:
                    yield f"\n[dsm] job {job.id} ended: {final.status.value}\n".encode()
                    return
                await asyncio.sleep(FOLLOW_POLL_SECONDS)

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")


def _stored_output(results: dict[str, object] | None, tail: int | None) -> str:
    if not results:
        return ""
    text = "\n".join(str(results.get(key) or "") for key in ("report", "error") if results.get(key))
    if tail is not None:
        text = "\n".join(text.splitlines()[-tail:]) if tail else ""
    return text + ("\n" if text and not text.endswith("\n") else "")


@router.get("/jobs/")
@router.get("/jobs")
@router.get("/api/jobs/")
async def list_jobs(request: Request) -> Response:
    current = bool(request.query_params.get("current"))
    limit_text = request.query_params.get("limit")
    offset_text = request.query_params.get("offset", "0")
    if (limit_text is not None and not limit_text.isdigit()) or not offset_text.isdigit():
        raise BadRequest("limit and offset must be whole numbers")
    limit = int(limit_text) if limit_text is not None else None
    newest_first = request.query_params.get("order") == "desc"
    jobs = await run_in_threadpool(ctx(request).store.jobs, current=current, limit=limit, offset=int(offset_text),
                                   newest_first=newest_first)
    return json_response({"status": "success", "jobs": [job.wire() for job in jobs]})


@router.post("/status_update/")
@router.post("/status_update")
async def status_update(request: Request) -> Response:
    """Progress from inside a container; parameters come in the query string."""
    params = request.query_params
    processed = params.get("processed_records")
    if processed in (None, ""):
        processed = params.get("num_records")
    await run_in_threadpool(
        ctx(request).jobs.status_update, params.get("key"), params.get("status"), params.get("message"), processed
    )
    return json_response({"status": "success"})

