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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from fourcat import FourCat
from slurm_cluster import SlurmCluster
from support import BUSYBOX, Server, base_config, wait_until
from test_ocr import SENTENCES, four_cat_args, render, word_recall


@dataclass
class Backend:
    name: str
    overrides: Callable[[Path], dict[str, Any]]
    env: dict[str, str]
    outage: Callable[[], None]
    cluster: SlurmCluster | None = None


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


def test_the_container_reports_progress_with_its_key(serve: Callable[..., Server]) -> None:
    """pass_key: the container posts to DMI_SM_SERVER from wherever it runs (a Slurm node too)."""
    server = serve()
    key = server.submit("fake_local", ["--progress", "2"], pass_key=True)["key"]
    job = server.wait_final(key, 120)
    assert job["status"] == "complete" and job["processed_records"] == 2 and job["message"] == "step 2 of 2"


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
    keys = [server.submit("fake_local", ["--sleep", "15"])["key"] for _ in range(3)]
    names = [f"dsm-{server.instance}-{key}" for key in keys]

    def slurm_states() -> dict[str, str]:
        output = slurm_cluster.run("squeue", "--noheader", "--format=%j %T").stdout
        return dict(line.split() for line in output.splitlines() if line.strip())

    wait_until(lambda: sorted(slurm_states().get(n, "") for n in names) == ["PENDING", "RUNNING", "RUNNING"], 60,
               what="two running, one waiting for a GPU")
    assert server.get("/api/check_gpu_mem/fake").status_code == 200  # never 503 for a job that will fit
    for key in keys:
        assert server.wait_final(key, 120)["status"] == "complete"


def test_a_slurm_runs_environment_and_output_are_its_accounts_alone(make_server: Callable[..., Server],
                                                                   tmp_path: Path,
                                                                   slurm_cluster: SlurmCluster) -> None:
    """The spool is shared storage and a node's process list is every user's: a service's secrets are in
    neither the job script nor a command line, and the run's folder is the account's alone."""
    config = base_config(tmp_path, BACKEND="slurm", SLURM_SPOOL_PATH=str(tmp_path / "slurm-jobs"),
                         SLURM_POLL_SECONDS=0.5)
    config["DOCKER_ENDPOINTS"]["shell"] = {"image_name": BUSYBOX, "local": True, "command": "sh -c",
                                           "data_path": "/app/data",
                                           "environment": {"API_KEY": "s3cret-value", "MULTI": "two\nlines"}}
    server = make_server(config, env=slurm_cluster.env)
    key = server.submit("shell_local", ['echo "key=$API_KEY lines=$(echo "$MULTI" | wc -l)"; sleep 5'])["key"]
    server.wait_status(key, "running")
    folder = tmp_path / "slurm-jobs" / f"dsm-{server.instance}-{key}"
    wait_until(lambda: (folder / "started").exists(), 60, what="the job's script to start")
    assert folder.stat().st_mode & 0o777 == 0o700
    assert (folder / "env").stat().st_mode & 0o777 == 0o600
    assert "s3cret-value" not in (folder / "job.sh").read_text()
    assert (folder / "stdout").stat().st_mode & 0o077 == 0  # what the container prints is private too
    job = server.wait_final(key, 120)
    assert job["status"] == "complete" and "key=s3cret-value lines=2" in _results(job)["report"], job


def test_a_node_that_cannot_see_the_data_says_so(make_server: Callable[..., Server], tmp_path: Path,
                                                 slurm_cluster: SlurmCluster) -> None:
    hidden = tmp_path / 'data "$(touch pwned)"'  # a folder's name is text in the job's script, never code
    hidden.mkdir()
    config = base_config(tmp_path, BACKEND="slurm", SLURM_SPOOL_PATH=str(tmp_path / "slurm-jobs"),
                         SLURM_POLL_SECONDS=0.5, **{"4CAT_DATASETS_PATH": str(hidden)})
    server = make_server(config, env=slurm_cluster.env)
    hidden.rmdir()  # as a node that lacks the shared mount sees it
    key = server.submit("fake_local", [])["key"]
    job = server.wait_final(key, 120)
    assert job["status"] == "error" and f"cannot see {hidden}: the folders a job uses" in _results(job)["error"]
    assert not list(tmp_path.rglob("pwned"))


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


def slurm_config(folder: Path, **overrides: Any) -> dict[str, Any]:
    return base_config(folder, BACKEND="slurm", SLURM_SPOOL_PATH=str(folder / "slurm-jobs"), SLURM_POLL_SECONDS=0.5,
                       **overrides)


def test_4cat_runs_ocr_through_slurm_in_both_modes(make_server: Callable[..., Server], tmp_path: Path,
                                                   slurm_cluster: SlurmCluster, ocr_image: str,
                                                   docker_client: docker.DockerClient) -> None:
    """Nothing changes for 4CAT: the same routes and files, the container run on a Slurm node."""
    config = slurm_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["ocr"] = {"image_name": ocr_image, "local": True, "remote": True, "command": "ocr",
                                         "data_path": "/app/data"}
    server = make_server(config, env=slurm_cluster.env)
    local = tmp_path / "local"
    render(docker_client, local, "page one.png", SENTENCES[0])
    client = FourCat(server.url, mode="remote")
    files, results = client.send_files("slurm-collection", "slurm-results", [local / "page one.png"])
    job = client.poll_until_done(client.submit("ocr", four_cat_args(
        f"data/{results}", [f"data/{files}/{client.stored_name('page one.png')}"])), limit=180)
    assert job["status"] == "complete", job
    assert json.loads(job["details"])["container"]["backend"] == "slurm"
    [saved] = client.download_results("slurm-collection", "slurm-results", tmp_path / "downloaded")
    assert word_recall(SENTENCES[0], json.loads(saved.read_text())["simplified_text"]["raw_text"]) >= 0.9

    render(docker_client, tmp_path / "4cat" / "staging", "local.png", SENTENCES[1])
    local_client = FourCat(server.url, mode="local")
    job = local_client.poll_until_done(local_client.submit("ocr", four_cat_args(
        "data/staging/out", ["data/staging/local.png"])), limit=180)
    result = json.loads((tmp_path / "4cat" / "staging" / "out" / "local.json").read_text())
    assert job["status"] == "complete" and word_recall(SENTENCES[1], result["simplified_text"]["raw_text"]) >= 0.9


def test_a_tes_task_runs_its_executors_through_slurm(make_server: Callable[..., Server], tmp_path: Path,
                                                     slurm_cluster: SlurmCluster) -> None:
    (tmp_path / "tes-data").mkdir()
    server = make_server(slurm_config(tmp_path, TES_ENABLED=True, TES_ALLOWED_IMAGES=[BUSYBOX],
                                      TES_FILE_ROOTS=[str(tmp_path / "tes-data")]), env=slurm_cluster.env)
    token = subprocess.run([sys.executable, "-m", "dmi_service_manager", "token", "create", "--config",
                            str(server.config_path), "--name", "slurm", "--scope", "submit"], capture_output=True,
                           text=True, check=True, timeout=60).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    task = {"inputs": [{"path": "/in/words.txt", "content": "one\ntwo\nthree\n"}],
            "outputs": [{"path": "/out/count.txt", "url": f"file://{tmp_path}/tes-data/count.txt"}],
            "executors": [{"image": BUSYBOX, "command": ["sh", "-c", "wc -l < /in/words.txt > /vol/n"]},
                          {"image": BUSYBOX, "command": ["cp", "/vol/n", "/out/count.txt"]}],
            "volumes": ["/vol"]}
    task_id = server.post("/ga4gh/tes/v1/tasks", json=task, headers=headers).json()["id"]
    final = wait_until(lambda: (t := server.get(f"/ga4gh/tes/v1/tasks/{task_id}", headers=headers).json())["state"]
                       in ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR") and t, 180, 0.5, "the task to end")
    assert final["state"] == "COMPLETE", server.get(f"/ga4gh/tes/v1/tasks/{task_id}?view=FULL", headers=headers).text
    assert (tmp_path / "tes-data" / "count.txt").read_text().strip() == "3"

    # No node has this many CPUs: sbatch refuses it in Slurm's words, and the task ends saying so at once.
    too_big = {"executors": [{"image": BUSYBOX, "command": ["true"]}],
               "resources": {"cpu_cores": slurm_cluster.cpus + 1}}
    task_id = server.post("/ga4gh/tes/v1/tasks", json=too_big, headers=headers).json()["id"]
    final = wait_until(lambda: (t := server.get(f"/ga4gh/tes/v1/tasks/{task_id}?view=FULL", headers=headers).json())
                       ["state"] not in ("QUEUED", "INITIALIZING", "RUNNING") and t, 60, 0.5, "the refusal")
    assert final["state"] == "SYSTEM_ERROR"
    assert "sbatch" in " ".join(final["logs"][0]["system_logs"]), final


def test_the_docker_backend_reuses_its_connections_to_the_engine() -> None:
    """The SDK would open a connection for each container a call is about (its pools are keyed by the whole
    URL), and keep 25 of them open: thousands of jobs made thousands of connections."""
    from dmi_service_manager.runtime.docker import DockerBackend

    def sockets() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    backend = DockerBackend()
    backend.ping()
    before = sockets()
    for number in range(40):
        assert backend.inspect(f"dsm-test-no-such-container-{number}") is None
    assert sockets() - before <= 1


def test_a_slurm_run_that_ended_without_a_visible_outcome_is_not_called_dead_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On NFS a node's exit_code file may show up a while after Slurm says the job ended (the server cached
    that it was not there): the run waits OUTCOME_GRACE_SECONDS for it, and ends with the real exit code."""
    from dmi_service_manager.config import load_config
    from dmi_service_manager.runtime import slurm

    config = base_config(tmp_path, BACKEND="slurm", SLURM_SPOOL_PATH=str(tmp_path / "spool"))
    (tmp_path / "config.yml").write_text(json.dumps(config))
    backend = slurm.SlurmBackend(load_config(tmp_path / "config.yml", env={}).config)
    name = "dsm-abc123-7"
    folder = tmp_path / "spool" / name
    folder.mkdir(parents=True)
    ended = {name: ("12", "COMPLETED", "")}
    assert backend._state(name, ended).status == "running"  # not yet: its outcome may still show
    (folder / "exit_code").write_text("0\n")
    state = backend._state(name, ended)
    assert (state.status, state.exit_code) == ("exited", 0)

    other = "dsm-abc123-8"
    (tmp_path / "spool" / other).mkdir()
    monkeypatch.setattr(slurm, "OUTCOME_GRACE_SECONDS", 0.0)
    dead = backend._state(other, {other: ("13", "NODE_FAIL", "")})
    assert dead.status == "dead" and "ended (NODE_FAIL) without writing its outcome" in dead.error
