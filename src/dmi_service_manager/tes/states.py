"""A task's TES state, read from the job's status and why it ended.

The job's `status` column keeps 4CAT's five words; TES's finer states are read from whether the
job is claimed (INITIALIZING), whether a stop was asked for (CANCELING), and its failure kind.
`store.TES_STATE_SQL` says the same in SQL, for `GET /tasks?state=`; a test keeps both in step.
"""

from __future__ import annotations

from ..jobs.model import Job, JobStatus

STATES = ("UNKNOWN", "QUEUED", "INITIALIZING", "RUNNING", "PAUSED", "COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR",
          "CANCELED", "PREEMPTED", "CANCELING")
FINAL = frozenset({"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED"})


def state_of(job: Job) -> str:
    if job.status == JobStatus.COMPLETE:
        return "COMPLETE"
    if job.status == JobStatus.ERROR:
        if job.failure is not None and job.failure.cancelled:
            return "CANCELED"
        if job.failure is not None and job.failure.by_executor:
            return "EXECUTOR_ERROR"
        return "SYSTEM_ERROR"
    if job.stop_reason in ("cancel", "abandoned"):
        return "CANCELING"
    if job.status == JobStatus.RUNNING:
        return "RUNNING"
    return "INITIALIZING" if job.claimed_at is not None else "QUEUED"
