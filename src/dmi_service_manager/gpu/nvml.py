"""GPU inventory and free memory: NVML on the host, a declared list, or nvidia-smi in a container.

Sources, in order: GPU_INVENTORY from the config (hosts without NVML, and tests); NVML through
nvidia-ml-py; and, where NVML is missing but Docker can hand out GPUs, `nvidia-smi` run in a short
container with the GPUs attached. Readings are cached for a few seconds, because 4CAT waits at most
30 s for an answer and a container start costs about a second.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..config import Config
from ..errors import GpuUnavailable, RuntimeUnavailable
from ..runtime.base import ContainerSpec, StartFailed
from ..runtime.docker import DockerBackend

log = logging.getLogger(__name__)

CACHE_SECONDS = 3.0
NVIDIA_SMI_TIMEOUT = 20.0
NVML_RETRY_SECONDS = 60.0
_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuCard:
    id: str
    name: str
    total: int
    free: int | None  # None where nothing measures it (a declared card)
    uuid: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "uuid": self.uuid, "gpu_total_mem": self.total,
                "gpu_free_mem": self.free}


class _Nvml:
    """nvidia-ml-py, initialised once per process; remembers why it failed instead of retrying hot."""

    def __init__(self) -> None:
        self._ready = False
        self._failed_at = 0.0
        self.error: str | None = None
        self._lock = threading.Lock()

    def read(self) -> list[GpuCard] | None:
        with self._lock:
            if not self._ready and time.monotonic() - self._failed_at < NVML_RETRY_SECONDS and self._failed_at:
                return None
            try:
                import pynvml

                if not self._ready:
                    pynvml.nvmlInit()
                    self._ready = True
                cards = []
                for index in range(pynvml.nvmlDeviceGetCount()):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                    name = pynvml.nvmlDeviceGetName(handle)
                    uuid = pynvml.nvmlDeviceGetUUID(handle)
                    cards.append(GpuCard(
                        id=str(index),
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        total=int(memory.total),
                        free=int(memory.free),
                        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    ))
                self.error = None
                return cards
            except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
                self._ready = False
                self._failed_at = time.monotonic()
                self.error = f"NVML is not available on this host ({exc})"
                return None


def parse_nvidia_smi(output: str) -> list[GpuCard]:
    """Lines of `index, uuid, name, memory.total, memory.free` (MiB, no units)."""
    cards = []
    for line in output.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue
        index, uuid, name, total, free = fields
        try:
            cards.append(GpuCard(id=index, uuid=uuid, name=name, total=int(float(total)) * _MIB,
                                 free=int(float(free)) * _MIB))
        except ValueError:
            continue
    return cards


class GpuInventory:
    """The cards jobs can get. With a local engine, this host's (`docker` is where nvidia-smi may run); with
    an engine that places GPUs itself (Slurm), only what GPU_INVENTORY declares for the cluster."""

    def __init__(self, config: Config, docker: DockerBackend | None) -> None:
        self.config = config
        self.docker = docker
        self._nvml = _Nvml()
        self._cache: tuple[float, list[GpuCard] | GpuUnavailable, str] | None = None
        self._lock = threading.Lock()

    def cards(self, image: str | None = None) -> tuple[list[GpuCard], str]:
        """(cards, source). Raises GpuUnavailable saying why when no source answers."""
        if self.config.gpu_inventory is not None:
            return [GpuCard(id=c.id, name=c.name, total=c.memory, free=None) for c in self.config.gpu_inventory], (
                "declared"
            )
        if self.docker is None:
            raise GpuUnavailable("the cluster's GPUs are not declared: set GPU_INVENTORY to the cards a job can get")
        with self._lock:
            if self._cache and time.monotonic() - self._cache[0] < CACHE_SECONDS:
                if isinstance(self._cache[1], GpuUnavailable):
                    raise self._cache[1]
                return self._cache[1], self._cache[2]
            found = self._nvml.read()
            source = "nvml"
            if found is None:
                source = "nvidia-smi"
                try:
                    found = self._nvidia_smi(image)
                except GpuUnavailable as exc:  # remembered too: each try starts a container
                    self._cache = (time.monotonic(), exc, source)
                    raise
            self._cache = (time.monotonic(), found, source)
            return found, source

    def _nvidia_smi(self, image: str | None) -> list[GpuCard]:
        reasons = [self._nvml.error or "NVML is not available"]
        image = image or self._any_gpu_image()
        if image is None:
            raise GpuUnavailable("; ".join([*reasons, "no GPU service image to run nvidia-smi in"]))
        # nvidia-smi is put into any container by the NVIDIA runtime, whatever the image holds.
        spec = ContainerSpec(
            name="",
            image=image,
            entrypoint=["nvidia-smi"],
            argv=["--query-gpu=index,uuid,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            labels={"dmi-service-manager.helper": "nvidia-smi"},
            network="none",
            gpu_ids=["all"],
        )
        try:
            assert self.docker is not None
            code, output = self.docker.run_to_completion(spec, NVIDIA_SMI_TIMEOUT)
        except (StartFailed, RuntimeUnavailable) as exc:
            raise GpuUnavailable("; ".join([*reasons, f"nvidia-smi in a container failed: {exc}"])) from None
        if code != 0:
            raise GpuUnavailable("; ".join([*reasons, f"nvidia-smi exited with {code}: {output.strip()[:300]}"]))
        cards = parse_nvidia_smi(output)
        if not cards:
            raise GpuUnavailable("; ".join([*reasons, "nvidia-smi listed no GPU"]))
        return cards

    def _any_gpu_image(self) -> str | None:
        for name, service in self.config.docker_endpoints.items():
            if self.config.service_uses_gpu(name):
                return service.image_name
        return None
