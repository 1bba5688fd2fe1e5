"""The small interface a container backend implements.

The scheduler only ever talks to this; it never names Docker. A backend raises RuntimeUnavailable
when the engine cannot be reached and StartFailed when a container cannot be made or started.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import RuntimeUnavailable

LABEL_INSTANCE = "dmi-service-manager.instance"
LABEL_JOB = "dmi-service-manager.job"
LABEL_SERVICE = "dmi-service-manager.service"
LABEL_STEP = "dmi-service-manager.step"  # which executor of a job of several containers
MAX_ARG_STRLEN = 128 * 1024  # the kernel's limit on one argument


def no_gpu_runtime(services: Iterable[str] = ()) -> str:
    """Why a GPU job cannot run on an engine that cannot hand out GPUs; said at start-up and per job."""
    names = ", ".join(services)
    return ("GPU_ENABLED is set but Docker on this server has no GPU runtime (install and configure"
            " nvidia-container-toolkit), so " + (f"jobs of {names}" if names else "this GPU job") + " cannot run."
            " Set gpu: false on a service to run it on the CPU.")


def argv_too_long(argv: list[str]) -> str:
    size = sum(len(a.encode()) + 1 for a in argv)
    return (f"The kernel refused the container's argument list as too long ({len(argv)} arguments, {size} bytes;"
            f" the limit is about {os.sysconf('SC_ARG_MAX')} bytes, {MAX_ARG_STRLEN} per argument)."
            " Send fewer files per job.")


def check_argv(argv: list[str]) -> str | None:
    """Why the kernel would refuse to exec this argument list, before a container is made for it."""
    size = sum(len(a.encode()) + 1 for a in argv)
    if size > os.sysconf("SC_ARG_MAX") or any(len(a.encode()) >= MAX_ARG_STRLEN for a in argv):
        return argv_too_long(argv)
    return None


class StartFailed(Exception):
    """The container could not be created or started; the message says why, for the job's error."""


class ContainerExists(Exception):
    """A container of that name exists already (a start that a crash interrupted)."""


@dataclass(frozen=True)
class Mount:
    host: str
    container: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    argv: list[str]
    labels: dict[str, str]
    entrypoint: list[str] | None = None
    mounts: list[Mount] = field(default_factory=list)
    network: str = "host"
    user: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    gpu_ids: list[str] = field(default_factory=list)
    gpu_mode: str = "device_requests"
    shm_size: int | None = None
    mem_limit: int | None = None
    cpus: float | None = None
    workdir: str | None = None


@dataclass(frozen=True)
class ContainerState:
    id: str
    name: str
    labels: dict[str, str]
    status: str  # created | running | paused | restarting | removing | exited | dead
    exit_code: int | None
    started_at: float | None
    finished_at: float | None
    image_id: str
    oom_killed: bool = False
    error: str = ""
    image: str = ""  # the name it was made from

    @property
    def ended(self) -> bool:
        return self.status in ("exited", "dead")


@dataclass(frozen=True)
class CapturedLog:
    text: str
    truncated: bool
    total_bytes: int


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    action: str  # die | start | destroy | oom ...
    labels: dict[str, str]


class EventStream(Protocol):
    """Container events as they happen; close() ends a blocked read from another thread."""

    def __iter__(self) -> Iterator[ContainerEvent]: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    def ping(self) -> None: ...

    def create(self, spec: ContainerSpec) -> str: ...

    def start(self, container_id: str, spec: ContainerSpec | None = None) -> None: ...

    def inspect(self, container_id: str) -> ContainerState | None: ...

    def stop(self, container_id: str, grace: float) -> None: ...

    def remove(self, container_id: str) -> None: ...

    def logs(self, container_id: str, stream: str, limit: int) -> CapturedLog: ...

    def follow_logs(self, container_id: str, tail: int | None, follow: bool) -> Iterator[bytes]: ...

    def labelled(self, labels: dict[str, str]) -> list[ContainerState]: ...

    def running_of_images(self, images: list[str]) -> list[ContainerState]: ...

    def events(self, labels: dict[str, str]) -> EventStream: ...

    def image_id(self, image: str) -> str | None: ...

    def gpu_runtime(self) -> str | None: ...

    def run_to_completion(self, spec: ContainerSpec, timeout: float) -> tuple[int, str]: ...


__all__ = [
    "LABEL_INSTANCE",
    "LABEL_JOB",
    "LABEL_SERVICE",
    "LABEL_STEP",
    "CapturedLog",
    "ContainerEvent",
    "ContainerExists",
    "ContainerSpec",
    "ContainerState",
    "EventStream",
    "Mount",
    "Runtime",
    "RuntimeUnavailable",
    "StartFailed",
    "argv_too_long",
    "check_argv",
    "no_gpu_runtime",
]
