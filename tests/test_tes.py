"""GA4GH TES v1.1 under /ga4gh/tes/v1: py-tes round trips on real containers, the shared queue, restarts, the
views and lists of the spec, and the refusals that keep a TES client inside its roots, networks and images.
Every 200 answer a test reads through TesApi has been checked against the official OpenAPI description."""

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
import tes

from dmi_service_manager.errors import BadRequest
from dmi_service_manager.tes.schema import Task, parse_task
from support import BUSYBOX, Server, containers_of, wait_until
from tes_support import (
    FileServer,
    Redirect,
    Slow,
    Tes,
    TesApi,
    Unsized,
    assert_error,
    container_events,
    container_with_env,
    create_token,
    echo_task,
    executor_logs,
    files_holding,
    open_tes,
    revoke_token,
    schema_errors,
    sleep_task,
    system_logs,
    tes_client,
    tes_config,
)

JOB_LABEL = "dmi-service-manager.job"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient,
           busybox_image: str) -> Iterator[Tes]:
    """One TES server for the tests that need nothing special; each of them names its tasks and files uniquely."""
    folder = tmp_path_factory.mktemp("tes-shared")
    server = Server(folder, tes_config(folder, TES_HTTP_ALLOWED_NETWORKS=["127.0.0.1/32"]))
    try:
        server.start()
        yield open_tes(server)
    finally:
        server.stop()
        server.remove_containers(docker_client)


@pytest.fixture
def make_tes(make_server: Callable[..., Server], tmp_path: Path) -> Callable[..., Tes]:
    count = itertools.count()

    def make(**overrides: Any) -> Tes:
        folder = tmp_path / f"tes{next(count)}"
        folder.mkdir()
        return open_tes(make_server(tes_config(folder, **overrides)))

    return make


@pytest.fixture
def http_files() -> Iterator[Callable[..., FileServer]]:
    servers: list[FileServer] = []

    def start(host: str = "127.0.0.1",
              routes: dict[str, bytes | Redirect | Unsized | Slow] | None = None) -> FileServer:
        servers.append(FileServer(host, dict(routes or {})))
        return servers[-1]

    yield start
    for one in servers:
        one.close()


def unique() -> str:
    return uuid.uuid4().hex[:10]


def executor(*command: str, **fields: Any) -> dict[str, Any]:
    return {"image": BUSYBOX, "command": list(command), **fields}


# -- round trips with py-tes


def test_py_tes_runs_an_echo_task_to_complete_with_its_log(shared: Tes) -> None:
    task_id = shared.client.create_task(tes.Task(
        name="echo", executors=[tes.Executor(image=BUSYBOX, command=["echo", "hello from tes"])]))
    assert shared.api.wait(task_id)["state"] == "COMPLETE"

    task = shared.client.get_task(task_id, view="FULL")
    assert task.id == task_id and task.state == "COMPLETE" and task.name == "echo"
    assert task.creation_time is not None
    [task_log] = task.logs
    [log] = task_log.logs
    assert log.exit_code == 0 and "hello from tes" in log.stdout
    assert log.start_time is not None and log.end_time is not None and log.start_time <= log.end_time
    assert task_log.start_time is not None and task_log.end_time is not None
    assert shared.client.get_task(task_id, view="MINIMAL").state == "COMPLETE"


def test_executors_pass_data_through_a_shared_volume(shared: Tes) -> None:
    task_id = shared.client.create_task(tes.Task(volumes=["/vol"], executors=[
        tes.Executor(image=BUSYBOX, command=["sh", "-c", "echo piped through > /vol/x"]),
        tes.Executor(image=BUSYBOX, command=["sh", "-c", 'cat x; echo "$GREETING"; pwd'], workdir="/vol",
                     env={"GREETING": "hello there"}),
    ]))
    task = shared.api.wait(task_id)
    assert task["state"] == "COMPLETE", system_logs(task)
    assert [log["exit_code"] for log in executor_logs(task)] == [0, 0]
    assert executor_logs(task)[1]["stdout"] == "piped through\nhello there\n/vol\n"


def test_stdin_stdout_and_stderr_are_files_inside_the_container(shared: Tes) -> None:
    results = shared.root / f"redirect-{unique()}"
    results.mkdir()
    task_id = shared.client.create_task(tes.Task(
        inputs=[tes.Input(path="/in/a.txt", content="one\ntwo\nthree\n")],
        executors=[tes.Executor(image=BUSYBOX, command=["sh", "-c", "wc -l; echo complaint >&2"],
                                stdin="/in/a.txt", stdout="/out/count.txt", stderr="/out/err.txt")],
        outputs=[tes.Output(path="/out/count.txt", url=f"file://{results}/count.txt"),
                 tes.Output(path="/out/err.txt", url=f"file://{results}/err.txt")],
    ))
    assert shared.api.wait(task_id)["state"] == "COMPLETE"
    assert (results / "count.txt").read_text().strip() == "3"
    assert (results / "err.txt").read_text() == "complaint\n"


def test_inputs_by_content_file_directory_and_http(shared: Tes, http_files: Callable[..., FileServer]) -> None:
    folder = shared.root / f"in-{unique()}"
    (folder / "d" / "sub").mkdir(parents=True)
    (folder / "f.txt").write_text("from a file\n")
    (folder / "d" / "a.txt").write_text("dir a\n")
    (folder / "d" / "sub" / "b.txt").write_text("dir b\n")
    web = http_files(routes={"/h.txt": b"from http\n"})

    task_id = shared.client.create_task(tes.Task(
        inputs=[tes.Input(path="/in/c.txt", content="from content\n"),
                tes.Input(url=f"file://{folder}/f.txt", path="/in/f.txt", type="FILE"),
                tes.Input(url=f"file://{folder}/d", path="/in/d", type="DIRECTORY"),
                tes.Input(url=web.url("/h.txt"), path="/in/h.txt", type="FILE")],
        executors=[tes.Executor(image=BUSYBOX, command=["cat", "/in/c.txt", "/in/f.txt", "/in/d/a.txt",
                                                        "/in/d/sub/b.txt", "/in/h.txt"])],
    ))
    task = shared.api.wait(task_id)
    assert task["state"] == "COMPLETE", system_logs(task)
    assert executor_logs(task)[0]["stdout"] == "from content\nfrom a file\ndir a\ndir b\nfrom http\n"
    assert "GET /h.txt" in web.requests
    assert [one.get("type", "FILE") for one in task["inputs"]] == ["FILE", "FILE", "DIRECTORY", "FILE"]


def test_wildcard_outputs_land_in_the_url_folder_with_their_logs(shared: Tes) -> None:
    results = shared.root / f"results-{unique()}"
    task_id = shared.client.create_task(tes.Task(
        executors=[tes.Executor(image=BUSYBOX, command=[
            "sh", "-c", "mkdir -p /out && echo one > /out/a.txt && echo three > /out/b.txt && echo no > /out/c.log"])],
        outputs=[tes.Output(path="/out/*.txt", path_prefix="/out", url=f"file://{results}/", type="FILE")],
    ))
    task = shared.api.wait(task_id)
    assert task["state"] == "COMPLETE", system_logs(task)
    assert sorted(p.name for p in results.iterdir()) == ["a.txt", "b.txt"]
    assert (results / "a.txt").read_text() == "one\n" and (results / "b.txt").read_text() == "three\n"
    expected = {(f"file://{results}/a.txt", "/out/a.txt", "4"), (f"file://{results}/b.txt", "/out/b.txt", "6")}
    for view in ("BASIC", "FULL"):
        logged = shared.api.task(task_id, view)["logs"][0]["outputs"]
        assert {(o["url"], o["path"], o["size_bytes"]) for o in logged} == expected, view
    assert {(o.url, o.size_bytes) for o in shared.client.get_task(task_id, "BASIC").logs[0].outputs} == {
        (f"file://{results}/a.txt", 4), (f"file://{results}/b.txt", 6)}


def test_wildcards_match_as_posix_says_and_a_prefix_may_end_inside_a_name(shared: Tes) -> None:
    """POSIX 2.13: a leading '.' is matched only by a '.', classes such as [[:digit:]] work, and a '['
    that never closes is an ordinary character (so that path needs no path_prefix)."""
    results = shared.root / f"posix-{unique()}"
    task_id = shared.api.create({
        "executors": [executor("sh", "-c", "mkdir -p /o && cd /o && for f in a.txt .h.txt f1.txt fx.txt "
                                           "sample_1.csv 'a[1'; do echo \"$f\" > \"$f\"; done")],
        "outputs": [{"path": "/o/*.txt", "path_prefix": "/o", "url": f"file://{results}/star/"},
                    {"path": "/o/f[[:digit:]].txt", "path_prefix": "/o/", "url": f"file://{results}/class/"},
                    {"path": "/o/sample_*", "path_prefix": "/o/sample_", "url": f"file://{results}/pruned/"},
                    {"path": "/o/a[1", "url": f"file://{results}/literal"}]})
    task = shared.api.wait(task_id)
    assert task["state"] == "COMPLETE", system_logs(task)
    found = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert found == ["class/f1.txt", "literal", "pruned/1.csv", "star/a.txt", "star/f1.txt", "star/fx.txt"]
    assert (results / "pruned" / "1.csv").read_text() == "sample_1.csv\n"


def test_the_server_fills_in_what_the_client_left_out(make_tes: Callable[..., Tes]) -> None:
    """An input's type, where the client sent none, is what its file:// URL names (a file root itself may be
    a DIRECTORY input); an empty content is no content, so the url is read; the task began before its first
    executor did."""
    env = make_tes()
    (env.root / "d").mkdir()
    (env.root / "d" / "a.txt").write_text("in a folder\n")
    (env.root / "top.txt").write_text("at the top\n")
    task_id = env.api.create({
        "inputs": [{"url": env.file_url(env.root / "d"), "path": "/in/d"},
                   {"url": env.file_url(env.root) + "/", "path": "/in/root", "type": "DIRECTORY"},
                   {"url": env.file_url(env.root / "top.txt"), "path": "/in/t.txt", "content": ""}],
        "executors": [executor("cat", "/in/d/a.txt", "/in/root/top.txt", "/in/t.txt")]})
    task = env.api.wait(task_id)
    assert task["state"] == "COMPLETE", system_logs(task)
    assert executor_logs(task)[0]["stdout"] == "in a folder\nat the top\nat the top\n"
    assert [item.get("type") for item in task["inputs"]] == ["DIRECTORY", "DIRECTORY", "FILE"]
    assert task["logs"][0]["start_time"] <= executor_logs(task)[0]["start_time"]
    as_file = env.api.call("POST", "/tasks", json={"inputs": [{"url": env.file_url(env.root), "path": "/in/x",
                                                              "type": "FILE"}], "executors": [executor("true")]})
    assert "is a folder of TES_FILE_ROOTS itself" in assert_error(as_file, 400, "inputs[0].url")["reason"]
    secret = env.api.call("POST", "/tasks", json={"inputs": [{"url": "http://me:hunter2@example.org/x",
                                                              "path": "/in/a"}], "executors": [executor("true")]})
    assert "hunter2" not in assert_error(secret, 400, "inputs[0].url")["reason"]


def test_browsers_on_the_configured_origins_may_call_tes_and_no_others(make_tes: Callable[..., Tes],
                                                                        shared: Tes) -> None:
    """CORS, as the spec asks of a TES API that other web sites use: a preflight needs no token; an answer
    names the origin only where it is allowed; 4CAT's routes never answer a browser's cross-site call."""
    site = "https://workflows.example.org"
    env = make_tes(TES_CORS_ORIGINS=[site])
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    preflight = requests.options(env.api.base + "/tasks", headers={"Origin": site, **ask}, timeout=30)
    assert preflight.status_code == 200 and preflight.headers["Access-Control-Allow-Origin"] == site
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    task_id = env.api.call("POST", "/tasks", json=echo_task("from a browser"), headers={"Origin": site}).json()["id"]
    read = env.api.call("GET", f"/tasks/{task_id}", headers={"Origin": site})
    assert read.status_code == 200 and read.headers["Access-Control-Allow-Origin"] == site

    elsewhere = requests.options(env.api.base + "/tasks", headers={"Origin": "https://evil.example", **ask},
                                 timeout=30)
    assert "TES_CORS_ORIGINS" in assert_error(elsewhere, 400)["reason"]
    assert "Access-Control-Allow-Origin" not in env.api.call("GET", "/tasks", headers={
        "Origin": "https://evil.example"}).headers
    assert "Access-Control-Allow-Origin" not in env.server.get("/api/", headers={"Origin": site}).headers
    # unset (the default): no CORS at all
    assert "Access-Control-Allow-Origin" not in shared.api.call("GET", "/tasks", headers={"Origin": site}).headers


def test_a_failing_executor_ends_the_task_unless_its_error_is_ignored(shared: Tes) -> None:
    failing = shared.api.create({"executors": [executor("sh", "-c", "echo first; echo secret >&2; exit 3"),
                                               executor("echo", "second")]})
    ignored = shared.api.create({"executors": [executor("sh", "-c", "echo first; exit 3", ignore_error=True),
                                               executor("echo", "second")]})
    failed = shared.api.wait(failing)
    assert failed["state"] == "EXECUTOR_ERROR"
    assert [log["exit_code"] for log in executor_logs(failed)] == [3]  # the second never ran
    listed = next(j for j in shared.server.get("/jobs/?kind=tes").json()["jobs"] if j["task_id"] == failing)
    assert json.loads(listed["results"]) == {"returncode": 3, "error": f"executor 0 ({BUSYBOX}) exited with code 3"}
    went_on = shared.api.wait(ignored)
    assert went_on["state"] == "COMPLETE"
    assert [log["exit_code"] for log in executor_logs(went_on)] == [3, 0]
    assert executor_logs(went_on)[1]["stdout"] == "second\n"


def test_staging_left_in_a_file_root_by_a_dead_process_is_swept_at_start_up(make_server: Callable[..., Server],
                                                                             tmp_path: Path) -> None:
    leftover = tmp_path / "tes-data" / ".dsm-staging" / "999999"  # no such process; an output copy cut short
    leftover.mkdir(parents=True)
    (leftover / "half-copied").write_bytes(b"partial")
    server = make_server(tes_config(tmp_path))
    wait_until(lambda: not leftover.exists(), 10, what="the sweep")
    assert f"removed 1 half-written file(s) in {tmp_path / 'tes-data'}" in server.log()


def test_a_command_the_image_lacks_is_the_executors_failure_code_127_as_docker_run_says(shared: Tes) -> None:
    missing = shared.api.create({"executors": [executor("no-such-command", "x")]})
    ignored = shared.api.create({"executors": [executor("/bin", ignore_error=True), executor("echo", "second")]})
    failed = shared.api.wait(missing)
    assert failed["state"] == "EXECUTOR_ERROR", system_logs(failed)
    [logged] = executor_logs(failed)
    assert logged["exit_code"] == 127 and "'no-such-command' was not found" in logged["stderr"]
    assert "was not found in the image" in system_logs(failed)
    went_on = shared.api.wait(ignored)
    assert went_on["state"] == "COMPLETE", system_logs(went_on)
    assert [log["exit_code"] for log in executor_logs(went_on)] == [126, 0]  # not executable: 126
    assert executor_logs(went_on)[1]["stdout"] == "second\n"


# -- the queue it shares with 4CAT


def test_cancel_a_queued_task_and_a_running_one(make_tes: Callable[..., Tes],
                                                docker_client: docker.DockerClient) -> None:
    env = make_tes(MAX_CONCURRENT_JOBS=1)
    since = time.time()
    running = env.api.create(sleep_task(60))
    env.api.wait(running, {"RUNNING"}, 30)
    queued = env.api.create(echo_task("never"))
    assert env.api.state(queued) == "QUEUED"

    answer = env.api.cancel(queued)
    assert answer.status_code == 200 and answer.json() == {}
    assert env.api.wait(queued, timeout=10)["state"] == "CANCELED"
    answer = env.api.cancel(running)
    assert answer.status_code == 200 and answer.json() == {}
    assert env.api.wait(running, timeout=20)["state"] == "CANCELED"
    assert containers_of(docker_client, env.server.instance) == []  # CANCELED: its container is gone

    time.sleep(1)  # the freed capacity must not start the cancelled task either
    assert env.api.state(queued) == "CANCELED"
    created = container_events(docker_client, env.server.instance, since, ("create",))
    assert len({event["Actor"]["Attributes"][JOB_LABEL] for event in created}) == 1  # only the running task's


def test_a_task_cancelled_while_its_inputs_are_copied_stops_copying(make_tes: Callable[..., Tes],
                                                                     http_files: Callable[..., FileServer],
                                                                     docker_client: docker.DockerClient) -> None:
    slow = Slow(b"x" * 1024, count=600, pause=0.1)  # a minute to send
    web = http_files(routes={"/big": slow})
    env = make_tes(TES_HTTP_ALLOWED_NETWORKS=["127.0.0.0/8"])
    task_id = env.api.create({"inputs": [{"url": web.url("/big"), "path": "/in/big"}],
                              "executors": [executor("echo", "never")]})
    env.api.wait(task_id, {"INITIALIZING"}, 30)
    wait_until(lambda: "GET /big" in web.requests, 30, what="the input's download to begin")
    assert env.api.cancel(task_id).status_code == 200
    assert env.api.wait(task_id, timeout=60)["state"] == "CANCELED"
    assert not slow.finished.is_set()  # it did not wait for the whole input
    assert containers_of(docker_client, env.server.instance) == []  # nor start the executor


def test_an_admin_cancels_a_task_by_its_job_id_through_the_api_and_dsm_cancel(shared: Tes) -> None:
    """`dsm jobs` and the dashboard list TES tasks by job id: an admin stops a runaway one there."""
    by_api, by_cli = shared.api.create(sleep_task(60)), shared.api.create(sleep_task(60))
    jobs = {j["task_id"]: j["id"] for j in shared.server.get("/jobs/?kind=tes&current=1").json()["jobs"]}
    for task_id in (by_api, by_cli):
        shared.api.wait(task_id, {"RUNNING"}, 30)
    refused = shared.server.delete(f"/api/jobs/{jobs[by_api]}",
                                   headers={"Authorization": f"Bearer {shared.server.token('submit')}"})
    assert refused.status_code == 403 and shared.api.state(by_api) == "RUNNING"
    answer = shared.server.delete(f"/api/jobs/{jobs[by_api]}")  # an admin's token
    assert answer.status_code == 202 and answer.json()["job"]["task_id"] == by_api
    assert shared.api.wait(by_api, timeout=30)["state"] == "CANCELED"
    done = subprocess.run([str(Path(sys.executable).parent / "dsm"), "cancel", str(jobs[by_cli]), "--wait",
                           "--server", shared.server.url, "--token", shared.server.token("admin")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"job {jobs[by_cli]} (TES task {by_cli}): it ended CANCELED"
    assert shared.api.state(by_cli) == "CANCELED"


def test_gpu_tasks_wait_for_the_one_declared_card(make_tes: Callable[..., Tes],
                                                  docker_client: docker.DockerClient) -> None:
    env = make_tes(GPU_ENABLED=True, GPU_INVENTORY=[{"id": "0", "memory": "16GiB"}],
                   GPU_DEVICE_MODE="environment")
    whole_card = {"backend_parameters": {"gpus": "1"}}
    own = unique()
    first = env.api.create({"executors": [executor("sleep", "10", env={"MARK": own})], "resources": whole_card})
    env.api.wait(first, {"RUNNING"}, 30)
    second = env.api.create(echo_task("second", resources=whole_card))
    container = container_with_env(docker_client, env.server.instance, f"MARK={own}")
    assert "NVIDIA_VISIBLE_DEVICES=0" in container.attrs["Config"]["Env"]

    seen_running = 0
    for _ in range(10):
        second_state = env.api.state(second)
        if env.api.state(first) == "RUNNING":  # read after: the first held the card when the second was read
            seen_running += 1
            assert second_state == "QUEUED"
        time.sleep(0.1)
    assert seen_running
    assert env.api.wait(first)["state"] == "COMPLETE"
    assert env.api.wait(second)["state"] == "COMPLETE"


def test_tes_tasks_and_4cat_jobs_share_one_capacity(make_tes: Callable[..., Tes]) -> None:
    env = make_tes(MAX_CONCURRENT_JOBS=1)
    key = env.server.submit("fake_local", ["--sleep", "10"])["key"]
    env.server.wait_status(key, "running")
    task_id = env.api.create(echo_task("after 4cat"))

    seen_running = 0
    for _ in range(10):
        state = env.api.state(task_id)
        if env.server.job(key)["status"] == "running":
            seen_running += 1
            assert state == "QUEUED"
        time.sleep(0.1)
    assert seen_running
    assert env.server.wait_final(key)["status"] == "complete"
    assert env.api.wait(task_id)["state"] == "COMPLETE"
    kinds = [job["kind"] for job in env.server.get("/jobs/").json()["jobs"]]
    assert sorted(kinds) == ["4cat", "tes"]


def test_a_task_survives_a_server_kill_between_its_executors(make_tes: Callable[..., Tes],
                                                             docker_client: docker.DockerClient) -> None:
    env = make_tes()
    since = time.time()
    task_id = env.api.create({"executors": [executor("sh", "-c", "sleep 3; echo one"), executor("echo", "two")]})
    env.api.wait(task_id, {"RUNNING"}, 30)
    env.server.kill()
    env.server.start()
    task = env.api.wait(task_id, timeout=40)
    assert task["state"] == "COMPLETE", system_logs(task)
    logs = executor_logs(task)
    assert [log["exit_code"] for log in logs] == [0, 0]
    assert logs[0]["stdout"] == "one\n" and logs[1]["stdout"] == "two\n"
    starts = Counter(event["id"] for event in container_events(docker_client, env.server.instance, since,
                                                                ("start",)))
    assert len(starts) == 2 and set(starts.values()) == {1}, starts  # one container per executor, started once


@pytest.mark.parametrize("ends_while_down", [True, False], ids=["ends-while-down", "runs-on"])
def test_an_executor_whose_start_a_crash_kept_unrecorded_runs_once(make_tes: Callable[..., Tes],
                                                                  docker_client: docker.DockerClient,
                                                                  ends_while_down: bool) -> None:
    """The server died after it started an executor's container and before it wrote that down (the state
    below is exactly what that crash leaves). The next server adopts that run; it never starts a second."""
    env = make_tes()
    since = time.time()
    task_id = env.api.create({"executors": [executor("echo", "zero"), executor("sh", "-c", "sleep 2; echo one")]})
    job_id = int(env.server.get("/jobs/?current=1").json()["jobs"][0]["id"])

    def second_step() -> list[Any]:
        return [c for c in containers_of(docker_client, env.server.instance, job_id)
                if c.labels.get("dmi-service-manager.step") == "1"]

    wait_until(lambda: any(c.status == "running" for c in second_step()), 30, 0.05, "the second executor's run")
    env.server.kill()
    with sqlite3.connect(env.server.config["DATABASE_FILE"]) as db:
        db.execute("UPDATE jobs SET container_id = NULL WHERE id = ?", (job_id,))
    if ends_while_down:
        wait_until(lambda: all(c.status == "exited" for c in second_step()), 30, 0.1, "the run's end")
    env.server.start()
    task = env.api.wait(task_id, timeout=60)
    assert task["state"] == "COMPLETE", system_logs(task)
    assert [log["stdout"] for log in executor_logs(task)] == ["zero\n", "one\n"]
    starts = Counter(event["id"] for event in container_events(docker_client, env.server.instance, since,
                                                                ("start",)))
    assert len(starts) == 2 and set(starts.values()) == {1}, starts  # one container per executor, started once


def test_a_task_whose_end_a_crash_kept_from_its_record_completes_with_its_outputs(
        make_tes: Callable[..., Tes]) -> None:
    """The last executor ended and the outputs were copied, but the server died before it wrote the task's end
    (here its write waits on a lock this test holds). The next server reads that end again from the same work
    area: the task completes with its outputs, not a failure to find them."""
    env = make_tes()
    out = env.root / f"out-{unique()}.txt"
    task_id = env.api.create({"volumes": ["/shared"], "executors": [
        executor("sh", "-c", "echo one > /shared/a"), executor("sh", "-c", "sleep 2; echo two >> /shared/a")],
        "outputs": [{"url": env.file_url(out), "path": "/shared/a", "type": "FILE"}]})
    with sqlite3.connect(env.server.config["DATABASE_FILE"], isolation_level=None) as db:

        def second_recorded() -> bool:
            row = db.execute("SELECT step, container_id FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
            return row is not None and row[0] == 1 and row[1] is not None

        wait_until(second_recorded, 30, 0.05, "the second executor's start recorded")
        job_id = db.execute("SELECT id FROM jobs WHERE task_id = ?", (task_id,)).fetchone()[0]
        wait_until(lambda: re.search(rf"job {job_id} started: .* \(step 1\)", env.server.log()), 30, 0.05,
                   "the last write of the second executor's start")  # its log line comes after it
        db.execute("BEGIN EXCLUSIVE")  # from here no write gets through, the task's end included
        wait_until(out.exists, 30, 0.05, "the outputs copied")
        time.sleep(0.5)
        env.server.kill()
        db.execute("ROLLBACK")
    env.server.start()
    task = env.api.wait(task_id, timeout=60)
    assert task["state"] == "COMPLETE", system_logs(task)
    assert out.read_text() == "one\ntwo\n"
    job_id = next(j["id"] for j in env.server.get("/jobs/").json()["jobs"] if j["task_id"] == task_id)
    wait_until(lambda: not (env.work / str(job_id)).exists(), 10, 0.1, "the work area removed")


def test_work_areas_that_ended_tasks_left_are_swept_at_start_and_a_running_ones_kept(
        make_tes: Callable[..., Tes]) -> None:
    env = make_tes()
    out = env.root / f"out-{unique()}.txt"
    running = env.api.create({"volumes": ["/shared"],
                              "executors": [executor("sh", "-c", "sleep 4; echo kept > /shared/a")],
                              "outputs": [{"url": env.file_url(out), "path": "/shared/a", "type": "FILE"}]})
    env.api.wait(running, {"RUNNING"}, 30)
    env.server.kill()
    left = env.work / "999999"  # the area of a task whose end was recorded just before a crash
    left.mkdir()
    fd = os.open(left, os.O_RDONLY)
    for _ in range(1_500):  # deeper than a recursive removal goes
        os.mkdir("d", dir_fd=fd)
        fd, above = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(above)
    os.close(fd)
    notes = env.work / "notes"  # not an area: not ours to remove
    notes.mkdir()
    env.server.start()
    try:
        wait_until(lambda: not left.exists(), 30, 0.1, "the ended task's area removed")
    finally:  # pytest's own clean-up of old temporary folders recurses, and would fail on this tree later
        subprocess.run(["rm", "-rf", str(left)], check=False)
    assert notes.exists()
    task = env.api.wait(running, timeout=60)
    assert task["state"] == "COMPLETE", system_logs(task)
    assert out.read_text() == "kept\n"


# -- views and lists


def test_views_hold_what_the_spec_says(shared: Tes) -> None:
    name = f"views-{unique()}"
    task_id = shared.api.create({
        "name": name, "inputs": [{"path": "/in/a.txt", "content": "view me\n"}],
        "executors": [executor("sh", "-c", "cat /in/a.txt; echo grumble >&2")],
        "resources": {"backend_parameters": {"VmSize": "Standard_D64_v3"}},  # unknown: a system log says so
    })
    shared.api.wait(task_id)

    minimal = shared.api.task(task_id, "MINIMAL")
    assert minimal == {"id": task_id, "state": "COMPLETE"}
    assert shared.api.call("GET", f"/tasks/{task_id}").json() == minimal  # MINIMAL is the default

    basic = shared.api.task(task_id, "BASIC")
    assert basic["name"] == name and basic["executors"][0]["command"][0] == "sh"
    assert basic["inputs"][0]["path"] == "/in/a.txt" and "content" not in basic["inputs"][0]
    assert executor_logs(basic)[0]["exit_code"] == 0 and "stdout" not in executor_logs(basic)[0]
    assert "system_logs" not in basic["logs"][0]

    full = shared.api.task(task_id, "FULL")
    assert full["inputs"][0]["content"] == "view me\n"
    assert executor_logs(full)[0]["stdout"] == "view me\n" and executor_logs(full)[0]["stderr"] == "grumble\n"
    assert "VmSize" in system_logs(full)

    for view, one in (("MINIMAL", minimal), ("BASIC", basic), ("FULL", full)):
        assert shared.api.list({"name_prefix": name, "view": view})["tasks"] == [one]
    listed = next(j for j in shared.server.get("/jobs/?kind=tes").json()["jobs"] if j["task_id"] == task_id)
    assert json.loads(listed["results"]) == {"returncode": 0, "error": ""}  # the server's listing: how it ended,
    assert "view me" not in json.dumps(listed) and "grumble" not in json.dumps(listed)  # its output behind tokens
    assert_error(shared.api.call("GET", f"/tasks/{task_id}", params={"view": "EVERYTHING"}), 400, "view")
    assert_error(shared.api.call("GET", f"/tasks/{task_id}", params={"view": "bas\u0131c"}), 400, "view")  # dotless ı


def test_lists_filter_by_name_prefix_and_state(shared: Tes) -> None:
    prefix = f"list-{unique()}"
    alphas = [shared.api.create(echo_task(name=f"{prefix}-alpha-{i}")) for i in range(2)]
    beta = shared.api.create({"name": f"{prefix}-beta", "executors": [executor("sh", "-c", "exit 1")]})
    for task_id in [*alphas, beta]:
        shared.api.wait(task_id)

    assert shared.api.ids([("name_prefix", f"{prefix}-alpha")]) == alphas[::-1]  # newest first
    assert shared.api.ids([("name_prefix", prefix)]) == [beta, *alphas[::-1]]
    assert shared.api.ids([("name_prefix", prefix), ("state", "EXECUTOR_ERROR")]) == [beta]
    assert shared.api.ids([("name_prefix", prefix), ("state", "COMPLETE")]) == alphas[::-1]
    assert shared.api.ids([("name_prefix", f"{prefix}-gamma")]) == []
    complete = shared.api.ids([("state", "COMPLETE")])
    assert set(alphas) <= set(complete) and beta not in complete
    assert_error(shared.api.call("GET", "/tasks", params={"state": "DONE"}), 400, "state")


# The table of the spec's tag_key/tag_value description, row for row: filter, the task's tags, match?
TAG_TABLE = [
    ({"foo": "bar"}, {"foo": "bar"}, True),
    ({"foo": "bar"}, {"foo": "bat"}, False),
    ({"foo": ""}, {"foo": ""}, True),
    ({"foo": "bar", "baz": "bat"}, {"foo": "bar", "baz": "bat"}, True),
    ({"foo": "bar"}, {"foo": "bar", "baz": "bat"}, True),
    ({"foo": "bar", "baz": "bat"}, {"foo": "bar"}, False),
    ({"foo": ""}, {"foo": "bar"}, True),
    ({"foo": ""}, {}, False),
]


@pytest.mark.parametrize(("wanted", "tags", "match"), TAG_TABLE, ids=[f"row{i}" for i in range(1, 9)])
def test_tag_filters_follow_the_spec_table(shared: Tes, wanted: dict[str, str], tags: dict[str, str],
                                           match: bool) -> None:
    own = unique()  # tag keys of this test's own, so that no other task matches

    def key(name: str) -> str:
        return f"{name}-{own}"

    task_id = shared.api.create(echo_task(tags={key(k): v for k, v in tags.items()}))
    query: list[tuple[str, str]] = []
    for name, value in wanted.items():
        query.append(("tag_key", key(name)))
        if value:
            query.append(("tag_value", value))
    assert shared.api.ids(query) == ([task_id] if match else [])
    assert shared.api.task(task_id, "BASIC").get("tags", {}) == {key(k): v for k, v in tags.items()}


def test_pages_walk_every_task_once_newest_first(make_tes: Callable[..., Tes]) -> None:
    env = make_tes(MAX_CONCURRENT_JOBS=1)
    blocker = env.api.create(sleep_task(60, name="blocker"))
    env.api.wait(blocker, {"RUNNING"}, 30)
    created = [blocker] + [env.api.create(echo_task(name=f"page-{i}")) for i in range(299)]  # all but one queued

    first = env.api.list()
    assert len(first["tasks"]) == 256 and first.get("next_page_token")  # the default page size
    assert [t["id"] for t in first["tasks"]] == created[::-1][:256]
    assert env.api.ids(page_size=100) == created[::-1]

    page = env.api.list({"page_size": "100"})
    later = [env.api.create(echo_task(name="later")) for _ in range(3)]  # new tasks while a client pages
    seen = [t["id"] for t in page["tasks"]]
    token = page["next_page_token"]
    while token:
        page = env.api.list([("page_size", "100"), ("page_token", token)])
        seen += [t["id"] for t in page["tasks"]]
        token = page.get("next_page_token")
    assert len(seen) == len(set(seen)), "a task came twice"
    assert set(created) <= set(seen) and set(seen) <= set(created) | set(later)

    assert env.api.call("GET", "/tasks", params={"page_size": "2047"}).status_code == 200
    for size in ("2048", "5000"):  # the spec: "must be less than 2048"
        assert_error(env.api.call("GET", "/tasks", params={"page_size": size}), 400, "page_size")
    assert_error(env.api.call("GET", "/tasks", params={"page_size": "many"}), 400, "page_size")
    assert_error(env.api.call("GET", "/tasks", params={"page_token": "not-a-token"}), 400, "page_token")


# -- who may call


TES_ROUTES = [("GET", "/service-info"), ("GET", "/tasks"), ("POST", "/tasks"), ("GET", "/tasks/some-id"),
              ("POST", "/tasks/some-id:cancel")]


def test_every_tes_route_is_404_while_tes_is_off(server: Server) -> None:
    api = TesApi(server, server.token("submit"))
    for method, path in TES_ROUTES:
        assert_error(api.call(method, path, json=echo_task()), 404)
        assert_error(api.with_token(None).call(method, path, json=echo_task()), 404)
        # A token sent is checked on every route, this one too.
        assert_error(api.with_token("dsm_whatever").call(method, path, json=echo_task()), 401)


def test_tes_routes_need_a_known_token(shared: Tes) -> None:
    task_id = shared.api.create(echo_task("mine"))
    before = shared.api.ids()
    for api in (shared.api.with_token(None), shared.api.with_token("dsm_not-a-token"),
                shared.api.with_token(shared.token + "x"), shared.api.with_token("")):
        assert_error(api.call("GET", "/tasks"), 401)
        assert_error(api.call("POST", "/tasks", json=echo_task()), 401)
        assert_error(api.call("GET", f"/tasks/{task_id}"), 401)
        assert_error(api.call("GET", "/tasks/unknown-id"), 401)  # no telling which ids exist
        assert_error(api.call("POST", f"/tasks/{task_id}:cancel"), 401)
    for header in (f"Basic {shared.token}", shared.token, f"Bearer{shared.token}"):  # only 'Bearer <token>'
        assert_error(shared.api.call("GET", "/tasks", headers={"Authorization": header}), 401)
    assert shared.api.ids() == before
    assert shared.api.wait(task_id)["state"] == "COMPLETE"  # the refused cancels did nothing


def test_a_revoked_token_is_refused(shared: Tes) -> None:
    name = f"revoke-{unique()}"
    token = create_token(shared.server, name, "submit")
    api = shared.api.with_token(token)
    assert api.call("GET", "/tasks").status_code == 200
    revoke_token(shared.server, name)
    assert_error(api.call("GET", "/tasks"), 401)
    before = shared.api.ids()
    assert_error(api.call("POST", "/tasks", json=echo_task()), 401)
    assert shared.api.ids() == before


def test_a_read_token_may_look_but_not_submit_or_cancel(shared: Tes) -> None:
    task_id = shared.api.create(sleep_task(1))
    reader = shared.api.with_token(create_token(shared.server, f"reader-{unique()}", "read"))
    assert reader.call("GET", "/tasks").status_code == 200
    assert reader.task(task_id, "BASIC")["id"] == task_id
    before = shared.api.ids()
    assert_error(reader.call("POST", "/tasks", json=echo_task()), 403)
    assert_error(reader.call("POST", f"/tasks/{task_id}:cancel"), 403)
    assert shared.api.ids() == before
    assert shared.api.wait(task_id)["state"] == "COMPLETE"


def test_service_info_needs_no_token_and_describes_this_server(shared: Tes) -> None:
    info = shared.api.with_token(None).service_info()
    assert info["type"]["artifact"] == "tes" and info["type"]["version"].startswith("1.1")
    storage = [s.rstrip("/") for s in info["storage"]]
    assert f"file://{shared.root}" in storage
    assert {"http", "https"} <= {s.split(":")[0] for s in storage}
    assert {"gpus", "gpu_memory", "timeout"} <= set(info["tesResources_backend_parameters"])
    assert tes_client(shared.server, None).get_service_info().type["artifact"] == "tes"


def test_the_ip_allow_list_covers_tes_too(make_tes: Callable[..., Tes]) -> None:
    env = make_tes(IP_WHITELIST=["10.0.0.0/8"])
    for method, path in TES_ROUTES:
        assert env.api.call(method, path, json=echo_task()).status_code == 403


# -- what a task may not do


def test_an_image_outside_the_allow_list_is_refused_naming_the_field(shared: Tes) -> None:
    before = shared.api.ids()
    for image in ("alpine:3.20", "dsm-test-busybox:other", "docker.io/library/dsm-test-busybox:latest-x"):
        assert_error(shared.api.call("POST", "/tasks", json={"executors": [{"image": image, "command": ["true"]}]}),
                     400, "executors[0].image")
    second = {"executors": [executor("true"), {"image": "alpine:3.20", "command": ["true"]}]}
    assert_error(shared.api.call("POST", "/tasks", json=second), 400, "executors[1].image")
    assert shared.api.ids() == before


def test_more_cpu_cores_than_the_engine_has_are_refused_when_asked_not_at_the_start(
    shared: Tes, docker_client: docker.DockerClient
) -> None:
    cpus = int(docker_client.info()["NCPU"])
    before = shared.api.ids()
    too_many = {"executors": [executor("true")], "resources": {"cpu_cores": cpus + 1}}
    refused = assert_error(shared.api.call("POST", "/tasks", json=too_many), 400, "resources.cpu_cores")
    assert f"has {cpus} CPUs" in refused["message"]
    assert shared.api.ids() == before  # never stored, so never a SYSTEM_ERROR later
    all_of_them = shared.api.create({"executors": [executor("true")], "resources": {"cpu_cores": cpus}})
    assert shared.api.wait(all_of_them)["state"] == "COMPLETE"


@pytest.fixture
def secret(shared: Tes) -> tuple[Path, str]:
    """A file outside every TES root, beside the shared server's folder, with text that must never leak."""
    folder = shared.server.tmp_path / f"secret-{unique()}"
    folder.mkdir()
    text = f"TOP-SECRET-{unique()}"
    (folder / "secret.txt").write_text(text + "\n")
    return folder / "secret.txt", text


def refused_or_system_error(env: Tes, body: dict[str, Any]) -> dict[str, Any] | None:
    """A task the server must not run as asked: a 400 that stores nothing, or a SYSTEM_ERROR that says why."""
    before = env.api.ids()
    response = env.api.call("POST", "/tasks", json=body)
    if response.status_code == 400:
        assert_error(response, 400)
        assert env.api.ids() == before
        return None
    assert response.status_code == 200, response.text
    task = env.api.wait(response.json()["id"])
    assert task["state"] == "SYSTEM_ERROR", task
    assert system_logs(task).strip(), "a SYSTEM_ERROR without a system log"
    return task


def assert_no_leak(env: Tes, text: str, task: dict[str, Any] | None = None) -> None:
    assert files_holding(env.work, text) == [] and files_holding(env.root, text) == []
    if task is not None:
        for log in executor_logs(env.api.task(task["id"], "FULL")):
            assert text not in log.get("stdout", "") + log.get("stderr", "")


@pytest.mark.parametrize("case", ["outside", "dot-dot", "file-link", "folder-link", "folder-link-as-directory"])
def test_file_inputs_cannot_read_outside_the_roots(shared: Tes, secret: tuple[Path, str], case: str) -> None:
    path, text = secret
    own = unique()
    (shared.root / f"file-link-{own}").symlink_to(path)
    (shared.root / f"folder-link-{own}").symlink_to(path.parent, target_is_directory=True)
    url, kind = {
        "outside": (f"file://{path}", "FILE"),
        "dot-dot": (f"file://{shared.root}/../{path.parent.name}/secret.txt", "FILE"),
        "file-link": (f"file://{shared.root}/file-link-{own}", "FILE"),
        "folder-link": (f"file://{shared.root}/folder-link-{own}/secret.txt", "FILE"),
        "folder-link-as-directory": (f"file://{shared.root}/folder-link-{own}", "DIRECTORY"),
    }[case]
    task = refused_or_system_error(shared, {
        "inputs": [{"url": url, "path": "/in/x", "type": kind}],
        "executors": [executor("sh", "-c", "cat /in/x /in/x/* 2>&1; true")],
    })
    assert_no_leak(shared, text, task)


def test_a_link_inside_an_input_folder_does_not_lead_out_of_the_root(shared: Tes,
                                                                      secret: tuple[Path, str]) -> None:
    path, text = secret
    folder = shared.root / f"bundle-{unique()}"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine\n")
    (folder / "leak").symlink_to(path)
    response = shared.api.call("POST", "/tasks", json={
        "inputs": [{"url": f"file://{folder}", "path": "/in/d", "type": "DIRECTORY"}],
        "executors": [executor("sh", "-c", "cat /in/d/ok.txt /in/d/leak 2>&1; true")],
    })
    task = None
    if response.status_code != 400:  # refusing the folder is fine; so is staging it without the link's target
        assert response.status_code == 200, response.text
        task = shared.api.wait(response.json()["id"])
    assert_no_leak(shared, text, task)


def test_output_urls_outside_the_roots_are_refused(shared: Tes) -> None:
    outside = shared.server.tmp_path / f"outside-{unique()}"
    outside.mkdir()
    before = shared.api.ids()
    for url in (f"file://{outside}/x.txt", f"file://{shared.root}/../{outside.name}/x.txt", f"file://{outside}/"):
        body = {"executors": [executor("sh", "-c", "mkdir -p /out; echo x > /out/x.txt")],
                "outputs": [{"path": "/out/x.txt", "url": url}]}
        assert_error(shared.api.call("POST", "/tasks", json=body), 400, "outputs[0].url")
    assert shared.api.ids() == before
    link = shared.root / f"out-link-{unique()}"
    link.symlink_to(outside, target_is_directory=True)
    refused_or_system_error(shared, {"executors": [executor("sh", "-c", "mkdir -p /out; echo x > /out/x.txt")],
                                     "outputs": [{"path": "/out/x.txt", "url": f"file://{link}/x.txt"}]})
    assert list(outside.iterdir()) == []


def test_an_executor_cannot_make_the_output_copy_read_a_host_file(shared: Tes, secret: tuple[Path, str]) -> None:
    path, text = secret
    results = shared.root / f"planted-{unique()}"
    response = shared.api.call("POST", "/tasks", json={
        "executors": [executor("sh", "-c", f"mkdir -p /out && ln -s {path} /out/x.txt && ln -s {path.parent} /out/d")],
        "outputs": [{"path": "/out/x.txt", "url": f"file://{results}/x.txt"},
                    {"path": "/out/d", "url": f"file://{results}/d", "type": "DIRECTORY"},
                    {"path": "/out/*", "path_prefix": "/out", "url": f"file://{results}/all/"}],
    })
    assert response.status_code == 200, response.text
    task = shared.api.wait(response.json()["id"])
    assert task["state"] in ("COMPLETE", "SYSTEM_ERROR")
    assert_no_leak(shared, text, task)
    for copied in results.rglob("*") if results.exists() else []:  # nor leave a link out of the root behind
        assert os.path.realpath(copied).startswith(os.path.realpath(shared.root) + os.sep), copied


def test_http_inputs_cannot_reach_loopback_unless_allowed(make_tes: Callable[..., Tes],
                                                          http_files: Callable[..., FileServer]) -> None:
    env = make_tes()  # no TES_HTTP_ALLOWED_NETWORKS
    web = http_files(routes={"/h.txt": b"loopback only\n"})
    for host in ("127.0.0.1", "localhost", "2130706433", "127.1", "0x7f.0.0.1"):
        task = refused_or_system_error(env, {"inputs": [{"url": web.url("/h.txt", host), "path": "/in/h.txt"}],
                                             "executors": [executor("cat", "/in/h.txt")]})
        assert task is None or "loopback only" not in (executor_logs(task) or [{}])[0].get("stdout", "")
    assert web.requests == []


def test_a_redirect_from_an_allowed_server_to_a_forbidden_one_is_not_followed(
    make_tes: Callable[..., Tes], http_files: Callable[..., FileServer]
) -> None:
    inner = http_files("127.0.0.1", {"/secret": b"inner secret\n"})
    outer = http_files("127.0.0.2", {"/hop": Redirect("/ok"), "/ok": b"allowed hop\n",
                                     "/redir": Redirect(inner.url("/secret"))})
    env = make_tes(TES_HTTP_ALLOWED_NETWORKS=["127.0.0.2/32"])

    allowed = env.api.create({"inputs": [{"url": outer.url("/hop"), "path": "/in/h.txt"}],
                              "executors": [executor("cat", "/in/h.txt")]})
    done = env.api.wait(allowed)
    assert done["state"] == "COMPLETE" and executor_logs(done)[0]["stdout"] == "allowed hop\n"  # a redirect it may take

    refused = env.api.create({"inputs": [{"url": outer.url("/redir"), "path": "/in/h.txt"}],
                              "executors": [executor("cat", "/in/h.txt")]})
    task = env.api.wait(refused)
    assert task["state"] == "SYSTEM_ERROR" and system_logs(task).strip()
    assert any(r.endswith(" /redir") for r in outer.requests)
    assert inner.requests == []


def test_an_http_input_over_the_size_limit_fails_the_task(make_tes: Callable[..., Tes],
                                                          http_files: Callable[..., FileServer]) -> None:
    web = http_files("127.0.0.2", {"/small": b"s" * 100, "/big": b"b" * 5000, "/unsized": Unsized(b"u" * 5000)})
    env = make_tes(TES_HTTP_ALLOWED_NETWORKS=["127.0.0.2/32"], TES_HTTP_MAX_BYTES="1KiB")
    ids = {name: env.api.create({"inputs": [{"url": web.url(f"/{name}"), "path": "/in/f"}],
                                 "executors": [executor("wc", "-c", "/in/f")]})
           for name in ("small", "big", "unsized")}
    small = env.api.wait(ids["small"])
    assert small["state"] == "COMPLETE" and executor_logs(small)[0]["stdout"].split()[0] == "100"
    for name in ("big", "unsized"):  # unsized: no Content-Length to trust, so the bytes are counted
        task = env.api.wait(ids[name])
        assert task["state"] == "SYSTEM_ERROR" and system_logs(task).strip(), name
    assert files_holding(env.work, "b" * 2000) == [] and files_holding(env.work, "u" * 2000) == []


def test_a_url_scheme_this_server_cannot_serve_is_refused_naming_the_field(shared: Tes) -> None:
    """Refused when the task is sent, not after its executors have run (an output) or queued (an input)."""
    before = shared.api.ids()
    for field, task in (
        ("inputs[0].url", {"inputs": [{"url": "s3://bucket/x", "path": "/in/x"}]}),
        ("outputs[0].url", {"outputs": [{"url": "http://127.0.0.1:9/r.txt", "path": "/out/r.txt"}]}),
        ("outputs[0].url", {"outputs": [{"url": "gs://bucket/r.txt", "path": "/out/r.txt"}]}),
    ):
        refused = assert_error(shared.api.call("POST", "/tasks", json={**task, "executors": [executor("true")]}),
                               400, field)
        assert "://" in refused["message"], refused
    assert shared.api.ids() == before


def test_a_task_past_its_timeout_is_a_system_error_and_its_container_goes(
    shared: Tes, docker_client: docker.DockerClient
) -> None:
    own = unique()
    task_id = shared.api.create({"executors": [executor("sleep", "60", env={"MARK": own})],
                                 "resources": {"backend_parameters": {"timeout": "1"}}})
    container = container_with_env(docker_client, shared.server.instance, f"MARK={own}")
    started = time.monotonic()
    task = shared.api.wait(task_id, timeout=30)
    assert task["state"] == "SYSTEM_ERROR" and system_logs(task).strip()
    assert time.monotonic() - started < 20
    with pytest.raises(docker.errors.NotFound):
        container.reload()


def test_unknown_backend_parameters_are_refused_when_strict_and_logged_otherwise(shared: Tes) -> None:
    before = shared.api.ids()
    strict = echo_task(resources={"backend_parameters": {"VmSize": "Standard_D64_v3"},
                                  "backend_parameters_strict": True})
    body = assert_error(shared.api.call("POST", "/tasks", json=strict), 400)
    assert "VmSize" in f"{body['message']} {body.get('reason')}"
    assert shared.api.ids() == before

    lenient = shared.api.create(echo_task("ran anyway", resources={"backend_parameters": {
        "VmSize": "Standard_D64_v3", "timeout": "60"}}))
    task = shared.api.wait(lenient)
    assert task["state"] == "COMPLETE" and executor_logs(task)[0]["stdout"] == "ran anyway\n"
    assert "VmSize" in system_logs(task)
    kept = task.get("resources", {}).get("backend_parameters", {})
    assert "VmSize" not in kept and kept.get("timeout") == "60"  # unsupported keys are not stored or returned

    no_gpu = shared.api.wait(shared.api.create(echo_task(resources={"backend_parameters": {"gpu_memory": "8GiB"}})))
    assert no_gpu["state"] == "COMPLETE"
    assert "'gpu_memory' was ignored: the task asks for no GPU" in system_logs(no_gpu)


def test_unknown_task_ids_are_404_json(shared: Tes) -> None:
    assert_error(shared.api.call("GET", "/tasks/no-such-task"), 404)
    assert_error(shared.api.call("GET", "/tasks/no-such-task", params={"view": "FULL"}), 404)
    assert_error(shared.api.cancel("no-such-task"), 404)


GOOD = executor("true")
MALFORMED: list[tuple[str, Any, str | None]] = [
    ("not-json", b"{not json", None),
    ("a-list", [GOOD], None),
    ("no-executors", {"name": "x"}, "executors"),
    ("empty-executors", {"executors": []}, "executors"),
    ("command-a-string", {"executors": [{"image": BUSYBOX, "command": "echo hi"}]}, "executors[0].command"),
    ("command-not-strings", {"executors": [{"image": BUSYBOX, "command": ["echo", 1]}]}, "executors[0].command"),
    ("no-image", {"executors": [{"command": ["true"]}]}, "executors[0].image"),
    ("relative-input-path", {"executors": [GOOD], "inputs": [{"path": "in/a.txt", "content": "x"}]},
     "inputs[0].path"),
    ("input-without-url-or-content", {"executors": [GOOD], "inputs": [{"path": "/in/a.txt"}]}, "inputs[0].url"),
    ("relative-stdout", {"executors": [{**GOOD, "stdout": "out.txt"}]}, "executors[0].stdout"),
    ("relative-output-path", {"executors": [GOOD], "outputs": [{"path": "out/x", "url": "file:///tmp/x"}]},
     "outputs[0].path"),
    ("wildcard-without-prefix", {"executors": [GOOD], "outputs": [{"path": "/out/*.txt", "url": "file:///tmp/"}]},
     "outputs[0].path_prefix"),
    ("relative-volume", {"executors": [GOOD], "volumes": ["vol"]}, "volumes[0]"),
    ("tags-not-strings", {"executors": [GOOD], "tags": {"a": 1}}, "tags"),
    # URLs that urllib cannot take apart, and numbers past what a float or SQLite holds
    ("input-url-broken-ipv6", {"executors": [GOOD], "inputs": [{"url": "http://[::1", "path": "/in/a"}]},
     "inputs[0].url"),
    ("input-url-nfkc-host", {"executors": [GOOD], "inputs": [{"url": "http://a\uff03b/x", "path": "/in/a"}]},
     "inputs[0].url"),
    ("input-url-port-out-of-range", {"executors": [GOOD], "inputs": [{"url": "http://a:99999/x", "path": "/in/a"}]},
     "inputs[0].url"),
    ("output-url-broken-ipv6", {"executors": [GOOD], "outputs": [{"url": "http://a]b/", "path": "/out/x"}]},
     "outputs[0].url"),
    ("gpu-memory-past-a-float", {"executors": [GOOD], "resources": {"backend_parameters": {"gpu_memory": "9" * 400}}},
     "resources.backend_parameters.gpu_memory"),
    ("gpu-memory-past-sqlite", {"executors": [GOOD],
                                "resources": {"backend_parameters": {"gpu_memory": "9999999999 TiB"}}},
     "resources.backend_parameters.gpu_memory"),
    ("timeout-with-underscore", {"executors": [GOOD], "resources": {"backend_parameters": {"timeout": "1_0"}}},
     "resources.backend_parameters.timeout"),
    ("input-url-host-label-too-long", {"executors": [GOOD], "inputs": [{"url": f"http://{'a' * 64}.com/",
                                                                        "path": "/in/a"}]}, "inputs[0].url"),
    # less memory than Docker takes (6 MiB) would be rounded to no limit at all
    ("ram-below-what-docker-takes", {"executors": [GOOD], "resources": {"ram_gb": 1e-10}}, "resources.ram_gb"),
    # paths that could never be mounted together, refused before the engine says so at the start
    ("two-inputs-one-path", {"executors": [GOOD], "inputs": [{"path": "/in/x", "content": "a"},
                                                             {"path": "/in/x", "content": "b"}]}, "inputs[1].path"),
    ("an-input-inside-a-file-input", {"executors": [GOOD], "inputs": [{"path": "/in/x/y", "content": "a"},
                                                                      {"path": "/in/x", "content": "b"}]},
     "inputs[0].path"),
    ("workdir-a-file-input", {"executors": [{**GOOD, "workdir": "/in/x"}],
                              "inputs": [{"path": "/in/x", "content": "a"}]}, "executors[0].workdir"),
    ("volume-a-file-input", {"executors": [GOOD], "volumes": ["/v"], "inputs": [{"path": "/v", "content": "a"}]},
     "volumes[0]"),
    ("stdout-name-past-255-bytes", {"executors": [{**GOOD, "stdout": "/out/" + "a" * 256}]}, "executors[0].stdout"),
    # an argument the kernel would never exec: refused now, not ended SYSTEM_ERROR at the start
    ("argument-past-the-kernels-limit", {"executors": [executor("echo", "x" * 200_000)]}, "executors[0].command"),
    # credentials in a URL would be shown to every reader of the task
    ("input-url-with-a-password", {"executors": [GOOD], "inputs": [{"url": "http://me:pw@example.org/x",
                                                                    "path": "/in/a"}]}, "inputs[0].url"),
    ("ignore-error-not-a-boolean", {"executors": [{**GOOD, "ignore_error": "yes"}]}, "executors[0].ignore_error"),
    ("wildcard-prefix-not-the-paths-start", {"executors": [GOOD], "outputs": [
        {"path": "/out/*.txt", "path_prefix": "/other", "url": "file:///tmp/"}]}, "outputs[0].path_prefix"),
]


def test_a_task_stored_by_an_earlier_version_is_read_as_it_was_accepted() -> None:
    """The checks a new task meets at submit are not applied again to stored tasks: a task accepted before
    them (and running across the upgrade) is still read, run and finished."""
    stored = {"executors": [GOOD], "volumes": ["/v"], "resources": {"ram_gb": 1e-10},
              "inputs": [{"path": "/v/x", "content": "a"}, {"path": "/v/x", "content": "b"}]}
    assert Task.model_validate(stored).resources is not None
    with pytest.raises(BadRequest, match=r"resources\.ram_gb: must be at least"):
        parse_task(stored)
    with pytest.raises(BadRequest, match=r"inputs\[1\]\.path: the same path as inputs\[0\]\.path"):
        parse_task({**stored, "resources": {}})


def test_checking_a_task_of_deep_paths_stays_linear() -> None:
    """A path 2,000 levels deep, in each of 1,000 inputs: one step per level, not one per level and prefix."""
    deep = "/" + "/".join(["a"] * 2000)
    body = {"executors": [GOOD], "volumes": [deep], "inputs": [{"path": f"{deep}/{i}", "content": "a"}
                                                               for i in range(1000)]}
    parse_task(body)  # bounded by the test's timeout: quadratic checks took minutes


@pytest.mark.parametrize(("body", "field"), [(b, f) for _, b, f in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_a_malformed_task_is_400_naming_the_field_and_not_stored(shared: Tes, body: Any, field: str | None) -> None:
    before = shared.api.ids()
    if isinstance(body, bytes):
        response = shared.api.call("POST", "/tasks", data=body, headers={"Content-Type": "application/json"})
    else:
        response = shared.api.call("POST", "/tasks", json=body)
    assert_error(response, 400, field)
    assert shared.api.ids() == before


def test_an_executor_gets_no_host_network_privileges_devices_or_outside_mounts(
    shared: Tes, docker_client: docker.DockerClient
) -> None:
    own = unique()
    results = shared.root / f"inspect-{own}"
    task_id = shared.api.create({
        "volumes": ["/vol"], "inputs": [{"path": "/in/a.txt", "content": "a\n"}],
        "outputs": [{"path": "/out/r.txt", "url": f"file://{results}/r.txt"}],
        "executors": [executor("sh", "-c", "sleep 2; mkdir -p /out; cat /in/a.txt > /out/r.txt", env={"MARK": own})],
        "resources": {"cpu_cores": 1, "ram_gb": 0.5},
    })
    container = container_with_env(docker_client, shared.server.instance, f"MARK={own}")
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] in ("default", "bridge")
    assert host["Privileged"] is False
    assert not host.get("Devices") and not host.get("DeviceRequests")
    assert not host.get("CapAdd") and host.get("PidMode") != "host" and host.get("IpcMode") != "host"
    assert host.get("NanoCpus") == 10**9 or (host.get("CpuQuota"), host.get("CpuPeriod")) == (100_000, 100_000)
    assert host.get("Memory") in (500_000_000, 512 * 1024**2)  # ram_gb 0.5, as GB or as GiB
    work = os.path.realpath(shared.work)
    mounts = container.attrs["Mounts"]
    assert mounts, "the task's work area is not mounted"
    for mount in mounts:
        assert mount["Type"] == "bind", mount
        assert os.path.realpath(mount["Source"]).startswith(work + os.sep), mount
    task = shared.api.wait(task_id)
    assert task["state"] == "COMPLETE" and (results / "r.txt").read_text() == "a\n"


# -- the schema check itself


def test_the_schema_check_catches_a_wrong_answer() -> None:
    assert schema_errors("tesTask", {"id": "x", "state": "DONE", "executors": [{"image": "i", "command": "c"}]})
    assert schema_errors("tesServiceInfo", {"id": "x", "name": "n", "version": "1",
                                            "type": {"group": "org.ga4gh", "artifact": "wes", "version": "1"}})
    assert schema_errors("tesListTasksResponse", {"tasks": [{"id": "x", "state": "QUEUED"}]})
    assert not schema_errors("tesListTasksResponse", {"tasks": [{"id": "x", "state": "QUEUED"}]}, minimal=True)
    assert schema_errors("tesCancelTaskResponse", [])
