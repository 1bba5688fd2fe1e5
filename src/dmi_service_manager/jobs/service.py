"""What the API may ask of the job engine: submit, look up, search, report progress, cancel.

It decides and validates; it knows neither HTTP nor Docker. Starting and stopping containers is the
scheduler's alone: a cancel here only records the request and rings the scheduler's doorbell.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..config import Config
from ..errors import BadRequest, GpuUnavailable, NotFound
from ..gpu.nvml import GpuInventory
from . import placement
from .model import Job, JobStatus, StopReason, error_results
from .store import Store

log = logging.getLogger(__name__)

POLL_RECORD_SECONDS = 60.0  # how stale last_polled_at may get before a poll writes it again


def parse_json_path(text: Any) -> list[str | int]:
    """`$.request_json.4CAT_dataset_key`, `$["a"][0]` and the like, as a list of keys."""
    if not isinstance(text, str) or not text.startswith("$"):
        raise BadRequest("details_key must be a JSON path starting with $, such as $.request_json.4CAT_dataset_key")
    keys: list[str | int] = []
    rest = text[1:]
    pattern = re.compile(r"""\.([^.\[\]]+)|\[\s*(\d+)\s*\]|\[\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')\s*\]""")
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


class JobService:
    def __init__(self, config: Config, store: Store, gpus: GpuInventory, ring: Callable[[], None]) -> None:
        self.config = config
        self.store = store
        self.gpus = gpus
        self.ring = ring
        self.endpoints = config.endpoints()

    def submit(self, endpoint: str, body: Any, query: dict[str, str]) -> Job:
        if endpoint not in self.endpoints:
            raise NotFound(f"Service not found: no endpoint {endpoint!r} is set up on this server")
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
            self._check_callback(callback)
        dataset_key = body.get("4CAT_dataset_key")
        if self.config.service_uses_gpu(service_name):
            self._check_could_ever_fit(service_name)
        job = self.store.create(
            jobtype=f"/api/{endpoint}",
            details={"request_json": body, "request_args": query},
            service=service_name,
            mode=mode,
            dataset_key=None if dataset_key is None else str(dataset_key),
            timeout=float(timeout),
            gpu_memory=service.gpu_memory,
            callback_url=callback,
        )
        log.info("job %s stored for %s (dataset %s)", job.id, endpoint, dataset_key)
        self.ring()
        return job

    def _check_could_ever_fit(self, service_name: str) -> None:
        service = self.config.docker_endpoints[service_name]
        try:
            cards, _ = self.gpus.cards(service.image_name)
        except GpuUnavailable:
            return  # the scheduler ends the job with the reason; the submit itself stays cheap
        demand = placement.Demand(job_id=0, service=service_name, uses_gpu=True, gpus=service.gpus,
                                  gpu_memory=service.gpu_memory)
        cards_ = [placement.Card(id=c.id, total=c.total, free=c.free) for c in cards]
        reason = placement.never_fits(demand, cards_)
        if reason:
            raise GpuUnavailable(f"GPU not available for {service_name}: {reason}")

    def _check_callback(self, url: Any) -> None:
        if not isinstance(url, str):
            raise BadRequest("callback_url must be a string")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest("callback_url must be an http(s) URL")
        allowed = {h.lower() for h in self.config.callback_allowed_hosts}
        if parts.hostname.lower() not in allowed:
            raise BadRequest(
                f"callback_url host {parts.hostname!r} is not in CALLBACK_ALLOWED_HOSTS on this server"
            )

    def get(self, job_id: int) -> Job:
        job = self.store.get(job_id) if 0 < job_id < 2**63 else None
        if job is None:
            raise NotFound(f"Job {job_id} not found")
        return job

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

    def status_update(self, key: str | None, status: str | None, message: str | None,
                      processed: str | None) -> None:
        """Progress from a container. Its `status` never changes ours: the container's exit decides."""
        if not key or not status:
            raise BadRequest("status_update must include both 'key' and 'status'")
        if not key.strip().isdigit():
            raise BadRequest(f"key must be a job id, not {key!r}")
        count = None
        if processed not in (None, ""):
            try:
                count = int(float(processed or 0))
            except ValueError:
                raise BadRequest(f"processed_records must be a number, not {processed!r}") from None
        job_id = int(key)
        if not self.store.update_progress(job_id, message, count) and self.store.get(job_id) is None:
            raise NotFound(f"Job {job_id} not found")

    def cancel(self, job_id: int, who: str) -> Job:
        job = self.get(job_id)
        if job.status.final:
            return job
        detail = f"Cancelled by {who}."
        waiting = not job.holds_capacity
        if waiting and self.store.finish(job_id, JobStatus.ERROR, error_results(detail), message=detail,
                                         only_if_pending=True):
            log.info("job %s cancelled while waiting, by %s", job_id, who)
            self.ring()
            return self.get(job_id)
        if self.store.request_stop(job_id, StopReason.CANCEL, detail):
            log.info("job %s: cancel requested by %s", job_id, who)
        self.ring()
        return self.get(job_id)
