"""What a kind of job (4CAT's, TES's) tells the scheduler: its containers and what their ends mean.

The scheduler owns the queue, placement and the containers' lives; a workload owns the meaning. A
4CAT job is one container; a TES task is one container per executor, run in order, with inputs
staged before the first and outputs collected after the last.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..runtime.base import CapturedLog, ContainerSpec, ContainerState
from .model import Failure, Job, JobStatus

# What CUDA, PyTorch and cuBLAS write when a card's memory runs out; 4CAT's processors look for the first.
# (Not a bare "OutOfMemoryError": Java's is the host's memory.)
_GPU_OOM = re.compile(r"CUDA error: out of memory|CUDA out of memory|torch(\.cuda)?\.OutOfMemoryError"
                      r"|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation")


def exit_failure(state: ContainerState, stderr: CapturedLog) -> Failure:
    """Why a container that exited non-zero failed: memory (the host's or a GPU's), or its own reasons."""
    if state.oom_killed:
        return Failure.OOM
    return Failure.GPU_OOM if _GPU_OOM.search(stderr.text) else Failure.EXIT_CODE


class CannotRun(Exception):
    """A job cannot run, for a reason that is not the container's (an input, the image, a limit)."""

    def __init__(self, message: str, failure: Failure) -> None:
        super().__init__(message)
        self.message = message
        self.failure = failure


@dataclass(frozen=True)
class StepExit:
    """How one container ended, with its output."""

    state: ContainerState
    stdout: CapturedLog
    stderr: CapturedLog
    engine_outage: str | None = None  # the engine, when it restarted or was unreachable while the run ended


@dataclass(frozen=True)
class Ended:
    """The job is over: its final status, results and, for a TES task, its log."""

    status: JobStatus
    results: dict[str, Any]
    failure: Failure | None = None
    task_log: dict[str, Any] | None = None


@dataclass(frozen=True)
class NextStep:
    """Another container is due: its step number and the log so far."""

    step: int
    task_log: dict[str, Any]


KeepGoing = Callable[[], bool]  # whether work under way is still wanted (false once its job is cancelled)


class Workload(Protocol):
    def prepare(self, job: Job, keep_going: KeepGoing) -> None:
        """Work before the first container (stage inputs); raises CannotRun saying why it cannot. It stops
        early, with nothing raised, once `keep_going` says no (the job was cancelled meanwhile)."""

    def spec(self, job: Job, gpu_ids: list[str]) -> ContainerSpec:
        """The container of the job's current step."""

    def step_ended(self, job: Job, exit: StepExit) -> Ended | NextStep:
        """What one container's end means for the job."""

    def failed(self, job: Job, message: str, failure: Failure) -> Ended:
        """The end of a job that failed without a container exit to read (start, engine, cancel)."""

    def cleanup(self, job: Job) -> None:
        """What the job left on this server goes, once its end is on record (never before: a crash in
        between must leave the next server what it needs to read that end again)."""

    def sweep(self, active: set[int]) -> None:
        """After a restart: what jobs no longer in `active` left, where a crash came before their clean-up."""
