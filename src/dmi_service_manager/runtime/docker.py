"""The Docker backend: the local Docker Engine through the Docker SDK, the one place that holds a
Docker connection. This server places GPUs here, and hands them over as device requests (like
`docker run --gpus`) or, where nvidia is Docker's default runtime, as NVIDIA_VISIBLE_DEVICES."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig
from docker.types import Mount as DockerMount

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
_EVENTS = ["start", "die", "oom"]
_FRAME_HEADER = struct.Struct(">BxxxL")
_FRAME_PIECE = 1024 * 1024
_EXEC_FAILED = re.compile(r'exec: "(?P<path>[^"]*)": (?P<why>.*)')  # runc's words for a bad command
_NO_SOURCE = re.compile(r"bind source path does not exist: (?P<path>\S+)")
GPU_ANSWER_SECONDS = 60.0  # how long whether Docker can hand out GPUs is taken as known


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


def _start_error(message: str, image: str, argv: list[str]) -> StartFailed:
    lowered = message.lower()
    if "argument list too long" in lowered or "e2big" in lowered:
        return StartFailed(f"{argv_too_long(argv)} ({message})")
    if "could not select device driver" in lowered or "nvidia" in lowered:
        return StartFailed(f"The container could not get a GPU. {no_gpu_runtime()} ({message})")
    if "no such image" in lowered:
        return StartFailed(f"The image {image!r} is not in the Docker engine; build or pull it first. ({message})")
    if (missing := _NO_SOURCE.search(message)) is not None:
        return StartFailed(f"The folder {missing['path']} that the job's container needs does not exist on this"
                           f" server (a share that is not mounted? a folder removed?) ({message})")
    if (command := _EXEC_FAILED.search(message)) is not None:
        not_found = "not found" in command["why"] or "no such file" in command["why"]
        return StartFailed(f"The command {command['path']!r} {'was not found' if not_found else 'could not be run'}"
                           f" in the image {image!r} ({message})", exit_code=127 if not_found else 126)
    return StartFailed(f"The container could not start: {message}")


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
        self._started: dict[str, float] = {}  # containers whose `start` came and whose `die` has not yet
        self._oom: set[str] = set()  # ... and those of them whose `oom` came

    def __iter__(self) -> Iterator[ContainerEvent]:
        with _engine():
            for event in self._stream:
                actor = event.get("Actor") or {}
                container_id = str(actor.get("ID") or event.get("id") or "")
                action = str(event.get("Action") or event.get("status") or "").split(":")[0]
                labels = {k: str(v) for k, v in (actor.get("Attributes") or {}).items()}
                ended = None
                if action == "start" and isinstance(event.get("timeNano"), int):
                    self._started[container_id] = event["timeNano"] / 1e9
                elif action == "oom":
                    self._oom.add(container_id)
                elif action == "die":
                    started = self._started.pop(container_id, None)
                    killed = container_id in self._oom  # the inspect's OOMKilled tells the job why it ended
                    self._oom.discard(container_id)
                    if started is not None and not killed:
                        ended = _ended_by(container_id, labels, started, event.get("timeNano"))
                yield ContainerEvent(container_id=container_id, action=action, labels=labels, ended=ended)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken stream may itself fail; nothing to recover
            self._stream.close()


def _reuse_connections(client: docker.APIClient) -> None:
    """Two costs of the SDK's HTTP session, each paid on every call, that a server making thousands of
    calls should not pay (together about 3 ms of CPU per call, more than the rest of the call):
    - its unix-socket adapter keys connection pools by each request's whole URL, so every call about
      another container opens a new connection (and, past 25 URLs, closes an old pool): one key for the
      socket lets its connections be reused;
    - requests reads proxy settings from the environment for each call; none apply to the engine's API
      (docker-py's own proxy settings are for containers, and a TCP engine's TLS comes from its config)."""
    client.trust_env = False
    adapter = client.get_adapter(client.base_url)
    if isinstance(adapter, docker.transport.UnixHTTPAdapter):
        by_url = adapter.get_connection
        adapter.get_connection = lambda url, proxies=None: by_url(client.base_url, proxies)


def _ended_by(container_id: str, attributes: dict[str, str], started: float, time_ns: Any) -> ContainerState | None:
    """A container's clean exit as its `start` and `die` events tell it: exit code 0, when it started and
    ended, and its labels (the engine sends them along). None for any other end, which is inspected: an OOM
    kill, the engine's own error, or the engine going down (it kills containers on the way, and the job
    must say so) is told apart there."""
    if attributes.get("exitCode") != "0" or not isinstance(time_ns, int):
        return None
    return ContainerState(id=container_id, name=attributes.get("name", ""), labels=attributes, status="exited",
                          exit_code=0, started_at=started, finished_at=time_ns / 1e9, image_id="",
                          image=attributes.get("image", ""))


def _listed(item: dict[str, Any]) -> ContainerState:
    """A container as the engine's listing shows it: its state, but no times or exit code."""
    names = item.get("Names") or [""]
    return ContainerState(id=str(item["Id"]), name=str(names[0]).lstrip("/"), labels=dict(item.get("Labels") or {}),
                          status=str(item.get("State", "")), exit_code=None, started_at=None, finished_at=None,
                          image_id=str(item.get("ImageID", "")), image=str(item.get("Image", "")))


def _frames(raw: Any) -> Iterator[tuple[int, bytes]]:
    """(stream, data) from the engine's multiplexed log format: an 8-byte header (the stream: 1 stdout,
    2 stderr; then the payload's length), then the payload. Read in bounded pieces."""
    while True:
        header = raw.read(_FRAME_HEADER.size)
        if len(header) < _FRAME_HEADER.size:
            return
        stream, left = _FRAME_HEADER.unpack(header)
        while left:
            data = raw.read(min(left, _FRAME_PIECE))
            if not data:
                return
            left -= len(data)
            yield stream, data


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
        self._cpus: int | None = None
        self._gpu_answer: tuple[float, str | None] | None = None  # (when, what gpu_problem found)

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
                _reuse_connections(self._client)
        return self._client

    def ping(self) -> None:
        with _engine():
            self.api.ping()

    def create(self, spec: ContainerSpec) -> str:
        """Make (not start) the container; its id. ContainerExists if one of that name is there."""
        host_config: dict[str, Any] = {
            # Mounts, not binds: a missing host folder is refused, where a bind made an empty one (an unmounted
            # share's results would land on the local disk, and the job "complete" without them).
            "mounts": [DockerMount(target=m.container, source=m.host, type="bind", read_only=m.read_only)
                       for m in spec.mounts],
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
                raise _start_error(str(exc.explanation or exc), spec.image, spec.argv) from None
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
        """Asked once a minute: every GPU job's start, 4CAT's GPU check, the dashboard and metrics ask it."""
        if self.gpu_mode == "environment":
            return None
        if self._gpu_answer is None or time.monotonic() - self._gpu_answer[0] > GPU_ANSWER_SECONDS:
            self._gpu_answer = (time.monotonic(), None if self.gpu_runtime() is not None else no_gpu_runtime())
        return self._gpu_answer[1]

    def most_cpus(self) -> float | None:
        if self._cpus is None:  # the engine's CPU count does not change while it runs: asked once
            with _engine():
                self._cpus = int(self.api.info().get("NCPU") or 0)
        return self._cpus or None

    def start(self, container_id: str, spec: ContainerSpec | None = None) -> None:
        with _engine():
            try:
                self.api.start(container_id)
            except docker.errors.APIError as exc:
                image, argv = (spec.image, spec.argv) if spec else ("", [])
                raise _start_error(str(exc.explanation or exc), image, argv) from None

    def inspect(self, container_id: str) -> ContainerState | None:
        with _engine():
            try:
                data = self.api.inspect_container(container_id)
            except docker.errors.NotFound:
                return None
        state = data.get("State") or {}
        host = data.get("HostConfig") or {}
        environment = (data.get("Config") or {}).get("Env") or []
        visible = [e.split("=", 1)[1] for e in environment if e.startswith("NVIDIA_VISIBLE_DEVICES=")]
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
            holds_gpu=bool(host.get("DeviceRequests")) or host.get("Runtime") == "nvidia"
            or any(v.strip() not in ("", "void", "none") for v in visible),
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

    def outputs(self, container_id: str, limit: int) -> tuple[CapturedLog, CapturedLog]:
        """Both streams in one request (the SDK's logs() would take one per stream: it drops the frame
        headers that tell them apart; this server never gives a container a TTY, so every log is framed).
        Read as a stream, keeping the last `limit` bytes of each, so memory stays bounded."""
        kept = {1: bytearray(), 2: bytearray()}
        totals = {1: 0, 2: 0}
        with _engine():
            try:
                response = self.api._get(self.api._url("/containers/{0}/logs", container_id),
                                         params={"stdout": 1, "stderr": 1, "follow": 0, "tail": "all"}, stream=True)
                self.api._raise_for_status(response)
            except docker.errors.NotFound:
                return _captured(bytearray(), 0, limit), _captured(bytearray(), 0, limit)
            with contextlib.closing(response):
                for stream, data in _frames(response.raw):
                    if stream not in kept:
                        continue
                    totals[stream] += len(data)
                    kept[stream] += data
                    if len(kept[stream]) > 2 * limit:
                        del kept[stream][: len(kept[stream]) - limit]
        return _captured(kept[1], totals[1], limit), _captured(kept[2], totals[2], limit)

    def follow_logs(self, container_id: str, tail: int | None, follow: bool) -> DockerLogStream:
        with _engine():
            try:
                stream = self.api.logs(container_id, stdout=True, stderr=True, stream=True, follow=follow,
                                       tail=tail if tail is not None else "all")
            except docker.errors.NotFound:
                return DockerLogStream(None)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:  # "dead or marked for removal": as good as gone, its output read
                    return DockerLogStream(None)
                raise
        return DockerLogStream(stream)

    def labelled(self, labels: dict[str, str]) -> list[ContainerState]:
        """As the engine lists them, without times or exit codes: one call, where an inspect of each
        would cost the engine one call per container every reconcile pass."""
        with _engine():
            found = self.api.containers(all=True, filters={"label": [f"{k}={v}" for k, v in labels.items()]})
        return [_listed(item) for item in found]

    def running_of_images(self, images: list[str], unless: dict[str, str]) -> list[ContainerState]:
        """Running containers made from these images, but for those labelled `unless`. Inspected, for the
        image name they were made from (a listing shows an id once that name has moved to a newer build)."""
        if not images:
            return []
        with _engine():
            found = self.api.containers(filters={"ancestor": images, "status": "running"})
        others = [item["Id"] for item in found
                  if any((item.get("Labels") or {}).get(k) != v for k, v in unless.items())]
        states = [self.inspect(container_id) for container_id in others]
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
            output, errors = (captured.text for captured in self.outputs(container_id, 1024 * 1024))
            return int(result.get("StatusCode", 1)), output if result.get("StatusCode") == 0 else errors or output
        finally:
            self.remove(container_id)


def _captured(kept: bytearray, total: int, limit: int) -> CapturedLog:
    """The last `limit` bytes of what was kept; truncated if anything written is not among them."""
    del kept[: max(len(kept) - limit, 0)]
    return CapturedLog(text=kept.decode("utf-8", errors="replace"), truncated=total > len(kept), total_bytes=total)
