"""Everything one server process holds, built once from the configuration, plus its background work.

Each worker process builds its own context. Background work (the scheduler, sweeping staging files,
retention, webhooks) runs only in the process that holds the scheduler lock.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .access import AccessPolicy
from .config import Config
from .errors import DsmError, RuntimeUnavailable
from .files.retention import sweep_expired
from .files.storage import Storage
from .gpu.nvml import GpuInventory
from .jobs.leader import Doorbell, Leadership
from .jobs.scheduler import Scheduler
from .jobs.service import JobService
from .jobs.store import Store
from .jobs.webhooks import Webhooks
from .runtime.docker import DockerRuntime

log = logging.getLogger(__name__)

LEADER_RETRY_SECONDS = 1.0
HOUSEKEEPING_SECONDS = 3600.0


@dataclass
class AppContext:
    config: Config
    port: int
    store: Store
    runtime: DockerRuntime
    gpus: GpuInventory
    jobs: JobService
    storage: Storage | None
    policy: AccessPolicy
    instance_id: str
    server_url: str
    doorbell: Doorbell
    leadership: Leadership
    webhooks: Webhooks
    scheduler: Scheduler | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, config: Config, port: int) -> AppContext:
        store = Store(config.database_file)
        for note in store.migrate():
            log.warning(note)
        instance_id = store.instance_id()
        runtime = DockerRuntime(config.docker_host)
        gpus = GpuInventory(config, runtime)
        doorbell = Doorbell(instance_id, config.database_file)
        storage = Storage(config.upload_folder_path, fsync=config.upload_fsync) if config.upload_folder_path else None
        return cls(
            config=config,
            port=port,
            store=store,
            runtime=runtime,
            gpus=gpus,
            jobs=JobService(config, store, gpus, doorbell.ring),
            storage=storage,
            policy=AccessPolicy(config.ip_whitelist, config.trusted_proxies),
            instance_id=instance_id,
            server_url=config.server_url(port),
            doorbell=doorbell,
            leadership=Leadership(Path(f"{config.database_file}.scheduler.lock")),
            webhooks=Webhooks(config, store),
        )

    # -- background work

    def start_background(self) -> None:
        threading.Thread(target=self._seek_leadership, name="dsm-leadership", daemon=True).start()

    def stop_background(self) -> None:
        self._stop.set()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.leadership.release()

    def _seek_leadership(self) -> None:
        while not self._stop.is_set():
            if self.leadership.try_acquire():
                self._lead()
                return
            self._stop.wait(LEADER_RETRY_SECONDS)

    def _lead(self) -> None:
        log.info("this process (instance %s) runs the scheduler", self.instance_id)
        if self.storage is not None:
            swept = self.storage.sweep_staging()
            if swept:
                log.warning("removed %d half-written upload(s) left by a process that died", swept)
        self.scheduler = Scheduler(self.config, self.store, self.runtime, self.gpus, self.instance_id,
                                   self.server_url, on_final=self.webhooks.job_final)
        self.scheduler.start()
        threading.Thread(target=self.doorbell.listen, args=(self.scheduler.wake, self._stop),
                         name="dsm-doorbell", daemon=True).start()
        self.webhooks.start(self._stop)
        while self.storage is not None and self.config.retention_days:
            try:
                sweep_expired(self.storage, self.store, self.config)
            except (DsmError, OSError) as exc:
                log.error("retention sweep failed: %s", exc)
            if self._stop.wait(HOUSEKEEPING_SECONDS):
                return

    def docker_state(self) -> tuple[bool, str]:
        try:
            self.runtime.ping()
        except RuntimeUnavailable as exc:
            return False, exc.message
        return True, "reachable"
