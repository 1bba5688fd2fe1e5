"""`dsm upload` and `dsm download`: a folder to a collection and back, resumable, streamed, with progress.

The server's side (4cat-protocol.md, section 2): `POST /api/send_files` takes a multipart form whose
`folder_name` field is the collection and whose file parts are each named after the folder they go to; a
part may not go to a collection's top level (its field name would be empty). Names are stored as werkzeug's
`secure_filename` makes them, so that is what this side compares with `GET /api/list_filenames/...`, whose
answer is `{"<folder relative to what was listed>": ["file", ...], ...}` with `"."` for the top and every
folder listed, empty ones too (an empty folder is made with 4CAT's placeholder part, which the server turns
into the folder and does not keep).

A file counts as already there when the listing has its name and the server's copy has its size, which a
`HEAD` of `/api/download/...` gives as its `Content-Length`. Uploads go in batches of several parts, each
request's body generated from open files as it is sent, with its exact length declared, so memory stays
flat at any size. Downloads are written to a temporary file beside the target and renamed into place once
complete.

The server's names are untrusted: a name that is empty, `.` or `..`, holds a slash, a backslash, NUL or a
control character, or would pass through a symlink or a non-folder, is refused, so nothing is written
outside `--out`.
"""

from __future__ import annotations

import mimetypes
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text
from urllib3.fields import RequestField
from werkzeug.utils import secure_filename

from .client import Client, decode, one_line
from .exits import USAGE, CliError
from .render import size

BATCH_FILES = 64  # parts per request (the server takes at most 256)
BATCH_BYTES = 64 * 1024 * 1024  # bytes per request, unless one file alone is larger
CHUNK = 1024 * 1024
UPLOAD_READ_TIMEOUT = 600.0  # the server answers once it has stored the whole batch
DOWNLOAD_READ_TIMEOUT = 120.0
MAX_NAME_BYTES = 255
UPLOAD_FIELD = "4cat_uploads"


# -- names


def _bad_component(part: str) -> str | None:
    """Why one path component may not be used, or None."""
    if part in ("", ".", ".."):
        return "an empty, '.' or '..' component"
    if "/" in part or "\\" in part:
        return "a slash or backslash"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in part):
        return "a control character"
    if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"a component longer than {MAX_NAME_BYTES} bytes"
    return None


def collection_parts(text: str, what: str = "COLLECTION") -> tuple[str, ...]:
    """A collection (or a path inside one) given on the command line, as its components."""
    if text.startswith("/"):
        raise CliError(f"{what} must be a relative path on the server, not {text!r}", USAGE)
    parts = tuple(text.strip("/").split("/"))
    for part in parts:
        why = _bad_component(part)
        if why:
            raise CliError(f"{what} {text!r} has {why}", USAGE)
    return parts


def _server_parts(key: str) -> tuple[str, ...] | None:
    """A folder named in the server's listing, as components (`.` is the top), or None when unsafe."""
    if key == ".":
        return ()
    parts = tuple(key.split("/"))
    return None if any(_bad_component(part) for part in parts) else parts


def _path(parts: tuple[str, ...]) -> str:
    return "/".join(parts) or "."


def _url_path(parts: tuple[str, ...]) -> str:
    return quote("/".join(parts), safe="/")


def remote_size(client: Client, parts: tuple[str, ...]) -> int | None:
    """The size of a file on the server (None: it has none there)."""
    response = client.request("HEAD", f"/api/download/{_url_path(parts)}", accept=(404,))
    length = response.headers.get("Content-Length", "")
    return int(length) if response.status_code != 404 and length.isdigit() else None


def listing(client: Client, parts: tuple[str, ...], *, missing_ok: bool) -> dict[str, list[str]]:
    """`{folder: [files]}` below `parts`; an absent folder is empty when `missing_ok`."""
    response = client.request("GET", f"/api/list_filenames/{_url_path(parts)}", accept=(404,) if missing_ok else ())
    if response.status_code == 404:
        return {}
    tree = decode(response)
    if not isinstance(tree, dict):
        raise CliError(f"the server's listing of {_path(parts)} is not a JSON object", 6)
    return {str(key): [str(name) for name in names] for key, names in tree.items() if isinstance(names, list)}


# -- progress


class _Counts(ProgressColumn):
    """`3/10 files 1.2/4.0 MiB 800.0 KiB/s` (without the total when it is not known)."""

    def render(self, task: Task) -> Text:
        fields = task.fields
        done, total = fields["bytes"], fields["bytes_total"]
        elapsed = task.elapsed or 0.0
        speed = f" {size(int(done / elapsed))}/s" if elapsed > 0.5 else ""
        amount = size(done) if total is None else _pair(done, total)
        return Text(f"{fields['files']}/{fields['files_total']} files {amount}{speed}")


def _pair(done: int, total: int) -> str:
    """`1.2/4.0 MiB`: both in the unit of the total."""
    number, unit = size(total).split(" ")
    scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[unit]
    return f"{done // scale}/{number} {unit}" if unit == "B" else f"{done / scale:.1f}/{number} {unit}"


class Progressing:
    """A progress bar on stderr, by bytes when their total is known, else by files; shown on a terminal."""

    def __init__(self, console: Console, verb: str, files_total: int, bytes_total: int | None) -> None:
        self.bytes_total = bytes_total
        columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn(bar_width=20), _Counts()]
        if bytes_total is not None:
            columns.append(TimeRemainingColumn())
        self.progress = Progress(*columns, console=console, transient=False, disable=not console.is_terminal)
        total = bytes_total if bytes_total is not None else files_total
        self.task = self.progress.add_task(verb, total=max(total, 1), files=0, files_total=files_total, bytes=0,
                                           bytes_total=bytes_total)
        self.files = 0
        self.bytes = 0

    def __enter__(self) -> Progressing:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def sent(self, count: int) -> None:
        self.bytes += count
        if self.bytes_total is not None:
            self.progress.update(self.task, completed=self.bytes, bytes=self.bytes)
        else:
            self.progress.update(self.task, bytes=self.bytes)

    def file_done(self) -> None:
        self.files += 1
        if self.bytes_total is None:
            self.progress.update(self.task, completed=self.files, files=self.files)
        else:
            self.progress.update(self.task, files=self.files)


# -- upload


@dataclass
class LocalFile:
    path: Path
    folder: tuple[str, ...]  # relative to the collection given
    name: str  # as the server stores it
    size: int

    @property
    def shown(self) -> str:
        return _path((*self.folder, self.name))


@dataclass
class UploadReport:
    collection: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    folders_made: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    not_followed: list[str] = field(default_factory=list)  # symlinks to folders
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0

    def json(self) -> dict[str, Any]:
        return {"collection": self.collection, "uploaded": self.uploaded, "skipped": self.skipped,
                "folders_made": self.folders_made, "renamed": self.renamed, "not_followed": self.not_followed,
                "failed": self.failed, "bytes": self.bytes}


def scan(root: Path, report: UploadReport) -> tuple[list[LocalFile], list[tuple[str, ...]]]:
    """Every regular file below `root` (symlinks to files followed, to folders not: they are noted) and
    every folder that holds nothing to upload, with the names the server will give them."""
    files: list[LocalFile] = []
    empty: list[tuple[str, ...]] = []
    seen: dict[tuple[tuple[str, ...], str], str] = {}
    for top, dirs, names in os.walk(root, onerror=_raise):
        folder = Path(top).relative_to(root).parts
        for name in [name for name in dirs if (Path(top) / name).is_symlink()]:
            report.not_followed.append(_path((*folder, name)))
            dirs.remove(name)
        dirs.sort()
        bad = next((why for part in folder if (why := _bad_component(part))), None)
        if bad:
            report.failed[_path(folder)] = f"the folder name has {bad}"
            dirs.clear()
            continue
        kept = 0
        for name in sorted(names):
            path = Path(top) / name
            shown = _path((*folder, name))
            try:
                stat = path.stat()
            except OSError as exc:
                report.failed[shown] = one_line(exc.strerror or str(exc))
                continue
            if not path.is_file():
                report.failed[shown] = "not a regular file"
                continue
            stored = secure_filename(name)
            if not stored:
                report.failed[shown] = "the server keeps no character of this name (secure_filename)"
                continue
            if (folder, stored) in seen:
                report.failed[shown] = f"stored as {stored!r}, as {seen[folder, stored]!r} is"
                continue
            seen[folder, stored] = shown
            if stored != name:
                report.renamed[shown] = _path((*folder, stored))
            files.append(LocalFile(path, folder, stored, stat.st_size))
            kept += 1
        if not kept and not dirs and folder:
            empty.append(folder)
    return files, empty


def _raise(exc: OSError) -> None:
    raise CliError(f"cannot read {exc.filename}: {exc.strerror}")


class MultipartBody:
    """A `multipart/form-data` body made as it is sent: files are read a chunk at a time, never whole.

    Its length is known beforehand (`len()`), so the request declares it and is not chunked. Every file
    is opened before the request starts, so an unreadable file fails before anything is sent.
    """

    def __init__(self, folder_name: str, parts: list[tuple[str, str, LocalFile | None]],
                 sent: Callable[[int], None], file_done: Callable[[], None]) -> None:
        self.boundary = uuid.uuid4().hex
        self.sent = sent
        self.file_done = file_done
        self.head = self._field_head("folder_name", None) + folder_name.encode() + b"\r\n"
        self.parts = [(self._field_head(name, filename), local) for name, filename, local in parts]
        self.tail = f"--{self.boundary}--\r\n".encode()
        self.length = len(self.head) + len(self.tail) + sum(
            len(head) + (local.size if local else 0) + 2 for head, local in self.parts)
        self.opened: list[IO[bytes]] = []

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _field_head(self, name: str, filename: str | None) -> bytes:
        part = RequestField(name=name, data=b"", filename=filename)
        content_type = (mimetypes.guess_type(filename)[0] or "application/octet-stream") if filename else None
        part.make_multipart(content_type=content_type)
        return f"--{self.boundary}\r\n".encode() + part.render_headers().encode("utf-8")

    def __len__(self) -> int:
        return self.length

    def open(self) -> None:
        for _, local in self.parts:
            if local is not None:
                try:
                    self.opened.append(local.path.open("rb"))
                except OSError as exc:
                    self.close()
                    raise CliError(f"cannot read {local.path}: {exc.strerror}") from None

    def close(self) -> None:
        for handle in self.opened:
            handle.close()
        self.opened.clear()

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        handles = iter(self.opened)
        for head, local in self.parts:
            yield head
            if local is not None:
                handle = next(handles)
                left = local.size
                while left:
                    chunk = handle.read(min(CHUNK, left))
                    if not chunk:
                        raise CliError(f"{local.path} became shorter while it was uploaded; upload again")
                    left -= len(chunk)
                    self.sent(len(chunk))
                    yield chunk
                self.file_done()
            yield b"\r\n"
        yield self.tail


def _batches(files: list[LocalFile]) -> Iterator[list[LocalFile]]:
    batch: list[LocalFile] = []
    held = 0
    for local in files:
        if batch and (len(batch) >= BATCH_FILES or held + local.size > BATCH_BYTES):
            yield batch
            batch, held = [], 0
        batch.append(local)
        held += local.size
    if batch:
        yield batch


def upload(client: Client, root: Path, collection: str, console: Console) -> UploadReport:
    """Upload every file below `root` that the collection does not already have, keeping sub-folders."""
    target = collection_parts(collection)
    report = UploadReport(collection="/".join(target))
    if not root.is_dir():
        raise CliError(f"{root} is not a folder", USAGE)
    files, empty = scan(root, report)
    if len(target) == 1:
        top = [local.shown for local in files if not local.folder]
        if top:
            listed = ", ".join(top[:3]) + (f" and {len(top) - 3} more" if len(top) > 3 else "")
            raise CliError(f"the server keeps no files directly in a collection, and {root} holds {len(top)} "
                           f"at its top ({listed}); upload into a folder of it, e.g. `dsm upload {root} "
                           f"{target[0]}/{UPLOAD_FIELD}`", USAGE)
    there = listing(client, target, missing_ok=True)
    pending: list[LocalFile] = []
    for local in files:
        key = _path(local.folder)
        if local.name in there.get(key, []) and remote_size(client, (*target, *local.folder, local.name)) == local.size:
            report.skipped.append(local.shown)
        else:
            pending.append(local)
    folders = [folder for folder in empty if _path(folder) not in there]
    folder_name, inside = target[0], target[1:]

    def field_of(folder: tuple[str, ...]) -> str:
        return "/".join((*inside, *folder))

    with Progressing(console, "uploading", len(pending), sum(local.size for local in pending)) as progress:
        batches = list(_batches(pending)) or ([[]] if folders else [])
        for number, batch in enumerate(batches):
            parts: list[tuple[str, str, LocalFile | None]] = [
                (field_of(local.folder), local.path.name, local) for local in batch]
            if number == 0:  # 4CAT's placeholder: the server makes the folder and keeps no file
                parts += [(field_of(folder), f"4CAT_{field_of(folder)}_blank.txt", None) for folder in folders]
            body = MultipartBody(folder_name, parts, progress.sent, progress.file_done)
            body.open()
            try:
                answer = decode(client.request("POST", "/api/send_files", data=body,
                                               headers={"Content-Type": body.content_type},
                                               read_timeout=UPLOAD_READ_TIMEOUT))
            finally:
                body.close()
            refused = (answer.get("errors") or {}) if isinstance(answer, dict) else {}
            for local in batch:
                if local.path.name in refused:
                    report.failed[local.shown] = one_line(str(refused[local.path.name]))
                else:
                    report.uploaded.append(local.shown)
                    report.bytes += local.size
            if number == 0:
                report.folders_made += [_path(folder) for folder in folders]
    return report


# -- download


@dataclass
class DownloadReport:
    collection: str
    out: str
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0

    def json(self) -> dict[str, Any]:
        return {"collection": self.collection, "out": self.out, "downloaded": self.downloaded,
                "skipped": self.skipped, "failed": self.failed, "bytes": self.bytes}


class Unsafe(Exception):
    pass


def _local_dir(out: Path, parts: tuple[str, ...]) -> Path:
    """`out/<parts>`, made a folder at a time; refuses a symlink or a non-folder on the way."""
    here = out
    for part in parts:
        here = here / part
        if here.is_symlink():
            raise Unsafe(f"{here} is a symlink")
        if here.exists():
            if not here.is_dir():
                raise Unsafe(f"{here} exists and is not a folder")
        else:
            here.mkdir()
    if not here.resolve().is_relative_to(out.resolve()):
        raise Unsafe(f"{here} is outside {out}")
    return here


def file_in_collection(client: Client, collection: str) -> tuple[str, str | None]:
    """`c/sub/file.txt` given as the collection names a file: (`c`, `sub/file.txt`), as `dsm download c
    sub/file.txt` would say it. Anything else is the collection (or a folder of it) as it was given."""
    parts = collection_parts(collection)
    if len(parts) > 1 and remote_size(client, parts) is not None:
        return parts[0], "/".join(parts[1:])
    return collection, None


def download(client: Client, collection: str, path: str | None, out: Path, console: Console) -> DownloadReport:
    """Fetch a collection, or one file or folder of it, into `out` (paths relative to the collection)."""
    target = collection_parts(collection)
    wanted = collection_parts(path, "PATH") if path else ()
    report = DownloadReport(collection="/".join(target), out=str(out))
    tree = listing(client, target, missing_ok=False)
    files: list[tuple[str, ...]] = []
    folders: list[tuple[str, ...]] = []
    for key, names in tree.items():
        folder = _server_parts(key)
        if folder is None:
            report.failed[key] = "refused: an unsafe folder name from the server"
            continue
        if folder[: len(wanted)] == wanted:
            folders.append(folder)
        for name in names:
            if _bad_component(name):
                report.failed[f"{key}/{name}"] = "refused: an unsafe file name from the server"
            elif (*folder, name)[: len(wanted)] == wanted:
                files.append((*folder, name))
    if wanted and not files and not folders:
        raise CliError(f"not found: no file or folder {path!r} in collection {report.collection!r}", 5)
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(folders):
        try:
            _local_dir(out, folder)
        except Unsafe as exc:
            report.failed[_path(folder)] = f"refused: {exc}"
    with Progressing(console, "downloading", len(files), None) as progress:
        for parts in sorted(files):
            shown = _path(parts)
            try:
                local = _local_dir(out, parts[:-1]) / parts[-1]
            except Unsafe as exc:
                report.failed[shown] = f"refused: {exc}"
                progress.file_done()
                continue
            if local.is_symlink() or (local.exists() and not local.is_file()):
                report.failed[shown] = f"refused: {local} exists and is not a regular file"
            elif local.exists() and remote_size(client, (*target, *parts)) == local.stat().st_size:
                report.skipped.append(shown)
            else:
                report.bytes += _fetch(client, (*target, *parts), local, progress)
                report.downloaded.append(shown)
            progress.file_done()
    return report


def _fetch(client: Client, parts: tuple[str, ...], local: Path, progress: Progressing) -> int:
    """Stream one file to a temporary name beside `local`, then rename it into place; returns its size."""
    response = client.request("GET", f"/api/download/{_url_path(parts)}", stream=True,
                              read_timeout=DOWNLOAD_READ_TIMEOUT)
    expected = response.headers.get("Content-Length")
    temporary = local.with_name(f".dsm-part-{uuid.uuid4().hex[:12]}")
    written = 0
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as handle:
            for chunk in client.chunks(response, CHUNK):
                handle.write(chunk)
                written += len(chunk)
                progress.sent(len(chunk))
        if expected is not None and expected.isdigit() and written != int(expected):
            raise CliError(f"{_path(parts)}: the server sent {written} of {expected} bytes; download again", 6)
        os.replace(temporary, local)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        response.close()
    return written


def summary(verb: str, report: UploadReport | DownloadReport, started: float) -> str:
    done = report.uploaded if isinstance(report, UploadReport) else report.downloaded
    seconds = time.monotonic() - started
    line = f"{verb} {len(done)} file{'s' if len(done) != 1 else ''} ({size(report.bytes)})"
    if seconds >= 1 and report.bytes:
        line += f" in {seconds:.1f} s, {size(int(report.bytes / seconds))}/s"
    if report.skipped:
        line += f"; {len(report.skipped)} already there, skipped"
    if report.failed:
        line += f"; {len(report.failed)} failed"
    return line
