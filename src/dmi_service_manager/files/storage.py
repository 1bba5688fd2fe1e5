"""The only module that turns a client-supplied name into a file on disk.

Every path is split into components, each component is checked, and the file system is then walked
one component at a time from an open descriptor of the root with O_NOFOLLOW: a `..`, an absolute
path, a NUL byte, a backslash or a symlink planted inside the folder (even one swapped in while a
request runs) can never reach outside it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
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

log = logging.getLogger(__name__)

STAGING_DIR = ".dsm-staging"
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PROC_FD = "/proc/self/fd"
_HAS_PROC_FD = os.path.isdir(_PROC_FD)  # where O_TMPFILE files can be linked into place
_RM = shutil.which("rm")

Parts = tuple[str, ...]


def name_problem(text: str) -> str | None:
    """Why a name cannot travel through the file routes, or None. Listings show only names without
    one (a job can write any byte string as a name), so that every name listed can be downloaded."""
    if "\x00" in text:
        return "must not contain a NUL byte"
    if "\\" in text:
        return "must not contain a backslash"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return "must not contain control characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, as os.scandir hands them over
        return "must be valid UTF-8"
    return None


def split_path(text: str | None, field: str, *, allow_nested: bool = True) -> Parts:
    """Check a relative path from a client; raise BadRequest naming the field when it is unsafe."""
    if text is None or text == "":
        raise BadRequest(f"{field} is required")
    problem = name_problem(text)
    if problem:
        raise BadRequest(f"{field} {problem}")
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
    folder: int = -1  # the staging folder that holds it by `name`, open, or -1
    name: str | None = None  # None: an anonymous O_TMPFILE, in no folder at all

    def named(self, folder: int, name: str) -> None:
        self.folder, self.name = folder, name

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.forget(unlink=True)

    def forget(self, *, unlink: bool = False) -> None:
        """Let go of its name (placed elsewhere, or removed with `unlink`) and of its folder."""
        if self.name is not None and unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self.folder)
        self.name = None
        if self.folder >= 0:
            os.close(self.folder)
            self.folder = -1


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

    def is_folder(self, parts: Parts) -> bool:
        """Whether `parts` is a folder (reached without following a symlink)."""
        try:
            with self._dir(parts):
                return True
        except NotFound:
            return False

    def ensure_dir(self, parts: Parts) -> None:
        with self._dir(parts, create=True):
            pass

    def open_file(self, parts: Parts) -> OpenFile:
        """Open a regular file for reading; the caller closes `fd`."""
        with self._dir(parts[:-1]) as dir_fd:
            try:
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link: said so, as "missing" would puzzle its maker
                    raise NotFound(f"file {display(parts)} is a symbolic link, which this server never follows"
                                   ) from None
                raise NotFound(f"file {display(parts)} does not exist") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            if stat.S_ISDIR(info.st_mode):
                raise NotFound(f"{display(parts)} is a folder, not a file")
            raise NotFound(f"file {display(parts)} does not exist")
        os.set_blocking(fd, True)
        return OpenFile(fd=fd, size=info.st_size, mtime=info.st_mtime, inode=info.st_ino, device=info.st_dev)

    # -- listing

    def list_tree(self, parts: Parts) -> dict[str, list[str]]:
        """Every folder below `parts` (empty ones too) with the files directly in it; '.' is the top."""
        with self._dir(parts) as top:
            longest = MAX_PATH_BYTES - len(display(parts).encode()) - 2  # room for a file name's slash
            tree = {key: sorted(entry.name for entry in files) for key, _, files in _walk(top, longest)}
        if not parts:  # the root's staging folder is this server's, never a client's
            tree = {k: v for k, v in tree.items() if k != STAGING_DIR and not k.startswith(STAGING_DIR + "/")}
        return dict(sorted(tree.items()))

    # -- writing

    def _staging(self) -> int:
        """This process's staging folder, open. Jobs of remote services can write anywhere in the upload
        folder, so it is reached without following symlinks and made again whenever a job removed it or
        put something else in its place: never a write, nor a removal, outside the upload folder."""
        for _ in range(5):
            root = self._root_fd()
            try:
                top = _real_folder(root, STAGING_DIR)
            finally:
                os.close(root)
            try:
                return _real_folder(top, str(os.getpid()))
            except FileNotFoundError:
                continue  # removed between the two steps: from the top again
            finally:
                os.close(top)
        raise _staging_gone()

    def sweep_staging(self) -> int:
        """Remove what processes that are gone left behind; returns how many half-written files it held
        (a process's empty folder, which every clean stop leaves, is not one)."""
        root = self._root_fd()
        try:
            try:
                top = os.open(STAGING_DIR, _DIR_FLAGS, dir_fd=root)
            except FileNotFoundError:
                return 0
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                _replace_intruder(root, STAGING_DIR)  # the next upload makes the real folder
                return 0
        finally:
            os.close(root)
        removed = 0
        try:
            with os.scandir(top) as entries:
                found = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
            for name, is_dir in found:
                pid = int(name) if name.isascii() and name.isdigit() else None
                if pid is not None and (pid == os.getpid() or alive(pid)):
                    continue
                if is_dir:
                    removed += _entries(top, name)
                    remove_tree(top, name)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=top)
                    removed += 1
        finally:
            os.close(top)
        return removed

    def new_staged_file(self) -> StagedFile:
        """A file to write an upload into. Where the file system allows, it has no name at all
        (O_TMPFILE) until it is linked into place, so a crash cannot leave it anywhere."""
        for _ in range(5):
            folder = self._staging()
            try:
                if _HAS_PROC_FD:
                    try:
                        return StagedFile(fd=os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o664,
                                                     dir_fd=folder))
                    except OSError as exc:
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                            raise
                name = uuid.uuid4().hex
                staged = StagedFile(fd=os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                               | os.O_CLOEXEC, 0o664, dir_fd=folder))
                staged.named(folder, name)
                folder = -1  # the staged file owns it now
                return staged
            except OSError as exc:
                # removed after it was opened (Linux answers an O_TMPFILE there EPERM, not ENOENT): again
                if not isinstance(exc, FileNotFoundError) and not _removed(folder):
                    raise
                continue
            finally:
                if folder >= 0:
                    os.close(folder)
        raise _staging_gone()

    def place(self, staged: StagedFile, folder: Parts, name: str) -> None:
        """Put a complete staged file at `folder/name` in one step: never a partial file there."""
        with self._dir(folder, create=True) as dir_fd:
            if staged.name is None:
                try:
                    os.link(f"{_PROC_FD}/{staged.fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
                    if self.fsync:
                        os.fsync(dir_fd)
                    return
                except FileExistsError:  # an earlier upload of that name: replace it atomically instead
                    self._name_in_staging(staged)
            assert staged.name is not None
            try:
                os.rename(staged.name, name, src_dir_fd=staged.folder, dst_dir_fd=dir_fd)
            except IsADirectoryError:
                raise Conflict(f"{display((*folder, name))} is a folder") from None
            except FileNotFoundError:  # a job removed the staging folder under the upload
                raise Conflict(f"{display((*folder, name))} could not be stored: the upload folder changed while it"
                               " arrived; send it again") from None
            staged.forget()
            if self.fsync:
                os.fsync(dir_fd)

    def _name_in_staging(self, staged: StagedFile) -> None:
        """Give an anonymous staged file a name in the staging folder, so that a rename can replace a file."""
        for _ in range(5):
            staging, temporary = self._staging(), uuid.uuid4().hex
            try:
                # a dir_fd makes Python call linkat(), which follows the /proc link; link() would not
                os.link(f"{_PROC_FD}/{staged.fd}", temporary, dst_dir_fd=staging, follow_symlinks=True)
            except FileNotFoundError:
                os.close(staging)
                continue  # a job removed the staging folder after it was opened: again
            except BaseException:
                os.close(staging)
                raise
            staged.named(staging, temporary)
            return
        raise _staging_gone()

    def remove_collection(self, parts: Parts) -> None:
        with self._dir(parts[:-1]) as parent:
            try:
                os.close(os.open(parts[-1], _DIR_FLAGS, dir_fd=parent))
            except OSError:
                raise NotFound(f"folder {display(parts)} does not exist") from None
            remove_tree(parent, parts[-1])

    def collections(self) -> Iterator[Collection]:
        """Top-level collections, each with what it holds and the newest modification time inside."""
        root = self._root_fd()
        try:
            with os.scandir(root) as entries:
                names = [entry.name for entry in entries if entry.name != STAGING_DIR
                         and entry.is_dir(follow_symlinks=False) and name_problem(entry.name) is None]
            for name in names:
                try:
                    top = os.open(name, _DIR_FLAGS, dir_fd=root)
                except OSError:
                    continue  # removed, or swapped for a symlink, meanwhile
                try:
                    yield _measure(name, top)
                finally:
                    os.close(top)
        finally:
            os.close(root)

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


def _walk(top: int, longest: int | None = None) -> Iterator[tuple[str, os.stat_result, list[os.DirEntry[str]]]]:
    """Every folder below the open folder `top` ('.' for itself, then paths below it), each with its own
    stat and its files (its descriptor stays open while they are handed over, so that they can be stat'ed).

    Without recursion, never through a symlink, and with two descriptors open at most, however deep or
    wide a job made the tree: it goes down by name and back up by "..", checking that ".." is the folder
    it came from (a tree moved meanwhile ends the walk). Names that the file routes would refuse are left
    out, and so are folders whose path below `top` is longer than `longest` bytes (what a request may
    name)."""
    above: list[tuple[tuple[int, int], str, Iterator[str]]] = []  # the folders above, and their children left
    fd, key = os.dup(top), "."
    try:
        while True:
            files: list[os.DirEntry[str]] = []
            folders: list[str] = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    if name_problem(entry.name) is not None:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        path = entry.name if key == "." else f"{key}/{entry.name}"
                        if longest is None or len(path.encode()) <= longest:
                            folders.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        files.append(entry)
            info = os.fstat(fd)
            yield key, info, files
            above.append(((info.st_dev, info.st_ino), key, iter(folders)))
            while True:  # the next folder: a child of this one, or of one above
                _, parent_key, children = above[-1]
                name = next(children, None)
                if name is not None:
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue  # removed, or swapped for a symlink, while we listed
                    os.close(fd)
                    fd, key = child, (name if parent_key == "." else f"{parent_key}/{name}")
                    break
                above.pop()
                if not above:
                    return
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                info = os.fstat(parent)
                os.close(fd)
                fd = parent
                if (info.st_dev, info.st_ino) != above[-1][0]:
                    return  # moved while we walked it: what was seen is what there is
    finally:
        os.close(fd)


def remove_tree(parent: int, name: str) -> None:
    """`rm -rf` of `name` in the open folder `parent`, never through a symlink and however deep a job
    made the tree (shutil.rmtree recurses, and fails past about a thousand levels). GNU rm walks with
    openat() and O_NOFOLLOW; it runs in the folder itself, reached through our descriptor of it."""
    if _RM is None:
        shutil.rmtree(name, dir_fd=parent)
        return
    done = subprocess.run([_RM, "-rf", "--one-file-system", "--", name], cwd=f"{_PROC_FD}/{parent}",
                          pass_fds=(parent,), capture_output=True, check=False, timeout=3600)
    if done.returncode != 0:
        raise OSError(errno.EIO, f"could not remove {name}: {done.stderr.decode(errors='replace').strip()}")


def _real_folder(parent: int, name: str) -> int:
    """The folder `name` in `parent`, opened; made when missing, and made again when something else (a
    symlink, a file) has taken its place."""
    for _ in range(3):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _replace_intruder(parent, name)
        with contextlib.suppress(FileExistsError), disk_full_is_507():
            os.mkdir(name, 0o700, dir_fd=parent)
    raise _staging_gone()


def _entries(parent: int, name: str) -> int:
    """How many entries the folder `name` holds (0 where it is gone, or not a folder)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError:
        return 0
    try:
        return len(os.listdir(fd))
    finally:
        os.close(fd)


def _removed(folder: int) -> bool:
    """Whether an open folder has since been removed from the tree."""
    return os.fstat(folder).st_nlink == 0


def _replace_intruder(parent: int, name: str) -> None:
    """Remove what stands where a folder of ours belongs: the link or the file itself, never its target."""
    log.warning("%s in the upload folder was not a folder (a job replaced it?); it is removed and made again", name)
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):  # gone, or a real folder, meanwhile
        os.unlink(name, dir_fd=parent)


def _staging_gone() -> Conflict:
    return Conflict("the upload folder's staging area keeps being removed (by a job?); send the file again")


@dataclass(frozen=True)
class Collection:
    name: str
    files: int
    bytes: int
    newest: float  # the newest modification time found inside: retention counts from it


def _measure(name: str, top: int) -> Collection:
    """What a collection holds, however deep: retention must see a file at the bottom of any tree."""
    newest, files, size = 0.0, 0, 0
    for _, folder, found in _walk(top):  # `top` itself first
        newest = max(newest, folder.st_mtime)
        for entry in found:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            newest = max(newest, info.st_mtime)
            files += 1
            size += info.st_size
    return Collection(name=name, files=files, bytes=size, newest=newest)
