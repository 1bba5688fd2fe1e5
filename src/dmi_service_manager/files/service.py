"""What the file routes may ask: upload, list, open, count lines, delete a collection.

Client-supplied names are checked by `storage.split_path` here, so a route only passes text through.
Which collections jobs still need is asked of a callable, so that files know nothing of jobs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ..errors import BadRequest, Conflict, DsmError, NotFound, PayloadTooLarge
from .storage import OpenFile, Storage, display, split_path
from .uploads import UploadReceiver, UploadResult

log = logging.getLogger(__name__)

NOT_CONFIGURED = ("This instance of DMI Service Manager is not configured to allow uploads"
                  " (UPLOAD_FOLDER_PATH is not set)")


class FileService:
    def __init__(self, root: Path | None, *, fsync: bool, allowed_extensions: list[str] | None, max_upload_bytes: int,
                 in_use: Callable[[], set[str]]) -> None:
        self._storage = Storage(root, fsync=fsync) if root is not None else None
        self.allowed_extensions = allowed_extensions
        self.max_upload_bytes = max_upload_bytes
        self.fsync = fsync
        self.in_use = in_use

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            raise BadRequest(NOT_CONFIGURED)
        return self._storage

    @property
    def configured(self) -> bool:
        return self._storage is not None

    async def upload(self, boundary: bytes, declared_length: int | None, chunks: AsyncIterator[bytes],
                     client: str) -> UploadResult:
        """One multipart request, streamed to staging and placed only once complete; nothing kept on failure.

        4CAT only logs a refused upload and runs the job without that file, so refusals for size or
        space are logged here too, with the collection's name, for the admin to find.
        """
        if declared_length is not None and declared_length > self.max_upload_bytes:
            _log_refusal("too large", None, client)
            raise PayloadTooLarge(f"the upload is larger than this server accepts ({self.max_upload_bytes} bytes)")
        receiver = UploadReceiver(self.storage, self.allowed_extensions, self.max_upload_bytes, self.fsync)
        try:
            await receiver.receive(boundary, chunks)
            return receiver.place()  # a few renames and mkdirs: cheaper inline than a thread hop
        except DsmError as exc:
            receiver.discard()
            if exc.status_code in (413, 507):
                _log_refusal(exc.message, receiver.fields.get("folder_name"), client)
            raise
        except BaseException:
            receiver.discard()
            log.info("upload to %s from %s ended early; nothing was kept", receiver.fields.get("folder_name"),
                     client)
            raise

    def list_tree(self, collection: str | None) -> dict[str, list[str]]:
        """Every folder below the collection, empty ones too, with its files; '.' holds the top level."""
        return self.storage.list_tree(split_path(collection, "collection"))

    def open(self, path: str) -> tuple[OpenFile, str]:
        """A file inside a collection, opened for reading, and its name."""
        parts = split_path(path, "path")
        if len(parts) < 2:
            raise BadRequest("path must name a file inside a collection: <collection>/<folder>/<file>")
        if path.endswith("/"):  # a folder's path, as the original's send_from_directory read it
            raise NotFound(f"file {path} does not exist")
        return self.storage.open_file(parts), parts[-1]

    def count_lines(self, folder: str | None, file: str | None) -> int:
        return self.storage.count_lines((*split_path(folder, "folder"), *split_path(file, "file")))

    def collections(self) -> list[dict[str, object]]:
        """Every upload collection with its size, and whether a waiting or running job names it."""
        if self._storage is None:
            return []
        used = self.in_use()
        return [{"name": c.name, "files": c.files, "bytes": c.bytes, "modified_at": c.newest, "in_use": c.name in used}
                for c in sorted(self.storage.collections(), key=lambda c: c.name)]

    def delete_collection(self, collection: str) -> str:
        parts = split_path(collection, "collection", allow_nested=False)
        storage = self.storage
        if parts[0] in self.in_use():
            raise Conflict(f"collection {display(parts)} is used by a job that is waiting or running")
        storage.remove_collection(parts)
        return display(parts)


def _log_refusal(why: str, collection: str | None, client: str) -> None:
    log.error("upload refused (%s) for collection %s from %s", why, collection or "(not yet known)", client)
