"""Start-up checks of a configuration against its engine (Docker or Slurm): warnings, never a refusal to start."""

from __future__ import annotations

from .config import Config
from .errors import RuntimeUnavailable
from .runtime.base import Backend


def engine_warnings(config: Config, runtime: Backend) -> list[str]:
    try:
        runtime.ping()
    except RuntimeUnavailable as exc:
        return [f"{runtime.engine}: {exc.message}. Jobs wait in the queue until it answers."]
    warnings = []
    missing = [
        f"{name} ({service.image_name})"
        for name, service in config.docker_endpoints.items()
        if runtime.image_id(service.image_name) is None
    ]
    if missing:
        warnings.append(
            f"images not in the Docker engine: {', '.join(missing)}; their jobs fail until the images are built"
        )
    gpu_services = [n for n in config.docker_endpoints if config.service_uses_gpu(n)]
    if gpu_services and (problem := runtime.gpu_problem()) is not None:
        warnings.append(f"{problem} (GPU services: {', '.join(gpu_services)})")
    return warnings


def describe_endpoints(config: Config) -> list[str]:
    lines = []
    for endpoint, (name, mode) in config.endpoints().items():
        service = config.docker_endpoints[name]
        gpu = "GPU" if config.service_uses_gpu(name) else "CPU"
        lines.append(
            f"POST /api/{endpoint:<24} {service.image_name} ({gpu}); {config.folder_for(mode)} -> {service.data_path}"
        )
    return lines
