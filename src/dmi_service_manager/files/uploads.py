"""`send_files`: one multipart request, streamed part by part straight into staging files.

Nothing is held in memory beyond the parser's chunk, whatever the file size. Each file lands in a
hidden staging folder on the same file system and is renamed into place only once it is complete,
so a client that disconnects, a refused file, a full disk or a killed server never leaves a partial
file where a real one would be. Names are sanitised exactly as werkzeug's `secure_filename` does,
because 4CAT predicts the stored names that way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from python_multipart.multipart import MultipartParser
from python_multipart.multipart import parse_options_header as multipart_options
from werkzeug.http import parse_options_header
from werkzeug.utils import secure_filename

from ..errors import BadRequest, Conflict, DsmError, PayloadTooLarge
from .storage import Parts, StagedFile, Storage, disk_full_is_507, display, split_path

log = logging.getLogger(__name__)

MAX_FIELD_BYTES = 64 * 1024  # one form field
MAX_FIELDS_BYTES = 1024 * 1024  # all form fields of a request together
MAX_PARTS = 256  # each file part holds a descriptor until the request is complete
MAX_PART_HEADER_BYTES = 16 * 1024
MAX_NAME_BYTES = 255  # what file systems take for one name


@dataclass
class _Part:
    field_name: str = ""
    filename: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    # a file part
    folder: Parts = ()
    name: str = ""
    staged: StagedFile | None = None
    placeholder: bool = False
    refused: bool = False
    writing: bool = True  # until the part's end boundary arrives
    # a form field
    value: bytearray = field(default_factory=bytearray)


@dataclass
class UploadResult:
    folder_name: str
    accepted: dict[str, list[str]]
    errors: dict[str, str]
    stored_files: int = 0  # what the metrics count; not part of 4CAT's answer
    stored_bytes: int = 0

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"folder_name": self.folder_name, **self.accepted}
        if self.errors:
            body["errors"] = self.errors
        return body


ANSWER_KEYS = ("folder_name", "errors")


def is_placeholder(filename: str, field_name: str) -> bool:
    """4CAT's empty `4CAT_<results>_blank.txt`, sent only so that the results folder exists."""
    return filename == f"4CAT_{field_name}_blank.txt"


class UploadReceiver:
    def __init__(self, storage: Storage, allowed_extensions: list[str] | None, max_bytes: int, fsync: bool) -> None:
        self.storage = storage
        self.allowed = None if allowed_extensions is None else set(allowed_extensions)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.received = 0
        self.fields: dict[str, str] = {}
        self.files: list[_Part] = []
        self.errors: dict[str, str] = {}
        self.claimed: set[tuple[Parts, str]] = set()  # (folder, stored name) of the files this request stores
        self.parts = 0
        self.field_bytes = 0
        self._part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()

    # -- parser callbacks (python-multipart calls these synchronously from write())

    def _on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise PayloadTooLarge(f"a request may hold at most {MAX_PARTS} parts; send the files in several requests")
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]
        self._check_header()

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._check_header()

    def _check_header(self) -> None:
        if len(self._header_field) + len(self._header_value) > MAX_PART_HEADER_BYTES or \
                len(self._part.headers) > 32:
            raise BadRequest("a part of the multipart body has headers that are too large")

    def _on_header_end(self) -> None:
        self._part.headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        part = self._part
        disposition = part.headers.get(b"content-disposition", b"").decode("latin-1")
        options = _disposition(disposition)
        part.field_name = _utf8(options.get("name", ""))
        filename = options.get("filename")
        if filename is None:
            return
        part.filename = _utf8(filename)
        if part.field_name in ANSWER_KEYS:  # the answer lists files by their field, beside these keys
            raise BadRequest(f"a file's field may not be named {part.field_name!r}: the answer uses that key")
        try:
            part.folder = split_path(part.field_name, f"field name {part.field_name!r}")
        except BadRequest as exc:  # this file's folder alone: refused alone, as any refused file
            self._refuse(part, exc.message)
            return
        if is_placeholder(part.filename, part.field_name):
            part.placeholder = True
            return
        part.name = secure_filename(part.filename)
        reason = self._refusal(part.name) or self._claimed(part)
        if reason:
            self._refuse(part, reason)
            return
        self.claimed.add((part.folder, part.name))
        with disk_full_is_507():
            part.staged = self.storage.new_staged_file()

    def _refuse(self, part: _Part, reason: str) -> None:
        part.refused = True
        self.errors[part.filename or ""] = reason

    def _refusal(self, name: str) -> str | None:
        """Why a file cannot be stored under `name` (its sanitised name), or None. The extension is the
        stored name's: the file on disk is what ALLOWED_EXTENSIONS is for."""
        if not name:
            return "the file name has no usable characters"
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            return f"the file name is longer than the {MAX_NAME_BYTES} bytes a file system takes"
        if self.allowed is not None:
            lowered = name.lower()
            if not any(lowered.endswith(f".{extension}") and len(lowered) > len(extension) + 1
                       for extension in self.allowed):
                extension = lowered.rsplit(".", 1)[1] if "." in lowered else ""
                return f"files of type {extension or '(none)'!r} are not allowed on this server"
        return None

    def _claimed(self, part: _Part) -> str | None:
        """Two files of one request stored under one name would leave only the last: the first keeps it."""
        if (part.folder, part.name) not in self.claimed:
            return None
        return (f"another file of this request is already stored as {part.name!r} in {part.field_name!r}; send"
                " this one in a request of its own to replace it")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.staged is not None and part.writing:
            self._write(part.staged.fd, memoryview(data)[start:end])
        elif part.filename is None:
            if len(part.value) + end - start > MAX_FIELD_BYTES:
                raise BadRequest(f"form field {part.field_name!r} is larger than {MAX_FIELD_BYTES} bytes")
            self.field_bytes += end - start
            if self.field_bytes > MAX_FIELDS_BYTES:
                raise PayloadTooLarge(f"the form fields of a request may hold at most {MAX_FIELDS_BYTES} bytes")
            part.value += data[start:end]

    def _on_part_end(self) -> None:
        part = self._part
        if part.filename is None:  # a field sent twice keeps its first value, as Flask's form.get() did
            # Bytes that are not UTF-8 are kept apart (as surrogates), for the name checks to refuse them.
            self.fields.setdefault(part.field_name, part.value.decode("utf-8", "surrogateescape"))
            return
        if part.staged is not None:
            part.writing = False
            if self.fsync:
                self._sync(part.staged.fd)
        self.files.append(part)

    # -- file handling

    def _write(self, fd: int, data: memoryview) -> None:
        """Straight to the staged file: no buffer of ours, so no copy and flat memory."""
        with disk_full_is_507():
            while data:
                data = data[os.write(fd, data):]

    def _sync(self, fd: int) -> None:
        with disk_full_is_507():
            os.fsync(fd)

    def discard(self) -> None:
        """Remove every staged file of this request: used on any failure."""
        for part in [*self.files, self._part]:
            if part.staged is not None:
                part.staged.discard()
                part.staged = None

    # -- the request

    async def receive(self, boundary: bytes, chunks: AsyncIterator[bytes]) -> None:
        try:
            parser = MultipartParser(
                boundary,
                callbacks={
                    "on_part_begin": self._on_part_begin,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._on_part_end,
                    "on_header_field": self._on_header_field,
                    "on_header_value": self._on_header_value,
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                },
            )
        except Exception as exc:  # a boundary the parser refuses (longer than 256 bytes, say)
            raise BadRequest(f"the multipart boundary is not usable: {exc}") from None
        async for chunk in chunks:
            self.received += len(chunk)
            over = self.received > self.max_bytes
            if over:  # what fits is still read: the log names the collection when its field came first
                chunk = chunk[:max(len(chunk) - (self.received - self.max_bytes), 0)]
            try:
                parser.write(chunk)
            except (DsmError, OSError):
                raise
            except Exception as exc:  # python-multipart's MultipartParseError and friends
                raise BadRequest(f"the multipart body could not be parsed: {exc}") from None
            if over:
                raise PayloadTooLarge(f"the upload is larger than this server accepts ({self.max_bytes} bytes)")
        try:
            parser.finalize()
        except Exception as exc:
            raise BadRequest(f"the multipart body could not be parsed: {exc}") from None
        if self._part.staged is not None and self._part.writing:
            raise BadRequest("the multipart body ended in the middle of a file")

    def place(self) -> UploadResult:
        """Move every complete file into its collection; returns what 4CAT expects back."""
        if not self.files:
            raise BadRequest("no files received; send each file as a multipart file part")
        folder_name = self.fields.get("folder_name") or uuid.uuid4().hex
        collection = split_path(folder_name, "folder_name")
        accepted: dict[str, list[str]] = {}
        stored_files = stored_bytes = 0
        if all(part.refused for part in self.files):
            with contextlib.suppress(Conflict):  # made all the same, as the original did, where it can be
                self.storage.ensure_dir(collection)
        for part in self.files:
            if part.refused:
                if part.folder:  # a field that names a folder is in the answer, if only with no file
                    accepted.setdefault(part.field_name, [])
                continue
            target = (*collection, *part.folder)
            try:
                if part.placeholder:
                    self.storage.ensure_dir(target)
                else:
                    assert part.staged is not None
                    size = os.fstat(part.staged.fd).st_size
                    with disk_full_is_507():
                        self.storage.place(part.staged, target, part.name)
                    stored_files += 1
                    stored_bytes += size
            except Conflict as exc:  # a folder, or a non-folder, in the way of this file only: refuse it alone
                self._refuse(part, exc.message)
                accepted.setdefault(part.field_name, [])
                continue
            finally:
                if part.staged is not None:
                    part.staged.discard()
                    part.staged = None
            accepted.setdefault(part.field_name, []).append(part.filename or "")
        if self.errors:
            log.warning("upload to %s: refused %s", display(collection), self.errors)
        return UploadResult(folder_name=folder_name, accepted=accepted, errors=self.errors, stored_files=stored_files,
                            stored_bytes=stored_bytes)


def _disposition(header: str) -> dict[str, str]:
    """A part's Content-Disposition parameters. Plain `name="..."; filename="..."` (what 4CAT's requests
    sends) is read by python-multipart's small parser; anything else (RFC 2231's `filename*=` from older
    urllib3, a percent-escaped quote, a backslash) by werkzeug's, which decodes it as werkzeug would."""
    if "*" in header or "\\" in header or "%" in header:
        return dict(parse_options_header(header)[1])
    _, options = multipart_options(header)
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in options.items()}


def _utf8(value: str) -> str:
    """Header values arrive as latin-1 text; clients send UTF-8 names."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value
