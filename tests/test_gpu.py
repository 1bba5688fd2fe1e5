"""`check_gpu_mem` answers exactly as 4CAT's processors expect, and GPU jobs are placed on real cards."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker

from fourcat import FourCat
from support import BUSYBOX, Server, base_config, wait_until

GIB = 1024**3
DISABLED = {"reason": "GPU not enabled on this instance of DMI Service Manager"}


def gpu_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Two declared cards, handed to containers as NVIDIA_VISIBLE_DEVICES, which needs no GPU runtime here."""
    config = base_config(tmp_path, GPU_ENABLED=True, GPU_DEVICE_MODE="environment",
                         GPU_INVENTORY=[{"id": 0, "memory": "16GiB"}, {"id": 1, "memory": "24GiB"}])
    config["DOCKER_ENDPOINTS"].update({
        "whisper": {"image_name": BUSYBOX, "local": True, "command": "fake-service", "data_path": "/app/data",
                    "gpu_memory": "10GiB"},
        "huge": {"image_name": BUSYBOX, "local": True, "command": "fake-service", "data_path": "/app/data",
                 "gpu_memory": "40GiB"},
        "cpuonly": {"image_name": BUSYBOX, "local": True, "command": "fake-service", "data_path": "/app/data",
                    "gpu": False},
    })
    config.update(overrides)
    return config


def test_gpu_disabled_answers_4cats_exact_sentence(server: Server) -> None:
    response = server.get("/api/check_gpu_mem/fake")
    assert response.status_code == 400
    assert response.json() == DISABLED


def test_unknown_service_is_404_service_not_found(server: Server) -> None:
    response = server.get("/api/check_gpu_mem/fake_local")  # the endpoint, not the service name
    assert response.status_code == 404 and response.json() == {"reason": "Service not found"}


def test_a_service_with_gpu_false_answers_the_disabled_sentence(make_server: Callable[..., Server],
                                                                tmp_path: Path) -> None:
    server = make_server(gpu_config(tmp_path))
    status, body = FourCat(server.url).check_gpu_memory("cpuonly")
    assert (status, body) == (400, DISABLED)


def test_a_declared_inventory_gives_real_figures_for_the_best_card(make_server: Callable[..., Server],
                                                                    tmp_path: Path) -> None:
    server = make_server(gpu_config(tmp_path))
    status, body = FourCat(server.url).check_gpu_memory("whisper")
    assert status == 200 and body["reason"] == "GPU available"
    assert server.get("/api/gpus").json()["problem"] is None
    assert body["memory"]["gpu_total_mem"] == 24 * GIB
    assert body["memory"]["gpu_free_mem"] == 24 * GIB
    assert [card["id"] for card in body["memory"]["gpus"]] == ["0", "1"]


def test_503_only_for_a_service_that_could_never_fit(make_server: Callable[..., Server], tmp_path: Path) -> None:
    server = make_server(gpu_config(tmp_path))
    response = server.get("/api/check_gpu_mem/huge")
    assert response.status_code == 503
    assert "40.0 GiB" in response.json()["reason"] and response.json()["memory"]["gpu_total_mem"] == 24 * GIB
    refused = server.post("/api/huge_local", json={"args": []})
    assert refused.status_code == 503 and "largest card has 24.0 GiB" in refused.json()["reason"]


def test_without_nvml_or_a_gpu_runtime_the_check_says_why(make_server: Callable[..., Server],
                                                          tmp_path: Path) -> None:
    """No card to be seen: the service can never fit, so a 503 (never a 5xx of the server's own) whose
    reason says why; 4CAT quotes it when it fails the dataset."""
    server = make_server(gpu_config(tmp_path, GPU_INVENTORY=None))
    response = server.get("/api/check_gpu_mem/whisper")
    assert response.status_code == 503
    reason = response.json()["reason"]
    assert reason.startswith("GPU not available: ") and "NVML is not available" in reason and "nvidia-smi" in reason
    assert response.json()["memory"] == {"gpu_total_mem": 0, "gpu_free_mem": 0}


def test_gpu_jobs_fail_with_the_reason_when_docker_has_no_gpu_runtime(make_server: Callable[..., Server],
                                                                       tmp_path: Path) -> None:
    server = make_server(gpu_config(tmp_path, GPU_DEVICE_MODE="device_requests"))  # as `--gpus` does
    assert "no GPU runtime" in server.log()  # the start-up warning
    check = server.get("/api/check_gpu_mem/whisper")  # 4CAT asks first: no job of it could run here
    assert check.status_code == 503 and check.json()["reason"].startswith("GPU not available: GPU_ENABLED is set")
    assert "nvidia-container-toolkit" in check.json()["reason"]
    overview = server.get("/api/gpus").json()  # the dashboard and `dsm gpus` say so beside the cards
    assert "no GPU runtime" in overview["problem"] and len(overview["cards"]) == 2
    job = server.wait_final(server.submit("whisper_local", [])["key"])
    assert job["status"] == "error"
    assert "no GPU runtime" in json.loads(job["results"])["error"]
    assert server.wait_final(server.submit("cpuonly_local", [])["key"])["status"] == "complete"


def test_concurrent_gpu_jobs_are_pinned_to_cards_and_never_oversubscribe(
    make_server: Callable[..., Server], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    # GPU_DEVICE_MODE environment: cards are named in NVIDIA_VISIBLE_DEVICES, so containers start here.
    server = make_server(gpu_config(tmp_path, MAX_CONCURRENT_JOBS=10))
    keys = [server.submit("whisper_local", ["--sleep", "15"])["key"] for _ in range(5)]

    def placement() -> dict[int, str]:
        found = {}
        for key in keys:
            job = server.job(key)
            if job["status"] == "running":
                found[key] = json.loads(job["details"])["container"]["gpu_ids"]
        return found

    first = wait_until(lambda: len(p := placement()) == 3 and p, 30)
    per_card: dict[str, int] = {}
    for ids in first.values():
        for gpu in ids:
            per_card[gpu] = per_card.get(gpu, 0) + 10
    assert per_card == {"0": 10, "1": 20}  # 16 GiB holds one 10 GiB job, 24 GiB holds two
    def waiting() -> list[dict[str, Any]]:
        return [server.job(k) for k in keys if k not in first]

    assert all(j["status"] == "pending" for j in waiting())
    wait_until(lambda: all("Waiting in line" in (j["message"] or "") for j in waiting()), 10, what="queue notes")
    some = next(iter(first))
    container = docker_client.containers.get(json.loads(server.job(some)["details"])["container"]["name"])
    assert f"NVIDIA_VISIBLE_DEVICES={first[some][0]}" in container.attrs["Config"]["Env"]
    for key in keys:
        assert server.wait_final(key, 60)["status"] == "complete"


def test_a_gpu_container_this_server_did_not_start_holds_its_memory(make_server: Callable[..., Server],
                                                                     tmp_path: Path,
                                                                     docker_client: docker.DockerClient) -> None:
    """A container the original left running keeps its GPU busy: it is named in the log and counted."""
    config = base_config(tmp_path, GPU_ENABLED=True, GPU_DEVICE_MODE="environment",
                         GPU_INVENTORY=[{"id": 0, "memory": "16GiB"}])
    config["DOCKER_ENDPOINTS"] = {"whisper": {"image_name": BUSYBOX, "local": True, "command": "fake-service",
                                              "data_path": "/app/data", "gpu_memory": "10GiB"}}
    # With nvidia as Docker's default runtime this variable gives the container every card (this machine has
    # none, so `--gpus all` cannot be asked for here); a container of the image without it holds no card.
    leftover = docker_client.containers.run(BUSYBOX, ["sleep", "120"], detach=True,
                                            environment={"NVIDIA_VISIBLE_DEVICES": "all"})
    cpu_only = docker_client.containers.run(BUSYBOX, ["sleep", "120"], detach=True)
    try:
        server = make_server(config)
        key = server.submit("whisper_local", [])["key"]
        waiting = wait_until(lambda: (j := server.job(key))["message"] and j, 15, what="a queue note")
        assert waiting["status"] == "pending" and "10.0 GiB" in waiting["message"]
        assert leftover.name in server.log() and "not started by this server" in server.log()
        assert cpu_only.name not in server.log()
        leftover.remove(force=True)
        assert server.wait_final(key, 60)["status"] == "complete"
    finally:
        for container in (leftover, cpu_only):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
