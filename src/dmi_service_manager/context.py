"""Everything one server process holds, built once from the configuration, plus its background work.

Each worker process builds its own context. Background work (the scheduler, sweeping staging files,
retention, webhooks) runs only in the process that holds the scheduler lock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from .access import AccessPolicy
from .config import Config
from .errors import DsmError
from .files.retention import sweep_expired
from .files.service import FileService
from .gpu.nvml import GpuInventory
from .health import Health
from .jobs.launch import FourCatWorkload
from .jobs.leader import Doorbell, Leadership
from .jobs.model import Kind
from .jobs.scheduler import Scheduler
from .jobs.service import JobService
from .jobs.store import Store
from .jobs.webhooks import Webhooks
from .jobs.workload import Workload
from .runtime.backends import make_backend
from .runtime.base import Backend
from .runtime.docker import DockerBackend
from .tes.service import TesService
from .tes.workload import TesWorkload
from .tokens import Tokens

log = logging.getLogger(__name__)

LEADER_RETRY_SECONDS = 1.0
HOUSEKEEPING_SECONDS = 3600.0
STAGING_SWEEP_SECONDS = 10.0


@dataclass
class AppContext:
    config: Config
    port: int
    store: Store
    backend: Backend
    gpus: GpuInventory
    workloads: dict[Kind, Workload]
    jobs: JobService
    files: FileService
    health: Health
    tes: TesService
    tokens: Tokens
    policy: AccessPolicy
    instance_id: str
    doorbell: Doorbell
    leadership: Leadership
    webhooks: Webhooks
    scheduler: Scheduler | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _stop_seeking: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, config: Config, port: int) -> AppContext:
        store = Store(config.database_file)
        for note in store.migrate():
            log.warning(note)
        instance_id = store.instance_id()
        backend = make_backend(config)
        gpus = GpuInventory(config, backend if isinstance(backend, DockerBackend) else None)
        doorbell = Doorbell(instance_id, config.database_file)
        leadership = Leadership.of(config.database_file)
        workloads: dict[Kind, Workload] = {
            Kind.FOURCAT: FourCatWorkload(config, instance_id, config.server_url(port)),
            Kind.TES: TesWorkload(config, instance_id),
        }
        jobs = JobService(config, store, gpus, backend, workloads, doorbell.ring)
        files = FileService(config.upload_folder_path, fsync=config.upload_fsync,
                            allowed_extensions=config.allowed_extensions, max_upload_bytes=config.max_upload_bytes,
                            in_use=jobs.collections_in_use)
        context = cls(
            config=config,
            port=port,
            store=store,
            backend=backend,
            gpus=gpus,
            workloads=workloads,
            jobs=jobs,
            files=files,
            health=Health(config, jobs, backend, gpus, instance_id, leadership.holder_pid, lambda: False),
            tes=TesService(config, jobs, store, instance_id),
            tokens=Tokens(store),
            policy=AccessPolicy(config.ip_whitelist, config.trusted_proxies),
            instance_id=instance_id,
            doorbell=doorbell,
            leadership=leadership,
            webhooks=Webhooks(config, store),
        )
        context.health.scheduler_here = lambda: context.scheduler is not None
        return context

    # -- background work

    def start_background(self) -> None:
        threading.Thread(target=self._seek_leadership, name="dsm-leadership", daemon=True).start()

    def stop_seeking(self) -> None:
        """This process is stopping: it no longer offers to run the scheduler (it keeps it, if it runs it)."""
        self._stop_seeking.set()

    def stop_background(self) -> None:
        self._stop.set()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.leadership.release()

    def _seek_leadership(self) -> None:
        warned = 0.0
        while not self._stop.is_set() and not self._stop_seeking.is_set():
            if self.leadership.try_acquire():
                if self.doorbell.claim():
                    self._lead()
                    return
                self.leadership.release()
                if time.monotonic() - warned > 60:
                    warned = time.monotonic()
                    log.warning("another process runs the scheduler for this database, though the lock file %s"
                                " was free (removed while it ran?); this one waits until that one is gone",
                                self.leadership.lock_path)
            self._stop.wait(LEADER_RETRY_SECONDS)

    def _lead(self) -> None:
        log.info("this process (instance %s) runs the scheduler", self.instance_id)
        self._sweep_staging()
        self.scheduler = Scheduler(self.config, self.store, self.backend, self.gpus, self.instance_id,
                                   self.workloads, on_final=self.webhooks.job_final)
        self.scheduler.start()
        threading.Thread(target=self.doorbell.listen, args=(self.scheduler.wake, self._stop),
                         name="dsm-doorbell", daemon=True).start()
        self.webhooks.start(self._stop)
        last_retention = -HOUSEKEEPING_SECONDS
        while True:
            if self.files.configured and self.config.retention_days and \
                    time.monotonic() - last_retention > HOUSEKEEPING_SECONDS:
                last_retention = time.monotonic()
                try:
                    sweep_expired(self.files.storage, self.config.retention_days, self.jobs.collections_in_use)
                except (DsmError, OSError) as exc:
                    log.error("retention sweep failed: %s", exc)
                except Exception:  # whatever a job made of the folder, housekeeping goes on
                    log.exception("retention sweep failed")
            if self._stop.wait(STAGING_SWEEP_SECONDS):
                return
            # Again soon after taking over: the workers of a killed server die a moment after it, and the
            # staging they leave can only be swept once they are gone.
            self._sweep_staging()

    def _sweep_staging(self) -> None:
        """The staging of the upload folder, and of the TES file roots that task outputs are copied into."""
        storages = [self.files.storage] if self.files.configured else []
        if self.config.tes_enabled:
            storages += self.tes.roots.storages
        for storage in storages:
            try:
                swept = storage.sweep_staging()
            except OSError as exc:
                log.error("sweeping the staging folder in %s failed: %s", storage.root, exc)
                continue
            except Exception:  # whatever a job made of the folder, housekeeping goes on
                log.exception("sweeping the staging folder in %s failed", storage.root)
                continue
            if swept:
                log.warning("removed %d half-written file(s) in %s left by a process that died", swept,
                            storage.root)
