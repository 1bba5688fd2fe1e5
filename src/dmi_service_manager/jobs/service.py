"""What the API may ask of the job engine: submit, look up, list, search, progress, logs, cancel, GPUs.

It decides and validates; it knows neither HTTP nor Docker's concepts. Starting and stopping
containers is the scheduler's alone: a cancel here only records the request and rings the
scheduler's doorbell (a waiting job, which has no container, it ends at once).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..config import GPU_DISABLED_REASON, Config
from ..errors import BadRequest, GpuUnavailable, NotFound, RuntimeUnavailable
from ..gpu.nvml import GpuInventory
from ..runtime.base import Backend, LogStream
from . import placement
from .model import Failure, Job, Kind, StopReason
from .store import JobFilter, NewJob, Store
from .webhooks import callback_refusal
from .workload import Workload

log = logging.getLogger(__name__)

POLL_RECORD_SECONDS = 60.0  # how stale last_polled_at may get before a poll writes it again


def parse_json_path(text: Any) -> list[str | int]:
    """`$.request_json.4CAT_dataset_key`, `$["a"][0]` and the like, as a list of keys."""
    if not isinstance(text, str) or not text.startswith("$"):
        raise BadRequest("details_key must be a JSON path starting with $, such as $.request_json.4CAT_dataset_key")
    keys: list[str | int] = []
    rest = text[1:]
    pattern = re.compile(r"""\.([^.\[\]]+)|\[\s*([0-9]{1,18})\s*\]"""  # an index: at most 18 ASCII digits
                         r"""|\[\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\s*\]""")
    while rest:
        match = pattern.match(rest)
        if not match:
            raise BadRequest(f"details_key is not a JSON path this server understands: {text!r}")
        name, index, double, single = match.groups()
        if index is not None:
            keys.append(int(index))
        else:
            keys.append(name if name is not None else (double if double is not None else single or ""))
        rest = rest[match.end():]
    if not keys:
        raise BadRequest("details_key must name a key inside the job's details")
    return keys


def _args(body: dict[str, Any]) -> list[str]:
    raw = body.get("args", [])
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("args must be a list of strings")
    args = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise BadRequest(f"args must be a list of strings; found {type(item).__name__}: {item!r}")
        if isinstance(item, str) and "\x00" in item:
            raise BadRequest("args must not contain NUL bytes")
        args.append(str(item))
    return args


@dataclass(frozen=True)
class GpuCheck:
    """The answer to 4CAT's GPU check, as a value; the route turns it into 4CAT's exact words."""

    outcome: Literal["available", "disabled", "unknown_service", "never_fits", "failed"]
    reason: str
    memory: dict[str, Any] | None = None


@dataclass(frozen=True)
class JobLogs:
    """A job's output: the stored text once it is over, else the container's live stream."""

    job: Job
    stored: str | None
    live: LogStream | None = None


class JobService:
    def __init__(self, config: Config, store: Store, gpus: GpuInventory, backend: Backend,
                 workloads: dict[Kind, Workload], ring: Callable[[], None]) -> None:
        self.config = config
        self.store = store
        self.gpus = gpus
        self.backend = backend
        self.workloads = workloads
        self.ring = ring
        self.endpoints = config.endpoints()

    def enqueue(self, new: NewJob) -> Job:
        """Store a job in the queue, once it is known that it could ever run here."""
        if new.kind is Kind.FOURCAT and new.service is not None:
            if self.config.service_uses_gpu(new.service):
                self._check_could_ever_fit(placement.service_demand(self.config, new.service))
        elif self.config.gpu_enabled and new.gpus > 0:
            self._check_could_ever_fit(placement.Demand(job_id=0, service="tes", uses_gpu=True, gpus=new.gpus,
                                                        gpu_memory=new.gpu_memory))
        job = self.store.create(new)
        self.ring()
        return job

    def submit(self, endpoint: str, body: Any, query: dict[str, str]) -> Job:
        if endpoint not in self.endpoints:
            offered = ", ".join(sorted(self.endpoints)) or "none"
            raise NotFound(f"Service not found: no endpoint {endpoint!r} is set up on this server (it offers:"
                           f" {offered})")
        service_name, mode = self.endpoints[endpoint]
        service = self.config.docker_endpoints[service_name]
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object such as {\"args\": [...]}")
        _args(body)
        timeout = body.get("timeout", service.timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 10**8:
            raise BadRequest("timeout must be a positive number of seconds")
        if "pass_key" in body and not isinstance(body["pass_key"], bool):
            raise BadRequest("pass_key must be true or false")
        callback = body.get("callback_url")
        if callback is not None:
            refusal = callback_refusal(callback, self.config)
            if refusal:
                raise BadRequest(refusal)
        dataset_key = body.get("4CAT_dataset_key")
        job = self.enqueue(NewJob(
            jobtype=f"/api/{endpoint}",
            details={"request_json": body, "request_args": query},
            timeout=float(timeout),
            service=service_name,
            mode=mode,
            dataset_key=None if dataset_key is None else str(dataset_key),
            gpus=service.gpus,
            gpu_memory=service.gpu_memory,
            callback_url=callback,
        ))
        log.info("job %s stored for %s (dataset %s)", job.id, endpoint, dataset_key)
        return job

    def _check_could_ever_fit(self, demand: placement.Demand) -> None:
        service = self.config.docker_endpoints.get(demand.service)
        image = service.image_name if service is not None else None
        try:
            cards, _ = self.gpus.cards(image)
        except GpuUnavailable:
            return  # the scheduler ends the job with the reason; the submit itself stays cheap
        reason = placement.never_fits(demand, [placement.Card.of(c) for c in cards])
        if reason:
            raise GpuUnavailable(f"GPU not available for {demand.service}: {reason}")

    def get(self, job_id: int, *, kind: Kind | None = Kind.FOURCAT) -> Job:
        """A job by id; one of another kind (a TES task, behind its tokens) is not found here."""
        job = self.store.get(job_id) if 0 < job_id < 2**63 else None
        if job is None:
            raise NotFound(f"Job {job_id} not found")
        if kind is not None and job.kind is not kind:
            raise NotFound(f"Job {job_id} is a TES task ({job.task_id}); it is read through"
                           f" /ga4gh/tes/v1/tasks/{job.task_id} (an admin may cancel it here, or with dsm cancel)")
        return job

    def list_jobs(self, *, current: bool = False, limit: int | None = None, offset: int = 0,
                  newest_first: bool = False, where: JobFilter | None = None, batch: int = 256,
                  batch_bytes: int = 1024 * 1024) -> Iterator[list[Job]]:
        """Jobs a few at a time (at most `batch`, and past `batch_bytes` of text only one), so that a listing
        of every job (4CAT's unpaged call) never sits in memory, however large some jobs' details are."""
        after: int | None = None
        left = limit
        while left is None or left > 0:
            size = batch if left is None else min(batch, left)
            found = self.store.listing(current=current, limit=size, offset=offset if after is None else 0,
                                    newest_first=newest_first, after=after, where=where, max_bytes=batch_bytes)
            if not found:
                return
            yield found
            after = found[-1].id
            if left is not None:
                left -= len(found)

    def services(self, failures: int = 5) -> list[dict[str, Any]]:
        """Each configured service: its image and needs, what of it runs and waits, and its latest failures."""
        active = self.store.active()
        recent = self.store.recent_failures(200)
        answer = []
        for name, service in self.config.docker_endpoints.items():
            mine = [j for j in active if j.kind is Kind.FOURCAT and j.service == name]
            failed = [j for j in recent if j.kind is Kind.FOURCAT and j.service == name][:failures]
            answer.append({
                "name": name, "image": service.image_name,
                "endpoints": [e for e in (f"{name}_local" if service.local else None,
                                          f"{name}_remote" if service.remote else None) if e],
                "uses_gpu": self.config.service_uses_gpu(name), "gpu_memory": service.gpu_memory,
                "max_concurrent": service.max_concurrent,
                "running": sum(1 for j in mine if j.holds_capacity),
                "waiting": sum(1 for j in mine if not j.holds_capacity),
                "recent_failures": [{"id": j.id, "completed_at": j.completed_at,
                                     "failure": j.failure.value if j.failure else None,
                                     "message": _error_line(j)} for j in failed],
            })
        return answer

    def gpus_overview(self) -> dict[str, Any]:
        """The cards, what each has and uses, and what this server's placement holds on it for which job."""
        if not self.config.gpu_enabled:
            return {"enabled": False, "source": None, "cards": [], "problem": GPU_DISABLED_REASON}
        try:
            found, source = self.gpus.cards()
        except GpuUnavailable as exc:
            return {"enabled": True, "source": None, "cards": [], "problem": exc.message}
        holding = [] if self.backend.places_gpus else [j for j in self.store.active() if j.holds_capacity]
        reserved = placement.reserved([placement.Holding.of(j) for j in holding],
                                      [placement.Card.of(c) for c in found])
        return {"enabled": True, "source": source, "problem": self._gpu_runtime_problem(), "cards": [
            {"id": card.id, "name": card.name, "uuid": card.uuid, "total": card.total,
             "used": None if card.free is None else card.total - card.free, "reserved": reserved.get(card.id, 0),
             "jobs": [{"id": j.id, "service": j.service, "gpu_memory": j.gpu_memory}
                      for j in holding if card.id in j.gpu_ids]}
            for card in found]}

    def counts(self) -> dict[str, int]:
        """Jobs by status; a write transaction first, so that a read-only or locked database shows."""
        self.store.instance_id()
        return self.store.counts()

    def collections_in_use(self) -> set[str]:
        """Upload collections named in the arguments of remote jobs that wait or run.

        Arguments are relative to the container's working directory (normally the parent of
        `data_path`), so both `data/<c>/x` and `/app/data/<c>/x` name collection `<c>`.
        """
        used: set[str] = set()
        for job in self.store.active():
            if job.mode != "remote" or job.service not in self.config.docker_endpoints:
                continue
            data_path = self.config.docker_endpoints[job.service].data_path.rstrip("/")
            name = os.path.basename(data_path)
            prefixes = (data_path + "/", name + "/", "./" + name + "/")
            request = job.details_dict().get("request_json") or {}
            for arg in request.get("args") or []:
                text = str(arg)
                for prefix in prefixes:
                    if text.startswith(prefix):
                        collection = text[len(prefix):].split("/", 1)[0]
                        if collection:
                            used.add(collection)
        return used

    def logs(self, job_id: int, tail: int | None, follow: bool) -> JobLogs:
        """The container's output while it runs (followed if asked); the stored output once final."""
        job = self.get(job_id)
        if job.status.final or job.container_id is None:
            return JobLogs(job=job, stored=_stored_output(job.results_dict(), tail))
        return JobLogs(job=job, stored=None, live=self.backend.follow_logs(job.container_id, tail, follow))

    def gpu_check(self, service: str) -> GpuCheck:
        """Whether a job of `service` can get a GPU: 4CAT's check, with real figures and what is queued."""
        config = self.config
        if service not in config.docker_endpoints:
            return GpuCheck("unknown_service", "Service not found")
        if not config.service_uses_gpu(service):
            return GpuCheck("disabled", GPU_DISABLED_REASON)
        try:
            found, source = self.gpus.cards(config.docker_endpoints[service].image_name)
        except GpuUnavailable as exc:
            return GpuCheck("failed", exc.message)
        if problem := self._gpu_runtime_problem():  # cards, but no way to hand them to a container
            return GpuCheck("failed", problem)
        cards = [placement.Card.of(c) for c in found]
        jobs = self.store.active()
        # Where the engine places GPUs (Slurm), a job that fits a card waits there for one: no reservations here.
        holding = [] if self.backend.places_gpus else [placement.Holding.of(j) for j in jobs if j.holds_capacity]
        reserved = placement.reserved(holding, cards)
        queued = sum(1 for j in jobs if not j.holds_capacity and placement.uses_gpu(j, config))

        def free(card: placement.Card) -> int:
            return card.free if card.free is not None else max(card.total - reserved.get(card.id, 0), 0)

        per_card = [{**card.as_dict(), "gpu_free_mem": free(placement.Card.of(card)),
                     "reserved_mem": reserved.get(card.id, 0)} for card in found]
        best = max(cards, key=lambda c: (free(c), c.total), default=None)
        memory = {
            "gpu_total_mem": best.total if best else 0,
            "gpu_free_mem": free(best) if best else 0,
            "gpus": per_card,
            "source": source,
            "jobs_running": len(holding),
            "gpu_jobs_queued": queued,
        }
        never = placement.never_fits(placement.service_demand(config, service), cards)
        if never:
            return GpuCheck("never_fits", f"GPU not available for {service}: {never}", memory)
        return GpuCheck("available", "GPU available", memory)

    def _gpu_runtime_problem(self) -> str | None:
        try:
            return self.backend.gpu_problem()
        except RuntimeUnavailable:
            return None  # the engine is down: GPU jobs wait for it like any other, and the cards are answered

    def needs_poll_record(self, job: Job, now: float) -> bool:
        """Whether this poll should be written down (only the abandonment rule reads it, so most are not)."""
        if self.config.abandon_after_hours is None or job.status.final:
            return False
        every = min(POLL_RECORD_SECONDS, self.config.abandon_after_hours * 360)  # a tenth of the limit
        return job.last_polled_at is None or now - job.last_polled_at > every

    def record_poll(self, job_id: int) -> None:
        self.store.touch_polled(job_id, time.time())

    def details_query(self, details_key: Any, details_value: Any) -> list[Job]:
        keys = parse_json_path(details_key)
        if isinstance(details_value, dict | list):
            raise BadRequest("details_value must be a string or a number")
        return self.store.find_by_details(keys, details_value)

    def status_update(self, job_id: int, message: str | None, processed: int | None) -> None:
        """Progress from a container. Its `status` never changes ours: the container's exit decides."""
        if not self.store.update_progress(job_id, message, processed) and self.store.get(job_id) is None:
            raise NotFound(f"Job {job_id} not found")

    def cancel(self, job_id: int, who: str, *, kind: Kind | None = Kind.FOURCAT) -> Job:
        """Cancel a job of `kind` (None: any, as an admin may)."""
        job = self.get(job_id, kind=kind)
        if job.status.final:
            return job
        detail = f"Cancelled by {who}."
        ended = self.workloads[job.kind].failed(job, detail, Failure.CANCEL)
        if not job.holds_capacity and self.store.finish(job_id, ended.status, ended.results, failure=ended.failure,
                                                        message=detail, only_if_waiting=True,
                                                        task_log=ended.task_log):
            log.info("job %s cancelled while waiting, by %s", job_id, who)
            self.ring()
            return self.get(job_id, kind=kind)
        if self.store.request_stop(job_id, StopReason.CANCEL, detail):
            log.info("job %s: cancel requested by %s", job_id, who)
        self.ring()
        return self.get(job_id, kind=kind)


def _error_line(job: Job) -> str:
    """The last line of a failed job's error (or its message): what a person reads first."""
    results = job.results_dict() or {}
    text = str(results.get("error") or job.message or "").strip()
    return text.splitlines()[-1][:300] if text else ""


def _stored_output(results: dict[str, object] | None, tail: int | None) -> str:
    if not results:
        return ""
    # stdout, then stderr: kept apart (4CAT reads them as `report` and `error`), their order is not kept
    text = "".join(part if part.endswith("\n") else part + "\n"
                   for part in (str(results.get(key) or "") for key in ("report", "error")) if part)
    if tail is not None:
        text = "\n".join(text.splitlines()[-tail:]) if tail else ""
    return text + ("\n" if text and not text.endswith("\n") else "")
