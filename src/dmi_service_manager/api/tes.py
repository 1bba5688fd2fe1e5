"""GA4GH TES v1.1 under `/ga4gh/tes/v1`: the second front door onto the same job service.

Every route but service-info needs a bearer token (reading: scope `read`; creating and cancelling:
`submit`), checked with every other route's in `auth.py`. While TES_ENABLED is false, every TES path
answers 404 saying so. Browsers on the origins in TES_CORS_ORIGINS may call it (CORS, as the spec asks
of a TES API that other websites use).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import BadRequest, NotFound
from ..tes.schema import Task
from ..tes.service import MAX_PAGE_SIZE, VIEWS, TesService
from ..tes.states import STATES
from . import params, schemas
from .auth import TES_PREFIX as PREFIX
from .auth import acting
from .http import json_body, json_response

_JSON: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {}},
                                               "description": "as in the official TES v1.1 description"}}


class _Cors(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        """Starlette's answer, with a refusal as the usual JSON error (it answers plain text)."""
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        why = bytes(answer.body).decode()
        refusal = json_response(BadRequest(f"{why} (TES_CORS_ORIGINS names the web sites that may call TES;"
                                           " they may use GET and POST with Authorization and Content-Type)"
                                           ).body(), 400)
        refusal.headers.update({k: v for k, v in answer.headers.items() if k.lower().startswith("access-control")})
        return refusal


class TesCors:
    """CORS on the TES routes only: 4CAT's routes have no callers in a browser. A preflight is answered here,
    before the token check (a browser sends it without the Authorization header); the allow-list still
    comes first."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors = _Cors(app, allow_origins=origins, allow_methods=["GET", "POST"],
                          allow_headers=["Authorization", "Content-Type"], max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith(PREFIX + "/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


# The spec's names; the service also takes them in lower case, as some clients send them.
_View = Annotated[str | None, Query(json_schema_extra={"enum": list(VIEWS)})]


def router(tes: TesService) -> APIRouter:
    api = APIRouter(prefix=PREFIX, tags=["GA4GH TES v1.1"])

    @api.get("/service-info", responses=_JSON)
    async def service_info() -> Response:
        return json_response(tes.service_info())

    @api.post("/tasks", responses={**_JSON, **schemas.errors(400, 401, 403, 413)},
              openapi_extra=schemas.json_body(Task))
    async def create_task(request: Request) -> Response:
        body = await json_body(request)
        task_id = await run_in_threadpool(tes.create, body, acting(request.scope))
        return json_response({"id": task_id})

    @api.get("/tasks", responses={**_JSON, **schemas.errors(400, 401, 403)})
    async def list_tasks(request: Request, name_prefix: str | None = None,
                         state: Annotated[str | None, Query(json_schema_extra={"enum": list(STATES)})] = None,
                         tag_key: Annotated[list[str] | None, Query()] = None,
                         tag_value: Annotated[list[str] | None, Query()] = None,
                         page_size: Annotated[params.QueryInt | None, Query(ge=1, le=MAX_PAGE_SIZE)] = None,
                         page_token: str | None = None, view: _View = None) -> Response:
        answer = await run_in_threadpool(tes.list, name_prefix=name_prefix, state=state,
                                         tag_keys=tag_key or [], tag_values=tag_value or [], page_size=page_size,
                                         page_token=page_token, view=view)
        return json_response(answer)

    @api.get("/tasks/{task_id}", responses={**_JSON, **schemas.errors(400, 401, 403, 404)})
    async def get_task(request: Request, task_id: str, view: _View = None) -> Response:
        return json_response(await run_in_threadpool(tes.get, task_id, view))

    @api.post("/tasks/{task_id}:cancel", responses={**_JSON, **schemas.errors(401, 403, 404)})
    async def cancel_task(request: Request, task_id: str) -> Response:
        return json_response(await run_in_threadpool(tes.cancel, task_id, acting(request.scope)))

    return api


def disabled_router() -> APIRouter:
    """What a TES client meets while TES is off: a clear 404, whatever it asks."""
    api = APIRouter()

    @api.api_route(PREFIX + "/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                   include_in_schema=False)
    async def off(rest: str) -> Response:
        raise NotFound("the GA4GH TES API is not enabled on this server (an admin sets TES_ENABLED: true)")

    return api
