"""Fixtures: the real Docker engine, locally built images, and real server processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from dmi_service_manager.runtime.images import build_service
from support import BUSYBOX, OCR, ROOT, Server, base_config


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
    for server in servers:
        server.stop()
        server.remove_containers(docker_client)


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()
