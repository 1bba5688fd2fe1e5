"""Job routes: poll, list, the details query, progress from containers, cancel, logs."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Query
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ..errors import BadRequest, NotFound
from ..jobs.model import JobStatus, Kind
from ..jobs.service import JobService
from ..jobs.store import JobFilter
from ..runtime.base import LogStream
from . import params, schemas
from .auth import acting
from .http import json_body, json_response

log = logging.getLogger(__name__)

FOLLOW_POLL_SECONDS = 0.5
FOLLOWERS = 8


@functools.cache
def _followers() -> anyio.CapacityLimiter:
    """Threads for following logs; made on first use, inside the event loop."""
    return anyio.CapacityLimiter(FOLLOWERS)


def router(jobs: JobService) -> APIRouter:
    api = APIRouter(tags=["jobs"])

    async def get_job(request: Request) -> Response:
        """The poll 4CAT sends every 5 to 30 s per job, by the thousand: a plain route, first in the table,
        with no thread hop and none of the framework's parameter machinery (documented in schemas.py)."""
        job = jobs.get(request.path_params["job_id"])
        if jobs.needs_poll_record(job, time.time()):
            await run_in_threadpool(jobs.record_poll, job.id)
        return json_response({"status": "success", "job": job.wire()})

    api.add_route("/api/jobs/{job_id:int}", get_job, methods=["GET"], include_in_schema=False)
    schemas.document("/api/jobs/{job_id}", "get", summary="Poll a job", model=schemas.PollAnswer,
                     parameters=[{"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                     errors=(404,))

    @api.get("/api/jobs/details_query/", responses={200: {"model": schemas.DetailsQueryAnswer},
                                                    **schemas.errors(400)},
             openapi_extra=schemas.json_body(schemas.DetailsQuery, required=False))
    @api.get("/api/jobs/details_query", include_in_schema=False)
    async def details_query(request: Request,
                            details_key: Annotated[str | None, Query(json_schema_extra={"pattern": "^\\$"})] = None,
                            details_value: str | None = None) -> Response:
        """Jobs whose stored details hold a value at a JSON path. 4CAT sends a GET with a JSON body;
        query parameters work too, for people with curl."""
        body = await json_body(request)
        if body is None:
            body = {k: v for k, v in (("details_key", details_key), ("details_value", details_value)) if v is not None}
        if not isinstance(body, dict) or "details_key" not in body or "details_value" not in body:
            raise BadRequest("send details_key (a JSON path) and details_value, as a JSON body or query parameters")
        found = await run_in_threadpool(jobs.details_query, body["details_key"], body["details_value"])
        return json_response({"status": "success", "jobs": [job.wire() for job in found]})

    @api.delete("/api/jobs/{job_id:int}", responses={200: {"model": schemas.CancelAnswer},
                                                     202: {"model": schemas.CancelAnswer}, **schemas.errors(404)})
    async def cancel_job(request: Request, job_id: int, by: str | None = None) -> Response:
        """Cancel a waiting job (200, final) or ask a running one's container to stop (202). An admin's
        token is always needed, so a TES task is cancelled here too (shown as a listing shows it)."""
        job = await run_in_threadpool(functools.partial(jobs.cancel, job_id, acting(request.scope, by), kind=None))
        shown = job.listed() if job.kind is Kind.TES else job.wire()
        return json_response({"status": "success", "job": shown}, 200 if job.status.final else 202)

    @api.get("/api/jobs/{job_id:int}/logs", response_class=StreamingResponse,
             responses={200: {"content": {"text/plain": {}}}, **schemas.errors(400, 404)})
    async def job_logs(request: Request, job_id: int,
                       tail: Annotated[params.QueryInt | None, Query(ge=0, le=params.MAX_INT)] = None,
                       follow: str | None = None) -> Response:
        """The container's output while it runs (`follow=1` streams it); the stored output once final."""
        if request.method == "HEAD":  # a followed stream would hold the connection until the job ends
            await run_in_threadpool(jobs.get, job_id)
            return Response(media_type="text/plain; charset=utf-8")
        following = (follow or "").lower() in ("1", "true", "yes")
        found = await run_in_threadpool(jobs.logs, job_id, tail, following)
        if found.live is None and not (following and not found.job.status.final):
            return Response(found.stored or "", media_type="text/plain; charset=utf-8")

        async def stream() -> AsyncIterator[bytes]:
            nonlocal found
            if found.live is None:  # followed while it waits for its container: the stream starts with it
                yield f"[dsm] job {job_id} is waiting to start\n".encode()
                while found.live is None:
                    await asyncio.sleep(FOLLOW_POLL_SECONDS)
                    if await request.is_disconnected():
                        return
                    found = await run_in_threadpool(jobs.logs, job_id, tail, True)
                    if found.job.status.final:  # it ran and ended between two looks, or never started
                        yield (found.stored or "").encode()
                        yield f"\n[dsm] job {job_id} ended: {found.job.status.value}\n".encode()
                        return
            lines = found.live
            try:
                async for chunk in chunks(lines):
                    yield chunk
            finally:
                # The client went away (the response is cancelled) or the stream ended: closing it ends a read
                # still waiting in its thread on a silent container, which would otherwise hold that thread
                # (and one of the followers' places) for as long as the container runs.
                lines.close()

        async def chunks(lines: LogStream) -> AsyncIterator[bytes]:
            while True:
                # A thread blocks on the engine for each read; a limiter of their own keeps followers from
                # taking the threads that submits and cancels need. A cancelled response does not wait for it.
                try:
                    chunk = await anyio.to_thread.run_sync(next, lines, None, limiter=_followers(),
                                                           abandon_on_cancel=True)
                except Exception as exc:  # the engine removed the container, or went away, mid-stream
                    why = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                    yield f"\n[dsm] the container's log stream ended early: {why}\n".encode()
                    break
                if chunk is None:
                    break
                yield chunk
                if await request.is_disconnected():
                    return
            if following:  # the container is gone; say how the job ended once it is recorded
                for _ in range(int(30 / FOLLOW_POLL_SECONDS)):
                    final = jobs.get(job_id)
                    if final.status.final:
                        yield f"\n[dsm] job {job_id} ended: {final.status.value}\n".encode()
                        return
                    await asyncio.sleep(FOLLOW_POLL_SECONDS)

        return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")

    @api.get("/jobs/", responses={200: {"model": schemas.JobListAnswer}, **schemas.errors(400)})
    @api.get("/jobs", include_in_schema=False)
    @api.get("/api/jobs/", include_in_schema=False)
    async def list_jobs(request: Request, current: str | None = None,
                        limit: Annotated[params.QueryInt | None, Query(ge=0, le=params.MAX_INT)] = None,
                        offset: Annotated[params.QueryInt, Query(ge=0, le=params.MAX_INT)] = 0,
                        order: Literal["asc", "desc"] | None = None,
                        status: JobStatus | None = None, service: str | None = None,
                        dataset_key: str | None = None, kind: Kind | None = None) -> Response:
        """Every job (4CAT's and TES tasks, each labelled), oldest first; `current=1`: not yet complete;
        `order=desc`: newest first; `status`, `service`, `dataset_key`, `kind` keep only the jobs that match.

        Streamed a few jobs at a time: 4CAT's unpaged call works whatever the store holds. The dashboard
        and the CLI page with `limit` and `offset`.
        """
        if request.method == "HEAD":  # the listing is only read to be thrown away
            return Response(media_type="application/json")
        where = JobFilter(status=status, service=service, dataset_key=dataset_key, kind=kind)
        batches = jobs.list_jobs(current=bool(current), limit=limit, offset=offset, newest_first=order == "desc",
                                 where=where)

        async def body() -> AsyncIterator[bytes]:
            # One chunk per batch read: a chunk per job would cost a write (and a pass through every
            # middleware) per job, most of the time of a listing of many small jobs.
            separator = b""
            yield b'{"status":"success","jobs":['
            async for found in iterate_in_threadpool(batches):
                yield separator + b",".join(json.dumps(job.listed(), separators=(",", ":"), ensure_ascii=False).encode()
                                            for job in found)
                separator = b","
            yield b"]}"

        return StreamingResponse(body(), media_type="application/json")

    @api.post("/status_update/", responses={200: {"model": schemas.StatusUpdateAnswer}, **schemas.errors(400)})
    @api.post("/status_update", include_in_schema=False)
    async def status_update(key: Annotated[str, Query(min_length=1)], status: Annotated[str, Query(min_length=1)],
                            message: str | None = None, processed_records: str | None = None,
                            num_records: str | None = None) -> Response:
        """Progress from inside a container; parameters come in the query string. Missing `key` or `status`
        is a 400; anything else is a 200, as the protocol says: what cannot be applied (a key that names no
        job, a count that is not one, text that is not text) is left out, and the log says why."""
        ignored: list[str] = []
        try:
            job_id: int | None = params.whole_number(key, "key", low=1)
        except BadRequest as exc:
            job_id = None
            ignored.append(exc.message)
        processed = processed_records if processed_records not in (None, "") else num_records
        count = None
        if processed not in (None, ""):
            try:
                count = params.count(processed, "processed_records")
            except BadRequest as exc:
                ignored.append(exc.message)
        if message is not None and not params.is_text(message):
            message = None
            ignored.append("message is not valid text")
        if job_id is not None:
            try:
                await run_in_threadpool(jobs.status_update, job_id, message, count)
            except NotFound as exc:
                ignored.append(exc.message)
        if ignored:
            log.info("status_update for key %r: ignored what could not be applied: %s", key[:40], "; ".join(ignored))
        return json_response({"status": "success"})

    return api
