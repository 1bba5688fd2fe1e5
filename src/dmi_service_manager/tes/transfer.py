"""Moving a task's files: inputs in from `content`, `file://` and `http(s)://`; outputs out to `file://`.

`file://` URLs reach only below TES_FILE_ROOTS, through `files.storage`, which walks every folder
with O_NOFOLLOW: a `..`, or a symlink planted in a root (or by an executor in the work area),
never leads outside. `http(s)://` inputs go only to public addresses, or to the networks an admin
allowed; every redirect is checked again, and the connection is made to the very address that was
checked, so a name that resolves differently a moment later cannot lead elsewhere.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import urllib3

from ..config import split_url
from ..errors import BadRequest, DsmError
from ..files.storage import Parts, Storage, disk_full_is_507, split_path
from ..jobs.workload import KeepGoing

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_REDIRECTS = 5
CHUNK = 1024 * 1024
OUTPUT_SCHEMES = ("file",)  # inputs: file, http(s) and content, each checked in its own way


class TransferFailed(Exception):
    """An input could not be fetched, or an output not stored; the message says why, for the task's log."""


def check_syntax(url: str, field: str) -> None:
    """A BadRequest for a URL that urllib cannot take apart, so that every later urlsplit of it is safe."""
    if url.startswith("/"):
        return
    try:
        split_url(url)
    except ValueError as exc:
        raise BadRequest(f"{field}: {url[:200]!r} is not a valid URL: {exc}", extra={"field": field}) from None
    if "@" in urlsplit(url).netloc:  # a task is shown to every reader, its URLs included
        raise BadRequest(f"{field}: a URL must not carry a user name or password; every reader of the task would"
                         " see them", extra={"field": field})


def scheme_of(url: str) -> str:
    """The URL's scheme; a bare absolute path (which the spec allows) is a file."""
    if url.startswith("/"):
        return "file"
    return urlsplit(url).scheme.lower()


@dataclass(frozen=True)
class Location:
    """A place below one of the file roots."""

    storage: Storage
    parts: Parts

    def describe(self) -> str:
        return str(self.storage.root.joinpath(*self.parts))


class FileRoots:
    """TES_FILE_ROOTS: the only host folders that file:// URLs may name."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.storages = [Storage(Path(root)) for root in roots]

    def urls(self) -> list[str]:
        return [f"file://{storage.root}" for storage in self.storages]

    def locate(self, url: str, field: str, *, folder: bool = False) -> Location:
        """Where a file:// URL points, or a BadRequest naming the field when it is outside every root.
        A `folder` (a DIRECTORY input) may be a root itself; a file never is one."""
        if url.startswith("/"):
            path = url
        else:
            parts = urlsplit(url)
            if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
                raise BadRequest(f"{field}: a file:// URL names a path on this server, like file:///data/x",
                                 extra={"field": field})
            path = unquote(parts.path)
        for storage in self.storages:
            root = str(storage.root).rstrip("/")
            if path.rstrip("/") == root:
                if folder:
                    return Location(storage, ())
                raise BadRequest(f"{field}: {path!r} is a folder of TES_FILE_ROOTS itself, not a file in it",
                                 extra={"field": field})
            if path.startswith(root + "/"):
                try:
                    return Location(storage, split_path(path[len(root) + 1:], field))
                except DsmError as exc:
                    raise BadRequest(exc.message, extra={"field": field}) from None
        raise BadRequest(f"{field}: {path!r} is outside the folders that TES may use (TES_FILE_ROOTS)",
                         extra={"field": field})


# -- copying, always from a descriptor opened safely to a file made complete before it is seen


class Cancelled(Exception):
    """The task was cancelled while its inputs were copied: the copy stops where it is."""


def _always() -> bool:
    return True


def copy_in(source: Location, directory: bool, target: Path, keep_going: KeepGoing = _always) -> int:
    """A file or folder below a file root into the work area (ours, and fresh); returns bytes copied."""
    try:
        if not directory:
            return _copy_file(source.storage, source.parts, target, keep_going)
        total = 0
        target.mkdir(parents=True, exist_ok=True)
        for folder, files in source.storage.list_tree(source.parts).items():
            here = target if folder == "." else target.joinpath(*folder.split("/"))
            here.mkdir(parents=True, exist_ok=True)
            inner = source.parts if folder == "." else (*source.parts, *folder.split("/"))
            for name in files:
                total += _copy_file(source.storage, (*inner, name), here / name, keep_going)
        return total
    except DsmError as exc:
        raise TransferFailed(f"{source.describe()}: {exc.message}") from None


def _copy_file(storage: Storage, parts: Parts, target: Path, keep_going: KeepGoing) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    with storage.open_file(parts) as opened:
        return write_file(target, opened.read(0, opened.size), keep_going)


def write_file(target: Path, chunks: Iterable[bytes], keep_going: KeepGoing = _always) -> int:
    """`chunks` into a new file at `target`; Cancelled as soon as `keep_going` says no."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    total = 0
    try:
        for chunk in chunks:
            if not keep_going():
                raise Cancelled
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            total += len(chunk)
    finally:
        os.close(fd)
    return total


def copy_out(source: Storage, parts: Parts, destination: Location) -> int:
    """A file of the work area (read without following links) to a file root, placed only when complete."""
    target = destination.storage
    with source.open_file(parts) as opened, disk_full_is_507():
        staged = target.new_staged_file()
        try:
            for chunk in opened.read(0, opened.size):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(staged.fd, view):]
            target.place(staged, destination.parts[:-1], destination.parts[-1])
            return opened.size
        finally:
            staged.discard()


# -- http(s)


def _networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


@dataclass(frozen=True)
class HttpPolicy:
    allowed_networks: tuple[IPNetwork, ...]
    max_bytes: int
    timeout: float

    @classmethod
    def of(cls, allowed: Iterable[str], max_bytes: int, timeout: float) -> HttpPolicy:
        return cls(_networks(allowed), max_bytes, timeout)

    def refusal(self, address: str) -> str | None:
        """Why this address may not be fetched from, or None: only public ones, or allowed networks."""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.allowed_networks):
            return None
        if not ip.is_global or ip.is_multicast:
            return (f"{ip} is a loopback, private or otherwise non-public address; http(s) inputs reach only"
                    " public addresses unless TES_HTTP_ALLOWED_NETWORKS allows it")
        return None

    def check_url(self, url: str, field: str) -> None:
        """At submit: a URL whose host is a literal non-public address is refused at once."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"{field}: {url!r} is not an http(s) URL with a host", extra={"field": field})
        try:
            refusal = self.refusal(parts.hostname)
        except ValueError:
            try:
                parts.hostname.encode("idna")  # what resolving it will do: labels of 1 to 63 characters
            except UnicodeError:
                raise BadRequest(f"{field}: {parts.hostname[:80]!r} is not a host name", extra={"field": field}) \
                    from None
            return  # a name: resolved and checked when the input is fetched
        if refusal:
            raise BadRequest(f"{field}: {refusal}", extra={"field": field})

    def fetch(self, url: str, target: Path, keep_going: KeepGoing = _always) -> int:
        """Download `url` to `target`; TransferFailed saying why when it cannot or may not."""
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_REDIRECTS + 1):
            response = self._get(url, deadline)
            try:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise TransferFailed(f"{url} redirected without a Location")
                    url = urljoin(url, location)
                    continue
                if response.status != 200:
                    raise TransferFailed(f"{url} answered HTTP {response.status}")
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise TransferFailed(f"{url} is {declared} bytes, more than TES_HTTP_MAX_BYTES"
                                         f" ({self.max_bytes})")
                return write_file(target, self._body(url, response, deadline), keep_going)
            finally:
                response.release_conn()
        raise TransferFailed(f"{url}: more than {MAX_REDIRECTS} redirects")

    def _body(self, url: str, response: urllib3.BaseHTTPResponse, deadline: float) -> Iterator[bytes]:
        total = 0
        # what has come, up to CHUNK: a server that sends slowly is measured against the deadline (and a
        # cancelled task stops) as it goes, not once a whole CHUNK has come
        while chunk := response.read1(CHUNK):
            total += len(chunk)
            if total > self.max_bytes:
                raise TransferFailed(f"{url} is larger than TES_HTTP_MAX_BYTES ({self.max_bytes} bytes)")
            if time.monotonic() > deadline:
                raise TransferFailed(f"{url} took longer than TES_HTTP_TIMEOUT ({self.timeout:g} s)")
            yield chunk

    def _get(self, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TransferFailed(f"{url}: only http(s) URLs are followed")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = self._address(parts.hostname, port)
        left = max(deadline - time.monotonic(), 0.1)
        timeout = urllib3.Timeout(connect=min(left, 30.0), read=min(left, 60.0))
        pool: urllib3.HTTPConnectionPool
        if parts.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(address, port, timeout=timeout, retries=False,
                                               server_hostname=parts.hostname, assert_hostname=parts.hostname,
                                               cert_reqs="CERT_REQUIRED")
        else:
            pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if ":" in parts.hostname:
            host = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            return pool.urlopen("GET", path, headers={"Host": host, "User-Agent": "dmi-service-manager (TES)"},
                                redirect=False, preload_content=False, retries=False)
        except urllib3.exceptions.HTTPError as exc:
            raise TransferFailed(f"{url}: {exc}") from None

    def _address(self, host: str, port: int) -> str:
        """The first address of `host` that may be fetched from; TransferFailed naming why none may."""
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # UnicodeError: not a host name (a redirect's, say)
            raise TransferFailed(f"cannot resolve {host[:80]}: {exc}") from None
        reasons = []
        for *_, sockaddr in found:
            address = str(sockaddr[0])
            refusal = self.refusal(address)
            if refusal is None:
                return address
            reasons.append(refusal)
        raise TransferFailed(f"{host}: {reasons[0] if reasons else 'no address'}")
