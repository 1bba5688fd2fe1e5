"""File routes (remote mode): upload, list, download, count lines, delete a collection.

Every client-supplied name goes through `files.storage`, which alone turns names into paths.
"""

from __future__ import annotations

import email.utils
import logging
import mimetypes
import os
import re
from collections.abc import AsyncIterator
from urllib.parse import quote

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from ..errors import BadRequest, Conflict, DsmError, PayloadTooLarge, RangeNotSatisfiable
from ..files.retention import collections_in_use
from ..files.storage import OpenFile, Storage, display, split_path
from ..files.uploads import UploadReceiver
from .http import ctx, json_response

log = logging.getLogger(__name__)
router = APIRouter()

CHUNK = 1024 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _storage(request: Request) -> Storage:
    storage = ctx(request).storage
    if storage is None:
        raise BadRequest("This instance of DMI Service Manager is not configured to allow uploads"
                         " (UPLOAD_FOLDER_PATH is not set)")
    return storage


# -- uploading (first: 4CAT sends one request per file, tens of thousands per dataset)


@router.post("/api/send_files")
@router.post("/api/send_files/")
async def send_files(request: Request) -> Response:
    storage = _storage(request)
    config = ctx(request).config
    content_type = request.headers.get("content-type", "")
    match = re.search(r"boundary=\"?([^\";,]+)\"?", content_type)
    if not content_type.lower().startswith("multipart/form-data") or not match:
        raise BadRequest("send_files takes a multipart/form-data body")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > config.max_upload_bytes:
        _log_refusal(request, "too large", None)
        raise PayloadTooLarge(f"the upload is larger than this server accepts ({config.max_upload_bytes} bytes)")
    receiver = UploadReceiver(storage, config.allowed_extensions, config.max_upload_bytes, config.upload_fsync)
    try:
        await receiver.receive(match.group(1).encode("latin-1"), request.stream())
        result = receiver.place()  # a few renames and mkdirs: cheaper inline than a thread hop
    except ClientDisconnect:
        receiver.discard()
        log.info("upload to %s: the client disconnected; nothing was kept", receiver.fields.get("folder_name"))
        return Response(status_code=400)
    except DsmError as exc:
        receiver.discard()
        if exc.status_code in (413, 507):
            _log_refusal(request, exc.message, receiver.fields.get("folder_name"))
        raise
    except BaseException:
        receiver.discard()
        raise
    return json_response(result.body())


# -- listing


@router.get("/api/list_filenames/{collection:path}")
async def list_filenames(collection: str, request: Request) -> Response:
    """Every folder below the collection, empty ones too, with its files; '.' holds the top level."""
    storage = _storage(request)
    parts = split_path(collection, "collection")
    tree = await run_in_threadpool(storage.list_tree, parts)
    return json_response(tree)


@router.get("/api/list_filenames/")
@router.get("/api/list_filenames")
@router.get("/api/list_files")
async def list_files(request: Request) -> Response:
    """The original's query-string form: `?folder_name=<collection>`."""
    folder = request.query_params.get("folder_name")
    if not folder:
        raise BadRequest("Must provide folder_name as ?folder_name=your_folder_name")
    return await list_filenames(folder, request)


def _log_refusal(request: Request, why: str, collection: str | None) -> None:
    log.error("upload refused (%s) for collection %s from %s", why, collection or "(not yet known)",
              request.client.host if request.client else "?")


# -- downloading


@router.get("/api/download/{path:path}")
@router.get("/api/uploads/{path:path}")
async def download(path: str, request: Request) -> Response:
    storage = _storage(request)
    parts = split_path(path, "path")
    if len(parts) < 2:
        raise BadRequest("path must name a file inside a collection: <collection>/<folder>/<file>")
    opened = await run_in_threadpool(storage.open_file, parts)
    try:
        return _file_response(request, opened, parts[-1])
    except BaseException:
        os.close(opened.fd)
        raise


def _file_response(request: Request, opened: OpenFile, name: str) -> Response:
    etag = f'"{opened.inode:x}-{opened.size:x}-{int(opened.mtime * 1e6):x}"'
    headers = {
        "ETag": etag,
        "Last-Modified": email.utils.formatdate(opened.mtime, usegmt=True),
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
        "X-Content-Type-Options": "nosniff",
    }
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if etag in (request.headers.get("if-none-match") or ""):
        os.close(opened.fd)
        return Response(status_code=304, headers=headers)
    start, end = 0, opened.size
    status = 200
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted and (if_range is None or if_range in (etag, headers["Last-Modified"])):
        span = _parse_range(wanted, opened.size)
        if span is not None:
            start, end = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{opened.size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        os.close(opened.fd)
        return Response(status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(_read(opened.fd, start, end), status_code=status, headers=headers,
                             media_type=media_type)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b` range as [start, end); None to send the whole file (several ranges, say)."""
    match = _RANGE.fullmatch(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0:
            raise RangeNotSatisfiable(f"range {header!r} is empty", extra={"size": size})
        return max(size - length, 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise RangeNotSatisfiable(f"range {header!r} is outside the file ({size} bytes)", extra={"size": size})
    return start, end


async def _read(fd: int, start: int, end: int) -> AsyncIterator[bytes]:
    try:
        offset = start
        while offset < end:
            data = await run_in_threadpool(os.pread, fd, min(CHUNK, end - offset), offset)
            if not data:
                break
            offset += len(data)
            yield data
    finally:
        os.close(fd)


# -- line counts and deletion


@router.get("/api/linecount/")
@router.get("/api/linecount")
async def linecount(request: Request) -> Response:
    """Lines in `folder/file`: progress for services that write one line per item."""
    storage = _storage(request)
    folder = split_path(request.query_params.get("folder"), "folder")
    file = split_path(request.query_params.get("file"), "file")
    lines = await run_in_threadpool(storage.count_lines, (*folder, *file))
    return json_response({"lines": lines})


@router.delete("/api/files/{collection:path}")
async def delete_collection(collection: str, request: Request) -> Response:
    storage = _storage(request)
    context = ctx(request)
    parts = split_path(collection, "collection", allow_nested=False)
    in_use = collections_in_use(await run_in_threadpool(context.store.active), context.config)
    if parts[0] in in_use:
        raise Conflict(f"collection {display(parts)} is used by a job that is waiting or running")
    await run_in_threadpool(storage.remove_collection, parts)
    log.info("collection %s deleted at the request of %s", display(parts), request.client)
    return json_response({"status": "success", "deleted": display(parts)})
