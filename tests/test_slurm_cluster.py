"""Smoke tests of the private Slurm cluster (tests/slurm_cluster.py) that the Slurm backend's tests run on:
it schedules, queues on its two declared GPUs, cancels, times out, runs Docker on its nodes, and keeps its jobs
across a slurmctld restart. They also pin down the Slurm behaviour the backend relies on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from slurm_cluster import SlurmCluster
from support import BUSYBOX, wait_until

LABEL = "dsm-slurm-smoke-test"


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    return slurm_cluster


@pytest.fixture
def containers(docker_client: docker.DockerClient) -> Iterator[str]:
    """A label for the test's containers; whatever carries it is removed afterwards."""
    label = f"{LABEL}={time.monotonic_ns()}"
    yield label
    for container in docker_client.containers.list(all=True, filters={"label": label}):
        container.remove(force=True)


def script(cluster: SlurmCluster, name: str, body: str) -> str:
    path = cluster.folder / "jobs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def known(cluster: SlurmCluster, job_id: int) -> dict[str, str]:
    found = cluster.job(job_id)
    assert found is not None, f"Slurm has forgotten job {job_id}"
    return found


def running(client: docker.DockerClient, label: str) -> list[str]:
    return [c.name for c in client.containers.list(filters={"label": label}, ignore_removed=True)]


def test_a_batch_job_runs_on_each_node_and_its_output_file_appears(cluster: SlurmCluster) -> None:
    cluster.wait_nodes_idle(60)  # the cluster is shared: an earlier test's jobs may still be completing
    assert cluster.node_states() == dict.fromkeys(cluster.nodes, "idle")
    for node in cluster.nodes:
        job_id = cluster.submit("-w", node, "--wrap", "echo hi; hostname")
        record = cluster.wait_state(job_id, timeout=30)
        assert (record["JobState"], record["ExitCode"], record["NodeList"]) == ("COMPLETED", "0:0", node)
        lines = cluster.output(job_id).split()
        assert lines[0] == "hi"
        assert lines[1] == (cluster.hostname if node == "dsm1" else node)  # dsm2: a hostname of its own


def test_a_failing_job_reports_its_exit_code_in_scontrol_and_squeue(cluster: SlurmCluster) -> None:
    job_id = cluster.submit("--wrap", "echo oops >&2; exit 3")
    record = cluster.wait_state(job_id, timeout=30)
    assert (record["JobState"], record["Reason"], record["ExitCode"]) == ("FAILED", "NonZeroExitCode", "3:0")
    assert "oops" in cluster.output(job_id)  # stderr goes to the --output file too unless --error says
    # squeue lists ended jobs only when asked (-t all), until MinJobAge; --json (openapi/v0.0.38) gives the raw
    # wait status as exit_code (3 << 8), not the exit code
    line = cluster.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%i|%T|%r|%N").stdout.strip()
    assert line == f"{job_id}|FAILED|NonZeroExitCode|{record['NodeList']}"
    jobs = json.loads(cluster.run("squeue", "--json").stdout)["jobs"]
    (job,) = [j for j in jobs if j["job_id"] == job_id]
    assert (job["job_state"], job["state_reason"], job["exit_code"]) == ("FAILED", "NonZeroExitCode", 3 << 8)
    assert "accounting storage is disabled" in cluster.run("sacct", "-j", str(job_id), check=False).stderr
    # with no slurmdbd, the jobcomp file is the only lasting record of a finished job
    assert wait_until(lambda: f"JobId={job_id} " in cluster.jobcomp_log.read_text(), 10, 0.2, "the jobcomp line")


def test_a_gpu_job_gets_its_gpu_in_the_environment(cluster: SlurmCluster) -> None:
    env = "env | grep -E '^(CUDA_VISIBLE_DEVICES|SLURM_JOB_GPUS|GPU_DEVICE_ORDINAL|SLURM_GPUS_ON_NODE)=' | sort"
    one = cluster.submit("--gres=gpu:1", "--wrap", env)
    both = cluster.submit("--gres=gpu:2", "--wrap", env)
    none = cluster.submit("--wrap", env)
    for job_id in (one, both, none):
        assert cluster.wait_state(job_id, timeout=30)["JobState"] == "COMPLETED"
    assert cluster.output(one).split() == [
        "CUDA_VISIBLE_DEVICES=0", "GPU_DEVICE_ORDINAL=0", "SLURM_GPUS_ON_NODE=1", "SLURM_JOB_GPUS=0"]
    assert cluster.output(both).split() == [
        "CUDA_VISIBLE_DEVICES=0,1", "GPU_DEVICE_ORDINAL=0,1", "SLURM_GPUS_ON_NODE=2", "SLURM_JOB_GPUS=0,1"]
    assert cluster.output(none) == ""
    assert known(cluster, one)["NodeList"] == "dsm1"  # the only node with GPUs


def test_the_third_gpu_job_waits_for_resources_and_starts_when_one_is_cancelled(cluster: SlurmCluster) -> None:
    jobs = [cluster.submit("--gres=gpu:1", "--wrap", "sleep 120") for _ in range(3)]
    seen: list[list[tuple[str, str]]] = []

    def states() -> list[tuple[str, str]] | None:
        records = [cluster.job(j) or {} for j in jobs]
        seen.append([(r.get("JobState", ""), r.get("Reason", "")) for r in records])
        if sorted(state for state, _ in seen[-1]) != ["PENDING", "RUNNING", "RUNNING"]:
            return None
        # A pending job's reason is set at the controller's next scheduling pass (until then it may read
        # Priority): it must come to Resources, not stay at Priority, as it is first in line and waits for a GPU.
        return seen[-1] if dict(seen[-1])["PENDING"] == "Resources" else None

    try:
        try:
            found = wait_until(states, 30, 0.3)
        except AssertionError:
            raise AssertionError(f"no two running GPU jobs and one pending for Resources; last: {seen[-1:]}") from None
        waiting = jobs[[state for state, _ in found].index("PENDING")]
        assert known(cluster, waiting)["TresPerNode"] == "gres:gpu:1"
        first = next(j for j in jobs if j != waiting)
        cluster.run("scancel", str(first))
        assert cluster.wait_state(first, timeout=30)["JobState"] == "CANCELLED"
        assert cluster.wait_state(waiting, "RUNNING", timeout=30)["NodeList"] == "dsm1"
        cluster.run("scancel", *map(str, jobs))
        for job_id in jobs:
            assert cluster.wait_state(job_id, timeout=30)["JobState"] == "CANCELLED"
    finally:  # a failure here must not leave the next tests a cluster whose GPUs are taken
        cluster.run("scancel", *map(str, jobs), check=False)


def test_a_job_runs_a_container_through_the_nodes_docker(
    cluster: SlurmCluster, busybox_image: str, containers: str
) -> None:
    for node in cluster.nodes:
        job_id = cluster.submit("-w", node, "--wrap", f"docker run --rm --label {containers} {BUSYBOX} echo hi")
        record = cluster.wait_state(job_id, timeout=60)
        assert record["JobState"] == "COMPLETED", cluster.output(job_id)
        assert cluster.output(job_id) == "hi\n"


def test_scancel_leaves_a_plain_docker_run_container_running_but_a_trap_in_the_script_removes_it(
    cluster: SlurmCluster, busybox_image: str, containers: str, docker_client: docker.DockerClient
) -> None:
    """What the backend's job script must do: Slurm kills the job's processes (SIGTERM, KillWait, SIGKILL to each
    process of the job, by parentage), and the `docker run` client with them; the container is no child of
    the job's and keeps running. A script that runs the client in the background and removes the container on
    TERM leaves nothing behind."""
    plain = script(cluster, "plain.sh", f"exec docker run --rm --name plain-$SLURM_JOB_ID --label {containers} "
                                        f"{BUSYBOX} sleep 300\n")
    trapped = script(cluster, "trapped.sh", f"""
name=trapped-$SLURM_JOB_ID
trap 'echo "got TERM"; docker rm -f "$name" >/dev/null 2>&1; exit 143' TERM
docker run --rm --name "$name" --label {containers} {BUSYBOX} sleep 300 &
wait $!
""")
    jobs = {name: cluster.submit("-w", cluster.nodes[-1], path) for name, path in (("plain", plain),
                                                                                    ("trapped", trapped))}
    wanted = {f"{name}-{job_id}" for name, job_id in jobs.items()}
    wait_until(lambda: set(running(docker_client, containers)) == wanted, 60, 0.3, "both containers to run")
    cluster.run("scancel", *map(str, jobs.values()))
    for job_id in jobs.values():
        assert cluster.wait_state(job_id, timeout=cluster.kill_wait + 30)["JobState"] == "CANCELLED"
    assert "got TERM" in cluster.output(jobs["trapped"])
    assert running(docker_client, containers) == [f"plain-{jobs['plain']}"]  # still there: Slurm cannot see it


def test_a_time_limit_ends_the_job_and_its_container(
    cluster: SlurmCluster, busybox_image: str, containers: str, docker_client: docker.DockerClient
) -> None:
    """The smallest limit is a minute (--time=0:01 is one second, rounded up to a minute); at the limit the job
    gets what scancel gives (TERM to each process, KILL after KillWait) and ends TIMEOUT."""
    trapped = script(cluster, "timed.sh", f"""
trap 'echo "got TERM"; docker rm -f "timed-$SLURM_JOB_ID" >/dev/null 2>&1; exit 143' TERM
docker run --rm --name "timed-$SLURM_JOB_ID" --label {containers} {BUSYBOX} sleep 300 &
wait $!
""")
    started = time.monotonic()
    job_id = cluster.submit("--time=0:01", trapped)
    assert known(cluster, job_id)["TimeLimit"] == "00:01:00"
    wait_until(lambda: running(docker_client, containers), 60, 0.3, "the container to run")
    record = cluster.wait_state(job_id, timeout=150)
    assert (record["JobState"], record["Reason"]) == ("TIMEOUT", "TimeLimit")
    assert 55 < time.monotonic() - started < 150
    assert "DUE TO TIME LIMIT" in cluster.output(job_id) and "got TERM" in cluster.output(job_id)
    assert running(docker_client, containers) == []


def test_jobs_survive_a_controller_restart_and_run_once(cluster: SlurmCluster) -> None:
    marker = cluster.folder / "jobs" / f"runs-{time.monotonic_ns()}"
    long = cluster.submit("--wrap", f"echo run >> {marker}.long; sleep 8; echo done")
    short = cluster.submit("-w", cluster.nodes[-1], "--wrap", f"echo run >> {marker}.short; sleep 2; echo done")
    blocked = cluster.submit("--hold", "--wrap", "echo never")  # held: stays pending
    cluster.wait_state(long, "RUNNING", timeout=30)
    cluster.wait_state(short, "RUNNING", timeout=30)
    cluster.stop_controller()
    assert "Unable to contact slurm controller" in cluster.run("squeue", check=False, timeout=60).stderr
    time.sleep(4)  # `short` ends while the controller is down: its slurmd reports the end later
    cluster.start_controller()
    assert cluster.state(long) in ("RUNNING", "COMPLETING", "COMPLETED")
    assert cluster.state(blocked) == "PENDING"
    for job_id in (long, short):
        record = cluster.wait_state(job_id, timeout=60)
        assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), record
        assert cluster.output(job_id).split() == ["done"]
    assert Path(f"{marker}.long").read_text() == "run\n"
    assert Path(f"{marker}.short").read_text() == "run\n"
    cluster.restart_controller()  # a plain restart too, as `systemctl restart slurmctld` does
    assert cluster.state(long) == "COMPLETED"
    cluster.run("scancel", str(blocked))
    cluster.wait_nodes_idle(30)
