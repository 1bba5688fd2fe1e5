"""Fixtures: the real Docker engine, locally built images, and real server processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from dmi_service_manager.runtime.docker import DockerBackend
from dmi_service_manager.runtime.images import build_service
from slurm_cluster import SlurmCluster, install_slurm, slurm_missing
from support import BUSYBOX, OCR, ROOT, Server, base_config, wait_until


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    client = docker.from_env()
    try:
        client.ping()
    except Exception as exc:  # the suite tests the real engine; without it, nothing here means anything
        pytest.exit(f"the Docker engine is not reachable ({exc}); run `bash test.sh`, which starts it", 2)
    return client


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    return build_service(str(ROOT / "tests" / "images" / "busybox"), tag=BUSYBOX, log=lambda _: None)


@pytest.fixture(scope="session")
def ocr_image(docker_client: docker.DockerClient) -> str:
    return build_service("ocr", tag=OCR, log=lambda _: None)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A private two-node Slurm cluster on this machine (tests/slurm_cluster.py), installed when missing."""
    if os.geteuid() != 0:
        pytest.skip("a private Slurm cluster needs root")
    if slurm_missing():
        install_slurm()
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


_STOPPED: list[Server] = []


@pytest.fixture(scope="session", autouse=True)
def _no_containers_left_behind() -> Iterator[None]:
    """Each test's servers' containers go with the test, and once more at the end: a server stopped while a
    job's container was being made can leave it made a moment after that clean-up looked (the engine
    finishes a create whose caller has gone; the next start of that server would start it, but a test's
    server never starts again)."""
    yield
    if _STOPPED:
        client = docker.from_env()
        for server in _STOPPED:
            server.remove_containers(client)


@pytest.fixture
def make_server(
    tmp_path: Path, docker_client: docker.DockerClient, busybox_image: str
) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(config: dict[str, Any] | None = None, *, workers: int = 1, start: bool = True,
             env: dict[str, str] | None = None, **overrides: Any) -> Server:
        folder = tmp_path / f"server{len(servers)}" if servers else tmp_path
        folder.mkdir(exist_ok=True)
        server = Server(folder, config or base_config(folder, **overrides), workers=workers, env=env)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    problems: list[BaseException] = []
    for server in servers:  # every server is stopped, whatever the clean-up of another one raised
        try:
            server.stop()
            server.remove_containers(docker_client)
        except Exception as exc:
            problems.append(exc)
        _STOPPED.append(server)
    if problems:
        raise problems[0]


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


# -- a Docker daemon of the test's own, to restart under a server


@pytest.fixture
def private_dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Callable[[], None]]]:
    if not shutil.which("dockerd") or os.geteuid() != 0:
        pytest.skip("needs root and dockerd to start a private Docker daemon")
    folder = tmp_path_factory.mktemp("dockerd", numbered=True)
    short = Path("/tmp") / f"dsm-dockerd-{os.getpid()}-{folder.name}"  # unix sockets want short paths
    short.mkdir()
    socket = short / "docker.sock"
    # Its own network namespace: a second dockerd beside the first would otherwise reconfigure (or, with
    # --bridge none, delete) the shared docker0 bridge. The server reaches it through its Unix socket.
    args = ["unshare", "--net", "dockerd", "--host", f"unix://{socket}", "--data-root", str(folder / "data"),
            "--exec-root", str(short / "exec"), "--pidfile", str(short / "docker.pid"), "--iptables=false",
            "--ip6tables=false"]
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        log = (folder / "dockerd.log").open("ab")
        processes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        wait_until(lambda: _pings(f"unix://{socket}"), 60, 0.2, "the private dockerd")

    def restart() -> None:
        processes[-1].send_signal(signal.SIGTERM)
        processes[-1].wait(60)
        start()

    start()
    build_service(str(ROOT / "tests" / "images" / "busybox"), tag=BUSYBOX, log=lambda _: None,
                  runtime=DockerBackend(f"unix://{socket}"))
    yield f"unix://{socket}", restart
    try:
        api = docker.APIClient(base_url=f"unix://{socket}")
        for listed in api.containers(all=True):  # ids only: the SDK's list() inspects each, racing removals
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(listed["Id"], force=True)
    finally:  # the daemon stops whatever the clean-up raised
        processes[-1].send_signal(signal.SIGTERM)
        processes[-1].wait(60)
        for root in (short, folder / "data"):
            _unmount_below(root)
        shutil.rmtree(short, ignore_errors=True)


def _unmount_below(folder: Path) -> None:
    """dockerd leaves its network namespace mounted under its exec root (held open, the namespace would outlive
    the test), and a daemon that did not stop cleanly its data root bound onto itself."""
    targets = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    below = [t for t in targets if t == str(folder) or t.startswith(f"{folder}/")]
    for target in sorted(below, key=len, reverse=True):  # the deepest first
        subprocess.run(["umount", "--lazy", target], check=False, capture_output=True)


def _pings(url: str) -> bool:
    try:
        return bool(docker.DockerClient(base_url=url, timeout=2).ping())
    except Exception:
        return False
