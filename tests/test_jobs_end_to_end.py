"""A 4CAT instance pointed at this server runs a containerised service end to end, in both modes."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from fourcat import FourCat, FourCatError
from support import BUSYBOX, Server, containers_of, wait_until


def test_local_mode_runs_the_container_on_4cats_own_folder(server: Server, tmp_path: Path) -> None:
    dataset = tmp_path / "4cat" / "staging-abc"
    dataset.mkdir()
    (dataset / "a.wav").write_bytes(b"x" * 100)
    client = FourCat(server.url, mode="local")
    assert client.existing_jobs("abc") == []

    result_url = client.submit("fake", {"args": ["--output_dir", "data/results-abc", "data/staging-abc/a.wav"],
                                        "4CAT_dataset_key": "abc"})
    job = client.poll_until_done(result_url)

    assert job["status"] == "complete"
    assert (tmp_path / "4cat" / "results-abc" / "a.wav.txt").read_text() == "processed 100 bytes of a.wav\n"
    results = json.loads(job["results"])
    assert results["returncode"] == 0 and isinstance(results["error"], str)
    assert results["report"].startswith("args ok")
    assert json.loads(job["details"])["request_json"]["4CAT_dataset_key"] == "abc"
    assert [j["id"] for j in client.existing_jobs("abc")] == [job["id"]]


def test_remote_mode_uploads_runs_and_downloads_as_4cat_does(server: Server, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    files = []
    for index in range(3):
        path = local / f"clip {index}.wav"
        path.write_bytes(b"y" * (index + 1))
        files.append(path)
    client = FourCat(server.url, mode="remote")

    files_path, results_path = client.send_files("collection1", "results1", files)
    args = ["--output_dir", f"data/{results_path}"] + [f"data/{files_path}/{client.stored_name(f.name)}" for f in files]
    job = client.poll_until_done(client.submit("fake", {"args": args, "4CAT_dataset_key": "k1"}))
    saved = client.download_results("collection1", "results1", tmp_path / "out")

    assert job["status"] == "complete"
    assert sorted(p.name for p in saved) == ["clip_0.wav.txt", "clip_1.wav.txt", "clip_2.wav.txt"]
    assert (tmp_path / "out" / "clip_2.wav.txt").read_text() == "processed 3 bytes of clip_2.wav\n"
    # The placeholder made the results folder, but is not kept: 4CAT would download and parse it.
    assert not (tmp_path / "uploads" / "collection1" / "results1" / "4CAT_results1_blank.txt").exists()


def test_a_second_upload_round_skips_files_already_on_the_server(server: Server, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "a.wav").write_bytes(b"1")
    client = FourCat(server.url)
    client.send_files("c2", "r2", [local / "a.wav"])
    before = (tmp_path / "uploads" / "c2" / "4cat_uploads" / "a.wav").stat().st_mtime_ns
    time.sleep(0.01)
    client.send_files("c2", "r2", [local / "a.wav"])
    assert (tmp_path / "uploads" / "c2" / "4cat_uploads" / "a.wav").stat().st_mtime_ns == before


def test_a_non_zero_exit_ends_the_job_in_error_with_stderr(server: Server) -> None:
    answer = server.submit("fake_local", ["--stderr", "CUDA error: out of memory", "--exit", "3"])
    job = server.wait_final(answer["key"])
    results = json.loads(job["results"])
    assert job["status"] == "error"
    assert results["returncode"] == 3
    assert "CUDA error: out of memory" in results["error"]
    with pytest.raises(FourCatError, match="out of GPU memory"):
        FourCat(server.url).poll_until_done(answer["result_url"])


def test_an_endpoint_that_is_not_set_up_is_404_naming_those_that_are(server: Server) -> None:
    response = server.post("/api/fak_local", json={"args": []})
    assert response.status_code == 404
    assert response.json()["reason"].startswith("Service not found: no endpoint 'fak_local' is set up")
    assert "it offers: fake_local, fake_remote" in response.json()["reason"]


def test_a_job_answers_202_pending_with_a_clean_absolute_result_url(server: Server) -> None:
    response = server.post("/api/fake_local", json={"args": []})
    body = response.json()
    assert response.status_code == 202
    assert body["status"] in ("pending", "running")
    assert body["result_url"] == f"{server.url}/api/jobs/{body['key']}"
    assert "//api" not in body["result_url"]


def test_two_identical_requests_are_two_jobs(server: Server) -> None:
    first = server.submit("fake_local", ["--stdout", "same"], **{"4CAT_dataset_key": "dup"})
    second = server.submit("fake_local", ["--stdout", "same"], **{"4CAT_dataset_key": "dup"})
    assert first["key"] != second["key"]
    assert server.wait_final(first["key"])["status"] == "complete"
    assert server.wait_final(second["key"])["status"] == "complete"
    found = server.get("/api/jobs/details_query/", json={"details_key": "$.request_json.4CAT_dataset_key",
                                                         "details_value": "dup"}).json()
    assert [j["id"] for j in found["jobs"]] == [first["key"], second["key"]]


def test_the_poll_shape_is_exactly_what_4cat_reads(server: Server) -> None:
    answer = server.submit("fake_local", ["--stdout", "hi"], timeout=60)
    job = server.wait_final(answer["key"])
    assert set(job) == {"id", "created_at", "jobtype", "completed_at", "status", "message", "processed_records",
                        "details", "results"}
    assert isinstance(job["id"], int) and isinstance(job["created_at"], int) and isinstance(job["completed_at"], int)
    assert job["jobtype"] == "/api/fake_local"
    details = json.loads(job["details"])
    assert details["request_json"] == {"args": ["--stdout", "hi"], "timeout": 60}
    assert "request_args" in details
    assert details["container"]["argv"] == ["fake-service", "--stdout", "hi"]
    assert details["container"]["image_id"].startswith("sha256:")
    results = json.loads(job["results"])
    assert {"returncode", "error", "report", "start_time", "end_time", "process_time"} <= set(results)


def test_a_services_first_progress_message_is_kept_however_early_it_comes(server: Server) -> None:
    # The fake service posts at once: often before the server has recorded that its container started.
    keys = [server.submit("fake_local", ["--progress", "1", "--sleep", "1"], pass_key=True)["key"] for _ in range(8)]
    finals = [server.wait_final(key) for key in keys]
    assert [(job["status"], job["message"], job["processed_records"]) for job in finals] == \
        [("complete", "step 1 of 1", 1)] * 8


def test_pass_key_lets_the_container_report_progress(server: Server) -> None:
    answer = server.submit("fake_local", ["--progress", "3", "--sleep", "1"], pass_key=True)
    running = server.wait_status(answer["key"], "running")
    # The server's own queue note is gone once the container starts; only the service's progress shows.
    assert running["message"] is None or running["message"].startswith("step")
    job = wait_until(lambda: (j := server.job(answer["key"]))["processed_records"] == 3 and j, 20)
    assert job["message"] == "step 3 of 3"
    final = server.wait_final(answer["key"])
    assert final["status"] == "complete"
    argv = json.loads(final["details"])["container"]["argv"]
    assert argv[-4:] == ["--database_key", str(answer["key"]), "--dmi_sm_server", f"http://localhost:{server.port}"]


def test_a_container_posting_complete_cannot_end_the_job_or_invent_a_status(server: Server) -> None:
    answer = server.submit("fake_local", ["--progress", "2", "--post-status", "complete", "--sleep", "5",
                                          "--exit", "4"], pass_key=True)
    wait_until(lambda: server.job(answer["key"])["processed_records"] == 2, 20)
    assert server.job(answer["key"])["status"] == "running"
    final = server.wait_final(answer["key"])
    assert final["status"] == "error" and json.loads(final["results"])["returncode"] == 4


def test_status_update_needs_key_and_status_and_applies_what_it_can(server: Server) -> None:
    missing = server.post("/status_update/?status=running")
    assert missing.status_code == 400 and missing.json()["status"] == "error" and missing.json()["message"]
    assert server.post("/status_update/?key=1").status_code == 400
    assert server.post("/status_update/?key=999999&status=running").json() == {"status": "success"}  # ignored
    answer = server.submit("fake_local", ["--sleep", "8"])
    server.wait_status(answer["key"], "running")
    ok = server.post(f"/status_update/?key={answer['key']}&status=running&message=hi&processed_records=x")
    assert ok.status_code == 200 and ok.json() == {"status": "success"}
    job = server.job(answer["key"])
    assert job["message"] == "hi" and job["processed_records"] is None  # the message; not a count that is none
    server.post(f"/status_update/?key={answer['key']}&status=running&message=&processed_records=5")
    job = server.job(answer["key"])
    assert job["message"] == "hi" and job["processed_records"] == 5  # an empty message keeps the last one
    final = server.wait_final(answer["key"])
    late = server.post(f"/status_update/?key={answer['key']}&status=running&message=late&num_records=7")
    assert late.status_code == 200 and late.json() == {"status": "success"}
    assert server.job(answer["key"])["message"] == final["message"]  # ignored once final


def test_the_timeout_stops_the_container_itself(server: Server, docker_client: docker.DockerClient) -> None:
    started = time.monotonic()
    answer = server.submit("fake_local", ["--sleep", "300"], timeout=2)
    job = server.wait_final(answer["key"], timeout=30)
    results = json.loads(job["results"])
    assert job["status"] == "error"
    assert "timed out" in results["error"] and results["returncode"] != 0
    assert time.monotonic() - started < 20
    assert containers_of(docker_client, server.instance, answer["key"]) == []


def test_unknown_service_and_unknown_job_are_404_json(server: Server) -> None:
    for response in (server.post("/api/whisper_local", json={"args": []}), server.get("/api/jobs/424242"),
                     server.get("/api/jobs/notanumber"), server.get("/api/nonexistent/route")):
        assert response.status_code == 404
        body = response.json()
        assert body["status"] == "error" and body["reason"] and body["message"]


@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"args": "a string"}', '{"args": [{"x": 1}]}',
                                  '{"args": [], "timeout": -5}', '{"args": [], "timeout": "soon"}',
                                  '{"args": [], "pass_key": "yes"}'])
def test_a_bad_submit_body_is_a_400_json_error(server: Server, body: str) -> None:
    response = server.post("/api/fake_local", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["reason"]


def test_an_oversized_submit_body_is_refused_with_413(server: Server) -> None:
    body = b'{"args": ["' + b"x" * (17 * 1024 * 1024) + b'"]}'
    response = server.post("/api/fake_local", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["reason"]


def test_a_missing_image_ends_the_job_in_error_not_stuck(make_server: Callable[..., Server],
                                                          tmp_path: Path) -> None:
    from support import base_config

    config = base_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["ghost"] = {"image_name": "dsm-no-such-image:1", "local": True,
                                           "data_path": "/app/data"}
    server = make_server(config)
    assert "dsm-no-such-image" in server.log()  # warned about at start-up
    job = server.wait_final(server.submit("ghost_local", [])["key"])
    assert job["status"] == "error"
    assert "dsm-no-such-image:1" in json.loads(job["results"])["error"]


def test_a_datasets_folder_gone_after_start_fails_the_job_and_is_never_made_again(
        make_server: Callable[..., Server], tmp_path: Path) -> None:
    from support import base_config

    server = make_server(base_config(tmp_path))
    datasets = tmp_path / "4cat"
    datasets.rename(tmp_path / "4cat.moved")  # a share unmounted, a folder moved: Docker would make an empty one
    job = server.wait_final(server.submit("fake_local", ["--output_dir", "data/out", "data/x"])["key"])
    results = json.loads(job["results"])
    assert job["status"] == "error" and f"{datasets} that the job's container needs does not exist" in results["error"]
    assert not datasets.exists()  # no results written where nobody looks for them


def test_a_command_the_image_lacks_ends_the_job_with_code_127_and_says_which(make_server: Callable[..., Server],
                                                                          tmp_path: Path) -> None:
    from support import BUSYBOX, base_config

    config = base_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["typo"] = {"image_name": BUSYBOX, "local": True, "data_path": "/app/data",
                                          "command": "pythn3 /app/run.py"}
    server = make_server(config)
    job = server.wait_final(server.submit("typo_local", ["--x"])["key"])
    results = json.loads(job["results"])
    assert job["status"] == "error" and results["returncode"] == 127  # as `docker run` would exit
    assert "'pythn3' was not found in the image" in results["error"]


@pytest.mark.parametrize("args", [
    ["data/" + "x" * 1000 + f"/{i}.wav" for i in range(3000)],  # ~3 MB in all, over ARG_MAX
    ["data/" + "y" * 200_000],  # one argument over the kernel's per-argument limit
])
def test_an_argument_list_too_long_for_the_kernel_ends_in_a_clear_error(server: Server, args: list[str]) -> None:
    job = server.wait_final(server.submit("fake_local", args)["key"])
    assert job["status"] == "error"
    assert "refuses the container's argument list as too long" in json.loads(job["results"])["error"]
    assert json.loads(job["results"])["returncode"] != 0


def test_output_is_kept_bounded_and_says_it_was_cut(make_server: Callable[..., Server], tmp_path: Path) -> None:
    from support import base_config

    server = make_server(base_config(tmp_path, LOG_MAX_BYTES=4096))
    job = server.wait_final(server.submit("fake_local", ["--spam", "100000", "--exit", "1"])["key"])
    results = json.loads(job["results"])
    assert results["error_truncated"] is True and results["report_truncated"] is False
    assert len(results["error"]) <= 4096 + 200
    assert "100000 bytes" in results["truncation_note"] or "stderr: 100000" in results["truncation_note"]


def test_a_container_killed_for_memory_says_so(make_server: Callable[..., Server], tmp_path: Path) -> None:
    """The kernel's OOM kill comes as an `oom` event before the `die`: the job must still name the cause."""
    from support import base_config

    config = base_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["hog"] = {"image_name": BUSYBOX, "local": True, "command": "sh -c",
                                         "data_path": "/app/data", "mem_limit": "16m"}
    server = make_server(config)
    job = server.wait_final(server.submit("hog_local", ['echo before; x=$(head -c 200000000 /dev/zero | tr "\\0" a)'])
                            ["key"])
    results = json.loads(job["results"])
    assert job["status"] == "error" and results["exit_code"] == 137
    assert "more memory than it may (mem_limit)" in results["error"]
    assert results["report"] == "before\n"
    hog = next(s for s in server.get("/api/services").json()["services"] if s["name"] == "hog")
    assert hog["recent_failures"][0]["failure"] == "oom"


def test_a_database_written_by_the_original_is_migrated_in_place(make_server: Callable[..., Server],
                                                                 tmp_path: Path) -> None:
    database = tmp_path / "jobs.db"
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, created_at INTEGER, jobtype TEXT,"
                       " completed_at INTEGER, status TEXT, message TEXT, details JSON, results JSON)")
    old_details = json.dumps({"request_json": {"args": [], "4CAT_dataset_key": "old"}, "request_args": {}})
    connection.executemany("INSERT INTO jobs (created_at, jobtype, status, details, results) VALUES (?, ?, ?, ?, ?)", [
        (1700000000.75, "/api/whisper_local", "complete", old_details, json.dumps({"returncode": 0, "error": ""})),
        (1700000001, "/api/whisper_local", "running", old_details, None),
        (1700000002, "/api/whisper_local", "unknown", "not json at all", None),
        # final rows whose results 4CAT could not read: each comes out with an int returncode and a string error
        (1700000003, "/api/whisper_local", "complete", old_details, None),
        (1700000004, "/api/whisper_local", "complete", old_details, json.dumps({"returncode": 2, "error": "oom"})),
        (1700000005, "/api/whisper_local", "error", old_details, json.dumps({"returncode": 1})),
        (1700000006, "/api/whisper_local", "error", old_details, "not json"),
        (1700000007, "/api/whisper_local", "error", old_details, json.dumps({"returncode": None, "error": "x"})),
    ])
    connection.commit()
    connection.close()

    connection = sqlite3.connect(database)
    connection.execute("UPDATE jobs SET completed_at = 1700000099.5 WHERE id = 1")  # time.time(), as stored
    connection.commit()
    connection.close()

    server = make_server()
    assert server.job(1)["status"] == "complete"
    times = (server.job(1)["created_at"], server.job(1)["completed_at"])
    assert times == (1700000000, 1700000099) and all(type(t) is int for t in times)  # whole seconds, as 4CAT reads
    for job_id in (2, 3):
        job = server.job(job_id)
        assert job["status"] == "error"
        assert "original" in json.loads(job["results"])["error"]
        assert json.loads(job["results"])["returncode"] != 0
    expected = {4: ("complete", 0), 5: ("error", 2), 6: ("error", 1), 7: ("error", 1), 8: ("error", 1)}
    for job_id, (status, code) in expected.items():
        job = server.job(job_id)
        results = json.loads(job["results"])
        assert (job["status"], results["returncode"]) == (status, code), job
        assert isinstance(results["error"], str) and (status == "complete" or results["error"])
    assert json.loads(server.job(5)["results"])["error"] == "oom"  # what the original kept is kept
    found = server.get("/api/jobs/details_query/", json={"details_key": "$.request_json.4CAT_dataset_key",
                                                         "details_value": "old"}).json()["jobs"]
    assert [j["id"] for j in found] == [1, 2, 4, 5, 6, 7, 8]
    assert server.wait_final(server.submit("fake_local", [])["key"])["id"] == 9


def test_the_details_query_takes_other_json_paths_and_rejects_bad_ones(server: Server) -> None:
    answer = server.submit("fake_local", ["--stdout", "x"], extra={"nested": ["a", "b"]})
    found = server.get("/api/jobs/details_query/", json={"details_key": "$.request_json.extra.nested[1]",
                                                         "details_value": "b"}).json()["jobs"]
    assert [j["id"] for j in found] == [answer["key"]]
    bad = server.get("/api/jobs/details_query/", json={"details_key": "request_json", "details_value": "b"})
    assert bad.status_code == 400 and bad.json()["reason"]
    empty = server.get("/api/jobs/details_query/", json={"details_key": "$.request_json.4CAT_dataset_key",
                                                         "details_value": "none-such"})
    assert empty.status_code == 200 and empty.json() == {"status": "success", "jobs": []}


def test_job_lists_and_the_endpoint_list(server: Server) -> None:
    done = server.submit("fake_local", [])["key"]
    server.wait_final(done)
    running = server.submit("fake_local", ["--sleep", "5"])["key"]
    server.wait_status(running, "running")
    assert [j["id"] for j in server.get("/jobs/").json()["jobs"]] == [done, running]
    assert [j["id"] for j in server.get("/jobs/?current=1").json()["jobs"]] == [running]
    assert server.get("/api/").json() == {"endpoints": ["check_gpu_mem", "fake_local", "fake_remote"]}
    server.delete(f"/api/jobs/{running}")


def test_health_says_what_is_well(server: Server) -> None:
    body = server.get("/api/health").json()
    assert body["status"] == "ok" and body["docker"]["ok"] and body["database"]["ok"]


def test_the_dashboard_page_and_the_lists_it_reads(server: Server) -> None:
    page = server.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "DMI Service Manager" in page.text and "Content-Security-Policy" in page.headers
    keys = [server.submit("fake_local", [])["key"] for _ in range(3)]
    newest = server.get("/api/jobs/", params={"limit": "2", "order": "desc"}).json()["jobs"]
    assert [j["id"] for j in newest] == keys[::-1][:2]
    assert server.get("/jobs/", params={"limit": "x"}).status_code == 400


def test_admin_overviews_services_gpus_collections_and_filtered_job_lists(server: Server) -> None:
    """What the dashboard and the CLI read: every field comes from the real queue, uploads and config."""
    ok = server.submit("fake_local", ["--exit", "0"])["key"]
    failed = server.submit("fake_local", ["--stderr", "boom: bad input", "--exit", "3"])["key"]
    server.wait_final(ok)
    server.wait_final(failed)
    upload = server.post("/api/send_files", data={"folder_name": "coll"},
                         files=[("4cat_uploads", ("a.txt", b"12345")), ("4cat_uploads", ("b.txt", b"678"))])
    assert upload.status_code == 200, upload.text

    services = server.get("/api/services").json()["services"]
    fake = next(s for s in services if s["name"] == "fake")
    assert fake["endpoints"] == ["fake_local", "fake_remote"] and fake["uses_gpu"] is False
    assert fake["recent_failures"][0]["id"] == failed
    assert "boom: bad input" in fake["recent_failures"][0]["message"]
    assert fake["recent_failures"][0]["failure"] == "exit_code"

    gpus = server.get("/api/gpus").json()
    assert gpus["enabled"] is False and gpus["cards"] == [] and gpus["problem"]

    collections = server.get("/api/collections").json()["collections"]
    assert collections == [{"name": "coll", "files": 2, "bytes": 8, "modified_at": collections[0]["modified_at"],
                            "in_use": False}]

    errors = server.get("/jobs/", params={"status": "error", "service": "fake"}).json()["jobs"]
    assert [j["id"] for j in errors] == [failed]
    newest = server.get("/jobs/", params={"order": "desc", "limit": 1}).json()["jobs"]
    assert [j["id"] for j in newest] == [failed]
    assert server.get("/jobs/", params={"status": "finished"}).status_code == 400
