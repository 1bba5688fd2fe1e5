"""The only module that turns a client-supplied name into a file on disk.

Every path is split into components, each component is checked, and the file system is then walked
one component at a time from an open descriptor of the root with O_NOFOLLOW: a `..`, an absolute
path, a NUL byte, a backslash or a symlink planted inside the folder (even one swapped in while a
request runs) can never reach outside it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadRequest, Conflict, InsufficientStorage, NotFound
from ..pids import alive

STAGING_DIR = ".dsm-staging"
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PROC_FD = "/proc/self/fd"
_HAS_PROC_FD = os.path.isdir(_PROC_FD)  # where O_TMPFILE files can be linked into place

Parts = tuple[str, ...]


def split_path(text: str | None, field: str, *, allow_nested: bool = True) -> Parts:
    """Check a relative path from a client; raise BadRequest naming the field when it is unsafe."""
    if text is None or text == "":
        raise BadRequest(f"{field} is required")
    if "\x00" in text:
        raise BadRequest(f"{field} must not contain a NUL byte")
    if "\\" in text:
        raise BadRequest(f"{field} must not contain a backslash")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise BadRequest(f"{field} must not contain control characters")
    if text.startswith("/"):
        raise BadRequest(f"{field} must be a relative path, not an absolute one")
    if len(text.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise BadRequest(f"{field} is too long")
    parts = tuple(text.rstrip("/").split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise BadRequest(f"{field} must not contain empty, '.' or '..' components: {text!r}")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise BadRequest(f"{field} has a component longer than {MAX_COMPONENT_BYTES} bytes")
    if not allow_nested and len(parts) > 1:
        raise BadRequest(f"{field} must be a single name, not a path: {text!r}")
    if parts[0] == STAGING_DIR:
        raise BadRequest(f"{field} names a reserved folder")
    return parts


def display(parts: Parts) -> str:
    return "/".join(parts)


@dataclass
class StagedFile:
    fd: int  # open for writing until the file is placed or discarded
    path: Path | None  # None: an anonymous O_TMPFILE

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


@contextmanager
def disk_full_is_507() -> Iterator[None]:
    """The one place where a full disk (or quota) becomes 507 Insufficient Storage."""
    try:
        yield
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise InsufficientStorage("the server's disk is full; nothing was stored") from None
        raise


@dataclass
class OpenFile:
    """A file opened safely for reading; it owns its descriptor until `close()`."""

    fd: int
    size: int
    mtime: float
    inode: int
    device: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, start: int, end: int, chunk: int = 1024 * 1024) -> Iterator[bytes]:
        """The bytes in [start, end), chunk by chunk; the file is closed when the reading ends."""
        try:
            offset = start
            while offset < end:
                data = os.pread(self.fd, min(chunk, end - offset), offset)
                if not data:
                    break
                offset += len(data)
                yield data
        finally:
            self.close()


class Storage:
    """One folder (UPLOAD_FOLDER_PATH) that clients may read and write below, and nothing else."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self.staging = root / STAGING_DIR
        self._staging_made: tuple[int, Path] | None = None  # (pid, folder)
        self._line_cache: dict[tuple[int, int], tuple[int, int, int]] = {}
        self._line_lock = threading.Lock()

    # -- walking

    def _root_fd(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise NotFound(f"the upload folder is not available: {exc.strerror}") from None

    @contextmanager
    def _dir(self, parts: Parts, *, create: bool = False) -> Iterator[int]:
        """An open descriptor of the folder at `parts`, never through a symlink."""
        fd = self._root_fd()
        try:
            for part in parts:
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise NotFound(f"folder {display(parts)} does not exist") from None
                    try:
                        with disk_full_is_507():
                            os.mkdir(part, 0o775, dir_fd=fd)
                    except FileExistsError:
                        pass
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except (NotADirectoryError, OSError) as exc:
                    if isinstance(exc, NotADirectoryError) or exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        if create:
                            raise Conflict(f"{display(parts)}: {part} exists and is not a folder") from None
                        raise NotFound(f"folder {display(parts)} does not exist") from None
                    raise
                os.close(fd)
                fd = next_fd
            yield fd
        finally:
            os.close(fd)

    def ensure_dir(self, parts: Parts) -> None:
        with self._dir(parts, create=True):
            pass

    def open_file(self, parts: Parts) -> OpenFile:
        """Open a regular file for reading; the caller closes `fd`."""
        with self._dir(parts[:-1]) as dir_fd:
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
            except OSError:
                raise NotFound(f"file {display(parts)} does not exist") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise NotFound(f"file {display(parts)} does not exist")
        os.set_blocking(fd, True)
        return OpenFile(fd=fd, size=info.st_size, mtime=info.st_mtime, inode=info.st_ino, device=info.st_dev)

    # -- listing

    def list_tree(self, parts: Parts) -> dict[str, list[str]]:
        """Every folder below `parts` (empty ones too) with the files directly in it; '.' is the top."""
        tree: dict[str, list[str]] = {}
        with self._dir(parts) as top:
            pending: list[tuple[int, str]] = [(os.dup(top), ".")]
            try:
                while pending:
                    fd, key = pending.pop()
                    try:
                        files, subdirs = _scan(fd)
                        tree[key] = files
                        for name in subdirs:
                            try:
                                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                            except OSError:
                                continue  # removed, or swapped for a symlink, while we listed
                            pending.append((child, name if key == "." else f"{key}/{name}"))
                    finally:
                        os.close(fd)
            finally:
                for fd, _ in pending:
                    os.close(fd)
        return dict(sorted(tree.items()))

    # -- writing

    def _staging_folder(self) -> Path:
        """This process's own staging folder: same file system, never inside a collection. Made once per
        process (a worker forked from another gets its own)."""
        pid = os.getpid()
        if self._staging_made is None or self._staging_made[0] != pid:
            path = self.staging / str(pid)
            path.mkdir(parents=True, exist_ok=True)
            self._staging_made = (pid, path)
        return self._staging_made[1]

    def sweep_staging(self) -> int:
        """Remove what processes that are gone left half-written; returns how many folders."""
        removed = 0
        if not self.staging.is_dir():
            return 0
        for entry in self.staging.iterdir():
            pid = int(entry.name) if entry.name.isdigit() else None
            if pid is not None and (pid == os.getpid() or alive(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def new_staged_file(self) -> StagedFile:
        """A file to write an upload into. Where the file system allows, it has no name at all
        (O_TMPFILE) until it is linked into place, so a crash cannot leave it anywhere."""
        folder = self._staging_folder()
        if _HAS_PROC_FD:
            try:
                return StagedFile(fd=os.open(folder, os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o664), path=None)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
        path = folder / uuid.uuid4().hex
        return StagedFile(fd=os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o664), path=path)

    def place(self, staged: StagedFile, folder: Parts, name: str) -> None:
        """Put a complete staged file at `folder/name` in one step: never a partial file there."""
        with self._dir(folder, create=True) as dir_fd:
            if staged.path is None:
                try:
                    os.link(f"{_PROC_FD}/{staged.fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                    if self.fsync:
                        os.fsync(dir_fd)
                    return
                except FileExistsError:  # an earlier upload of that name: replace it atomically instead
                    staged.path = self._staging_folder() / uuid.uuid4().hex
                    staging_fd = os.open(staged.path.parent, _DIR_FLAGS)
                    try:  # a dir_fd makes Python call linkat(), which follows the /proc link; link() would not
                        os.link(f"{_PROC_FD}/{staged.fd}", staged.path.name, dst_dir_fd=staging_fd,
                                follow_symlinks=True)
                    finally:
                        os.close(staging_fd)
            try:
                os.rename(staged.path, name, dst_dir_fd=dir_fd)
            except IsADirectoryError:
                raise Conflict(f"{display((*folder, name))} is a folder") from None
            staged.path = None
            if self.fsync:
                os.fsync(dir_fd)

    def remove_collection(self, parts: Parts) -> None:
        with self._dir(parts[:-1]) as parent:
            try:
                os.close(os.open(parts[-1], _DIR_FLAGS, dir_fd=parent))
            except OSError:
                raise NotFound(f"folder {display(parts)} does not exist") from None
            # rmtree with dir_fd never follows symlinks out of the tree.
            shutil.rmtree(parts[-1], dir_fd=parent)

    def collections(self) -> Iterator[Collection]:
        """Top-level collections, each with what it holds and the newest modification time inside."""
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name == STAGING_DIR or not entry.is_dir(follow_symlinks=False):
                    continue
                yield _measure(entry.name, Path(entry.path))

    # -- reading

    def count_lines(self, parts: Parts) -> int:
        """Lines as a person counts them (a last line without a newline counts too).

        Progress polling asks again and again while a file grows, so the count is kept per inode
        and only the bytes appended since the last call are read.
        """
        with self.open_file(parts) as opened:
            key = (opened.device, opened.inode)
            with self._line_lock:
                cached = self._line_cache.get(key)
            start, newlines = 0, 0
            if cached and cached[0] <= opened.size and int(opened.mtime * 1e9) >= cached[2]:
                start, newlines = cached[0], cached[1]
            newlines += _count_newlines(opened.fd, start, opened.size)
            with self._line_lock:
                if len(self._line_cache) > 4096:
                    self._line_cache.clear()
                self._line_cache[key] = (opened.size, newlines, int(opened.mtime * 1e9))
            last = os.pread(opened.fd, 1, opened.size - 1) if opened.size else b"\n"
            return newlines + (0 if last == b"\n" else 1)


_WC = shutil.which("wc")
_WC_THRESHOLD = 32 * 1024 * 1024


def _count_newlines(fd: int, start: int, end: int) -> int:
    """Newlines in [start, end). Large spans go to coreutils' vectorised `wc -l` over our open fd."""
    if end - start >= _WC_THRESHOLD and _WC:
        os.lseek(fd, start, os.SEEK_SET)
        done = subprocess.run([_WC, "-l"], stdin=fd, capture_output=True, check=False, timeout=600)
        if done.returncode == 0:
            return int(done.stdout.split()[0]) - _newlines_after(fd, end)
    count, offset, chunk = 0, start, 4 * 1024 * 1024
    while offset < end:
        data = os.pread(fd, min(chunk, end - offset), offset)
        if not data:
            break
        count += data.count(b"\n")
        offset += len(data)
    return count


def _newlines_after(fd: int, end: int) -> int:
    """wc read to the end of a file that may have grown past the size we stat'ed."""
    size = os.fstat(fd).st_size
    return _count_newlines(fd, end, size) if size > end else 0


def _scan(fd: int) -> tuple[list[str], list[str]]:
    files: list[str] = []
    subdirs: list[str] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            elif entry.is_file(follow_symlinks=False):
                files.append(entry.name)
    files.sort()
    return files, subdirs


@dataclass(frozen=True)
class Collection:
    name: str
    files: int
    bytes: int
    newest: float  # the newest modification time found inside: retention counts from it


def _measure(name: str, path: Path) -> Collection:
    newest, files, size = path.lstat().st_mtime, 0, 0
    for folder, dirs, names in os.walk(path):
        for entry, is_file in [*((d, False) for d in dirs), *((n, True) for n in names)]:
            try:
                info = os.lstat(os.path.join(folder, entry))
            except OSError:
                continue
            newest = max(newest, info.st_mtime)
            if is_file:
                files += 1
                size += info.st_size
    return Collection(name=name, files=files, bytes=size, newest=newest)


    return True
