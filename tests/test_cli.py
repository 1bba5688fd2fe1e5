"""The `dsm` client commands, as the installed console script, against real servers.

Uploads and downloads of a tree (resumed, byte-identical), the job listing's filters and JSON, following a
job's log, cancelling with and without a token, the services and GPUs tables, and the exit codes and
one-line messages of every expected failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmi_service_manager.cli.transfer import _bad_component, _server_parts
from support import DSM, Server, base_config, dsm, free_port, wait_until


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """An expected failure: the exit code, one line on stderr, no traceback."""
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}: {done.stdout}{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) below `root`, by relative path."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[path.relative_to(root).as_posix()] = path.read_bytes() if path.is_file() else None
    return found


def make_tree(root: Path) -> None:
    uploads = root / "4cat_uploads"
    (uploads / "deep" / "er").mkdir(parents=True)
    (uploads / "a.txt").write_text("hello")
    (uploads / "empty.txt").write_bytes(b"")
    (uploads / "deep" / "er" / "b.bin").write_bytes(os.urandom(300_000))
    many = uploads / "many"
    many.mkdir()
    for i in range(70):  # more than one request's worth of parts
        (many / f"f{i:02d}.txt").write_text(str(i) * i)
    (root / "other").mkdir()
    (root / "other" / "c.json").write_text('{"c": 1}')
    (root / "results").mkdir()  # empty: made on the server too


# -- files


def test_upload_skips_what_is_there_and_download_gives_back_the_same_tree(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_tree(source)
    files = sorted(p for p, data in tree(source).items() if data is not None)

    first = as_json(dsm("upload", str(source), "coll", "--server", server.url, "--json"))
    assert sorted(first["uploaded"]) == files and first["skipped"] == [] and first["failed"] == {}
    assert first["folders_made"] == ["results"]
    listing = server.get("/api/list_filenames/coll").json()
    assert listing["4cat_uploads/deep/er"] == ["b.bin"] and len(listing["4cat_uploads/many"]) == 70
    assert listing["results"] == [] and listing["."] == []

    again = as_json(dsm("upload", str(source), "coll", "--server", server.url, "--json"))
    assert again["uploaded"] == [] and sorted(again["skipped"]) == files

    (source / "4cat_uploads" / "a.txt").write_text("hello again")  # changed (another size)
    (source / "other" / "new.txt").write_text("new")
    human = dsm("upload", str(source), "coll", "--server", server.url)
    assert human.returncode == 0, human.stderr
    assert f"uploaded 2 files (14 B); {len(files) - 1} already there, skipped" in human.stdout
    assert server.get("/api/download/coll/4cat_uploads/a.txt").content == b"hello again"

    out = tmp_path / "out"
    fetched = as_json(dsm("download", "coll", "--out", str(out), "--server", server.url, "--json"))
    assert len(fetched["downloaded"]) == len(files) + 1 and fetched["failed"] == {}
    assert tree(out) == tree(source)
    assert as_json(dsm("download", "coll", "--out", str(out), "--server", server.url, "--json"))["downloaded"] == []

    (out / "other" / "c.json").write_text("{}")  # incomplete locally: fetched again
    refetched = as_json(dsm("download", "coll", "--out", str(out), "--server", server.url, "--json"))
    assert refetched["downloaded"] == ["other/c.json"] and tree(out) == tree(source)

    part = tmp_path / "part"
    one = dsm("download", "coll", "4cat_uploads/deep", "--out", str(part), "--server", server.url)
    assert one.returncode == 0, one.stderr
    deep = "4cat_uploads/deep/er/b.bin"
    assert tree(part) == {"4cat_uploads": None, "4cat_uploads/deep": None, "4cat_uploads/deep/er": None,
                          deep: (source / deep).read_bytes()}
    assert not list(part.rglob(".dsm-part-*"))

    # a file named with its collection in one argument, as `list_filenames` paths read: as if given apart
    named = dsm("download", f"coll/{deep}", "--server", server.url, cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    assert (tmp_path / "coll" / deep).read_bytes() == (source / deep).read_bytes()


def test_files_at_the_top_of_a_folder_go_into_a_folder_of_the_collection(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "images"
    (source / "sub").mkdir(parents=True)
    (source / "one.png").write_bytes(b"\x89PNG one")
    (source / "my photo.png").write_bytes(b"\x89PNG two")
    (source / "sub" / "three.png").write_bytes(b"\x89PNG three")

    refused = dsm("upload", str(source), "coll", "--server", server.url)
    line = one_line_error(refused, 2)
    assert "no files directly in a collection" in line and "coll/4cat_uploads" in line

    done = as_json(dsm("upload", str(source), "coll/4cat_uploads", "--server", server.url, "--json"))
    assert done["renamed"] == {"my photo.png": "my_photo.png"}  # as werkzeug's secure_filename stores it
    assert server.get("/api/list_filenames/coll").json()["4cat_uploads"] == ["my_photo.png", "one.png"]
    again = as_json(dsm("upload", str(source), "coll/4cat_uploads", "--server", server.url, "--json"))
    assert again["uploaded"] == [] and len(again["skipped"]) == 3

    out = tmp_path / "out"
    assert dsm("download", "coll/4cat_uploads", "--out", str(out), "--server", server.url).returncode == 0
    assert (out / "my_photo.png").read_bytes() == b"\x89PNG two"
    assert (out / "sub" / "three.png").read_bytes() == b"\x89PNG three"


def test_a_refused_file_fails_the_upload_and_names_the_file(make_server: Callable[..., Server],
                                                            tmp_path: Path) -> None:
    server = make_server(ALLOWED_EXTENSIONS=["png"])
    source = tmp_path / "source"
    (source / "in").mkdir(parents=True)
    (source / "in" / "ok.png").write_bytes(b"png")
    (source / "in" / "no.exe").write_bytes(b"exe")
    done = dsm("upload", str(source), "coll", "--server", server.url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed: in/no.exe" in done.stderr and "uploaded 1 file" in done.stdout
    assert server.get("/api/list_filenames/coll").json()["in"] == ["ok.png"]


def test_download_writes_nothing_outside_out(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "f.txt").write_text("data")
    (source / "top").mkdir()
    (source / "top" / "g.txt").write_text("more")
    assert dsm("upload", str(source), "coll", "--server", server.url).returncode == 0
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)  # a planted link: the file would land outside --out
    done = dsm("download", "coll", "--out", str(out), "--server", server.url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed: sub" in done.stderr and "is a symlink" in done.stderr
    assert list(elsewhere.iterdir()) == []
    assert (out / "top" / "g.txt").read_text() == "more"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "x\x00y", "bell\x07", "x" * 256])
def test_names_from_the_server_that_could_leave_out_are_refused(name: str) -> None:
    assert _bad_component(name) is not None  # as a file name
    if "/" not in name:
        assert _server_parts(f"ok/{name}") is None  # as a folder in a listing


def test_server_folder_names_that_are_safe_are_taken_apart() -> None:
    assert _server_parts(".") == ()
    assert _server_parts("a/b c/ü") == ("a", "b c", "ü")
    assert _server_parts("/etc") is None and _server_parts("a//b") is None and _server_parts("a/../b") is None


# -- jobs


def test_jobs_filters_newest_first_and_json(server: Server) -> None:
    first = server.submit("fake_local", ["--stdout", "one"], **{"4CAT_dataset_key": "ds-1"})["key"]
    second = server.submit("fake_local", ["--exit", "3"])["key"]
    third = server.submit("fake_local", ["--stdout", "three"])["key"]
    for key in (first, second, third):
        server.wait_final(key)

    def ids(*args: str) -> list[int]:
        return [job["id"] for job in as_json(dsm("jobs", "--server", server.url, "--json", *args))["jobs"]]

    assert ids() == [third, second, first]
    assert ids("--status", "error") == [second]
    assert ids("--status", "complete", "--service", "fake") == [third, first]
    assert ids("--dataset-key", "ds-1") == [first]
    assert ids("--limit", "1") == [third]
    assert ids("--limit", "1", "--offset", "1") == [second]
    assert ids("--kind", "tes") == []
    assert ids("--service", "nosuch") == []

    table = dsm("jobs", "--server", server.url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "STATUS", "WHAT"]
    assert lines[1].split()[:4] == [str(third), "4cat", "complete", "/api/fake_local"]
    assert lines[2].split()[:3] == [str(second), "4cat", "error"]
    assert "no jobs match" in dsm("jobs", "--server", server.url, "--status", "running").stderr
    usage = dsm("jobs", "--server", server.url, "--status", "finished")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_job_shows_the_results_and_submit_waits_with_an_exit_code(server: Server) -> None:
    done = dsm("submit", "fake_local", "--wait", "--server", server.url, "--", "--stdout", "from the cli")
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stdout and "from the cli" in done.stdout
    failed = dsm("submit", "--server", server.url, "--wait", "--json", "fake_local", "--", "--stderr", "broken",
                 "--exit", "2")
    assert failed.returncode == 1, failed.stderr
    job = json.loads(failed.stdout)["job"]
    assert job["status"] == "error" and json.loads(job["results"])["returncode"] == 2
    zero = dsm("submit", "--server", server.url, "--timeout", "0", "fake_local")  # the server's to refuse
    assert zero.returncode == 6 and "timeout must be a positive number" in zero.stderr, zero.stderr
    shown = dsm("job", "--server", server.url, str(job["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "error" in shown.stdout and "broken" in shown.stdout
    assert any(line.split() == ["returncode", "2"] for line in shown.stdout.splitlines())
    assert as_json(dsm("job", "--server", server.url, str(job["id"]), "--json"))["job"]["id"] == job["id"]


def test_logs_follow_prints_what_the_container_prints_and_ends_with_the_job(server: Server) -> None:
    key = server.submit("fake_local", ["--stdout", "a line from the container", "--sleep", "4"])["key"]
    server.wait_status(key, "running")
    followed = dsm("logs", "-f", "--server", server.url, str(key))
    assert followed.returncode == 0, followed.stderr
    assert "a line from the container" in followed.stdout
    assert server.job(key)["status"] == "complete"  # it ended because the job did
    tail = dsm("logs", "--tail", "1", "--server", server.url, str(key))
    assert tail.returncode == 0 and "a line from the container" not in tail.stdout and "args ok" in tail.stdout
    both = server.submit("fake_local", ["--stdout", "out", "--stderr", "err"])["key"]
    server.wait_final(both)
    assert dsm("logs", "--server", server.url, str(both)).stdout.endswith("server=\nerr\n")  # no blank line between


def test_a_machine_outside_the_allow_list_is_told_so_not_sent_for_a_token(make_server: Callable[..., Server],
                                                                           tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, IP_WHITELIST=["10.0.0.0/8"]))
    refused = one_line_error(dsm("jobs", "--server", server.url, token=server.token("admin")), 4)
    assert "403" in refused and "IP_WHITELIST" in refused and "DSM_TOKEN" not in refused


def test_cancel_needs_an_admin_token(server: Server) -> None:
    key = server.submit("fake_local", ["--sleep", "60"])["key"]
    server.wait_status(key, "running")
    nobody = one_line_error(dsm("cancel", "--server", server.url, str(key)), 4)
    assert "401" in nobody and "DSM_TOKEN" in nobody and server.url in nobody
    reader = one_line_error(dsm("cancel", "--server", server.url, str(key), token=server.token("read")), 4)
    assert "403" in reader and "scope" in reader and "DSM_TOKEN" in reader
    wrong = one_line_error(dsm("cancel", "--server", server.url, str(key), "--token", "dsm_nonsense"), 4)
    assert "401" in wrong
    assert server.job(key)["status"] == "running"
    cancelled = dsm("cancel", "--wait", "--server", server.url, str(key), token=server.token("admin"))
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job {key} cancelled" in cancelled.stdout
    job = server.job(key)
    assert job["status"] == "error" and "dsm cancel" in json.loads(job["results"])["error"]


# -- the server


def test_services_and_gpus_as_tables_and_json(make_server: Callable[..., Server], tmp_path: Path) -> None:
    # Cards declared by hand and named to containers in NVIDIA_VISIBLE_DEVICES, so GPU jobs start here.
    config = base_config(tmp_path, GPU_ENABLED=True, GPU_DEVICE_MODE="environment",
                         GPU_INVENTORY=[{"id": 0, "memory": "24GiB", "name": "Test Card 4090"}])
    config["DOCKER_ENDPOINTS"]["fake"].update(gpu=True, gpu_memory="4GiB")
    server = make_server(config)
    failed = server.submit("fake_local", ["--stderr", "it broke", "--exit", "1"])["key"]
    server.wait_final(failed)

    listed = as_json(dsm("services", "--server", server.url, "--json"))
    [fake] = listed["services"]
    assert fake["name"] == "fake" and fake["uses_gpu"] is True
    assert [f["id"] for f in fake["recent_failures"]] == [failed]
    table = dsm("services", "--server", server.url)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("fake "))
    assert "fake_local, fake_remote" in row and "yes, 4.0 GiB" in row
    assert f"job {failed}" in table.stdout and "it broke" in table.stdout

    running = server.submit("fake_local", ["--sleep", "60"])["key"]
    server.wait_status(running, "running")
    gpus = as_json(dsm("gpus", "--server", server.url, "--json"))
    assert gpus["enabled"] is True and [card["name"] for card in gpus["cards"]] == ["Test Card 4090"]
    assert gpus["cards"][0]["jobs"] == [{"id": running, "service": "fake", "gpu_memory": 4 << 30}]
    shown = dsm("gpus", "--server", server.url)
    assert shown.returncode == 0, shown.stderr
    assert "GPUs: enabled" in shown.stdout
    row = next(line for line in shown.stdout.splitlines() if "Test Card 4090" in line)
    assert "24.0 GiB" in row and "4.0 GiB" in row and f"{running} fake (4.0 GiB)" in row


# -- failures: one line, a code that means something


def test_an_unreachable_server_is_one_line_naming_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["jobs"], ["job", "1"], ["services"], ["upload", str(tmp_path), "coll"]):
        line = one_line_error(dsm(*args, "--server", url), 3)
        assert url in line and "cannot reach the server" in line
    env_line = one_line_error(subprocess.run([str(DSM), "gpus"], capture_output=True, text=True, timeout=60,
                                             env={**os.environ, "DSM_SERVER": url}), 3)
    assert url in env_line


def test_a_server_url_that_can_never_work_is_a_usage_error_not_an_unreachable_server() -> None:
    for url in ("http://127.0.0.1:99999", "http://127.0.0.1:0", "http://[::1", "ftp://127.0.0.1"):
        assert "Traceback" not in one_line_error(dsm("jobs", "--server", url), 2)


def test_a_token_read_from_a_crlf_file_works_and_a_broken_one_is_a_usage_error(server: Server) -> None:
    token = server.token("read")
    assert dsm("jobs", "--server", server.url, token=token + "\r\n").returncode == 0
    broken = dsm("jobs", "--server", server.url, token=token[:5] + "\n" + token[5:])
    assert broken.returncode == 2 and "line break" in broken.stderr and "Traceback" not in broken.stderr


def test_serve_on_a_port_in_use_is_one_line_and_exit_1(server: Server, tmp_path: Path) -> None:
    busy = one_line_error(dsm("serve", "--host", "127.0.0.1", "--port", str(server.port), cwd=tmp_path), 1)
    assert f"cannot listen on 127.0.0.1:{server.port}" in busy and "in use" in busy
    assert server.get("/api/").status_code == 200  # the one there goes on


@pytest.mark.parametrize("options", [["--port", "70000"], ["--port", "-1"], ["--workers", "0"]])
def test_serve_refuses_a_port_or_worker_count_that_cannot_be(options: list[str], tmp_path: Path) -> None:
    refused = dsm("serve", *options, cwd=tmp_path)
    assert refused.returncode == 2 and "Invalid value" in refused.stderr and "Traceback" not in refused.stderr


def test_the_demo_fails_in_one_line_with_the_clis_exit_codes_and_uploads_nothing(
        make_server: Callable[..., Server], tmp_path: Path) -> None:
    closed = make_server(REQUIRE_TOKEN=True)
    assert "401" in one_line_error(dsm("demo", "--server", closed.url, cwd=tmp_path), 4)
    server = make_server()  # its config has no ocr service
    refused = one_line_error(dsm("demo", "--server", server.url, cwd=tmp_path), 5)
    assert "offers neither ocr_remote nor whisper_remote" in refused
    assert server.get("/api/collections").json()["collections"] == []


def test_interrupting_submit_wait_says_the_job_goes_on(server: Server) -> None:
    # As from a terminal: a suite started in the background (`pytest &`) hands its children SIGINT ignored.
    waiting = subprocess.Popen([str(DSM), "submit", "fake_local", "--wait", "--server", server.url, "--",
                                "--sleep", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    key = wait_until(lambda: next((j["id"] for j in server.get("/jobs/?status=running").json()["jobs"]), None),
                     30, what="the job to run")
    waiting.send_signal(signal.SIGINT)
    _, stderr = waiting.communicate(timeout=30)
    assert waiting.returncode == 130, stderr
    assert f"job {key} goes on on the server (dsm job {key}; dsm cancel {key} stops it)" in stderr
    assert server.job(key)["status"] == "running"
    server.delete(f"/api/jobs/{key}")


def test_unknown_things_are_not_found(server: Server, tmp_path: Path) -> None:
    for args in (["job", "4242"], ["logs", "4242"], ["cancel", "4242"], ["download", "nosuch", "--out",
                                                                           str(tmp_path / "x")]):
        line = one_line_error(dsm(*args, "--server", server.url, token=server.token("admin")), 5)
        assert "not found" in line
    assert "4242" in one_line_error(dsm("job", "4242", "--server", server.url), 5)


def test_server_side_failures_are_one_line(tmp_path: Path) -> None:
    line = one_line_error(dsm("build-service", "nosuch", cwd=tmp_path), 2)  # a name that is no recipe: usage
    assert "no service recipe 'nosuch'" in line
    missing = one_line_error(dsm("check-config", str(tmp_path / "nope.yml")), 2)
    assert "cannot read the config file" in missing


def test_token_commands_run_on_the_servers_config(server: Server) -> None:
    made = dsm("token", "create", "ci-bot", "--scope", "read", "--config", str(server.config_path))
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip().startswith("dsm_") and len(made.stdout.strip().splitlines()) == 1
    listed = dsm("token", "list", "--config", str(server.config_path))
    assert any(line.split()[:3] == ["ci-bot", "read", "active"] for line in listed.stdout.splitlines())
    assert as_json(dsm("jobs", "--server", server.url, "--json", token=made.stdout.strip()))["jobs"] == []
    assert dsm("token", "revoke", "--name", "ci-bot", "--config", str(server.config_path)).returncode == 0
    assert "401" in one_line_error(dsm("jobs", "--server", server.url, token=made.stdout.strip()), 4)
    again = dsm("token", "create", "ci-bot", "--scope", "read", "--config", str(server.config_path))
    assert again.returncode == 0, again.stderr  # a revoked token's name may be used again
    listed = dsm("token", "list", "--config", str(server.config_path))
    rows = [line.split() for line in listed.stdout.splitlines() if line.startswith("ci-bot")]
    assert sorted((row[0], row[-4]) for row in rows) == [("ci-bot", "active"), ("ci-bot", "revoked")], listed.stdout
    assert "401" in one_line_error(dsm("jobs", "--server", server.url, token=made.stdout.strip()), 4)
    assert as_json(dsm("jobs", "--server", server.url, "--json", token=again.stdout.strip()))["jobs"] == []
    assert dsm("token", "create", "--config", str(server.config_path)).returncode == 2
    twice = dsm("token", "create", "one", "--name", "another", "--config", str(server.config_path))
    assert twice.returncode == 2 and "two names given" in twice.stderr  # neither is made
    assert f"tokens in {server.config['DATABASE_FILE']}" in listed.stderr and "new database" not in listed.stderr


def test_token_commands_say_which_database_they_use_and_when_it_is_new(tmp_path: Path) -> None:
    """Run from another folder, the embedded default names another database than the server's: a token
    made there would never work, so the command says where it writes."""
    listed = dsm("token", "list", cwd=tmp_path)
    assert listed.returncode == 0
    assert f"tokens in {tmp_path / 'dsm-data' / 'jobs.db'}" in listed.stderr and "new database" in listed.stderr


def test_terminal_control_sequences_from_a_container_are_not_passed_to_the_terminal(server: Server) -> None:
    key = server.submit("fake_local", ["--sleep", "30"])["key"]
    server.wait_status(key, "running")
    hostile = "\x1b]52;c;cHduZWQ=\x07\x1b[31mred\x1b]0;title\x07"  # set the clipboard, colour, window title
    assert server.post("/status_update/", params={"key": key, "status": "running", "message": hostile}).ok
    for args in (("jobs",), ("job", str(key))):
        done = dsm(*args, "--server", server.url)
        assert done.returncode == 0, done.stderr
        assert "\x1b" not in done.stdout and "\x07" not in done.stdout
        assert "red" in done.stdout


def test_a_local_file_error_is_one_line(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "source" / "sub"
    source.mkdir(parents=True)
    (source / "f.txt").write_text("data")
    assert dsm("upload", str(tmp_path / "source"), "coll", "--server", server.url).returncode == 0
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where --out wants a folder")
    line = one_line_error(dsm("download", "coll", "--out", str(blocked / "out"), "--server", server.url), 1)
    assert str(blocked) in line
