"""Helpers for driving a real server process against the real Docker engine."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
import yaml

from dmi_service_manager.jobs.store import Store
from dmi_service_manager.tokens import Tokens

ROOT = Path(__file__).resolve().parents[1]
BUSYBOX = "dsm-test-busybox:latest"
OCR = "dsm-ocr:latest"
INSTANCE_LABEL = "dmi-service-manager.instance"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DSM = Path(sys.executable).parent / "dsm"


def dsm(*args: str, token: str | None = None, cwd: Path | None = None, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `dsm` console script, with neither DSM_SERVER nor DSM_TOKEN from the test's environment
    (`token` and `env` set what a test wants)."""
    assert DSM.exists(), f"{DSM} is missing: run `bash scripts/setup.sh`"
    environment = {k: v for k, v in os.environ.items() if k not in ("DSM_SERVER", "DSM_TOKEN")}
    environment.update(env or {})
    if token is not None:
        environment["DSM_TOKEN"] = token
    return subprocess.run([str(DSM), *args], capture_output=True, text=True, env=environment, cwd=cwd,
                          timeout=timeout)


def wait_until(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or check}; last: {last!r}")


def base_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    (tmp_path / "4cat").mkdir(parents=True, exist_ok=True)
    (tmp_path / "uploads").mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "DATABASE_FILE": str(tmp_path / "jobs.db"),
        "4CAT_DATASETS_PATH": str(tmp_path / "4cat"),
        "UPLOAD_FOLDER_PATH": str(tmp_path / "uploads"),
        "GPU_ENABLED": False,
        "STOP_GRACE_SECONDS": 1,
        "DOCKER_ENDPOINTS": {
            "fake": {
                "image_name": BUSYBOX,
                "local": True,
                "remote": True,
                "command": "fake-service",
                "data_path": "/app/data",
            },
        },
    }
    config.update(overrides)
    return config


class Server:
    """`dsm serve` in a subprocess of its own, with its own config, port and database."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], workers: int = 1, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1", open_files: int | None = None):
        self.tmp_path = tmp_path
        self.config = config
        self.workers = workers
        self.env = env or {}
        self.host = host
        self.open_files = open_files  # the process's hard limit, as `ulimit -n` sets it
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.config_path = tmp_path / "config.yml"
        self.log_path = tmp_path / f"server-{self.port}.log"
        self._tokens: dict[str, str] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.instance: str | None = None

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait: bool = True) -> Server:
        self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dmi_service_manager", "serve", "--config", str(self.config_path),
             "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp_path, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, preexec_fn=self._limit_open_files,
        )
        if wait:
            self.wait_ready()
        return self

    def _limit_open_files(self) -> None:
        if self.open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def wait_ready(self, timeout: float = 30.0) -> float:
        started = time.monotonic()

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                requests.get(self.url + "/api/", timeout=1)  # any answer (a 403 too) means it serves
                return True
            except requests.ConnectionError:
                return False

        wait_until(answers, timeout, 0.05, "the server to answer")
        if self.instance is None:
            with sqlite3.connect(self.config["DATABASE_FILE"]) as db:
                self.instance = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()[0]
        return time.monotonic() - started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        """The server's process and its workers."""
        assert self.process is not None
        pid = self.process.pid
        return [pid, *(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]

    def staged_files_open(self) -> list[str]:
        """Upload files the server holds open in its staging folders. An upload is written into a file with
        no name (O_TMPFILE), so a leaked one never shows in the folder: only as a descriptor held open."""
        held = []
        for pid in self.pids():
            folder = Path(f"/proc/{pid}/fd")
            for fd in os.listdir(folder) if folder.exists() else []:
                with contextlib.suppress(OSError):
                    if "/.dsm-staging/" in (target := os.readlink(folder / fd)):  # a file in it
                        held.append(target)
        return held

    def kill(self) -> None:
        """kill -9 of the server's main process only, as an admin or the OOM killer would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # any worker left behind

    def remove_containers(self, client: docker.DockerClient) -> None:
        if self.instance is None:
            return
        for container in containers_of(client, self.instance):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:  # another server of this instance (this test's) removes it
                if "already in progress" not in str(exc):
                    raise

    # -- HTTP

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        """As an admin would: with an admin token, unless the test sends its own headers."""
        kwargs.setdefault("headers", {"Authorization": f"Bearer {self.token('admin')}"})
        return requests.delete(self.url + path, timeout=30, **kwargs)

    def token(self, scope: str) -> str:
        """A token of this scope on this server's database, made once per server (as `dsm token create` does)."""
        if scope not in self._tokens:
            tokens = Tokens(Store(Path(self.config["DATABASE_FILE"])))
            self._tokens[scope] = tokens.create(f"test-{scope}-{len(self._tokens)}", scope)
        return self._tokens[scope]

    def submit(self, endpoint: str, args: list[str], **body: Any) -> dict[str, Any]:
        response = self.post(f"/api/{endpoint}", json={"args": args, **body})
        assert response.status_code == 202, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def job(self, job_id: int) -> dict[str, Any]:
        response = self.get(f"/api/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()["job"]
        return job

    def wait_final(self, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
        job: dict[str, Any] = wait_until(
            lambda: (j := self.job(job_id))["status"] in ("complete", "error") and j, timeout, 0.1,
            f"job {job_id} to end",
        )
        return job

    def wait_status(self, job_id: int, status: str, timeout: float = 30.0) -> dict[str, Any]:
        job: dict[str, Any] = wait_until(
            lambda: (j := self.job(job_id))["status"] == status and j, timeout, 0.05, f"job {job_id} to be {status}"
        )
        return job


def containers_of(client: docker.DockerClient, instance: str | None, job_id: int | None = None) -> list[Any]:
    labels = [f"{INSTANCE_LABEL}={instance}"]
    if job_id is not None:
        labels.append(f"dmi-service-manager.job={job_id}")
    for _ in range(20):
        try:
            return list(client.containers.list(all=True, filters={"label": labels}))
        except docker.errors.NotFound:  # the SDK inspects each one listed: one was removed in between
            time.sleep(0.05)
    return list(client.containers.list(all=True, filters={"label": labels}))
