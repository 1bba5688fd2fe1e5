"""File routes (remote mode): upload, list, download, count lines, delete a collection.

Every client-supplied name goes through the file service, which alone turns names into paths.
"""

from __future__ import annotations

import email.utils
import logging
import mimetypes
import re
from collections.abc import AsyncIterator, Iterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from ..errors import AnswerCut, BadRequest, PreconditionFailed, RangeNotSatisfiable
from ..files.service import FileService
from ..files.storage import OpenFile
from ..metrics import transferred
from . import schemas
from .auth import acting
from .http import caller, json_response

log = logging.getLogger(__name__)

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_BOUNDARY = re.compile(r"boundary=\"?([^\";,]+)\"?", re.IGNORECASE)
_MULTIPART = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object",
    "properties": {"folder_name": {"type": "string", "description": "the collection; blank: a fresh one"}},
    "additionalProperties": {"type": "string", "format": "binary",
                             "description": "each file part's field name is the subfolder it goes to"},
}}}}}


# A name or path of the upload folder, in the query: refused with control characters, as in a path.
_Name = Annotated[str, Query(min_length=1, json_schema_extra={"pattern": schemas.PATH_TEXT})]


def router(files: FileService) -> APIRouter:
    api = APIRouter(tags=["files"])

    # -- uploading (first: 4CAT sends one request per file, tens of thousands per dataset)

    async def send_files(request: Request) -> Response:
        """4CAT sends one of these per file, tens of thousands per dataset: a plain route, first in the table,
        without the framework's parameter machinery (documented in schemas.py)."""
        content_type = request.headers.get("content-type", "")
        match = _BOUNDARY.search(content_type)
        if not content_type.lower().startswith("multipart/form-data") or not match:
            raise BadRequest("send_files takes a multipart/form-data body")
        length = request.headers.get("content-length")
        declared = int(length) if length and length.isascii() and length.isdigit() else None
        try:
            result = await files.upload(match.group(1).encode("latin-1"), declared, request.stream(),
                                        caller(request))
        except ClientDisconnect:
            return Response(status_code=400)
        transferred("upload", result.stored_files, result.stored_bytes)
        return json_response(result.body())

    for path in ("/api/send_files", "/api/send_files/"):
        api.add_route(path, send_files, methods=["POST"], include_in_schema=False)
    schemas.document("/api/send_files", "post", summary="Upload files into a collection", model=schemas.UploadAnswer,
                     parameters=[], errors=(400, 413, 507), body=_MULTIPART["requestBody"])

    # -- listing

    @api.get("/api/list_filenames/{collection:path}", responses={200: {"content": {"application/json": {
        "schema": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}}}}},
        **schemas.errors(400, 404)})
    async def list_filenames(collection: str) -> Response:
        """Every folder below the collection, empty ones too, with its files; '.' holds the top level."""
        return json_response(await run_in_threadpool(files.list_tree, collection))

    @api.get("/api/list_files", responses={200: {"content": {"application/json": {}}}, **schemas.errors(400, 404)})
    @api.get("/api/list_filenames/", include_in_schema=False)
    @api.get("/api/list_filenames", include_in_schema=False)
    async def list_files(folder_name: _Name) -> Response:
        """The original's query-string form: `?folder_name=<collection>`."""
        return json_response(await run_in_threadpool(files.list_tree, folder_name))

    # -- downloading

    @api.api_route("/api/download/{path:path}", methods=["GET", "HEAD"], response_class=StreamingResponse,
                   responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a range"},
                              304: {"description": "not modified"}, **schemas.errors(400, 404, 412, 416)})
    @api.api_route("/api/uploads/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def download(request: Request, path: str) -> Response:
        opened, name = await run_in_threadpool(files.open, path)
        try:
            return _file_response(request, opened, name)
        except BaseException:
            opened.close()
            raise

    # -- line counts and deletion

    @api.get("/api/linecount/", responses={200: {"model": schemas.LinecountAnswer}, **schemas.errors(400, 404)})
    @api.get("/api/linecount", include_in_schema=False)
    async def linecount(folder: _Name, file: _Name) -> Response:
        """Lines in `folder/file`: progress for services that write one line per item."""
        return json_response({"lines": await run_in_threadpool(files.count_lines, folder, file)})

    @api.get("/api/collections", responses={200: {"model": schemas.CollectionsAnswer}})
    async def collections() -> Response:
        """Every upload collection: files, bytes, last change, and whether a waiting or running job uses it."""
        return json_response({"collections": await run_in_threadpool(files.collections)})

    @api.delete("/api/files/{collection:path}", responses={200: {"model": schemas.DeletedAnswer},
                                                          **schemas.errors(400, 404, 409)})
    async def delete_collection(request: Request, collection: str) -> Response:
        deleted = await run_in_threadpool(files.delete_collection, collection)
        log.info("collection %s deleted at the request of %s", deleted, acting(request.scope))
        return json_response({"status": "success", "deleted": deleted})

    return api


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
    precondition = _preconditions(request, etag, opened.mtime)
    if precondition is not None:
        opened.close()
        if precondition == 412:
            raise PreconditionFailed("the file is not the version the request's If-Match or If-Unmodified-Since"
                                     " names")
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
        opened.close()
        return Response(status_code=status, headers=headers, media_type=media_type)
    transferred("download", 1, 0)
    return StreamingResponse(_chunks(opened.read(start, end), end - start, name), status_code=status,
                             headers=headers, media_type=media_type)


async def _chunks(reading: Iterator[bytes], promised: int, name: str) -> AsyncIterator[bytes]:
    """Each read in a thread; the file closes when the reading ends, however it ends. A file that shrinks
    while it is sent cuts the answer: Content-Length promised more than is left."""
    sent = 0
    try:
        async for data in iterate_in_threadpool(reading):
            yield data
            sent += len(data)
            transferred("download", 0, len(data))
    finally:
        close = getattr(reading, "close", None)
        if close is not None:
            close()
    if sent < promised:
        log.warning("download of %s cut after %d of %d bytes: the file shrank while it was sent", name, sent,
                    promised)
        raise AnswerCut(name)


def _preconditions(request: Request, etag: str, mtime: float) -> int | None:
    """RFC 9110's conditional requests in its order: 412 or 304 when one decides, else None. Dates have
    whole seconds, as Last-Modified does."""
    def tags(header: str) -> list[str]:
        return [tag.strip().removeprefix("W/") for tag in header.split(",")]

    def date(header: str) -> float | None:
        try:
            return email.utils.parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None  # an invalid date is ignored (RFC 9110 13.1.3)

    if_match, if_unmodified = request.headers.get("if-match"), request.headers.get("if-unmodified-since")
    if if_match is not None:
        if "*" not in tags(if_match) and etag not in tags(if_match):
            return 412
    elif if_unmodified is not None and (since := date(if_unmodified)) is not None and int(mtime) > since:
        return 412
    if_none_match, if_modified = request.headers.get("if-none-match"), request.headers.get("if-modified-since")
    if if_none_match is not None:
        if "*" in tags(if_none_match) or etag in tags(if_none_match):
            return 304
    elif if_modified is not None and (since := date(if_modified)) is not None and int(mtime) <= since:
        return 304
    return None


def _position(digits: str) -> int | None:
    """A byte position of a range; one past any file where it has more digits than a file's size can
    (int() refuses numbers past 4,300 digits). Leading zeros count for nothing."""
    if not digits:
        return None
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else 2**63


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b` range as [start, end); None to send the whole file (several ranges, say)."""
    match = _RANGE.fullmatch(header.strip())
    if not match or match.group(1) == match.group(2) == "" or size == 0:
        return None  # an empty file has no range to send: it is sent whole
    first, last = (_position(text) for text in match.groups())
    if first is None:
        assert last is not None
        length = last
        if length == 0:
            raise RangeNotSatisfiable(f"range {header!r} is empty", extra={"size": size},
                                      headers={"Content-Range": f"bytes */{size}"})
        return max(size - length, 0), size
    start = first
    end = min(last + 1, size) if last is not None else size
    if start >= size or end <= start:
        raise RangeNotSatisfiable(f"range {header!r} is outside the file ({size} bytes)", extra={"size": size},
                                  headers={"Content-Range": f"bytes */{size}"})
    return start, end
