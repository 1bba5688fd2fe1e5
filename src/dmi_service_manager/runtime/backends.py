"""The backend a configuration asks for (BACKEND): the one place that chooses an engine."""

from __future__ import annotations

from ..config import Config
from .base import Backend
from .docker import DockerBackend
from .slurm import SlurmBackend


def make_backend(config: Config, *, timeout: float = 60) -> Backend:
    if config.backend == "slurm":
        return SlurmBackend(config)
    return DockerBackend(config.docker_host, timeout=timeout, gpu_mode=config.gpu_device_mode)
