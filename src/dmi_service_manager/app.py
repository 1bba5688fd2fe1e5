"""Builds the ASGI app: routers, the access check, the one error handler, and the lifespan."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import serving
from .access import AccessPolicy
from .api import dashboard, files, gpu, health, jobs, metrics, schemas, services, tes
from .api.auth import Gate, TokenMiddleware
from .api.http import CALLER_KEY, TRUSTED_PEER_KEY, json_response
from .api.tes import TesCors
from .config import Config, load_config
from .context import AppContext
from .errors import AnswerCut, BadRequest, DsmError
from .metrics import HttpMetrics, Metrics

log = logging.getLogger(__name__)

ENV_CONFIG = "DSM_CONFIG"
ENV_PORT = "DSM_PORT"
ENV_SUPERVISOR = "DSM_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1
HOT_PATHS = ("/api/send_files", "/api/jobs/{job_id:int}", "/status_update/", "/api/list_filenames/{collection:path}",
             "/api/download/{path:path}")


def path_problem(raw_path: bytes) -> str | None:
    """Why no route may see this path, or None. Routes match with `$`, which also matches before a final
    newline (`/api/download/a.txt%0A` would serve a.txt), and uvicorn turns bytes that are not UTF-8
    into U+FFFD (`%FF.json` would serve a file named that way)."""
    if raw_path.isascii() and b"%" not in raw_path:
        return None
    decoded = unquote_to_bytes(raw_path)
    if any(byte < 0x20 or byte == 0x7F for byte in decoded):
        return "the path must not contain control characters"
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        return "the path must be valid UTF-8"
    return None


def query_problem(query: bytes) -> str | None:
    """Why no route may see this query string, or None: bytes that are not UTF-8 would reach it as U+FFFD
    (`?folder_name=c%FF` and `?folder_name=c%FE` would name one collection)."""
    if not query or (query.isascii() and b"%" not in query):
        return None
    try:
        unquote_to_bytes(query).decode("utf-8")
    except UnicodeDecodeError:
        return "the query string must be valid UTF-8"
    return None


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_OTHER_SITES = frozenset({b"cross-site", b"same-site"})


def _forged_by_another_site(scope: Scope) -> bool:
    """A change that a browser sends for a page of another web site (Sec-Fetch-Site, which every current
    browser adds and no other client does): a form or a no-cors fetch there could submit jobs, post progress
    or upload, from a browser that the allow-list admits. One that carries a token is the caller's own doing
    (no other site can attach one, nor a header that forces a CORS preflight)."""
    if scope["method"] in _SAFE_METHODS:
        return False
    headers = dict(scope["headers"])
    return headers.get(b"sec-fetch-site") in _OTHER_SITES and b"authorization" not in headers


class AccessMiddleware:
    """IP_WHITELIST and TRUSTED_PROXIES for every request, before any routing; changes that a page of
    another web site had a browser send; then a path that no route could read as sent."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("//"):
            # The original's result_url reads http://host:4000//api/jobs/1, and 4CAT polls exactly that.
            scope["path"] = "/" + scope["path"].lstrip("/")
            scope["raw_path"] = b"/" + scope.get("raw_path", b"").lstrip(b"/")
        hops = [v for k, v in scope["headers"] if k == b"x-forwarded-for"]
        forwarded = b",".join(hops)
        peer = scope["client"][0] if scope.get("client") else None
        who = self.policy.caller(peer, forwarded.decode("latin-1") if forwarded else None)
        scope[CALLER_KEY] = who.address
        scope[TRUSTED_PEER_KEY] = trusted = self.policy.peer_is_trusted(peer)
        if not self.policy.allows(who.address, scope["path"], peer, scope["method"], forwarded=trusted and bool(hops)):
            log.warning("refused %s %s from %s", scope["method"], scope["path"], who.address)
            response = json_response(DsmError(f"{who.address} may not use this server").body(), 403)
            # and hang up: what else it sends (a body, trailers, pipelined requests) is not read or kept
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        if _forged_by_another_site(scope):
            log.warning("refused %s %s from %s: sent by a page of another web site", scope["method"], scope["path"],
                        who.address)
            refusal = DsmError("a page of another web site may not change anything here (its browser sent"
                               " Sec-Fetch-Site: cross-site); send the request yourself, or with a token")
            response = json_response(refusal.body(), 403)
            response.headers["connection"] = "close"
            await response(scope, receive, send)
            return
        problem = path_problem(scope.get("raw_path") or scope["path"].encode())
        if problem is None and not scope["path"].startswith("/status_update"):  # a container's progress is a 200
            problem = query_problem(scope["query_string"])  # whatever it holds (the protocol): a U+FFFD is kept
        if problem:
            await json_response(BadRequest(problem).body(), 400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _error_body(status: int, message: str) -> Response:
    return json_response({"status": "error", "message": message, "reason": message}, status)


async def _dsm_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DsmError)
    response = json_response(exc.body(), exc.status_code)
    response.headers.update(exc.headers)
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = ", ".join(sorted(_methods_of(request.app.router.routes, request.scope["path"]) | {"OPTIONS"}))
        if request.method == "OPTIONS":  # as Flask answered it for the original
            return Response(status_code=200, headers={"Allow": allow})
        response = _error_body(405, f"Method {request.method} not allowed here")
        response.headers["Allow"] = allow
        return response
    message = {404: f"Not found: {request.url.path}"}.get(exc.status_code, str(exc.detail))
    response = _error_body(exc.status_code, message)
    response.headers.update(exc.headers or {})
    return response


def _methods_of(routes: list[Any], path: str) -> set[str]:
    """The methods of the routes that match `path` most closely, for `Allow`. Starlette names only the first
    route whose path matched. Where several match, the ones with the most fixed text win: `/api/health` is
    not a service for `POST /api/{endpoint}`, nor `tasks/1:cancel` a task id for `GET tasks/{task_id}`."""
    matching = [(len(_PARAMETER.sub("", getattr(r, "path_format", ""))), r) for r in routes
                if (regex := getattr(r, "path_regex", None)) and regex.match(path)]
    closest = max((fixed for fixed, _ in matching), default=0)
    return {method for fixed, route in matching if fixed == closest
            for method in (getattr(route, "methods", None) or ())}


_PARAMETER = re.compile(r"\{[^}]*\}")


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "path", "body"))
        problems.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return _error_body(400, "invalid request: " + "; ".join(problems))


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up while its body was read: nothing to store, and no one to answer (the answer is
    for the log and the metrics, which count it as a 400, not a server error)."""
    log.info("%s %s: the client closed the connection before its body arrived", request.method, request.url.path)
    return _error_body(400, "the client closed the connection before its body arrived")


async def _unexpected(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, AnswerCut):  # logged where it happened; its answer is under way
        log.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return _error_body(500, f"internal error: {type(exc).__name__}: {exc}")


_M_MMAP_THRESHOLD = -3  # glibc's mallopt()
BIG_ALLOCATION = 4 * 1024 * 1024


def _return_big_blocks() -> None:
    """Blocks of 4 MiB and more (a large request body, a job's large details) come from mmap and go back
    to the system when freed. glibc's own threshold rises to 32 MiB after the first such block is freed,
    and then every later one is carved from a heap that never shrinks."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own allocator's rules hold
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, BIG_ALLOCATION)


def _die_with_supervisor() -> None:
    """A worker of `--workers N` dies with its parent, so a kill -9 of the server frees the port."""
    supervisor = os.environ.get(ENV_SUPERVISOR)
    if not supervisor or not supervisor.isdigit() or int(supervisor) == os.getpid():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        log.warning("cannot ask the kernel to end this worker with its parent")
    if os.getppid() != int(supervisor):  # the parent died before prctl took effect
        os._exit(1)


def _on_stop_signal(action: Callable[[], None]) -> None:
    """Run `action` the moment SIGTERM or SIGINT arrives, before the server's own handler (uvicorn's, which
    first lets open requests finish, up to its grace): a process that is stopping must not take over the
    scheduler from another that stopped sooner, while it drains a followed log."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(number)
        if not callable(previous):
            continue

        def chained(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
            action()
            previous(signum, frame)

        signal.signal(number, chained)


class DsmApp(FastAPI):
    """FastAPI, with one lane beside its own stack for the request 4CAT sends most: the poll of a job.

    4CAT polls every job it waits for, by the thousand, and each poll comes alone to a cold process:
    FastAPI's own layers around the route (error handling, telemetry, body limits, the route table, the
    parameter machinery) cost the poll more CPU than the answer itself. A `GET /api/jobs/<id>` goes through
    the same middlewares as every request (built from the same list, so none can be left out: the
    allow-list, tokens, metrics), then straight to the route's own endpoint."""

    poll_lane: tuple[Route, ASGIApp] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.poll_lane is not None and scope["type"] == "http" and scope["method"] == "GET" \
                and not scope.get("root_path") and (found := self.poll_lane[0].path_regex.match(scope["path"])):
            route, lane = self.poll_lane  # matched and converted by the route's own pattern, as its router would
            scope["app"] = self
            scope["path_params"] = {name: route.param_convertors[name].convert(value)
                                    for name, value in found.groupdict().items()}
            await lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def open_poll_lane(self, path: str) -> None:
        """After every middleware is added: the route at `path` (a plain Starlette route) gets its lane."""
        route = next(r for r in self.router.routes if isinstance(r, Route) and not isinstance(r, APIRoute)
                     and r.path == path)
        endpoint = route.endpoint

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            scope["endpoint"] = endpoint  # as the router records it, for the metrics' route label
            request = Request(scope, receive)
            try:
                response = await endpoint(request)
            except DsmError as exc:
                response = await _dsm_error(request, exc)
            except Exception as exc:
                response = await _unexpected(request, exc)
            await response(scope, receive, send)

        lane: ASGIApp = answer
        for middleware in reversed(self.user_middleware):  # as Starlette builds its stack: the first added inside
            lane = middleware.cls(lane, *middleware.args, **middleware.kwargs)
        self.poll_lane = (route, ServerErrorMiddleware(lane, handler=_unexpected))  # a middleware's failure: JSON


def create_app(config: Config, port: int) -> FastAPI:
    context = AppContext.build(config, port)
    serving.use_policy(context.policy)
    serving.quiet_logs()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _die_with_supervisor()
        _return_big_blocks()
        _on_stop_signal(context.stop_seeking)
        context.start_background()  # scheduler and adoption start after the socket is up
        yield
        context.stop_background()

    app = DsmApp(
        title="DMI Service Manager",
        summary="Runs Docker containers as jobs for 4CAT and manages the files they read and write",
        lifespan=lifespan,
        redirect_slashes=False,
        telemetry={"tracing": False, "metrics": False},  # checked on every request otherwise
    )
    tes_router = tes.router(context.tes) if config.tes_enabled else tes.disabled_router()
    routers: tuple[APIRouter, ...] = (jobs.router(context.jobs), files.router(context.files), gpu.router(context.jobs),
               health.router(context.health), dashboard.router(), tes_router, services.router(context.jobs))
    if config.metrics:
        routers += (metrics.router(Metrics(context.store, context.jobs.gpus_overview)),)
    # One flat table (an included router is searched as a whole), with the routes 4CAT calls by the
    # thousand first: routes are tried in turn. The sort is stable, so the rest keep their order.
    app.router.routes.extend(route for router in routers for route in router.routes)
    app.router.routes.sort(key=lambda r: HOT_PATHS.index(getattr(r, "path", "")) if getattr(r, "path", "") in HOT_PATHS
                           else len(HOT_PATHS))
    # Flask, which the original ran on, answers HEAD wherever it answers GET (uvicorn sends no body).
    implied_head: set[str] = set()  # as the OpenAPI document names their paths
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.methods and "GET" in route.methods and "HEAD" not in route.methods:
            route.methods.add("HEAD")
            implied_head.add(route.path_format)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():  # a route's GET and HEAD share its operation id; HEAD is dropped
                warnings.filterwarnings("ignore", "Duplicate Operation ID")
                document = generate()
            for path in implied_head:
                document.get("paths", {}).get(path, {}).pop("head", None)
            app.openapi_schema = schemas.with_components(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    handlers: dict[Any, Any] = {
        DsmError: _dsm_error,
        HTTPException: _http_error,
        RequestValidationError: _validation_error,
        ClientDisconnect: _client_gone,
        Exception: _unexpected,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
    # The last added runs first: the allow-list, then tokens.
    app.add_middleware(TokenMiddleware, tokens=context.tokens,
                       gate=Gate(require_token=config.require_token, tes_enabled=config.tes_enabled))
    if config.tes_enabled and config.tes_cors_origins:
        app.add_middleware(TesCors, origins=config.tes_cors_origins)
    app.add_middleware(AccessMiddleware, policy=context.policy)
    if config.metrics:
        plain: dict[Any, str] = {}
        for route in app.router.routes:
            if isinstance(route, Route) and not isinstance(route, APIRoute):
                plain.setdefault(route.endpoint, route.path)  # an endpoint's first path names it
        app.add_middleware(HttpMetrics, plain_routes=plain)  # outermost: refusals are timed and counted too
    app.open_poll_lane("/api/jobs/{job_id:int}")
    return app


def app_from_environment() -> FastAPI:
    """The factory that `dsm serve` hands uvicorn, so that every worker process builds its own app."""
    path = os.environ.get(ENV_CONFIG)
    loaded = load_config(Path(path) if path else None)
    logging.basicConfig(level=loaded.config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(loaded.config, int(os.environ.get(ENV_PORT, "4000")))
