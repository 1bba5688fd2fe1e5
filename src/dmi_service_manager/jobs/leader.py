"""Exactly one scheduler at a time, however many worker processes serve HTTP.

Every worker tries to take an exclusive lock on a file beside the database; the one that holds it
runs the scheduler. The kernel drops the lock when that process dies (kill -9 included), and another
worker takes over within a second. Workers ring a doorbell (a datagram on an abstract Unix socket)
after they store a job, so the scheduler reacts at once rather than at its next tick.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class Doorbell:
    def __init__(self, instance_id: str, database: Path) -> None:
        # Abstract socket names are per network namespace and vanish with their process.
        digest = hashlib.sha1(str(database.resolve()).encode()).hexdigest()[:12]
        self.address = f"\0dmi-service-manager-{instance_id}-{digest}"
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)
        self._listener: socket.socket | None = None

    def ring(self) -> None:
        # Nobody listening (no leader yet) or a full queue: the scheduler's tick still sees the job.
        with contextlib.suppress(OSError):
            self._send.sendto(b"!", self.address)

    def claim(self) -> bool:
        """Bind the doorbell before leading. False when a process of this database already has it: that
        process runs a scheduler, whatever the lock file says (someone removed it while it ran), and a
        second one must not start. The address cannot be removed by hand; it goes with its process."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            listener.bind(self.address)
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                return False
            log.warning("doorbell unavailable (%s); the scheduler falls back to its tick", exc)
            return True
        listener.settimeout(0.5)
        self._listener = listener
        return True

    def listen(self, on_ring: Callable[[], None], stop: threading.Event) -> None:
        """Call `on_ring` for each ring until `stop` is set (after `claim`). Runs in its own thread."""
        listener = self._listener
        if listener is None:
            return
        with listener:
            while not stop.is_set():
                try:
                    listener.recv(64)
                except TimeoutError:
                    continue
                except OSError:
                    return
                on_ring()


class Leadership:
    """Holds the scheduler lock while this process is the leader."""

    def __init__(self, lock_path: Path) -> None:
        self.lock_path = lock_path
        self._fd: int | None = None

    @classmethod
    def of(cls, database: Path) -> Leadership:
        """The lock of the scheduler of the jobs in `database`: one per database, beside it."""
        return cls(Path(f"{database}.scheduler.lock"))

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            named, held = os.stat(self.lock_path), os.fstat(fd)
            if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
                raise FileNotFoundError  # removed or replaced between the open and the lock: not the lock
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> int | None:
        """The pid of another process that holds the lock now (0 where it cannot be read), else None."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.holder_pid() or 0
        finally:
            os.close(fd)  # closing it drops a lock it got
        return None

    def holder_pid(self) -> int | None:
        try:
            text = self.lock_path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None
