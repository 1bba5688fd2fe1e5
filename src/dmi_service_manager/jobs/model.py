"""A job, its status, and the transitions between statuses.

4CAT accepts exactly five status words and aborts a job on any other, so the status column only
ever holds these; what else the engine needs to know (claimed, stopping, why) lives in other fields.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class JobStatus(enum.StrEnum):
    CREATED = "created"
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    ERROR = "error"

    @property
    def final(self) -> bool:
        return self in (JobStatus.COMPLETE, JobStatus.ERROR)


# Where a job may go from each status. The store builds the guard of its one status-writing function
# from this table, so a transition not listed here can never be written.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.CREATED: frozenset({JobStatus.PENDING, JobStatus.RUNNING, JobStatus.ERROR}),
    JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.ERROR}),
    JobStatus.RUNNING: frozenset({JobStatus.COMPLETE, JobStatus.ERROR}),
    JobStatus.COMPLETE: frozenset(),
    JobStatus.ERROR: frozenset(),
}


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """The statuses from which a job may move to `target`."""
    return frozenset(status for status, targets in TRANSITIONS.items() if target in targets)


class StopReason(enum.StrEnum):
    """Why the server stopped a container itself; decides the message the job ends with."""

    TIMEOUT = "timeout"
    CANCEL = "cancel"
    ABANDONED = "abandoned"


class Failure(enum.StrEnum):
    """Why a job ended in error, as a value: TES states and metrics are read from it."""

    EXIT_CODE = "exit_code"  # the container (an executor) exited non-zero
    OOM = "oom"  # killed for using more memory than it may
    GPU_OOM = "gpu_oom"  # ran out of GPU memory (CUDA said so on stderr)
    TIMEOUT = "timeout"
    CANCEL = "cancel"
    ABANDONED = "abandoned"
    START = "start"  # it could not be started: image missing, argv too long, no GPU runtime
    ENGINE = "engine"  # the engine lost it, or restarted under it
    INPUT = "input"  # a TES input could not be staged
    OUTPUT = "output"  # a TES output could not be copied
    CONFIG = "config"  # the service or GPUs it needs are not (or no longer) configured

    @property
    def by_executor(self) -> bool:
        return self in (Failure.EXIT_CODE, Failure.OOM, Failure.GPU_OOM)

    @property
    def cancelled(self) -> bool:
        return self in (Failure.CANCEL, Failure.ABANDONED)


class Kind(enum.StrEnum):
    """Which front door a job came through."""

    FOURCAT = "4cat"
    TES = "tes"


@dataclass
class Job:
    id: int
    created_at: int
    jobtype: str
    status: JobStatus
    completed_at: int | None = None
    message: str | None = None
    processed_records: int | None = None
    details: str = "{}"
    results: str | None = None
    # Engine fields, never part of the wire shape 4CAT reads.
    service: str | None = None
    mode: str | None = None
    dataset_key: str | None = None
    timeout: float | None = None
    claimed_at: float | None = None
    started_at: float | None = None
    container_id: str | None = None
    gpu_ids: list[str] = field(default_factory=list)
    gpu_memory: int | None = None
    stop_reason: str | None = None
    stop_detail: str | None = None
    callback_url: str | None = None
    last_polled_at: float | None = None
    kind: Kind = Kind.FOURCAT
    failure: Failure | None = None
    gpus: int = 1
    cpus: float | None = None
    mem_limit: int | None = None
    step: int = 0  # the executor that runs (or runs next) for a job of several containers
    # TES fields: the client's id, name and tags, the accepted task document and what was logged.
    task_id: str | None = None
    name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    task_log: dict[str, Any] = field(default_factory=dict)

    @property
    def holds_capacity(self) -> bool:
        """Running, or claimed by the scheduler for starting: it holds a job slot and its GPUs."""
        return self.status == JobStatus.RUNNING or self.claimed_at is not None

    def wire(self) -> dict[str, Any]:
        """The job exactly as 4CAT reads it (`details` and `results` are JSON strings)."""
        return {
            "id": self.id,
            "created_at": self.created_at,
            "jobtype": self.jobtype,
            "completed_at": self.completed_at,
            "status": self.status.value,
            "message": self.message,
            "processed_records": self.processed_records,
            "details": self.details,
            "results": self.results,
        }

    def listed(self) -> dict[str, Any]:
        """The job in a listing, where 4CAT jobs and TES tasks meet: the wire shape, labelled.

        A TES task's output stays behind its tokens: here it shows only how it ended (and, if it failed, the
        first line of why: this server's words; an executor's stderr follows them, and a success's is its
        stderr alone).
        """
        shown = {**self.wire(), "kind": self.kind.value, "task_id": self.task_id}
        if self.kind is Kind.TES and (results := self.results_dict()) is not None:
            why = (results.get("error") or "").split("\n", 1)[0] if self.status is JobStatus.ERROR else ""
            shown["results"] = json.dumps({"returncode": results.get("returncode"), "error": why})
        return shown

    def details_dict(self) -> dict[str, Any]:
        try:
            value = json.loads(self.details or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def results_dict(self) -> dict[str, Any] | None:
        if self.results is None:
            return None
        try:
            value = json.loads(self.results)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def argv(self) -> list[str]:
        """The exact argument list the container was started with (recorded at start)."""
        argv = (self.details_dict().get("container") or {}).get("argv")
        return list(argv) if isinstance(argv, list) else []


def error_results(message: str, *, returncode: int = 1, **extra: Any) -> dict[str, Any]:
    """Results of a job that ended without a usable container exit: still a non-zero int returncode."""
    return {"returncode": returncode if returncode else 1, "error": message, "report": "", **extra}
