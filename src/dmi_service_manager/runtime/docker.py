"""The Docker backend: the local Docker Engine through the Docker SDK, the one place that holds a
Docker connection. This server places GPUs here, and hands them over as device requests (like
`docker run --gpus`) or, where nvidia is Docker's default runtime, as NVIDIA_VISIBLE_DEVICES."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig

from ..errors import RuntimeUnavailable
from .base import (
    CapturedLog,
    ContainerEvent,
    ContainerExists,
    ContainerSpec,
    ContainerState,
    Launched,
    StartFailed,
    argv_too_long,
    no_gpu_runtime,
)

log = logging.getLogger(__name__)

# Docker keeps a container's log on disk; bound it so a chatty service cannot fill the disk. We keep
# only the last LOG_MAX_BYTES (1 MiB) of each stream anyway, far less than what is kept here.
_LOG_CONFIG = LogConfig(type=LogConfig.types.JSON, config={"max-size": "20m", "max-file": "2"})
_EVENTS = ["start", "die", "destroy", "oom"]


def _timestamp(value: str | None) -> float | None:
    if not value or value.startswith("0001-01-01"):
        return None
    text = value.rstrip("Z")
    if "." in text:  # Docker gives nanoseconds; Python parses at most microseconds
        head, fraction = text.split(".", 1)
        text = f"{head}.{fraction[:6]}"
    try:
        return datetime.fromisoformat(text + "+00:00").timestamp()
    except ValueError:
        return None


def _describe_start_error(message: str, image: str, argv: list[str]) -> str:
    lowered = message.lower()
    if "argument list too long" in lowered or "e2big" in lowered:
        return f"{argv_too_long(argv)} ({message})"
    if "could not select device driver" in lowered or "nvidia" in lowered:
        return f"The container could not get a GPU. {no_gpu_runtime()} ({message})"
    if "no such image" in lowered:
        return f"The image {image!r} is not in the Docker engine; build or pull it first. ({message})"
    return f"The container could not start: {message}"


@contextmanager
def _engine() -> Iterator[None]:
    """Turn a lost connection to the engine into RuntimeUnavailable, whatever the call."""
    try:
        yield
    except (requests.exceptions.ConnectionError, ConnectionError) as exc:
        raise RuntimeUnavailable(f"the Docker engine is not reachable: {exc}") from None
    except docker.errors.DockerException as exc:
        if isinstance(exc, docker.errors.APIError):
            raise
        raise RuntimeUnavailable(f"the Docker engine is not reachable: {exc}") from None


class DockerEventStream:
    """Container events, with a close() that ends a blocked read from another thread."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[ContainerEvent]:
        with _engine():
            for event in self._stream:
                actor = event.get("Actor") or {}
                yield ContainerEvent(
                    container_id=str(actor.get("ID") or event.get("id") or ""),
                    action=str(event.get("Action") or event.get("status") or "").split(":")[0],
                    labels={k: str(v) for k, v in (actor.get("Attributes") or {}).items()},
                )

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken stream may itself fail; nothing to recover
            self._stream.close()


class DockerLogStream:
    """The SDK's log stream; its close() shuts the connection, which ends a read waiting in another thread."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._chunks: Iterator[bytes] = iter(stream) if stream is not None else iter(())

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with _engine():
            return bytes(next(self._chunks))

    def close(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):  # already closed, or the engine already hung up
                self._stream.close()


class DockerBackend:
    name = "docker"
    engine = "Docker daemon"
    places_gpus = False

    def __init__(self, base_url: str | None = None, timeout: float = 60, gpu_mode: str = "device_requests") -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.gpu_mode = gpu_mode
        self._client: docker.APIClient | None = None

    @property
    def api(self) -> docker.APIClient:
        # Created lazily so that the server answers at once even while Docker is down.
        if self._client is None:
            with _engine():
                if self.base_url:
                    self._client = docker.APIClient(base_url=self.base_url, timeout=self.timeout,
                                                    max_pool_size=64, version="auto")
                else:
                    self._client = docker.from_env(timeout=int(self.timeout), max_pool_size=64).api
        return self._client

    def ping(self) -> None:
        with _engine():
            self.api.ping()

    def create(self, spec: ContainerSpec) -> str:
        """Make (not start) the container; its id. ContainerExists if one of that name is there."""
        host_config: dict[str, Any] = {
            "binds": {m.host: {"bind": m.container, "mode": "ro" if m.read_only else "rw"} for m in spec.mounts},
            "network_mode": spec.network,
            "log_config": _LOG_CONFIG,
        }
        environment = dict(spec.environment)
        if spec.gpu_ids:
            if self.gpu_mode == "environment":
                # With nvidia as Docker's default runtime, this variable alone picks the cards.
                environment["NVIDIA_VISIBLE_DEVICES"] = ",".join(spec.gpu_ids)
            elif spec.gpu_ids == ["all"]:
                host_config["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu", "utility"]])]
            else:
                host_config["device_requests"] = [DeviceRequest(device_ids=spec.gpu_ids, capabilities=[["gpu"]])]
        if spec.shm_size:
            host_config["shm_size"] = spec.shm_size
        if spec.mem_limit:
            host_config["mem_limit"] = spec.mem_limit
        if spec.cpus:
            host_config["nano_cpus"] = int(spec.cpus * 1e9)
        with _engine():
            try:
                created = self.api.create_container(
                    image=spec.image,
                    command=spec.argv or None,
                    entrypoint=spec.entrypoint,
                    name=spec.name or None,
                    labels=spec.labels,
                    environment=environment or None,
                    user=spec.user or "",
                    working_dir=spec.workdir,
                    host_config=self.api.create_host_config(**host_config),
                )
            except docker.errors.ImageNotFound:
                raise StartFailed(
                    f"The image {spec.image!r} is not in the Docker engine; build or pull it on the server first."
                ) from None
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and spec.name:
                    raise ContainerExists(spec.name) from None
                raise StartFailed(_describe_start_error(str(exc.explanation or exc), spec.image, spec.argv)) from None
        return str(created["Id"])

    def launch(self, spec: ContainerSpec) -> Launched:
        try:
            container_id = self.create(spec)
        except ContainerExists:  # made before a crash: finish that start, never make a second one
            existing = self.inspect(spec.name)
            if existing is None:
                raise StartFailed("The job's container vanished while it was being started.") from None
            if existing.status != "created":
                return Launched(existing.id, existing.started_at)
            container_id = existing.id
        try:
            self.start(container_id, spec)
        except StartFailed:
            with contextlib.suppress(Exception):  # the reason to report is the start's, not the clean-up's
                self.remove(container_id)
            raise
        return Launched(container_id, time.time())

    def gpu_problem(self) -> str | None:
        if self.gpu_mode == "environment" or self.gpu_runtime() is not None:
            return None
        return no_gpu_runtime()

    def start(self, container_id: str, spec: ContainerSpec | None = None) -> None:
        with _engine():
            try:
                self.api.start(container_id)
            except docker.errors.APIError as exc:
                image, argv = (spec.image, spec.argv) if spec else ("", [])
                raise StartFailed(_describe_start_error(str(exc.explanation or exc), image, argv)) from None

    def inspect(self, container_id: str) -> ContainerState | None:
        with _engine():
            try:
                data = self.api.inspect_container(container_id)
            except docker.errors.NotFound:
                return None
        state = data.get("State") or {}
        return ContainerState(
            id=data["Id"],
            name=str(data.get("Name", "")).lstrip("/"),
            labels=dict((data.get("Config") or {}).get("Labels") or {}),
            status=str(state.get("Status", "")),
            exit_code=state.get("ExitCode") if state.get("Status") in ("exited", "dead") else None,
            started_at=_timestamp(state.get("StartedAt")),
            finished_at=_timestamp(state.get("FinishedAt")),
            image_id=str(data.get("Image", "")),
            oom_killed=bool(state.get("OOMKilled")),
            error=str(state.get("Error") or ""),
            image=str((data.get("Config") or {}).get("Image") or ""),
        )

    def stop(self, container_id: str, grace: float) -> None:
        with _engine():
            try:
                self.api.stop(container_id, timeout=int(grace))
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                log.warning("stopping container %s: %s; killing it", container_id[:12], exc)
                with contextlib.suppress(docker.errors.APIError):
                    self.api.kill(container_id)

    def remove(self, container_id: str) -> None:
        with _engine():
            try:
                self.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if "already in progress" not in str(exc):
                    raise

    def logs(self, container_id: str, stream: str, limit: int) -> CapturedLog:
        """The last `limit` bytes of one stream, read as a stream so memory stays bounded."""
        kept = bytearray()
        total = 0
        with _engine():
            try:
                chunks = self.api.logs(container_id, stdout=stream == "stdout", stderr=stream == "stderr",
                                       stream=True, follow=False)
                for chunk in chunks:
                    total += len(chunk)
                    kept += chunk
                    if len(kept) > 2 * limit:
                        del kept[: len(kept) - limit]
            except docker.errors.NotFound:
                return CapturedLog(text="", truncated=False, total_bytes=0)
        truncated = len(kept) > limit
        if truncated:
            del kept[: len(kept) - limit]
        return CapturedLog(text=kept.decode("utf-8", errors="replace"), truncated=truncated, total_bytes=total)

    def follow_logs(self, container_id: str, tail: int | None, follow: bool) -> DockerLogStream:
        with _engine():
            try:
                stream = self.api.logs(container_id, stdout=True, stderr=True, stream=True, follow=follow,
                                       tail=tail if tail is not None else "all")
            except docker.errors.NotFound:
                return DockerLogStream(None)
        return DockerLogStream(stream)

    def labelled(self, labels: dict[str, str]) -> list[ContainerState]:
        with _engine():
            found = self.api.containers(all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})
        states = [self.inspect(item["Id"]) for item in found]
        return [s for s in states if s is not None]

    def running_of_images(self, images: list[str]) -> list[ContainerState]:
        """Running containers made from these images, whoever started them."""
        if not images:
            return []
        with _engine():
            found = self.api.containers(filters={"ancestor": images, "status": "running"})
        states = [self.inspect(item["Id"]) for item in found]
        return [s for s in states if s is not None]

    def events(self, labels: dict[str, str]) -> DockerEventStream:
        with _engine():
            stream = self.api.events(
                decode=True,
                filters={"type": "container", "event": _EVENTS, "label": [f"{k}={v}" for k, v in labels.items()]},
            )
        return DockerEventStream(stream)

    def image_id(self, image: str) -> str | None:
        with _engine():
            try:
                return str(self.api.inspect_image(image)["Id"])
            except docker.errors.ImageNotFound:
                return None
            except docker.errors.APIError as exc:
                if exc.status_code in (400, 404):  # an invalid reference is as absent as a missing one
                    return None
                raise

    def gpu_runtime(self) -> str | None:
        """What would give containers a GPU here, or None: Docker's nvidia runtime or its hook."""
        with _engine():
            info = self.api.info()
        runtimes = info.get("Runtimes") or {}
        if "nvidia" in runtimes:
            return "nvidia runtime"
        if info.get("DefaultRuntime") == "nvidia":
            return "nvidia default runtime"
        if shutil.which("nvidia-container-runtime-hook"):
            return "nvidia-container-runtime-hook"
        return None

    def run_to_completion(self, spec: ContainerSpec, timeout: float) -> tuple[int, str]:
        """A short helper container (e.g. nvidia-smi): run, wait at most `timeout`, collect, remove."""
        container_id = self.create(spec)
        try:
            self.start(container_id, spec)
            with _engine():
                try:
                    result = self.api.wait(container_id, timeout=timeout)
                except requests.exceptions.ReadTimeout:
                    raise StartFailed(f"{spec.argv[0] if spec.argv else 'helper'} took over {timeout:.0f} s") from None
            output = self.logs(container_id, "stdout", 1024 * 1024).text
            errors = self.logs(container_id, "stderr", 64 * 1024).text
            return int(result.get("StatusCode", 1)), output if result.get("StatusCode") == 0 else errors or output
        finally:
            self.remove(container_id)
