"""The 4CAT workload: how a job becomes one container, and how its end becomes the job's results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Config, ServiceConfig
from ..runtime.base import (
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_SERVICE,
    CapturedLog,
    ContainerSpec,
    ContainerState,
    Mount,
    argv_too_long,
)
from .model import Failure, Job, JobStatus, StopReason, error_results
from .workload import Ended, KeepGoing, StepExit, exit_failure


def container_name(instance_id: str, job_id: int) -> str:
    return f"dsm-{instance_id}-{job_id}"


def job_argv(job: Job, service: ServiceConfig, server_url: str) -> list[str]:
    """The service's command, the request's args, and, when asked for, the key to report progress with."""
    request = job.details_dict().get("request_json") or {}
    argv = service.argv_prefix() + [str(a) for a in request.get("args") or []]
    if request.get("pass_key") is True or service.pass_key:
        argv += ["--database_key", str(job.id), "--dmi_sm_server", server_url]
    return argv


def container_spec(
    job: Job, config: Config, instance_id: str, server_url: str, gpu_ids: list[str]
) -> ContainerSpec:
    assert job.service is not None and job.mode is not None
    service = config.docker_endpoints[job.service]
    folder = config.folder_for(job.mode)
    mounts = [Mount(host=str(folder), container=service.data_path)] if folder else []
    for volume in service.volumes:
        host, container, *mode = volume.split(":")
        mounts.append(Mount(host=host, container=container, read_only=mode == ["ro"]))
    return ContainerSpec(
        name=container_name(instance_id, job.id),
        image=service.image_name,
        argv=job_argv(job, service, server_url),
        labels={LABEL_INSTANCE: instance_id, LABEL_JOB: str(job.id), LABEL_SERVICE: job.service},
        mounts=mounts,
        network=service.network,
        user=service.user,
        environment=dict(service.environment),
        gpu_ids=gpu_ids,
        gpus=service.gpus if config.service_uses_gpu(job.service) else 0,
        timeout=job.timeout,
        shm_size=service.shm_size,
        mem_limit=service.mem_limit,
        cpus=service.cpus,
    )


_STOP_MESSAGES = {
    StopReason.TIMEOUT: "stopped",
    StopReason.CANCEL: "cancelled",
    StopReason.ABANDONED: "cancelled as abandoned",
}


def stop_failure(job: Job) -> Failure:
    """The failure kind of a job the server stopped itself."""
    reason = job.stop_reason or ""
    return Failure(reason) if reason in Failure._value2member_map_ else Failure.CANCEL


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    results: dict[str, Any]
    failure: Failure | None = None


def outcome(
    job: Job,
    state: ContainerState,
    stdout: CapturedLog,
    stderr: CapturedLog,
    *,
    engine_outage: str | None = None,
) -> Outcome:
    """The final status and results of a job whose container has ended.

    4CAT decides success by `returncode` alone, so every error carries a non-zero int, and `error`
    holds the container's stderr (where 4CAT looks for 'CUDA error: out of memory') after any note of
    ours saying why the server intervened.
    """
    code = state.exit_code if state.exit_code is not None else 1
    notes = []
    if job.stop_reason:
        notes.append(job.stop_detail or f"The job was {_STOP_MESSAGES.get(StopReason(job.stop_reason), 'stopped')}.")
    elif engine_outage and code != 0:
        notes.append(
            f"The {engine_outage} restarted or was unreachable while this job ran; its container ended with exit"
            f" code {code}."
        )
    if code != 0 and "argument list too long" in stderr.text[:2000]:
        notes.append(argv_too_long(job.argv))
    if state.oom_killed:
        notes.append("The container was killed for using more memory than it may (mem_limit).")
    if state.error:
        notes.append(f"The container engine reported: {state.error}")
    failed = code != 0 or bool(job.stop_reason)
    if failed and not notes and not stderr.text.strip():
        notes.append(f"The container exited with code {code} and wrote nothing to stderr.")
    error = "\n".join([*notes, stderr.text]).strip("\n") if notes else stderr.text
    start, end = state.started_at or job.started_at, state.finished_at
    if start and end and start > end:  # our clock's start (taken once the start call returned) of a quick exit
        start = end
    results: dict[str, Any] = {
        "returncode": (code or 1) if failed else 0,
        "error": error,
        "report": stdout.text,
        "start_time": start,
        "end_time": end,
        "process_time": (end - start) if start and end else None,
        "exit_code": state.exit_code,
        "report_truncated": stdout.truncated,
        "error_truncated": stderr.truncated,
    }
    if stdout.truncated or stderr.truncated:
        results["truncation_note"] = (
            f"Only the last part of the container's output is kept (stdout: {stdout.total_bytes} bytes written,"
            f" stderr: {stderr.total_bytes} bytes written)."
        )
    failure = None
    if failed:
        failure = (stop_failure(job) if job.stop_reason else Failure.ENGINE if engine_outage and not state.oom_killed
                   else exit_failure(state, stderr))
    return Outcome(status=JobStatus.ERROR if failed else JobStatus.COMPLETE, results=results, failure=failure)


class FourCatWorkload:
    """A 4CAT job: one container of a configured service, its results in 4CAT's shape."""

    def __init__(self, config: Config, instance_id: str, server_url: str) -> None:
        self.config = config
        self.instance_id = instance_id
        self.server_url = server_url

    def prepare(self, job: Job, keep_going: KeepGoing) -> None:
        return None

    def spec(self, job: Job, gpu_ids: list[str]) -> ContainerSpec:
        return container_spec(job, self.config, self.instance_id, self.server_url, gpu_ids)

    def step_ended(self, job: Job, exit: StepExit) -> Ended:
        result = outcome(job, exit.state, exit.stdout, exit.stderr, engine_outage=exit.engine_outage)
        return Ended(status=result.status, results=result.results, failure=result.failure)

    def failed(self, job: Job, message: str, failure: Failure) -> Ended:
        return Ended(status=JobStatus.ERROR, results=error_results(message), failure=failure)

    def cleanup(self, job: Job) -> None:
        return None  # its files are 4CAT's (the dataset folder) or the uploads', kept by their own rules

    def sweep(self, active: set[int]) -> None:
        return None
