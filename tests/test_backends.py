"""One contract, every backend: the local Docker engine and a real Slurm cluster run jobs alike.

Each test runs once per backend, through the real server and 4CAT's own routes: start, exit code, output,
timeout, cancel, adoption after a kill -9 of the server, and an outage of the engine. The Slurm cluster is a
private one on this machine (tests/slurm_cluster.py): two nodes, two declared GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from slurm_cluster import SlurmCluster, install_slurm, slurm_missing
from support import Server, base_config, wait_until


@dataclass
class Backend:
    name: str
    overrides: Callable[[Path], dict[str, Any]]
    env: dict[str, str]
    outage: Callable[[], None]
    cluster: SlurmCluster | None = None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("a private Slurm cluster needs root")
    if slurm_missing():
        install_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["docker", "slurm"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "docker":
        return Backend("docker", lambda folder: {}, {}, lambda: None)
    cluster: SlurmCluster = request.getfixturevalue("slurm_cluster")

    def overrides(folder: Path) -> dict[str, Any]:
        return {"BACKEND": "slurm", "SLURM_SPOOL_PATH": str(folder / "slurm-jobs"), "SLURM_POLL_SECONDS": 0.5}

    return Backend("slurm", overrides, cluster.env, lambda: cluster.restart_controller(down_for=3), cluster)


@pytest.fixture
def serve(make_server: Callable[..., Server], tmp_path: Path, backend: Backend) -> Callable[..., Server]:
    def start(**overrides: Any) -> Server:
        config = base_config(tmp_path, **backend.overrides(tmp_path), **overrides)
        return make_server(config, env=backend.env)

    return start


def _results(job: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = json.loads(job["results"])
    return results


def _containers(client: docker.DockerClient, name_part: str) -> list[dict[str, Any]]:
    """Containers whose name holds `name_part`, read in one call (a list-then-inspect races their removal)."""
    found: list[dict[str, Any]] = client.api.containers(all=True, filters={"name": name_part})
    return found


def test_a_job_runs_and_writes_its_results(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve()
    (tmp_path / "4cat" / "in").mkdir()
    (tmp_path / "4cat" / "in" / "a.txt").write_text("12345")
    key = server.submit("fake_local", ["--output_dir", "data/out", "--stdout", "said hello", "data/in/a.txt"],
                        **{"4CAT_dataset_key": "contract"})["key"]
    job = server.wait_final(key, 120)
    assert job["status"] == "complete", job
    assert _results(job)["returncode"] == 0 and "said hello" in _results(job)["report"]
    assert (tmp_path / "4cat" / "out" / "a.txt.txt").read_text() == "processed 5 bytes of a.txt\n"


def test_the_exit_code_and_both_streams_come_back(serve: Callable[..., Server]) -> None:
    server = serve()
    key = server.submit("fake_local", ["--stdout", "to stdout", "--stderr", "CUDA error: out of memory",
                                       "--exit", "3"])["key"]
    job = server.wait_final(key, 120)
    results = _results(job)
    assert job["status"] == "error" and results["returncode"] == 3
    assert "to stdout" in results["report"] and "CUDA error: out of memory" in results["error"]


def test_a_timeout_stops_the_container(serve: Callable[..., Server], docker_client: docker.DockerClient) -> None:
    server = serve()
    key = server.submit("fake_local", ["--sleep", "120"], timeout=3)["key"]
    job = server.wait_final(key, 120)
    assert job["status"] == "error" and "timed out" in _results(job)["error"]
    wait_until(lambda: not [c for c in _containers(docker_client, f"{server.instance}-{key}")
                            if c["State"] == "running"], 30, what="no container left running")


def test_a_cancel_stops_the_container(serve: Callable[..., Server], docker_client: docker.DockerClient) -> None:
    server = serve()
    key = server.submit("fake_local", ["--sleep", "120"])["key"]
    server.wait_status(key, "running", 60)
    wait_until(lambda: _containers(docker_client, f"{server.instance}-{key}"), 60, what="the container")
    assert server.delete(f"/api/jobs/{key}").status_code in (200, 202)
    job = server.wait_final(key, 60)
    assert job["status"] == "error" and "Cancelled" in _results(job)["error"]
    wait_until(lambda: not _containers(docker_client, f"{server.instance}-{key}"), 30, what="the container to go")


def test_a_job_is_adopted_after_a_kill_9_of_the_server(serve: Callable[..., Server],
                                                        docker_client: docker.DockerClient) -> None:
    server = serve()
    key = server.submit("fake_local", ["--sleep", "4", "--stdout", "survived"])["key"]
    wait_until(lambda: _containers(docker_client, f"{server.instance}-{key}"), 60, what="the container")
    server.kill()
    server.start()
    job = server.wait_final(key, 120)
    assert job["status"] == "complete" and "survived" in _results(job)["report"]


def test_an_engine_outage_leaves_no_job_stuck(request: pytest.FixtureRequest, serve: Callable[..., Server],
                                              backend: Backend) -> None:
    """A restart of the engine under a running job: the job ends (its real outcome where the engine kept it),
    and the server reconnects by itself."""
    outage = backend.outage
    if backend.name == "docker":  # a private dockerd, so that other tests' engine is never restarted
        url, outage = request.getfixturevalue("private_dockerd")
        server = serve(DOCKER_HOST=url)
    else:
        server = serve()
    key = server.submit("fake_local", ["--sleep", "8", "--stdout", "through the outage"])["key"]
    server.wait_status(key, "running", 60)
    time.sleep(1)
    outage()
    job = server.wait_final(key, 180)
    assert job["status"] in ("complete", "error")
    assert server.wait_final(server.submit("fake_local", ["--stdout", "after"])["key"], 120)["status"] == "complete"


# -- what only the Slurm backend has


def test_gpu_jobs_wait_in_slurm_until_a_card_frees(make_server: Callable[..., Server], tmp_path: Path,
                                                   slurm_cluster: SlurmCluster) -> None:
    config = base_config(tmp_path, BACKEND="slurm", SLURM_SPOOL_PATH=str(tmp_path / "slurm-jobs"),
                         SLURM_POLL_SECONDS=0.5, GPU_ENABLED=True, GPU_DEVICE_MODE="environment",
                         GPU_INVENTORY=[{"id": "0", "memory": "16GiB"}, {"id": "1", "memory": "16GiB"}])
    config["DOCKER_ENDPOINTS"]["fake"]["gpu_memory"] = "10GiB"
    server = make_server(config, env=slurm_cluster.env)
    check = server.get("/api/check_gpu_mem/fake")
    assert check.status_code == 200 and check.json()["memory"]["gpu_total_mem"] == 16 * 1024**3
    keys = [server.submit("fake_local", ["--sleep", "6"])["key"] for _ in range(3)]
    names = [f"dsm-{server.instance}-{key}" for key in keys]

    def slurm_states() -> dict[str, str]:
        output = slurm_cluster.run("squeue", "--noheader", "--format=%j %T").stdout
        return dict(line.split() for line in output.splitlines() if line.strip())

    states = wait_until(lambda: (s := slurm_states()) and sorted(s.get(n, "") for n in names) ==
                        ["PENDING", "RUNNING", "RUNNING"] and s, 60, what="two running, one waiting for a GPU")
    assert states
    assert server.get("/api/check_gpu_mem/fake").status_code == 200  # never 503 for a job that will fit
    for key in keys:
        assert server.wait_final(key, 120)["status"] == "complete"


def test_a_node_that_cannot_see_the_data_says_so(make_server: Callable[..., Server], tmp_path: Path,
                                                 slurm_cluster: SlurmCluster) -> None:
    config = base_config(tmp_path, BACKEND="slurm", SLURM_SPOOL_PATH=str(tmp_path / "slurm-jobs"),
                         SLURM_POLL_SECONDS=0.5)
    server = make_server(config, env=slurm_cluster.env)
    server.stop()
    hidden = tmp_path / "4cat"
    hidden.rename(tmp_path / "4cat-moved")  # as a node that lacks the shared mount sees it
    hidden.mkdir()
    server.start()
    hidden.rmdir()
    key = server.submit("fake_local", [])["key"]
    job = server.wait_final(key, 120)
    assert job["status"] == "error" and "cannot see" in _results(job)["error"]


def test_check_config_says_whether_the_backend_answers(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    import yaml

    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(base_config(tmp_path, BACKEND="slurm",
                                               SLURM_SPOOL_PATH=str(tmp_path / "slurm-jobs"))))
    done = subprocess.run([sys.executable, "-m", "dmi_service_manager", "check-config", str(path)], capture_output=True,
                          text=True, env={**os.environ, **slurm_cluster.env}, timeout=60, check=False)
    assert "backend: slurm (Slurm cluster) answers" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "dmi_service_manager", "check-config", str(path)], capture_output=True,
                          text=True, env={**os.environ, "SLURM_CONF": str(tmp_path / "no-such.conf")}, timeout=60,
                          check=False)
    assert "does not answer" in done.stdout, done.stdout + done.stderr
