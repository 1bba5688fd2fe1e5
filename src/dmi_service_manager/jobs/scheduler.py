"""The job engine: admission, start, watching, timeouts, stops, and adoption after a restart.

It runs in exactly one process at a time (see leader.py) and is the only code that starts, stops or
removes the containers of jobs (the GPU inventory runs its own short nvidia-smi helper). What a
container means is its job's workload's business (workload.py); the queue, placement and the
containers' lives are this module's. The database is the truth: every decision is read from it and
written back before the next step, so a server killed at any moment picks up where it was. Labels
tie containers to jobs, and a container's deterministic name stops a step from ever starting twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import GpuUnavailable, RuntimeUnavailable
from ..gpu.nvml import GpuInventory
from ..runtime.base import (
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_STEP,
    Backend,
    CapturedLog,
    ContainerState,
    EventStream,
    StartFailed,
    check_argv,
)
from . import placement
from .launch import stop_failure
from .model import Failure, Job, JobStatus, Kind, StopReason
from .store import Store
from .workload import CannotRun, Ended, KeepGoing, NextStep, StepExit, Workload

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
    # job -> (run that the engine says ended, its end as the engine's event told it, if it did)
    exited: dict[int, tuple[str, ContainerState | None]] = field(default_factory=dict)
    passes: dict[int, int] = field(default_factory=dict)
    engine_lost_at: float | None = None
    outage_windows: list[tuple[float, float]] = field(default_factory=list)
    foreign: list[tuple[str, str]] = field(default_factory=list)  # (container, service) we did not start
    warned_foreign: set[str] = field(default_factory=set)
    reconcile_due: bool = True
    swept: bool = False
    last_reconcile: float = 0.0
    notes_at: float = 0.0


class Scheduler:
    def __init__(
        self,
        config: Config,
        store: Store,
        backend: Backend,
        gpus: GpuInventory,
        instance_id: str,
        workloads: dict[Kind, Workload],
        on_final: Any = None,
    ) -> None:
        self.config = config
        self.store = store
        self.backend = backend
        self.gpus = gpus
        self.instance_id = instance_id
        self.workloads = workloads
        self.on_final = on_final  # called with a job id once the job is final (webhooks)
        self.labels = {LABEL_INSTANCE: instance_id}
        self._flags = _Flags()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dsm-job")
        self._readers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dsm-logs")  # never waits on _pool
        self._events: EventStream | None = None
        self._image_ids: dict[str, tuple[float, str]] = {}

    # -- lifecycle

    def start(self) -> None:
        for target, name in ((self._loop, "dsm-scheduler"), (self._watch_events, "dsm-engine-events")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # a log line only: the store may be what failed
            running = [j.id for j in self.store.active() if j.holds_capacity]
            if running:
                log.info("stopping: the containers of %d running job(s) (%s) keep running; the next start adopts"
                         " them", len(running), ", ".join(map(str, running[:20])))
        self._stop.set()
        self._wake.set()
        if self._events is not None:
            self._events.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._readers.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        self._wake.set()

    @property
    def engine_reachable(self) -> bool:
        return self._flags.engine_lost_at is None

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
                self._engine_lost(str(exc))
            except Exception:
                log.exception("scheduler tick failed; trying again")
                time.sleep(TICK_SECONDS)

    def tick(self) -> None:
        now = time.time()
        jobs = self.store.active()
        holding = [j for j in jobs if j.holds_capacity]
        if not self._flags.swept:  # the first pass after a start: what ended jobs left before a crash
            self._flags.swept = True
            for workload in self.workloads.values():
                self._quietly(workload.sweep, {j.id for j in jobs})
            if holding:
                log.info("adopting %d job(s) that were starting or running before this start (%s)", len(holding),
                         ", ".join(str(j.id) for j in holding[:20]))
        waiting = [j for j in jobs if not j.holds_capacity]
        due = self._flags.reconcile_due or now - self._flags.last_reconcile > RECONCILE_SECONDS
        if due and self.engine_reachable:
            self._reconcile(holding)
        self._finish_exited()
        self._enforce_limits(holding, waiting, now)
        if self.engine_reachable:
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
        demands = []
        for job in waiting:
            if job.kind is Kind.FOURCAT and job.service not in self.config.docker_endpoints:
                self._fail(job, f"The service {job.service!r} is no longer configured on this server.",
                           Failure.CONFIG)
                continue
            demand = placement.demand_of(job, self.config)
            if demand.uses_gpu:
                if not cards and gpu_problem is None:
                    try:
                        cards = [placement.Card.of(c) for c in self.gpus.cards()[0]]
                    except GpuUnavailable as exc:
                        gpu_problem = exc.message
                reason = gpu_problem or placement.never_fits(demand, cards)
                if reason:
                    self._fail(job, f"This job cannot run on this server's GPUs: {reason}.", Failure.CONFIG)
                    continue
                if self.backend.places_gpus:  # the engine queues it for a card (Slurm's GRES), not this server
                    demand = dataclasses.replace(demand, uses_gpu=False)
            demands.append(demand)
        limits = placement.Limits(
            max_jobs=self.config.max_concurrent_jobs,
            per_service={n: s.max_concurrent for n, s in self.config.docker_endpoints.items() if s.max_concurrent},
            max_passes=self.config.queue_max_passes,
        )
        holdings = [placement.Holding.of(j) for j in holding]
        plan = placement.plan(demands, holdings, cards, limits, self._flags.passes, self._foreign_holdings(cards))
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

    def _foreign_holdings(self, cards: list[placement.Card]) -> list[placement.Holding]:
        """What GPU-service containers that this server did not start hold: their service's estimate (or the
        whole card) on the first card, where a CUDA program lands when it sees every card, as the
        original's `--gpus all` let it."""
        if not cards or not self._flags.foreign:
            return []
        first = min(cards, key=lambda c: placement.numeric_id(c.id)).id
        services = self.config.docker_endpoints
        return [placement.Holding(job_id=0, service=service, gpu_ids=(first,), gpu_memory=services[service].gpu_memory)
                for _, service in self._flags.foreign if service in services]

    def _find_foreign(self) -> None:
        """Running containers of GPU services' images that this server did not start (the original's, say)."""
        if not self.config.gpu_enabled:
            return
        services = {n: s for n, s in self.config.docker_endpoints.items() if self.config.service_uses_gpu(n)}
        found = []
        for state in self.backend.running_of_images(sorted({s.image_name for s in services.values()}), self.labels):
            if not state.holds_gpu:  # a CPU job of the image (another server's, say) holds no card
                continue
            # By the name it was made from, else by image id; of several services, the largest estimate.
            matching = [n for n, s in services.items() if s.image_name == state.image] or \
                [n for n, s in services.items() if self._image_id(s.image_name) == state.image_id]
            if not matching:
                continue
            service = max(matching, key=lambda n: services[n].gpu_memory or float("inf"))
            found.append((state.id, service))
            if state.id not in self._flags.warned_foreign:
                self._flags.warned_foreign.add(state.id)
                log.warning("container %s (%s, made from %s) runs on this engine but was not started by this"
                            " server; it is counted as holding %s's GPU memory until it ends", state.name,
                            state.id[:12], state.image or state.image_id[:19], service)
        self._flags.foreign = found

    def _image_id(self, image: str) -> str:
        """The id the image name stands for now; cached briefly, as every job of a service asks."""
        cached = self._image_ids.get(image)
        if cached is None or time.monotonic() - cached[0] > IMAGE_ID_SECONDS:
            cached = (time.monotonic(), self.backend.image_id(image) or "")
            self._image_ids[image] = cached
        return cached[1]

    def _start(self, job: Job, gpu_ids: list[str]) -> None:
        """A claimed job: its workload's preparation, then its first container. In a pool thread."""
        try:
            if job.status == JobStatus.PENDING:  # a running job's start was finished before a crash
                self.workloads[job.kind].prepare(job, self._still_wanted(job.id))
            self._launch(job, gpu_ids)
        except CannotRun as exc:
            log.warning("job %s could not start: %s", job.id, exc.message)
            self._fail(job, exc.message, exc.failure)
        except RuntimeUnavailable as exc:
            if job.status == JobStatus.PENDING:
                self.store.release_claim(job.id)  # back in line; the adoption pass sorts out a half start
            else:
                with self._lock:
                    self._flags.reconcile_due = True
            self._engine_lost(str(exc))
        except Exception as exc:
            log.exception("job %s: unexpected error while starting", job.id)
            self._fail(job, f"The server failed to start this job: {exc}", Failure.START)
        finally:
            self._release(job.id)

    def _still_wanted(self, job_id: int) -> KeepGoing:
        """Whether a job being prepared is still wanted, read from the store at most once a second (a cancel
        may come through any worker process)."""
        checked = [time.monotonic()]

        def still_wanted() -> bool:
            if time.monotonic() - checked[0] < 1.0:
                return True
            checked[0] = time.monotonic()
            current = self.store.get(job_id)
            return current is not None and not current.stop_reason and not current.status.final

        return still_wanted

    def _launch(self, job: Job, gpu_ids: list[str]) -> None:
        """Start the run of the job's current step, never a second one of it."""
        try:
            spec = self.workloads[job.kind].spec(job, gpu_ids)
            too_long = check_argv([*(spec.entrypoint or []), *spec.argv])
            if too_long:
                raise StartFailed(too_long)
            if (spec.gpu_ids or spec.gpus) and (problem := self.backend.gpu_problem()):
                raise StartFailed(problem)
            current = self.store.get(job.id)
            if current is None or current.status.final:
                return
            if current.stop_reason:
                self._fail(current, current.stop_detail or "The job was cancelled before it started.",
                           stop_failure(current))
                return
            launched = self.backend.launch(spec)
            if current.status == JobStatus.PENDING:
                details = job.details_dict()
                details["container"] = {"name": spec.name, "image": spec.image,
                                        "image_id": self._image_id(spec.image), "argv": spec.argv,
                                        "gpu_ids": gpu_ids, "backend": self.backend.name}
                self.store.mark_running(job.id, container_id=launched.run_id, gpu_ids=gpu_ids, details=details)
            else:
                self.store.set_container(job.id, launched.run_id, current.step)
            if launched.started_at is not None:  # else the engine queues it: the reconcile pass records it
                self.store.set_started(job.id, launched.started_at)
            log.info("job %s started: %s %s (step %s) on %s", job.id, self.backend.name, launched.run_id[:12],
                     current.step, gpu_ids or (f"{spec.gpus} GPU(s) of the engine's choice" if spec.gpus else "CPU"))
        except StartFailed as exc:
            log.warning("job %s could not start: %s", job.id, exc)
            if exc.exit_code is None:
                self._fail(job, str(exc), Failure.START)
            else:
                self._command_not_run(job, gpu_ids, str(exc), exc.exit_code)

    def _command_not_run(self, job: Job, gpu_ids: list[str], why: str, exit_code: int) -> None:
        """A command the image does not have (or cannot run) ends its step as `docker run` or a shell
        would end it: with code 127 (126) and the reason on stderr. It is the executor's failure, not the
        server's (TES: EXECUTOR_ERROR), and a TES executor's `ignore_error` passes over it to the next."""
        now = time.time()
        current = self.store.get(job.id)
        if current is None or current.status.final:
            return
        if current.status == JobStatus.PENDING:
            # no container is left: a crash before the end is recorded runs this start again (see _reconcile)
            self.store.mark_running(job.id, container_id=None, gpu_ids=gpu_ids, details=current.details_dict())
            self.store.set_started(job.id, now)
            current = self.store.get(job.id)
            if current is None or current.status != JobStatus.RUNNING:
                return
        state = ContainerState(id="", name="", labels={}, status="exited", exit_code=exit_code, started_at=now,
                               finished_at=now, image_id="", error=why)
        empty, reason = CapturedLog("", False, 0), CapturedLog(why, False, len(why.encode()))
        self._step_over(current, StepExit(state=state, stdout=empty, stderr=reason), None)

    # -- finishing

    def _finish_exited(self) -> None:
        with self._lock:
            ready = {j: c for j, c in self._flags.exited.items() if j not in self._flags.busy}
            for job_id in ready:
                del self._flags.exited[job_id]
                self._flags.busy.add(job_id)
        for job_id, (container_id, ended) in ready.items():
            self._pool.submit(self._finish_task, job_id, container_id, ended)

    def _finish_task(self, job_id: int, container_id: str, ended: ContainerState | None) -> None:
        try:
            self._finish(job_id, container_id, ended=ended)
        except RuntimeUnavailable as exc:
            self._engine_lost(str(exc))
        except Exception:
            log.exception("job %s: could not record its end; will retry", job_id)
            with self._lock:
                self._flags.reconcile_due = True
        finally:
            self._release(job_id)

    def _finish(self, job_id: int, container_id: str, *, ended: ContainerState | None = None,
                outage: bool = False) -> None:
        """Record the end of a job's run. `ended`: the end as the engine's event told it; else inspected."""
        job = self.store.get(job_id)
        if job is None or job.status.final:
            self.backend.remove(container_id)
            return
        if job.container_id != container_id:
            state = ended or self.backend.inspect(container_id)
            if state is not None and int(state.labels.get(LABEL_STEP, job.step)) == job.step:
                # This step's own run, whose start a crash kept from being recorded: never removed (its
                # step would run twice); the reconcile pass adopts it, then its end is recorded.
                with self._lock:
                    self._flags.reconcile_due = True
                return
            self._quietly(self.backend.remove, container_id)  # an earlier step's container, already recorded
            return
        # The container's output is read while its state is asked for (if the event did not tell it): two
        # round trips to the engine cost one. Nearly every container asked about here has ended; a read for
        # one that has not is dropped. (A read after the end waits for the engine's clean-up of the container;
        # following the output from the start does not avoid that: the engine ends the stream no sooner.)
        limit = self.config.log_max_bytes

        def read() -> Future[tuple[CapturedLog, CapturedLog]]:
            return self._readers.submit(self.backend.outputs, container_id, limit)

        asked = time.time()
        outputs = read()
        state = ended or self.backend.inspect(container_id)
        if state is None:
            self._fail(job, "The job's container disappeared (removed outside this server) before its end was"
                       " recorded.", Failure.ENGINE)
            return
        if not state.ended:
            return
        if int(state.labels.get(LABEL_STEP, job.step)) != job.step:
            self.backend.remove(container_id)  # a step already recorded; a crash kept its container
            return
        if state.finished_at is None or asked <= state.finished_at:
            # Its output was asked for before it ended (an `oom` event comes before the exit; the engine's
            # `die` comes once all output is in): what came back may be short. Read again, now that it is over.
            outputs = read()
        stdout, stderr = outputs.result()
        exit = StepExit(state=state, stdout=stdout, stderr=stderr,
                        engine_outage=self.backend.engine if outage or self._in_outage(state.finished_at) else None)
        self._step_over(job, exit, container_id)

    def _step_over(self, job: Job, exit: StepExit, container_id: str | None) -> None:
        """A run ended (its container is `container_id`, or None where none was left): the job's next step,
        or its end."""
        state = exit.state

        def remove() -> None:
            if container_id:
                self.backend.remove(container_id)

        result = self.workloads[job.kind].step_ended(job, exit)
        if isinstance(result, NextStep):
            if job.stop_reason:  # stopped between two steps: the workload says how it ends
                result = self.workloads[job.kind].failed(job, job.stop_detail or "The job was stopped.",
                                                         stop_failure(job))
            else:
                # The log and the next step first, then the old container goes, then the next one starts:
                # a crash anywhere in between resumes at the right step (see _reconcile).
                self.store.advance_step(job.id, result.step, result.task_log)
                remove()
                following = self.store.get(job.id)
                if following is not None and not following.status.final:
                    self._launch(following, list(job.gpu_ids))
                return
        ended_at = max(state.finished_at, job.started_at or 0) if state.finished_at else None  # not the adoption's
        if job.stop_reason:
            # Stopped by us (timeout, cancel): the job says so only once its container is gone, and its message
            # says why (as a job cancelled while it waited), not the last progress it made.
            remove()
            self._end(job, result, message=job.stop_detail, completed_at=ended_at)
        else:
            # Its own exit: record the results first, so a crash in between cannot lose them.
            self._end(job, result, completed_at=ended_at)
            remove()
        log.info("job %s %s (exit code %s)", job.id, result.status.value, state.exit_code)

    def _end(self, job: Job, ended: Ended, message: str | None = None, completed_at: float | None = None) -> None:
        if self.store.finish(job.id, ended.status, ended.results, failure=ended.failure, message=message,
                             task_log=ended.task_log, completed_at=completed_at) and self.on_final is not None:
            try:
                self.on_final(job.id)
            except Exception:
                log.exception("job %s: final-state hook failed", job.id)
        self._quietly(self.workloads[job.kind].cleanup, job)  # only now that the end is on record
        self._wake.set()  # capacity was freed

    def _fail(self, job: Job, message: str, failure: Failure) -> None:
        ended = self.workloads[job.kind].failed(job, message, failure)
        self._end(job, ended, message=message if not job.started_at else None)

    # -- timeouts, cancels, abandoned jobs

    def _enforce_limits(self, holding: list[Job], waiting: list[Job], now: float) -> None:
        abandon_after = self.config.abandon_after_hours
        for job in waiting:
            if job.stop_reason:  # cancelled while waiting, or while a start was under way
                if job.id not in self._flags.busy:
                    self._fail(job, job.stop_detail or "The job was cancelled before it started.",
                               stop_failure(job))
                continue
            if abandon_after and now - (job.last_polled_at or job.created_at) > abandon_after * 3600:
                detail = self._abandon_note(abandon_after)
                log.warning("job %s: %s", job.id, detail)
                self._fail(job, detail, Failure.ABANDONED)
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
            self.backend.stop(container_id, self.config.stop_grace_seconds)
            self._finish(job_id, container_id)
        except RuntimeUnavailable as exc:
            self._engine_lost(str(exc))
        except Exception:
            log.exception("job %s: could not stop its container; will retry", job_id)
        finally:
            self._release(job_id)

    # -- what the engine tells us

    def _watch_events(self) -> None:
        """Follow container events; on every (re)connection, reconcile what happened meanwhile."""
        while not self._stop.is_set():
            try:
                stream = self.backend.events(self.labels)
                self._events = stream
                self._engine_back()
                for event in stream:
                    if event.action not in ("die", "oom"):
                        continue
                    job_id = event.labels.get(LABEL_JOB, "")
                    if job_id.isdigit():
                        with self._lock:
                            self._flags.exited[int(job_id)] = (event.container_id, event.ended)
                        # Straight to a pool thread, not through the next tick: the tick may be busy
                        # admitting, and 4CAT's next poll should already see the end.
                        if self.engine_reachable:
                            self._finish_exited()
                        else:
                            self._wake.set()
                if not self._stop.is_set():
                    self._engine_lost(f"the {self.backend.engine}'s event stream ended")
            except RuntimeUnavailable as exc:
                self._engine_lost(str(exc))
            except Exception as exc:
                self._engine_lost(f"the {self.backend.engine}'s event stream failed: {exc}")
            self._stop.wait(RECONNECT_SECONDS)

    def _engine_lost(self, why: str) -> None:
        with self._lock:
            if self._flags.engine_lost_at is not None:
                return
            self._flags.engine_lost_at = time.time()
            log.error("lost the %s: %s; reconnecting", self.backend.engine, why)
        # Whatever failed, reconnect the event stream: its reconnection is what declares the engine back
        # (and reconciles), so a failed call while the stream looked healthy cannot stall the queue.
        if self._events is not None:
            self._events.close()

    def _engine_back(self) -> None:
        with self._lock:
            lost = self._flags.engine_lost_at
            if lost is not None:
                self._flags.outage_windows.append((lost, time.time()))
                self._flags.outage_windows = self._flags.outage_windows[-20:]
                log.warning("the %s is back after %.1f s; reconciling jobs", self.backend.engine, time.time() - lost)
            self._flags.engine_lost_at = None
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
        self._find_foreign()
        containers: dict[int, list[ContainerState]] = {}
        for state in self.backend.labelled(self.labels):
            label = state.labels.get(LABEL_JOB, "")
            if label.isdigit():
                containers.setdefault(int(label), []).append(state)
        for job in holding:
            with self._lock:
                if job.id in self._flags.busy:
                    continue
            # `holding` was read before the listing: a job whose start or step ended in between may show in
            # the listing as it is now (the next step's container, or none between two) and not as it was
            # read. Such a job waits for the next pass.
            states = containers.pop(job.id, [])
            now = self.store.get(job.id)
            if now is None or _progress(now) != _progress(job):
                continue
            found = None
            for state in states:
                if int(state.labels.get(LABEL_STEP, job.step)) == job.step:
                    found = state
                else:  # a step already recorded, whose removal a crash interrupted
                    self._quietly(self.backend.remove, state.id)
            if found is None:
                if job.status == JobStatus.RUNNING and job.container_id is None and not job.stop_reason:
                    self._submit(self._launch_task, job)  # between two steps: start the next
                elif job.status == JobStatus.RUNNING:
                    if job.stop_reason:  # we removed it after stopping it
                        self._fail(job, job.stop_detail or "The job was stopped.", stop_failure(job))
                    else:
                        self._fail(job, "The job's container vanished before its end was recorded: it was removed"
                                   " outside this server (docker rm), or the engine lost it. Its exit code and"
                                   " output went with it.", Failure.ENGINE)
                else:
                    self.store.release_claim(job.id)  # claimed, never created: start it again
                continue
            if found.status == "created" or job.status != JobStatus.RUNNING or found.id != job.container_id:
                # Made before a crash but maybe never started or recorded: finish that start now, which
                # finds the run by its name and records it (never a second run, and never a second
                # preparation under a run that may be going).
                self._submit(self._launch_task, job)
            elif found.ended:
                with self._lock:  # inspected again when finished: a listing can be a moment old
                    self._flags.exited[job.id] = (found.id, None)
            elif job.started_at is None and found.status == "running":  # a crash came between its start and this
                started = found if found.started_at else self.backend.inspect(found.id)  # a listing may lack it
                if started is not None and started.started_at:
                    self.store.set_started(job.id, started.started_at)
        for job_id, states in containers.items():
            owner = self.store.get(job_id)
            if owner is None or owner.status.final:
                for state in states:
                    self._quietly(self.backend.remove, state.id)
        self._wake.set()

    def _submit(self, task: Any, job: Job, *args: Any) -> None:
        """One task per job at a time: the die event's thread may have taken the job since it was looked at."""
        with self._lock:
            if job.id in self._flags.busy:
                return
            self._flags.busy.add(job.id)
        self._pool.submit(task, job, *args)

    def _launch_task(self, job: Job) -> None:
        try:
            self._launch(job, list(job.gpu_ids))
        except RuntimeUnavailable as exc:
            self._engine_lost(str(exc))
        except Exception:
            log.exception("job %s: could not start its next step; will retry", job.id)
        finally:
            self._release(job.id)

    # -- helpers

    def _release(self, job_id: int) -> None:
        """The job's task is done. A tick now only if its end came meanwhile (capacity freed and starts
        failed wake it themselves; anything else waits for the next tick): every tick reads the queue."""
        with self._lock:
            self._flags.busy.discard(job_id)
            ended_meanwhile = job_id in self._flags.exited
        if ended_meanwhile:
            self._wake.set()

    @staticmethod
    def _quietly(action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:
            log.warning("%s%s failed: %s", getattr(action, "__name__", action), args, exc)


def _progress(job: Job) -> tuple[Any, ...]:
    """What a job's start and steps change: the same in two readings, and nothing of it moved in between."""
    return job.status, job.claimed_at, job.step, job.container_id
