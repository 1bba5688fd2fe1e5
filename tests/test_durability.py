"""Jobs survive kill -9 of the server and restarts of Docker; cancels stop the container itself."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from support import BUSYBOX, INSTANCE_LABEL, Server, base_config, containers_of, wait_until


def test_a_job_survives_a_server_kill_and_is_adopted(make_server: Callable[..., Server]) -> None:
    server = make_server()
    key = server.submit("fake_local", ["--sleep", "3", "--stdout", "adopted", "--exit", "0"])["key"]
    server.wait_status(key, "running")
    server.kill()
    server.start(wait=False)
    # answers within seconds (4CAT aborts on its fourth failed poll); generous for a loaded machine
    assert server.wait_ready() < 20
    job = server.wait_final(key, 30)
    assert job["status"] == "complete"
    assert "adopted" in json.loads(job["results"])["report"]
    assert f"adopting 1 job(s) that were starting or running before this start ({key})" in server.log()


def test_a_stop_leaves_running_containers_to_the_next_start_and_says_so(make_server: Callable[..., Server]) -> None:
    server = make_server()
    key = server.submit("fake_local", ["--sleep", "4", "--exit", "0"])["key"]
    server.wait_status(key, "running")
    server.stop()  # SIGTERM, as systemd stops it
    assert f"stopping: the containers of 1 running job(s) ({key}) keep running; the next start adopts them" \
        in server.log()
    server.start()
    assert server.wait_final(key, 30)["status"] == "complete"
    assert f"adopting 1 job(s) that were starting or running before this start ({key})" in server.log()


def test_a_second_server_on_the_same_database_says_who_runs_the_queue(make_server: Callable[..., Server],
                                                                      tmp_path: Path) -> None:
    config = base_config(tmp_path, DMI_SM_SERVER="http://localhost:4000")
    first = make_server(config)
    second = make_server(config)
    pid = int(Path(f"{config['DATABASE_FILE']}.scheduler.lock").read_text())
    assert f"another server (pid {pid}) already runs the queue of {config['DATABASE_FILE']}" in second.log()
    assert "already runs the queue" not in first.log()
    for server in (first, second):  # neither listens on 4000: the progress of containers would go astray
        assert f"but this server listens on port {server.port}" in server.log()
    key = second.submit("fake_local", ["--exit", "0"])["key"]
    assert second.wait_final(key)["status"] == "complete"  # the first one's queue ran it
    assert "no token exists" not in first.log()


def test_requiring_tokens_where_none_exists_is_warned_about_at_start(make_server: Callable[..., Server]) -> None:
    server = make_server(REQUIRE_TOKEN=True)
    assert "REQUIRE_TOKEN is set but no token exists" in server.log()
    server.token("read")
    server.stop()
    server.start()
    assert server.log().count("REQUIRE_TOKEN is set but no token exists") == 1  # the first start's only


def test_a_stopping_worker_never_takes_over_the_scheduler_while_it_drains_a_followed_log(
        make_server: Callable[..., Server], tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path), workers=2)
    key = server.submit("fake_local", ["--sleep", "30"])["key"]
    server.wait_status(key, "running")
    # A kept-alive connection stays with one worker: find one to the worker that does not run the scheduler.
    # Which worker accepts a connection is the kernel's choice: open new ones (bounded) until one lands there.
    sessions: list[requests.Session] = []

    def to_the_other_worker() -> requests.Session | None:
        sessions.append(requests.Session())
        here = sessions[-1].get(f"{server.url}/api/health", timeout=30).json()["scheduler"]["here"]
        return None if here else sessions[-1]

    other = wait_until(to_the_other_worker, 20, what="a connection to the worker that does not run the scheduler")
    with other.get(f"{server.url}/api/jobs/{key}/logs", params={"follow": "1"}, stream=True, timeout=30):
        server.stop()  # the scheduler's worker stops at once; the other drains the followed log first
    log = server.log()
    assert "stopping: the containers of 1 running job(s)" in log
    assert log.count("runs the scheduler") == 1, log
    for session in sessions:
        session.close()
    server.start()
    assert server.wait_final(key, 60)["status"] == "complete"


def test_a_container_that_exits_while_the_server_is_down_gets_its_real_exit_code(
    make_server: Callable[..., Server], docker_client: docker.DockerClient
) -> None:
    server = make_server()
    key = server.submit("fake_local", ["--sleep", "4", "--stderr", "failed while you were away", "--exit", "7"])["key"]
    server.wait_status(key, "running")
    server.kill()
    container = containers_of(docker_client, server.instance, key)[0]
    wait_until(lambda: container.reload() or container.status == "exited", 20)
    exited_at = time.time()
    time.sleep(3)  # down a while longer
    server.start()
    job = server.wait_final(key, 30)
    results = json.loads(job["results"])
    assert job["status"] == "error" and results["returncode"] == 7
    assert "failed while you were away" in results["error"]
    assert job["completed_at"] <= exited_at + 1  # when it ended, not when the server came back to see it
    wait_until(lambda: containers_of(docker_client, server.instance, key) == [], 10, what="the container removed")


@pytest.mark.parametrize("ends_while_down", [True, False], ids=["ends-while-down", "runs-on"])
def test_a_job_whose_start_a_crash_kept_unrecorded_runs_once(make_server: Callable[..., Server],
                                                            docker_client: docker.DockerClient,
                                                            ends_while_down: bool) -> None:
    """The server died after it started a job's container and before it wrote that down: the row below is
    what that crash leaves (claimed, still pending). The next server adopts the run and never starts a second."""
    server = make_server()
    since = time.time()
    key = server.submit("fake_local", ["--sleep", "5", "--stdout", "once", "--exit", "0"])["key"]
    server.wait_status(key, "running")
    server.kill()
    with sqlite3.connect(server.config["DATABASE_FILE"]) as db:
        db.execute("UPDATE jobs SET status = 'pending', container_id = NULL, started_at = NULL WHERE id = ?", (key,))
    container = containers_of(docker_client, server.instance, key)[0]
    if ends_while_down:
        wait_until(lambda: container.reload() or container.status == "exited", 20)
    server.start()
    job = server.wait_final(key, 30)
    assert job["status"] == "complete" and "once" in json.loads(job["results"])["report"]
    starts = docker_client.events(since=since, until=time.time(), decode=True, filters={
        "type": "container", "event": "start",
        "label": [f"{INSTANCE_LABEL}={server.instance}", f"dmi-service-manager.job={key}"]})
    assert [event["id"] for event in starts] == [container.id]  # started once, by the first server


def test_a_job_whose_container_vanished_ends_in_error_saying_so(
    make_server: Callable[..., Server], docker_client: docker.DockerClient
) -> None:
    server = make_server()
    key = server.submit("fake_local", ["--sleep", "60"])["key"]
    server.wait_status(key, "running")
    server.kill()
    for container in containers_of(docker_client, server.instance, key):
        container.remove(force=True)
    server.start()
    job = server.wait_final(key, 30)
    assert job["status"] == "error" and "vanished" in json.loads(job["results"])["error"]


def test_pending_jobs_wait_durably_and_start_after_a_restart(make_server: Callable[..., Server],
                                                             tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, MAX_CONCURRENT_JOBS=1))
    first = server.submit("fake_local", ["--sleep", "8"])["key"]
    queued = [server.submit("fake_local", ["--stdout", f"job {i}"])["key"] for i in range(3)]
    server.wait_status(first, "running")
    waiting = server.job(queued[1])
    assert waiting["status"] == "pending"
    assert wait_until(lambda: (server.job(queued[1])["message"] or "").startswith("Waiting in line: 2 of 3"), 10)
    server.kill()
    server.start()
    for key in [first, *queued]:
        assert server.wait_final(key, 40)["status"] == "complete"
    assert all(server.job(k)["message"] is None for k in queued)  # our note goes when the job runs


def test_cancel_a_pending_job_and_a_running_one(make_server: Callable[..., Server], tmp_path: Path,
                                                docker_client: docker.DockerClient) -> None:
    server = make_server(base_config(tmp_path, MAX_CONCURRENT_JOBS=1))
    running = server.submit("fake_local", ["--sleep", "120"])["key"]
    pending = server.submit("fake_local", [])["key"]
    server.wait_status(running, "running")

    cancelled = server.delete(f"/api/jobs/{pending}", params={"by": "a researcher"})
    assert cancelled.status_code == 200 and cancelled.json()["job"]["status"] == "error"
    results = json.loads(cancelled.json()["job"]["results"])
    assert "Cancelled by a researcher (token test-admin-0, 127.0.0.1)" in results["error"]
    assert results["returncode"] != 0

    assert server.delete(f"/api/jobs/{running}").status_code == 202
    job = server.wait_final(running, 20)
    assert job["status"] == "error"
    assert "Cancelled by token test-admin-0 (127.0.0.1)" in json.loads(job["results"])["error"]
    assert job["message"] == "Cancelled by token test-admin-0 (127.0.0.1)."  # what 4CAT shows, as for the other
    assert containers_of(docker_client, server.instance, running) == []
    again = server.delete(f"/api/jobs/{running}")
    assert again.status_code == 200 and again.json()["job"]["status"] == "error"
    assert server.delete("/api/jobs/999999").status_code == 404


def test_logs_can_be_followed_while_the_job_runs(server: Server) -> None:
    key = server.submit("fake_local", ["--progress", "3", "--sleep", "3", "--stdout", "hello from the container"],
                        pass_key=True)["key"]
    server.wait_status(key, "running")
    with requests.get(f"{server.url}/api/jobs/{key}/logs", params={"follow": "1"}, stream=True, timeout=30) as r:
        text = b"".join(r.iter_content(None)).decode()
    assert "hello from the container" in text and f"job {key} ended: complete" in text
    tail = server.get(f"/api/jobs/{key}/logs", params={"tail": "1"}).text
    assert len(tail.splitlines()) == 1
    assert server.get(f"/api/jobs/{key}/logs", params={"tail": "x"}).status_code == 400


def test_following_a_waiting_jobs_log_waits_for_its_container_then_follows_it(
        make_server: Callable[..., Server], tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, MAX_CONCURRENT_JOBS=1))
    first = server.submit("fake_local", ["--sleep", "8"])["key"]
    waiting = server.submit("fake_local", ["--stdout", "the second one speaks"])["key"]
    server.wait_status(first, "running")
    assert server.job(waiting)["status"] == "pending"
    with requests.get(f"{server.url}/api/jobs/{waiting}/logs", params={"follow": "1"}, stream=True, timeout=60) as r:
        text = b"".join(r.iter_content(None)).decode()
    assert text.startswith(f"[dsm] job {waiting} is waiting to start")
    assert "the second one speaks" in text and f"job {waiting} ended: complete" in text


def test_four_workers_serve_every_route_and_start_each_job_exactly_once(
    make_server: Callable[..., Server], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    server = make_server(base_config(tmp_path, MAX_CONCURRENT_JOBS=6), workers=4)
    starts: dict[str, int] = {}
    stop = threading.Event()
    since = int(time.time()) - 1

    def count_starts() -> None:
        events = docker_client.events(decode=True, since=since, filters={
            "type": "container", "event": "start", "label": f"dmi-service-manager.instance={server.instance}"})
        for event in events:
            job = event["Actor"]["Attributes"]["dmi-service-manager.job"]
            starts[job] = starts.get(job, 0) + 1
            if stop.is_set():
                break

    watcher = threading.Thread(target=count_starts, daemon=True)
    watcher.start()
    keys = []
    for _ in range(24):
        response = requests.post(f"{server.url}/api/fake_local", json={"args": ["--sleep", "0.2"]}, timeout=30,
                                 headers={"Connection": "close"})
        keys.append(response.json()["key"])
    for key in keys:
        assert server.wait_final(key, 60)["status"] == "complete"
    health = [requests.get(f"{server.url}/api/health", headers={"Connection": "close"}, timeout=10).json()
              for _ in range(10)]
    pids = {answer["scheduler"]["pid"] for answer in health}
    assert len(pids) == 1  # one scheduler, whichever worker answers
    stop.set()
    server.submit("fake_local", [])  # one more event wakes the watcher so that it can stop
    watcher.join(10)
    assert {int(k): v for k, v in starts.items() if int(k) in keys} == {k: 1 for k in keys}


def test_a_removed_lock_file_does_not_let_a_second_server_schedule_too(
    make_server: Callable[..., Server], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Someone deletes the scheduler's lock file while it runs, then a second server starts on the same
    config: the first one's doorbell still says who leads, and the second waits."""
    config = base_config(tmp_path, MAX_CONCURRENT_JOBS=6)
    first = make_server(config)
    wait_until(lambda: "runs the scheduler" in first.log(), 15, what="the first server to lead")
    Path(f"{config['DATABASE_FILE']}.scheduler.lock").unlink()
    second = make_server(dict(config))
    wait_until(lambda: "another process runs the scheduler" in second.log(), 15, what="the second to stand back")
    keys = [(first if index % 2 else second).submit("fake_local", ["--sleep", "0.3"])["key"] for index in range(12)]
    for key in keys:
        assert first.wait_final(key, 60)["status"] == "complete"
    assert "runs the scheduler" not in second.log().replace("another process runs the scheduler", "")
    first.kill()  # gone, its doorbell with it: the second server takes over
    wait_until(lambda: "runs the scheduler" in second.log().replace("another process runs the scheduler", ""), 15,
               what="the second server to take over")
    assert second.wait_final(second.submit("fake_local", [])["key"], 60)["status"] == "complete"


def test_when_the_worker_running_the_scheduler_dies_another_takes_over(make_server: Callable[..., Server],
                                                                     tmp_path: Path) -> None:
    server = make_server(workers=2)
    running = server.submit("fake_local", ["--sleep", "3"])["key"]
    server.wait_status(running, "running")
    leader = server.get("/api/health").json()["scheduler"]["pid"]
    os.kill(leader, signal.SIGKILL)
    new_leader = wait_until(lambda: (pid := _leader(server)) not in (None, leader) and pid, 20,
                            what="another worker to take the scheduler")
    assert new_leader != leader
    assert server.wait_final(running, 30)["status"] == "complete"  # adopted by the new leader
    assert server.wait_final(server.submit("fake_local", [])["key"], 30)["status"] == "complete"


def _leader(server: Server) -> int | None:
    try:
        pid: int | None = server.get("/api/health").json()["scheduler"]["pid"]
    except (requests.RequestException, ValueError):
        return None
    return pid if pid is not None and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_9_of_the_parent_leaves_no_worker_holding_the_port(make_server: Callable[..., Server],
                                                                tmp_path: Path) -> None:
    server = make_server(workers=4)
    server.kill()
    wait_until(lambda: _port_free(server.port), 10, what="the workers to die with their parent")
    server.start()  # binds the same port right away
    assert server.get("/api/").status_code == 200


def _port_free(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/api/", timeout=1)
    except requests.ConnectionError:
        return True
    return False


def test_a_docker_daemon_restart_ends_affected_jobs_and_the_server_reconnects(
    make_server: Callable[..., Server], tmp_path: Path, private_dockerd: tuple[str, Callable[[], None]]
) -> None:
    url, restart_docker = private_dockerd
    server = make_server(base_config(tmp_path, DOCKER_HOST=url))
    key = server.submit("fake_local", ["--sleep", "300"])["key"]
    server.wait_status(key, "running")
    restart_docker()
    job = server.wait_final(key, 60)
    results = json.loads(job["results"])
    assert job["status"] == "error" and results["returncode"] != 0
    assert "Docker daemon restarted" in results["error"]
    after = server.wait_final(server.submit("fake_local", ["--stdout", "back"])["key"], 60)
    assert after["status"] == "complete"  # reconnected on its own


def test_a_reconcile_pass_that_read_a_task_before_its_next_step_started_leaves_that_step_running(
        tmp_path: Path) -> None:
    """The pass reads the jobs, then lists the containers: a TES task whose executor ended in between shows up
    with the next executor's container, newer than the task as read. That is no leftover of an earlier step
    to remove. (In-process, to hold the pass's reading: the window is too short to hit through the server.)"""
    from dmi_service_manager.config import Config
    from dmi_service_manager.context import AppContext
    from dmi_service_manager.jobs.model import JobStatus
    from dmi_service_manager.jobs.scheduler import Scheduler
    from tes_support import tes_config

    config = Config.model_validate(tes_config(tmp_path))
    context = AppContext.build(config, port=1)
    scheduler = Scheduler(config, context.store, context.backend, context.gpus, context.instance_id,
                          context.workloads)
    scheduler.start()
    try:
        task_id = context.tes.create({"executors": [{"image": BUSYBOX, "command": ["sleep", "1"]},
                                                    {"image": BUSYBOX, "command": ["sleep", "5"]}]}, who="test")
        scheduler.wake()

        def at_step(step: int) -> Any:
            job = context.store.get_task(task_id)
            return job if job is not None and job.step == step and job.container_id else None

        as_read = [wait_until(lambda: at_step(0), what="the first executor running")]
        second = wait_until(lambda: at_step(1), what="the second executor running")
        scheduler._reconcile(as_read)
        assert docker.from_env().containers.get(second.container_id).status == "running"
        final = wait_until(lambda: (job := context.store.get_task(task_id)) is not None and job.status.final and job)
        assert final.status == JobStatus.COMPLETE, final.results
    finally:
        scheduler.stop()
        for container in containers_of(docker.from_env(), context.instance_id):
            context.backend.remove(container.id)
