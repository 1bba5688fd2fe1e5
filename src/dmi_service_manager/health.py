"""Is everything this server needs working? One report, for `/api/health` and the dashboard."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import GpuUnavailable, RuntimeUnavailable
from .gpu.nvml import GpuInventory
from .jobs.service import JobService
from .runtime.base import Backend


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    body: dict[str, Any]


class Health:
    def __init__(self, config: Config, jobs: JobService, runtime: Backend, gpus: GpuInventory, instance_id: str,
                 scheduler_pid: Callable[[], int | None], scheduler_here: Callable[[], bool]) -> None:
        self.config = config
        self.jobs = jobs
        self.runtime = runtime
        self.gpus = gpus
        self.instance_id = instance_id
        self.scheduler_pid = scheduler_pid
        self.scheduler_here = scheduler_here

    def status(self) -> HealthReport:
        problems: list[str] = []
        try:
            self.runtime.ping()
            engine = {"ok": True, "note": "reachable"}
        except RuntimeUnavailable as exc:
            engine = {"ok": False, "note": exc.message}
            problems.append(f"{self.runtime.engine}: {exc.message}")
        engine["backend"] = self.runtime.name
        try:
            database: dict[str, Any] = {"ok": True, "path": str(self.config.database_file),
                                        "jobs": self.jobs.counts()}
        except Exception as exc:  # any failure of the database is what this report is for
            problems.append(f"database: {exc}")
            database = {"ok": False, "error": str(exc)}
        gpu: dict[str, Any] = {"enabled": self.config.gpu_enabled}
        if self.config.gpu_enabled:
            try:
                cards, source = self.gpus.cards()
                gpu.update(ok=True, source=source, cards=[c.as_dict() for c in cards])
            except GpuUnavailable as exc:
                gpu.update(ok=False, error=exc.message)
                problems.append(f"GPU: {exc.message}")
        body: dict[str, Any] = {
            "status": "ok" if not problems else "error",
            "message": "all is well" if not problems else "; ".join(problems),
            "instance": self.instance_id,
            "engine": engine,
            "docker": engine,  # the key of earlier versions, kept for monitoring that reads it
            "database": database,
            "gpu": gpu,
            "scheduler": {"pid": self.scheduler_pid(), "here": self.scheduler_here()},
        }
        if problems:
            body["reason"] = body["message"]
        return HealthReport(ok=not problems, body=body)
