"""The job engine: admission, start, watching, timeouts, stops, and adoption after a restart.

It runs in exactly one process at a time (see leader.py) and is the only code that starts, stops or
removes containers. The database is the truth: every decision is read from it and written back
before the next step, so a server killed at any moment picks up where it was. Docker's labels tie
containers to jobs, and a container's deterministic name stops a job from ever starting twice.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import GpuUnavailable, RuntimeUnavailable
from ..gpu.nvml import GpuInventory
from ..runtime.base import (
    LABEL_INSTANCE,
    LABEL_JOB,
    ContainerExists,
    ContainerState,
    EventStream,
    Runtime,
    StartFailed,
)
from . import placement
from .launch import check_argv, container_spec, outcome
from .model import Job, JobStatus, StopReason, error_results
from .store import Store

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
RECONCILE_SECONDS = 5.0
RECONNECT_SECONDS = 1.0
NOTES_SECONDS = 1.0
IMAGE_ID_SECONDS = 10.0


@dataclass
class _Flags:
    """What the scheduler knows beyond the database; all of it may be lost on a restart."""

    busy: set[int] = field(default_factory=set)  # jobs with a start, stop or finish in flight
    exited: dict[int, str] = field(default_factory=dict)  # job -> container that Docker says died
    passes: dict[int, int] = field(default_factory=dict)
    docker_lost_at: float | None = None
    outage_windows: list[tuple[float, float]] = field(default_factory=list)
    reconcile_due: bool = True
    last_reconcile: float = 0.0
    notes_at: float = 0.0


class Scheduler:
    def __init__(
        self,
        config: Config,
        store: Store,
        runtime: Runtime,
        gpus: GpuInventory,
        instance_id: str,
        server_url: str,
        on_final: Any = None,
    ) -> None:
        self.config = config
        self.store = store
        self.runtime = runtime
        self.gpus = gpus
        self.instance_id = instance_id
        self.server_url = server_url
        self.on_final = on_final  # called with a job id once the job is final (webhooks)
        self.labels = {LABEL_INSTANCE: instance_id}
        self._flags = _Flags()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dsm-job")
        self._events: EventStream | None = None
        self._gpu_runtime: tuple[float, str | None] | None = None
        self._image_ids: dict[str, tuple[float, str]] = {}

    # -- lifecycle

    def start(self) -> None:
        for target, name in ((self._loop, "dsm-scheduler"), (self._watch_events, "dsm-docker-events")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._events is not None:
            self._events.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def docker_reachable(self) -> bool:
        return self._flags.docker_lost_at is None

    # -- the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except RuntimeUnavailable as exc:
                self._docker_lost(str(exc))
            except Exception:
                log.exception("scheduler tick failed; trying again")
                time.sleep(TICK_SECONDS)

    def tick(self) -> None:
        now = time.time()
        jobs = self.store.active()
        holding = [j for j in jobs if j.holds_capacity]
        waiting = [j for j in jobs if not j.holds_capacity]
        due = self._flags.reconcile_due or now - self._flags.last_reconcile > RECONCILE_SECONDS
        if due and self.docker_reachable:
            self._reconcile(holding)
        self._finish_exited()
        self._enforce_limits(holding, waiting, now)
        if self.docker_reachable:
            self._admit([j for j in waiting if j.stop_reason is None], holding)

    # -- starting

    def _admit(self, waiting: list[Job], holding: list[Job]) -> None:
        if not waiting:
            self._flags.passes.clear()
            return
        full = len(holding) >= self.config.max_concurrent_jobs
        if full and time.monotonic() - self._flags.notes_at < NOTES_SECONDS:
            return  # nothing can start; the queue notes are refreshed once a second below
        cards: list[placement.Card] = []
        gpu_problem = None
        if any(self._uses_gpu(j) for j in waiting):
            try:
                found, _ = self.gpus.cards()
                cards = [placement.Card(id=c.id, total=c.total, free=c.free) for c in found]
            except GpuUnavailable as exc:
                gpu_problem = exc.message
        demands = []
        for job in waiting:
            if job.service not in self.config.docker_endpoints:
                self._fail(job, f"The service {job.service!r} is no longer configured on this server.")
                continue
            demand = self._demand(job)
            if demand.uses_gpu:
                reason = gpu_problem or placement.never_fits(demand, cards)
                if reason:
                    self._fail(job, f"This job cannot run on this server's GPUs: {reason}.")
                    continue
            demands.append(demand)
        limits = placement.Limits(
            max_jobs=self.config.max_concurrent_jobs,
            per_service={n: s.max_concurrent for n, s in self.config.docker_endpoints.items() if s.max_concurrent},
            max_passes=self.config.queue_max_passes,
        )
        holdings = [placement.Holding.of(j) for j in holding]
        plan = placement.plan(demands, holdings, cards, limits, self._flags.passes)
        self._flags.passes = {k: v for k, v in plan.passes.items() if k in plan.waiting}
        by_id = {j.id: j for j in waiting}
        for demand, gpu_ids in plan.start:
            job = by_id[demand.job_id]
            with self._lock:
                if job.id in self._flags.busy:
                    continue
                if not self.store.claim(job.id, gpu_ids):
                    continue
                self._flags.busy.add(job.id)
            self._pool.submit(self._start, job, gpu_ids)
        # Every start moves everyone up a place; rewriting each waiting job's note every time would cost
        # more than the starts, so notes change at most once a second (new arrivals get theirs at once).
        refresh = time.monotonic() - self._flags.notes_at >= NOTES_SECONDS
        order = [d.job_id for d in demands if d.job_id in plan.waiting]
        notes = {}
        for position, job_id in enumerate(order, start=1):
            note = f"Waiting in line: {position} of {len(order)}; {plan.waiting[job_id]}."
            if by_id[job_id].message != note and (refresh or by_id[job_id].message is None):
                notes[job_id] = note
        if refresh:
            self._flags.notes_at = time.monotonic()
        self.store.set_queue_messages(notes)

    def _uses_gpu(self, job: Job) -> bool:
        return job.service in self.config.docker_endpoints and self.config.service_uses_gpu(job.service or "")

    def _demand(self, job: Job) -> placement.Demand:
        service = self.config.docker_endpoints[job.service or ""]
        return placement.Demand(
            job_id=job.id,
            service=job.service or "",
            uses_gpu=self._uses_gpu(job),
            gpus=service.gpus,
            gpu_memory=job.gpu_memory if job.gpu_memory is not None else service.gpu_memory,
        )

    def _image_id(self, image: str) -> str:
        """The id the image name stands for now; cached briefly, as every job of a service asks."""
        cached = self._image_ids.get(image)
        if cached is None or time.monotonic() - cached[0] > IMAGE_ID_SECONDS:
            cached = (time.monotonic(), self.runtime.image_id(image) or "")
            self._image_ids[image] = cached
        return cached[1]

    def _has_gpu_runtime(self) -> str | None:
        if self._gpu_runtime is None or time.monotonic() - self._gpu_runtime[0] > 60:
            self._gpu_runtime = (time.monotonic(), self.runtime.gpu_runtime())
        return self._gpu_runtime[1]

    def _start(self, job: Job, gpu_ids: list[str]) -> None:
        container_id: str | None = None
        try:
            spec = container_spec(job, self.config, self.instance_id, self.server_url, gpu_ids)
            too_long = check_argv(spec.argv)
            if too_long:
                raise StartFailed(too_long)
            if gpu_ids and self.config.gpu_device_mode == "device_requests" and not self._has_gpu_runtime():
                raise StartFailed(
                    "GPU_ENABLED is set but Docker on this server has no GPU runtime (install and configure"
                    " nvidia-container-toolkit), so this GPU service cannot run. Set gpu: false on the service"
                    " to run it on the CPU."
                )
            try:
                container_id = self.runtime.create(spec)
                fresh = True
            except ContainerExists:  # made before a crash: finish that start, never make a second one
                existing = self.runtime.inspect(spec.name)
                if existing is None:
                    raise StartFailed("The job's container vanished while it was being started.") from None
                container_id, fresh = existing.id, existing.status == "created"
            current = self.store.get(job.id)
            if current is None or current.stop_reason or current.status.final:
                self.runtime.remove(container_id)
                if current is not None:
                    self._fail(current, current.stop_detail or "The job was cancelled before it started.")
                return
            details = job.details_dict()
            details["container"] = {"name": spec.name, "image": spec.image, "image_id": self._image_id(spec.image),
                                    "argv": spec.argv, "gpu_ids": gpu_ids}
            self.store.mark_running(job.id, container_id=container_id, gpu_ids=gpu_ids, details=details)
            if fresh:
                self.runtime.start(container_id, spec)
                started = time.time()
            else:
                state = self.runtime.inspect(container_id)
                started = state.started_at if state and state.started_at else time.time()
            self.store.set_started(job.id, started)
            log.info("job %s started: container %s on %s", job.id, container_id[:12], gpu_ids or "CPU")
        except StartFailed as exc:
            log.warning("job %s could not start: %s", job.id, exc)
            if container_id is not None:
                self._quietly(self.runtime.remove, container_id)
            self._end(job.id, JobStatus.ERROR, error_results(str(exc)), message=str(exc))
        except RuntimeUnavailable as exc:
            self.store.release_claim(job.id)  # back in line; the adoption pass sorts out a half start
            self._docker_lost(str(exc))
        except Exception as exc:
            log.exception("job %s: unexpected error while starting", job.id)
            self._end(job.id, JobStatus.ERROR, error_results(f"The server failed to start this job: {exc}"))
        finally:
            self._release(job.id)

    # -- finishing

    def _finish_exited(self) -> None:
        with self._lock:
            ready = {j: c for j, c in self._flags.exited.items() if j not in self._flags.busy}
            for job_id in ready:
                del self._flags.exited[job_id]
                self._flags.busy.add(job_id)
        for job_id, container_id in ready.items():
            self._pool.submit(self._finish_task, job_id, container_id)

    def _finish_task(self, job_id: int, container_id: str) -> None:
        try:
            self._finish(job_id, container_id)
        except RuntimeUnavailable as exc:
            self._docker_lost(str(exc))
        except Exception:
            log.exception("job %s: could not record its end; will retry", job_id)
            with self._lock:
                self._flags.reconcile_due = True
        finally:
            self._release(job_id)

    def _finish(self, job_id: int, container_id: str, *, outage: bool = False) -> None:
        job = self.store.get(job_id)
        if job is None or job.status.final:
            self.runtime.remove(container_id)
            return
        state = self.runtime.inspect(container_id)
        if state is None:
            self._end(job_id, JobStatus.ERROR, error_results(
                "The job's container disappeared (removed outside this server) before its end was recorded."
            ))
            return
        if not state.ended:
            return
        outage = outage or self._in_outage(state.finished_at)
        limit = self.config.log_max_bytes
        stdout = self.runtime.logs(container_id, "stdout", limit)
        stderr = self.runtime.logs(container_id, "stderr", limit)
        result = outcome(job, state, stdout, stderr, docker_outage=outage)
        if job.stop_reason:
            # Stopped by us (timeout, cancel): the job says so only once its container is gone.
            self.runtime.remove(container_id)
            self._end(job_id, result.status, result.results)
        else:
            # Its own exit: record the results first, so a crash in between cannot lose them.
            self._end(job_id, result.status, result.results)
            self.runtime.remove(container_id)
        log.info("job %s %s (exit code %s)", job_id, result.status.value, state.exit_code)

    def _end(self, job_id: int, status: JobStatus, results: dict[str, Any], message: str | None = None) -> None:
        if self.store.finish(job_id, status, results, message=message) and self.on_final is not None:
            try:
                self.on_final(job_id)
            except Exception:
                log.exception("job %s: final-state hook failed", job_id)
        self._wake.set()  # capacity was freed

    def _fail(self, job: Job, message: str) -> None:
        self._end(job.id, JobStatus.ERROR, error_results(message), message=message if not job.started_at else None)

    # -- timeouts, cancels, abandoned jobs

    def _enforce_limits(self, holding: list[Job], waiting: list[Job], now: float) -> None:
        abandon_after = self.config.abandon_after_hours
        for job in waiting:
            if job.stop_reason:  # cancelled while waiting, or while a start was under way
                if job.id not in self._flags.busy:
                    self._fail(job, job.stop_detail or "The job was cancelled before it started.")
                continue
            if abandon_after and now - (job.last_polled_at or job.created_at) > abandon_after * 3600:
                detail = self._abandon_note(abandon_after)
                log.warning("job %s: %s", job.id, detail)
                self._fail(job, detail)
        for job in holding:
            if job.status != JobStatus.RUNNING or job.container_id is None:
                continue
            if job.stop_reason is None:
                if job.started_at and job.timeout and now - job.started_at > job.timeout:
                    detail = (f"The job timed out: it ran for more than {job.timeout:g} s, so its container was"
                              " stopped.")
                    self.store.request_stop(job.id, StopReason.TIMEOUT, detail)
                elif abandon_after and now - (job.last_polled_at or job.created_at) > abandon_after * 3600:
                    detail = self._abandon_note(abandon_after)
                    log.warning("job %s: %s", job.id, detail)
                    self.store.request_stop(job.id, StopReason.ABANDONED, detail)
                else:
                    continue
            with self._lock:
                if job.id in self._flags.busy:
                    continue
                self._flags.busy.add(job.id)
            self._pool.submit(self._stop_task, job.id, job.container_id)

    @staticmethod
    def _abandon_note(hours: float) -> str:
        return (f"Nobody asked about this job for {hours:g} hours (ABANDON_AFTER_HOURS), so the server"
                " cancelled it as abandoned.")

    def _stop_task(self, job_id: int, container_id: str) -> None:
        try:
            log.info("job %s: stopping container %s", job_id, container_id[:12])
            self.runtime.stop(container_id, self.config.stop_grace_seconds)
            self._finish(job_id, container_id)
        except RuntimeUnavailable as exc:
            self._docker_lost(str(exc))
        except Exception:
            log.exception("job %s: could not stop its container; will retry", job_id)
        finally:
            self._release(job_id)

    # -- what Docker tells us

    def _watch_events(self) -> None:
        """Follow container events; on every (re)connection, reconcile what happened meanwhile."""
        while not self._stop.is_set():
            try:
                stream = self.runtime.events(self.labels)
                self._events = stream
                self._docker_back()
                for event in stream:
                    if event.action not in ("die", "oom", "destroy"):
                        continue
                    job_id = event.labels.get(LABEL_JOB, "")
                    if job_id.isdigit():
                        with self._lock:
                            self._flags.exited[int(job_id)] = event.container_id
                        self._wake.set()
                if not self._stop.is_set():
                    self._docker_lost("the Docker event stream ended")
            except RuntimeUnavailable as exc:
                self._docker_lost(str(exc))
            except Exception as exc:
                self._docker_lost(f"the Docker event stream failed: {exc}")
            self._stop.wait(RECONNECT_SECONDS)

    def _docker_lost(self, why: str) -> None:
        with self._lock:
            if self._flags.docker_lost_at is not None:
                return
            self._flags.docker_lost_at = time.time()
            log.error("lost the Docker engine: %s; reconnecting", why)
        # Whatever failed, reconnect the event stream: its reconnection is what declares Docker back
        # (and reconciles), so a failed call while the stream looked healthy cannot stall the queue.
        if self._events is not None:
            self._events.close()

    def _docker_back(self) -> None:
        with self._lock:
            lost = self._flags.docker_lost_at
            if lost is not None:
                self._flags.outage_windows.append((lost, time.time()))
                self._flags.outage_windows = self._flags.outage_windows[-20:]
                log.warning("the Docker engine is back after %.1f s; reconciling jobs", time.time() - lost)
            self._flags.docker_lost_at = None
            self._flags.reconcile_due = True
            self._gpu_runtime = None
        self._wake.set()

    def _in_outage(self, finished_at: float | None) -> bool:
        if finished_at is None:
            return False
        return any(start - 2 <= finished_at <= end + 2 for start, end in self._flags.outage_windows)

    def _reconcile(self, holding: list[Job]) -> None:
        """Compare running jobs with their containers: adopt, record ends missed, end the vanished.

        This is also the adoption pass after a restart: it runs before the first admission.
        """
        self._flags.reconcile_due = False
        self._flags.last_reconcile = time.time()
        containers: dict[int, ContainerState] = {}
        for state in self.runtime.list(self.labels):
            label = state.labels.get(LABEL_JOB, "")
            if label.isdigit():
                containers[int(label)] = state
        for job in holding:
            with self._lock:
                if job.id in self._flags.busy:
                    continue
            found = containers.pop(job.id, None)
            if found is None:
                if job.status == JobStatus.RUNNING:
                    why = (
                        (job.stop_detail or "The job was stopped.")  # we removed it after stopping it
                        if job.stop_reason
                        else "The job's container vanished (it was removed, or Docker lost it) while this server"
                        " was not watching; its results are unknown."
                    )
                    self._end(job.id, JobStatus.ERROR, error_results(why))
                else:
                    self.store.release_claim(job.id)  # claimed, never created: start it again
                continue
            if found.status == "created" or job.status != JobStatus.RUNNING:
                # Created before a crash but maybe never started: finish that start now, never a second one.
                with self._lock:
                    self._flags.busy.add(job.id)
                self._pool.submit(self._start, job, list(job.gpu_ids))
            elif found.ended:
                with self._lock:
                    self._flags.exited[job.id] = found.id
            elif job.started_at is None and found.started_at:
                self.store.set_started(job.id, found.started_at)
        for job_id, state in containers.items():
            owner = self.store.get(job_id)
            if owner is None or owner.status.final:
                self._quietly(self.runtime.remove, state.id)
        self._wake.set()

    # -- helpers

    def _release(self, job_id: int) -> None:
        with self._lock:
            self._flags.busy.discard(job_id)
        self._wake.set()

    @staticmethod
    def _quietly(action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:
            log.warning("%s%s failed: %s", getattr(action, "__name__", action), args, exc)
