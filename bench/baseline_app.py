"""Ceilings for the benchmarks: bare Starlette routes doing only the essential work, nothing else.

Run by the bench scripts with the same uvicorn settings as `dsm serve`, so the comparison is fair:
- POST /upload: parse one multipart request (Starlette's own parser) and write its file to disk;
- POST /stream: stream the raw body to a file;  GET /file: serve that file back (FileResponse);
- GET /row/{id}: read one row from a SQLite database and answer it as JSON.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

ROOT = Path(os.environ.get("BASELINE_ROOT", "/tmp/dsm-baseline"))
DATABASE = os.environ.get("BASELINE_DB", str(ROOT / "rows.db"))
_local = threading.local()


async def upload(request: Request) -> Response:
    form = await request.form()
    folder = ROOT / str(form.get("folder_name") or "x")
    names = []
    for field, value in form.multi_items():
        if hasattr(value, "read"):
            target = folder / field
            target.mkdir(parents=True, exist_ok=True)
            with open(target / (value.filename or uuid.uuid4().hex), "wb") as handle:
                handle.write(await value.read())
            names.append(value.filename)
    return JSONResponse({"folder_name": folder.name, "files": names})


async def stream(request: Request) -> Response:
    with open(ROOT / "streamed.bin", "wb") as handle:
        async for chunk in request.stream():
            handle.write(chunk)
    return JSONResponse({"ok": True})


async def file(request: Request) -> Response:
    return FileResponse(ROOT / "streamed.bin")


async def row(request: Request) -> Response:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = sqlite3.connect(DATABASE, check_same_thread=False)
        conn.row_factory = sqlite3.Row
    found = conn.execute("SELECT * FROM jobs WHERE id = ?", (int(request.path_params["id"]),)).fetchone()
    return Response(json.dumps({"status": "success", "job": dict(found)}), media_type="application/json")


ROOT.mkdir(parents=True, exist_ok=True)
app = Starlette(routes=[Route("/upload", upload, methods=["POST"]), Route("/stream", stream, methods=["POST"]),
                       Route("/file", file), Route("/row/{id:int}", row)])
