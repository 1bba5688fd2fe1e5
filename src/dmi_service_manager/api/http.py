"""Small helpers every router shares: JSON answers and bodies, the caller, our own URL."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import PayloadTooLarge
from .params import decode_json

CALLER_KEY = "dsm.caller"  # the client's address after trusted proxies, set by the access middleware
TRUSTED_PEER_KEY = "dsm.trusted_peer"  # whether the TCP peer is a trusted proxy, set there too
MAX_JSON_BYTES = 16 * 1024 * 1024  # a job's arguments; far more than the kernel lets a container take
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]+\])(?::([0-9]{{1,5}}))?")
_PREFIX = re.compile(r"(/[A-Za-z0-9._~\-]+)*/?")


def json_response(data: Any, status_code: int = 200) -> Response:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Response(content=body, status_code=status_code, media_type="application/json")


def caller(request: Request) -> str:
    """The client's address after trusted proxies (set by the access middleware)."""
    return str(request.scope.get(CALLER_KEY) or (request.client.host if request.client else "unknown"))


def _forwarded(request: Request, header: str) -> str | None:
    """The value our trusted proxy set: the last of the list (the ones before it came from further out,
    where anyone could have written them), as werkzeug's ProxyFix reads it."""
    values = ",".join(request.headers.getlist(header))
    last = values.split(",")[-1].strip()
    return last or None


def base_url(request: Request) -> str:
    """This server's URL as the client sees it: behind a trusted proxy, as the proxy says."""
    scheme = request.url.scheme
    host = request.headers.get("host") or (
        f"{request.scope['server'][0]}:{request.scope['server'][1]}" if request.scope.get("server") else "localhost"
    )
    prefix = request.scope.get("root_path", "")
    port = None
    if request.scope.get(TRUSTED_PEER_KEY):
        scheme = _forwarded(request, "x-forwarded-proto") or scheme
        host = _forwarded(request, "x-forwarded-host") or host
        prefix = _forwarded(request, "x-forwarded-prefix") or prefix
        port = _forwarded(request, "x-forwarded-port")
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        scheme = "http"
    valid = _HOST.fullmatch(host)
    if not valid or (valid.group(1) and not 0 < int(valid.group(1)) <= 65535):
        server = request.scope.get("server") or ("localhost", 4000)
        host = f"{server[0]}:{server[1]}"
    elif port and port.isascii() and port.isdigit() and 0 < int(port[:6]) <= 65535:
        # The port the proxy was reached on (nginx's $server_port, Traefik): it replaces the host's, and the
        # scheme's default is left out, as a browser writes it.
        bare = host[:-len(valid.group(1)) - 1] if valid.group(1) else host
        host = bare if int(port) == (443 if scheme == "https" else 80) else f"{bare}:{int(port)}"
    prefix = prefix.strip("/")
    safe = _PREFIX.fullmatch(f"/{prefix}") and not {".", ".."} & set(prefix.split("/"))
    prefix = f"/{prefix}" if prefix and safe else ""
    return f"{scheme}://{host}{prefix}"


async def json_body(request: Request) -> Any:
    """The body as JSON, or None when there is none; a BadRequest when it is not JSON."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BYTES:
            raise PayloadTooLarge(f"a JSON body may be at most {MAX_JSON_BYTES} bytes")
    if not raw.strip():
        return None
    return decode_json(raw)
