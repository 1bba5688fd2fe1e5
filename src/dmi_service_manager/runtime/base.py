"""The small interface a compute backend implements: the local Docker engine, or a Slurm cluster.

The scheduler and the job service only ever talk to this; they never name an engine. A backend runs
a container spec as a *run* it identifies by id (a container, a Slurm job), tells its state, stops,
removes and reads it, lists the runs of this server for adoption after a restart, and reports runs
that end. It answers the two GPU questions itself: whether it can attach GPUs here, and whether the
engine places GPUs (Slurm's GRES) or this server does (placement.py, on a local engine). It raises
RuntimeUnavailable when the engine cannot be reached and StartFailed when a run cannot be started.
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
            " nvidia-container-toolkit), so " + (f"jobs of {names}" if names else "GPU jobs") + " cannot run."
            " Set gpu: false on a service to run it on the CPU.")


FEWER_FILES = "Send fewer files per job."  # what a 4CAT job's too long argument list asks of its sender


def argv_too_long(argv: list[str], hint: str = FEWER_FILES) -> str:
    size = sum(len(a.encode()) + 1 for a in argv)
    return (f"The kernel refuses the container's argument list as too long ({len(argv)} arguments, {size} bytes;"
            f" the limit is about {os.sysconf('SC_ARG_MAX')} bytes, {MAX_ARG_STRLEN} per argument). {hint}")


def check_argv(argv: list[str], hint: str = FEWER_FILES) -> str | None:
    """Why the kernel would refuse to exec this argument list, before a container is made for it."""
    size = sum(len(a.encode()) + 1 for a in argv)
    if size > os.sysconf("SC_ARG_MAX") or any(len(a.encode()) >= MAX_ARG_STRLEN for a in argv):
        return argv_too_long(argv, hint)
    return None


class StartFailed(Exception):
    """The container could not be created or started; the message says why, for the job's error.

    `exit_code` is set where the fault is the command's own (not found: 127, not executable: 126, as a
    shell or `docker run` would say): the run's code, not the server's, so TES calls it EXECUTOR_ERROR."""

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    gpu_ids: list[str] = field(default_factory=list)  # cards this server placed the run on
    gpus: int = 0  # cards the run needs, for an engine that places GPUs itself
    timeout: float | None = None  # for an engine that enforces it itself (a Slurm time limit)
    shm_size: int | None = None
    mem_limit: int | None = None
    cpus: float | None = None
    workdir: str | None = None


class LogStream(Protocol):
    """Output chunks as a run writes them. A reader whose client has gone closes it from another thread,
    which ends a read that waits on a silent run (else the reading thread would wait as long as the run)."""

    def __iter__(self) -> Iterator[bytes]: ...

    def __next__(self) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ContainerState:
    id: str
    name: str
    labels: dict[str, str]
    status: str  # created (made, never started) | waiting (queued by the engine) | running | exited | dead
    exit_code: int | None
    started_at: float | None
    finished_at: float | None
    image_id: str
    oom_killed: bool = False
    error: str = ""
    image: str = ""  # the name it was made from
    holds_gpu: bool = False  # asked the engine for GPUs (as `--gpus`, the nvidia runtime or its variable do)

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
    action: str  # die | start | oom ...
    labels: dict[str, str]
    # What the event itself says of a run that ended (Docker's `die` carries the exit code), so that
    # finishing it needs no inspect: right after an exit the engine answers one slowly. None: ask.
    ended: ContainerState | None = None


@dataclass(frozen=True)
class Launched:
    run_id: str
    started_at: float | None  # None while the engine queues it (Slurm's PENDING)


class EventStream(Protocol):
    """Container events as they happen; close() ends a blocked read from another thread."""

    def __iter__(self) -> Iterator[ContainerEvent]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Where runs happen. Every method may raise RuntimeUnavailable when the engine cannot be reached."""

    name: str  # "docker" | "slurm"
    engine: str  # the engine in words, for messages: "Docker daemon", "Slurm cluster"
    places_gpus: bool  # True: the engine picks the cards (ContainerSpec.gpus); False: this server does (gpu_ids)

    def ping(self) -> None: ...

    def launch(self, spec: ContainerSpec) -> Launched:
        """Start a run of `spec`. Idempotent by `spec.name`: a run of that name (made before a crash) is
        started if it never was, and returned, never a second one."""

    def inspect(self, run_id: str) -> ContainerState | None: ...

    def stop(self, run_id: str, grace: float) -> None: ...

    def remove(self, run_id: str) -> None:
        """Forget a run that ended (or stop and forget one that did not): nothing of it stays on the engine."""

    def outputs(self, run_id: str, limit: int) -> tuple[CapturedLog, CapturedLog]:
        """The last `limit` bytes of the run's stdout and of its stderr, read together."""

    def follow_logs(self, run_id: str, tail: int | None, follow: bool) -> LogStream:
        """The run's output as it comes; `close()` from another thread ends a read that waits for more."""

    def labelled(self, labels: dict[str, str]) -> list[ContainerState]:
        """This server's runs, ended ones too: what a restart adopts. Their status is current; their times
        and exit code may be left out (an engine's listing need not carry them): inspect for those."""

    def running_of_images(self, images: list[str], unless: dict[str, str]) -> list[ContainerState]:
        """Running runs of these images not labelled `unless` (not ours: the original server's, say), with
        whether each holds GPUs that we place."""

    def events(self, labels: dict[str, str]) -> EventStream:
        """Ends of this server's runs as they happen."""

    def image_id(self, image: str) -> str | None: ...

    def gpu_problem(self) -> str | None:
        """Why GPUs cannot be attached to runs here, or None when they can."""

    def most_cpus(self) -> float | None:
        """The most CPUs one run can be given here, so that a larger request is refused when it is made
        rather than when it would start; None where the engine alone can tell (Slurm refuses a request no
        node meets at `sbatch`, in its own words)."""


__all__ = [
    "LABEL_INSTANCE",
    "LABEL_JOB",
    "LABEL_SERVICE",
    "LABEL_STEP",
    "Backend",
    "CapturedLog",
    "ContainerEvent",
    "ContainerExists",
    "ContainerSpec",
    "ContainerState",
    "EventStream",
    "Launched",
    "Mount",
    "RuntimeUnavailable",
    "StartFailed",
    "argv_too_long",
    "check_argv",
    "no_gpu_runtime",
]
