"""The file routes: nothing outside UPLOAD_FOLDER_PATH is ever touched, and uploads are never partial."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from werkzeug.utils import secure_filename

from dmi_service_manager.errors import Conflict
from dmi_service_manager.files.storage import STAGING_DIR, Storage
from fourcat import FourCat
from support import Server, base_config, wait_until

SECRET = "top secret outside the upload folder"


def raw_request(server: Server, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Send the path exactly as written: no client-side normalisation of dots or slashes."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    if body:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body or None)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def snapshot(folder: Path, skip: Path) -> dict[str, str]:
    """Every path below `folder` outside `skip`, with a digest of what it holds (but the server's own log
    and database, which change as it works)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if skip in path.parents or path == skip or "server-" in path.name or path.name.startswith("jobs.db"):
            continue
        if path.is_symlink():
            found[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path)] = "dir"
    return found


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """An upload folder with a collection, a secret beside it, and symlinks planted inside pointing out."""
    uploads = tmp_path / "uploads"
    (tmp_path / "outside.txt").write_text(SECRET)
    (tmp_path / "outside-dir").mkdir()
    (tmp_path / "outside-dir" / "secret.txt").write_text(SECRET)
    (uploads / "c1" / "sub").mkdir(parents=True)
    (uploads / "c1" / "sub" / "ok.txt").write_text("fine\n")
    (uploads / "c1" / "link-file").symlink_to(tmp_path / "outside.txt")
    (uploads / "link-out").symlink_to(tmp_path / "outside-dir")
    (uploads / "c1" / "link-dir").symlink_to(tmp_path / "outside-dir")
    return tmp_path


HOSTILE_PATHS = [
    "../outside.txt", "..%2Foutside.txt", "%2e%2e/outside.txt", "%2e%2e%2foutside.txt", "....//outside.txt",
    "/etc/passwd", "%2Fetc%2Fpasswd", "c1/../../outside.txt", "c1/..%5c..%5coutside.txt", "c1\\..\\..\\outside.txt",
    "c1/%00/x", "c1/x%00.txt", "c1//sub/ok.txt", "c1/./sub/ok.txt", ".dsm-staging/1/x", "link-out/secret.txt",
    "c1/link-file", "c1/link-dir/secret.txt", "%252e%252e/outside.txt", "c1/..", "..", ".",
    "c1/%2e%2e/%2e%2e/outside.txt",
    "c1/sub/../../../outside.txt", "c1%2f..%2f..%2foutside.txt", "a" * 5000, "c1/sub/ok.txt/..",
    "..;/outside.txt",
    "%c0%ae%c0%ae/outside.txt", "c1/sub/%0aok.txt",
]


def test_hostile_paths_on_every_read_route_touch_nothing_outside(make_server: Callable[..., Server],
                                                                 planted: Path) -> None:
    server = make_server(base_config(planted))
    admin = {"Authorization": f"Bearer {server.token('admin')}"}
    before = snapshot(planted, planted / "uploads")
    routes = ["/api/list_filenames/{}", "/api/download/{}", "/api/uploads/{}", "/api/list_files?folder_name={}",
              "/api/linecount/?folder={}&file=x", "/api/linecount/?folder=c1&file={}"]
    checked = 0
    for hostile in HOSTILE_PATHS:
        for route in routes:
            status, body = raw_request(server, "GET", route.format(hostile))
            assert status in (400, 404), (route.format(hostile), status, body[:200])
            assert SECRET.encode() not in body and b"root:x:0:0" not in body
            assert json.loads(body)["reason"]
            checked += 1
        status, body = raw_request(server, "DELETE", f"/api/files/{hostile}", headers=admin)
        assert status in (400, 404, 405), (hostile, status)
    assert checked >= 30 * 6
    assert snapshot(planted, planted / "uploads") == before
    assert (planted / "uploads" / "c1" / "link-file").is_symlink()  # nothing deleted either


def test_a_planted_link_is_never_followed_and_the_answer_says_it_is_a_link(make_server: Callable[..., Server],
                                                                           planted: Path) -> None:
    server = make_server(base_config(planted))
    answer = server.get("/api/download/c1/link-file")
    assert answer.status_code == 404 and "symbolic link" in answer.json()["reason"]
    assert SECRET not in answer.text


HOSTILE_UPLOADS = [
    # (folder_name, field name, file name): each must stay inside the upload folder or be refused
    ("../escape", "4cat_uploads", "a.txt"), ("/tmp/escape", "4cat_uploads", "a.txt"), ("c1/../../escape", "x", "a.txt"),
    ("..", "x", "a.txt"), (".", "x", "a.txt"), ("c1\\..\\escape", "x", "a.txt"), ("c1", "../../escape", "a.txt"),
    ("c1", "/abs", "a.txt"), ("c1", "a/../../..", "a.txt"), ("c1", "", "a.txt"), ("c1", "..", "a.txt"),
    ("c1", "link-dir", "pwned.txt"), ("link-out", "x", "pwned.txt"), (".dsm-staging", "x", "a.txt"),
    ("c1", "x", "../../escape.txt"), ("c1", "x", "/etc/passwd"), ("c1", "x", "..\\..\\escape.txt"),
    ("c1", "x", "\x00.txt"), ("c1", "x", "...."), ("c1\x00", "x", "a.txt"), ("c1//d", "x", "a.txt"),
]


@pytest.mark.parametrize(("folder", "field", "name"), HOSTILE_UPLOADS)
def test_hostile_uploads_stay_inside_or_are_refused(make_server: Callable[..., Server], planted: Path,
                                                    folder: str, field: str, name: str) -> None:
    server = make_server(base_config(planted))
    before = snapshot(planted, planted / "uploads")
    response = server.post("/api/send_files", data={"folder_name": folder}, files=[(field, (name, b"payload"))])
    assert response.status_code in (200, 400, 404, 409), response.text
    if response.status_code != 200:
        assert response.json()["reason"]
    assert response.status_code != 405
    assert snapshot(planted, planted / "uploads") == before
    assert (planted / "outside-dir" / "pwned.txt").exists() is False
    for path in (planted / "uploads").rglob("*"):
        assert not path.is_symlink() or path.name in ("link-file", "link-out", "link-dir")
        assert planted / "uploads" in path.resolve().parents or path.is_symlink()


def test_names_are_sanitised_exactly_as_werkzeug_does(server: Server, tmp_path: Path) -> None:
    names = ["my file (1).WAV", "naïve café.jpg", "../../x.png", "Ωmega.png", "  spaced  out .txt", "a\"b.txt",
             "C:\\Users\\me\\pic.png", "x.tar.gz"]
    for name in names:
        response = server.post("/api/send_files", data={"folder_name": "names"},
                               files=[("4cat_uploads", (name, name.encode()))])
        assert response.status_code == 200
        if "\\" not in name:  # requests sends backslashes unescaped; the original's werkzeug drops them too
            assert response.json()["4cat_uploads"] == [name]
    stored = sorted(p.name for p in (tmp_path / "uploads" / "names" / "4cat_uploads").iterdir())
    assert stored == sorted(secure_filename(n) for n in names)


def test_refused_extensions_are_listed_as_errors_with_status_200(make_server: Callable[..., Server],
                                                                 tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, ALLOWED_EXTENSIONS=["wav", "png"]))
    response = server.post("/api/send_files", data={"folder_name": "ext"},
                           files=[("4cat_uploads", ("ok.WAV", b"1")), ("4cat_uploads", ("bad.exe", b"2")),
                                  ("4cat_uploads", ("noext", b"3"))])
    assert response.status_code == 200
    body = response.json()
    assert body["4cat_uploads"] == ["ok.WAV"]
    assert set(body["errors"]) == {"bad.exe", "noext"}
    assert sorted(os.listdir(tmp_path / "uploads" / "ext" / "4cat_uploads")) == ["ok.WAV"]
    # The results placeholder is honoured even though txt is not an allowed extension.
    placeholder = server.post("/api/send_files", data={"folder_name": "ext"},
                              files=[("res", ("4CAT_res_blank.txt", b""))])
    assert placeholder.status_code == 200 and placeholder.json()["res"] == ["4CAT_res_blank.txt"]
    assert FourCat(server.url).folder_files("ext") == {".": [], "4cat_uploads": ["ok.WAV"], "res": []}


def test_without_a_folder_name_the_server_picks_a_fresh_one(server: Server, tmp_path: Path) -> None:
    response = server.post("/api/send_files", files=[("x", ("a.txt", b"1"))])
    folder = response.json()["folder_name"]
    assert response.status_code == 200 and len(folder) == 32
    assert (tmp_path / "uploads" / folder / "x" / "a.txt").read_bytes() == b"1"


def test_bad_upload_requests_are_clear_400s_never_405(server: Server) -> None:
    assert server.post("/api/send_files", data={"folder_name": "x"}).status_code == 400
    assert server.post("/api/send_files", data=b"raw", headers={"Content-Type": "text/plain"}).status_code == 400
    truncated = (b"--b\r\nContent-Disposition: form-data; name=\"x\"; filename=\"a.txt\"\r\n\r\nhalf a file")
    response = server.post("/api/send_files", data=truncated,
                           headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and response.json()["reason"]


def test_a_client_that_disconnects_mid_upload_leaves_nothing(server: Server, tmp_path: Path) -> None:
    body_head = (b"--XyZ\r\nContent-Disposition: form-data; name=\"folder_name\"\r\n\r\ncut\r\n"
                 b"--XyZ\r\nContent-Disposition: form-data; name=\"4cat_uploads\"; filename=\"big.wav\"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /api/send_files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
                     b"Content-Length: 10000000\r\n\r\n" + body_head + b"z" * 3_000_000)
        time.sleep(0.3)
    staging = tmp_path / "uploads" / ".dsm-staging"
    wait_until(lambda: not any(p.is_file() for p in staging.rglob("*")) and server.staged_files_open() == [], 10,
               what="the cut upload's file to be discarded")
    assert not (tmp_path / "uploads" / "cut" / "4cat_uploads" / "big.wav").exists()
    assert server.get("/api/list_filenames/cut").status_code == 404


def test_concurrent_uploads_of_one_name_leave_one_whole_file(server: Server, tmp_path: Path) -> None:
    contents = [bytes([65 + i]) * 200_000 for i in range(8)]
    statuses: list[int] = []

    def upload(data: bytes) -> None:
        response = server.post("/api/send_files", data={"folder_name": "race"},
                               files=[("4cat_uploads", ("same.bin", data))])
        statuses.append(response.status_code)

    threads = [threading.Thread(target=upload, args=(data,)) for data in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * len(contents)
    assert (tmp_path / "uploads" / "race" / "4cat_uploads" / "same.bin").read_bytes() in contents
    assert os.listdir(tmp_path / "uploads" / "race" / "4cat_uploads") == ["same.bin"]


def test_an_upload_over_the_limit_is_413_and_nothing_is_kept(make_server: Callable[..., Server],
                                                             tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, MAX_UPLOAD_BYTES=10_000))
    response = server.post("/api/send_files", data={"folder_name": "big"}, files=[("x", ("a.bin", b"0" * 50_000))])
    assert response.status_code == 413 and response.json()["reason"]
    assert not (tmp_path / "uploads" / "big" / "x" / "a.bin").exists()
    assert "upload refused" in server.log()
    # chunked, so no length to refuse up front: the folder's field came first, and the log names it
    body = (b'--b\r\nContent-Disposition: form-data; name="folder_name"\r\n\r\nchunked-big\r\n'
            b'--b\r\nContent-Disposition: form-data; name="x"; filename="a.bin"\r\n\r\n' + b"0" * 50_000 +
            b"\r\n--b--\r\n")
    chunked = requests.post(f"{server.url}/api/send_files", data=iter([body]), timeout=30,
                            headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413 and not (tmp_path / "uploads" / "chunked-big" / "x" / "a.bin").exists()
    assert "for collection chunked-big" in server.log()


def test_a_full_disk_is_507_with_nothing_half_written(make_server: Callable[..., Server], tmp_path: Path) -> None:
    uploads = tmp_path / "small-disk"
    uploads.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(uploads)], check=False).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        server = make_server(base_config(tmp_path, UPLOAD_FOLDER_PATH=str(uploads)))
        response = server.post("/api/send_files", data={"folder_name": "full"},
                               files=[("x", ("huge.bin", b"0" * 3_000_000))])
        assert response.status_code == 507 and "disk is full" in response.json()["reason"]
        assert not (uploads / "full" / "x" / "huge.bin").exists()
        assert not any(p.is_file() for p in (uploads / ".dsm-staging").rglob("*"))
        assert "upload refused" in server.log() and "full" in server.log()
        small = server.post("/api/send_files", data={"folder_name": "full"}, files=[("x", ("small.txt", b"ok"))])
        assert small.status_code == 200 and (uploads / "full" / "x" / "small.txt").read_bytes() == b"ok"
    finally:
        subprocess.run(["umount", "-l", str(uploads)], check=False)


def test_downloads_stream_with_length_etag_and_ranges(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "uploads" / "dl" / "results"
    folder.mkdir(parents=True)
    data = bytes(range(256)) * 4000
    (folder / "out.json").write_bytes(data)
    whole = server.get("/api/download/dl/results/out.json")
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["Content-Length"] == str(len(data)) and whole.headers["Content-Type"] == "application/json"
    assert whole.headers["Accept-Ranges"] == "bytes" and whole.headers["Last-Modified"]
    etag = whole.headers["ETag"]
    assert server.get("/api/uploads/dl/results/out.json").content == data  # the README's alias
    head = requests.head(f"{server.url}/api/download/dl/results/out.json", timeout=30)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data)) and head.content == b""

    part = server.get("/api/download/dl/results/out.json", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert server.get("/api/download/dl/results/out.json", headers={"Range": "bytes=1000-"}).content == data[1000:]
    assert server.get("/api/download/dl/results/out.json", headers={"Range": "bytes=-10"}).content == data[-10:]
    stale = server.get("/api/download/dl/results/out.json", headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == data
    beyond = server.get("/api/download/dl/results/out.json", headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.json()["reason"]
    assert server.get("/api/download/dl/results/out.json", headers={"If-None-Match": etag}).status_code == 304
    assert server.get("/api/download/dl/results/missing.json").status_code == 404
    assert server.get("/api/download/dl/results").status_code == 404  # a folder is not a file
    trailing = server.get("/api/download/dl/results/out.json/")  # a path ending in / names a folder
    assert trailing.status_code == 404 and "does not exist" in trailing.json()["reason"]


def test_a_file_that_shrinks_while_it_is_sent_cuts_the_download_and_says_so_once(server: Server,
                                                                                 tmp_path: Path) -> None:
    """Its length was promised in the head: the connection closes short of it, so the client cannot take
    the rest for the whole file, and the log names the cause in one line instead of two tracebacks."""
    path = tmp_path / "uploads" / "shrinks" / "big.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * (64 << 20))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /api/download/shrinks/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        received = sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200") and b"content-length: 67108864" in received.lower()
        os.truncate(path, 1000)
        while chunk := sock.recv(1 << 20):
            received += chunk
    assert len(received) < 64 << 20  # closed short of the promised length
    wait_until(lambda: "the file shrank while it was sent" in server.log(), 10, what="the cut in the log")
    assert "Traceback" not in server.log()
    assert server.get("/api/download/shrinks/big.bin").content == b"x" * 1000  # and the server goes on


def test_list_filenames_lists_nested_and_empty_folders(server: Server, tmp_path: Path) -> None:
    root = tmp_path / "uploads" / "nest"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_text("1")
    (root / "a" / "b" / "deep.txt").write_text("2")
    listing = server.get("/api/list_filenames/nest").json()
    assert listing == {".": ["top.txt"], "a": [], "a/b": ["deep.txt"], "a/b/c": [], "empty": []}
    assert server.get("/api/list_files", params={"folder_name": "nest"}).json() == listing
    assert server.get("/api/list_filenames/nest/a").json() == {".": [], "b": ["deep.txt"], "b/c": []}
    assert server.get("/api/list_filenames/absent").status_code == 404


def test_linecount_counts_lines_and_follows_a_growing_file(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "uploads" / "lc" / "res"
    folder.mkdir(parents=True)
    path = folder / "out.ndjson"
    path.write_text("a\nb\nc")
    assert server.get("/api/linecount/", params={"folder": "lc/res", "file": "out.ndjson"}).json() == {"lines": 3}
    with path.open("a") as handle:
        handle.write("\nd\n")
    assert server.get("/api/linecount/", params={"folder": "lc/res", "file": "out.ndjson"}).json() == {"lines": 4}
    path.write_text("")
    assert server.get("/api/linecount/", params={"folder": "lc/res", "file": "out.ndjson"}).json() == {"lines": 0}
    missing = server.get("/api/linecount/", params={"folder": "lc/res", "file": "nope"})
    assert missing.status_code == 404 and missing.json()["reason"]
    assert server.get("/api/linecount/", params={"folder": "lc"}).status_code == 400


def test_delete_a_collection_unless_a_job_uses_it(server: Server, tmp_path: Path) -> None:
    (tmp_path / "uploads" / "busy" / "4cat_uploads").mkdir(parents=True)
    (tmp_path / "uploads" / "idle" / "x").mkdir(parents=True)
    key = server.submit("fake_remote", ["--sleep", "30", "data/busy/4cat_uploads/a.wav"])["key"]
    server.wait_status(key, "running")
    refused = server.delete("/api/files/busy")
    assert refused.status_code == 409 and "used by a job" in refused.json()["reason"]
    assert server.delete("/api/files/idle").status_code == 200
    assert not (tmp_path / "uploads" / "idle").exists() and (tmp_path / "uploads" / "busy").exists()
    assert server.delete("/api/files/idle").status_code == 404
    server.delete(f"/api/jobs/{key}")
    server.wait_final(key)
    assert server.delete("/api/files/busy").status_code == 200


def test_retention_removes_only_old_collections_no_job_uses(make_server: Callable[..., Server],
                                                            tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    for name in ("old", "fresh", "old-but-used"):
        (uploads / name / "4cat_uploads").mkdir(parents=True)
        (uploads / name / "4cat_uploads" / "f.wav").write_text("x")
    long_ago = time.time() - 10 * 86400
    for name in ("old", "old-but-used"):
        for path in [uploads / name, *(uploads / name).rglob("*")]:
            os.utime(path, (long_ago, long_ago))
    server = make_server(base_config(tmp_path, MAX_CONCURRENT_JOBS=1))
    blocker = server.submit("fake_local", ["--sleep", "30"])["key"]
    server.submit("fake_remote", ["data/old-but-used/4cat_uploads/f.wav"])  # waits behind the blocker
    server.stop()
    server.config["RETENTION_DAYS"] = 7
    server.start()  # the sweep runs when the scheduler starts, then hourly
    wait_until(lambda: not (uploads / "old").exists(), 15, what="the old collection to be removed")
    assert (uploads / "fresh").exists() and (uploads / "old-but-used").exists()
    wait_until(lambda: "retention: removed collection old" in server.log(), 5, what="the removal in the log")
    server.delete(f"/api/jobs/{blocker}")


def test_staging_left_by_a_dead_process_is_swept_at_start_up(make_server: Callable[..., Server],
                                                              tmp_path: Path) -> None:
    leftover = tmp_path / "uploads" / ".dsm-staging" / "999999"  # no such process
    leftover.mkdir(parents=True)
    (leftover / "half-written").write_bytes(b"partial")
    emptied = tmp_path / "uploads" / ".dsm-staging" / "999998"  # what every clean stop leaves: nothing lost
    emptied.mkdir()
    server = make_server()
    wait_until(lambda: not leftover.exists() and not emptied.exists(), 10, what="the sweep")
    assert f"removed 1 half-written file(s) in {tmp_path / 'uploads'}" in server.log()
    assert server.get("/api/list_filenames/.dsm-staging").status_code == 400  # never listed


def test_with_upload_fsync_files_are_synced_and_stored(make_server: Callable[..., Server], tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, UPLOAD_FSYNC=True))
    for _ in range(2):  # the second replaces the first
        response = server.post("/api/send_files", data={"folder_name": "synced"},
                               files=[("4cat_uploads", ("a.bin", b"durable"))])
        assert response.status_code == 200
    assert (tmp_path / "uploads" / "synced" / "4cat_uploads" / "a.bin").read_bytes() == b"durable"


# -- what a job can do to the upload folder: remote services' containers see all of it, and write anywhere


def test_a_symlink_planted_as_the_staging_folder_is_never_followed(server: Server, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "important.txt").write_text(SECRET)
    (victim / "keep" / "also.txt").write_text(SECRET)
    staging = tmp_path / "uploads" / ".dsm-staging"
    subprocess.run(["rm", "-rf", str(staging)], check=True)
    staging.symlink_to(victim)  # what `ln -s` in a job does
    upload = server.post("/api/send_files", data={"folder_name": "s1"}, files={"4cat_uploads": ("a.txt", b"hello")})
    assert upload.status_code == 200 and upload.json()["4cat_uploads"] == ["a.txt"]
    assert (tmp_path / "uploads" / "s1" / "4cat_uploads" / "a.txt").read_bytes() == b"hello"
    assert staging.is_dir() and not staging.is_symlink()  # made again, a real folder
    seen = server.log().count("was not a folder")  # before the planting: a sweep may come right after it
    subprocess.run(["rm", "-rf", str(staging)], check=True)
    staging.symlink_to(victim)
    wait_until(lambda: server.log().count("was not a folder") > seen, 15, what="the periodic staging sweep")
    assert sorted(p.relative_to(victim).as_posix() for p in victim.rglob("*")) == [
        "important.txt", "keep", "keep/also.txt"]  # nothing removed, nothing written there
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("intrusion", ["removed", "a file", "a file, then removed"])
def test_uploads_go_on_whatever_a_job_made_of_the_staging_folder(server: Server, tmp_path: Path,
                                                                 intrusion: str) -> None:
    staging = tmp_path / "uploads" / ".dsm-staging"
    for index in range(4):  # each worker, whichever answers
        subprocess.run(["rm", "-rf", str(staging)], check=True)
        if intrusion.startswith("a file"):
            staging.write_text("in the way")
        if intrusion.endswith("removed"):
            staging.unlink(missing_ok=True)
        upload = server.post("/api/send_files", data={"folder_name": "s2"},
                             files={"4cat_uploads": (f"f{index}.txt", b"x")})
        assert upload.status_code == 200, upload.text
    assert sorted(p.name for p in (tmp_path / "uploads" / "s2" / "4cat_uploads").iterdir()) == [
        "f0.txt", "f1.txt", "f2.txt", "f3.txt"]


def test_names_the_routes_cannot_carry_are_not_listed(server: Server, tmp_path: Path) -> None:
    """A job can name a file with any bytes; a listing shows only what a download can then fetch."""
    folder = tmp_path / "uploads" / "odd" / "results"
    folder.mkdir(parents=True)
    for raw in (b"caf\xe9.json", b"tab\tname.json", b"esc\x1b.json", b"back\\slash.json", b"fine.json"):
        with open(os.fsencode(folder) + b"/" + raw, "wb"):
            pass
    os.mkdir(os.fsencode(tmp_path / "uploads") + b"/bad\xffcol")
    listing = server.get("/api/list_filenames/odd")
    assert listing.status_code == 200 and listing.json() == {".": [], "results": ["fine.json"]}
    assert server.get("/api/list_files", params={"folder_name": "odd/results"}).json() == {".": ["fine.json"]}
    collections = server.get("/api/collections")
    assert collections.status_code == 200 and "odd" in [c["name"] for c in collections.json()["collections"]]
    for name in listing.json()["results"]:
        assert server.get(f"/api/download/odd/results/{name}").status_code == 200


def _deep_tree(top: Path, depth: int, mtime: float, leaf_mtime: float) -> None:
    """`depth` nested folders and a file at the bottom, made through descriptors (the path is longer
    than PATH_MAX); the folders modified at `mtime`, the file at `leaf_mtime`."""
    times = (mtime, mtime)
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.utime(fd, times)
            os.close(fd)
            fd = child
        with open(os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as leaf:
            leaf.write("x")
            leaf.flush()
            os.utime(leaf.fileno(), (leaf_mtime, leaf_mtime))
        os.utime(fd, times)
    finally:
        os.close(fd)


def test_a_tree_thousands_of_levels_deep_is_listed_measured_and_removed(tmp_path: Path,
                                                                      request: pytest.FixtureRequest) -> None:
    uploads = tmp_path / "uploads"
    long_ago = time.time() - 30 * 86400
    _deep_tree(uploads / "deep", 3000, long_ago, time.time())  # old but for its bottom file
    _deep_tree(uploads / "old-deep", 1500, long_ago, long_ago)
    # pytest's own clean-up of tmp_path recurses: whatever happens here, the trees go
    request.addfinalizer(lambda: subprocess.run(["rm", "-rf", str(uploads / "deep"), str(uploads / "old-deep")]))
    # far fewer descriptors than levels: a walk that held one per level would run out
    server = Server(tmp_path, base_config(tmp_path, RETENTION_DAYS=7), open_files=512)
    request.addfinalizer(server.stop)
    server.start()
    listing = server.get("/api/list_filenames/deep")
    assert listing.status_code == 200
    keys = list(listing.json())
    assert max(len(k.encode()) for k in keys) < 4096 and len(keys) > 1000  # what a request could name
    collections = server.get("/api/collections")
    assert collections.status_code == 200
    # deep's newest file sits at the bottom, past any path a request can name, and still counts
    wait_until(lambda: not (uploads / "old-deep").exists(), 20, what="retention to remove the old deep tree")
    assert (uploads / "deep").exists()
    assert server.delete("/api/files/deep").status_code == 200
    assert not (uploads / "deep").exists()
    time.sleep(1)
    assert "Traceback" not in server.log()


def test_a_file_that_cannot_be_placed_is_refused_alone(server: Server, tmp_path: Path) -> None:
    (tmp_path / "uploads" / "s3" / "f" / "dir.txt").mkdir(parents=True)  # a folder where a file would go
    (tmp_path / "uploads" / "s3" / "lnk").symlink_to(tmp_path / "victim", target_is_directory=True)
    files = [("f", ("ok1.txt", b"1")), ("f", ("dir.txt", b"2")), ("x/../y", ("bad.txt", b"4")),
             ("lnk", ("through.txt", b"5")), ("f", ("ok2.txt", b"3"))]
    response = server.post("/api/send_files", data={"folder_name": "s3"}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["f"] == ["ok1.txt", "ok2.txt"] and "is a folder" in body["errors"]["dir.txt"]
    assert "'..'" in body["errors"]["bad.txt"] and "x/../y" not in body  # a bad folder name is no key
    assert "not a folder" in body["errors"]["through.txt"] and body["lnk"] == []
    assert (tmp_path / "uploads" / "s3" / "f" / "ok2.txt").read_bytes() == b"3"
    assert not (tmp_path / "victim").exists()


def test_two_files_of_one_request_with_one_stored_name_keep_the_first_and_say_so(server: Server,
                                                                                tmp_path: Path) -> None:
    files = [("f", ("a.txt", b"first")), ("f", ("a.txt", b"second")), ("f", ("b c.txt", b"spaced")),
             ("f", ("b_c.txt", b"underscored")), ("g", ("a.txt", b"other folder"))]
    response = server.post("/api/send_files", data={"folder_name": "dup"}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["f"] == ["a.txt", "b c.txt"] and body["g"] == ["a.txt"]
    assert set(body["errors"]) == {"a.txt", "b_c.txt"} and "'b_c.txt'" in body["errors"]["b_c.txt"]
    folder = tmp_path / "uploads" / "dup"
    assert (folder / "f" / "a.txt").read_bytes() == b"first"
    assert (folder / "f" / "b_c.txt").read_bytes() == b"spaced"
    assert (folder / "g" / "a.txt").read_bytes() == b"other folder"
    # A later request replaces a stored file, as the original's did.
    again = server.post("/api/send_files", data={"folder_name": "dup"}, files=[("f", ("a.txt", b"replaced"))])
    assert again.json() == {"folder_name": "dup", "f": ["a.txt"]}
    assert (folder / "f" / "a.txt").read_bytes() == b"replaced"
    assert [p for p in (tmp_path / "uploads" / ".dsm-staging").rglob("*") if not p.is_dir()] == []


def test_uploads_never_fail_while_a_job_keeps_removing_the_staging_folder(server: Server, tmp_path: Path) -> None:
    staging = tmp_path / "uploads" / ".dsm-staging"
    stop = threading.Event()

    def vandal() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline:
            subprocess.run(["rm", "-rf", str(staging)], check=False)
            with contextlib.suppress(OSError):
                staging.symlink_to(tmp_path / "victim")
            with contextlib.suppress(OSError):
                staging.unlink()

    thread = threading.Thread(target=vandal, daemon=True)
    thread.start()
    try:
        statuses = [server.post("/api/send_files", data={"folder_name": "s5"},
                                files={"4cat_uploads": (f"f{i}.txt", b"x" * 1000)}).status_code for i in range(40)]
    finally:
        stop.set()
        thread.join(30)
    assert set(statuses) <= {200, 409} and statuses.count(200) >= 30, statuses  # 409: "send it again"
    assert not (tmp_path / "victim").exists()
    assert "Traceback" not in server.log()


def test_staging_removed_at_any_moment_is_send_it_again_never_an_error(tmp_path: Path) -> None:
    """The storage itself, thousands of times: whatever step a job's removal of the staging folder lands
    between, an upload is stored or refused as a conflict ("send it again"), new names and replaced ones alike."""
    root = tmp_path / "uploads"
    root.mkdir()
    storage, staging, stop = Storage(root), root / STAGING_DIR, threading.Event()

    def vandal() -> None:
        while not stop.is_set():
            subprocess.run(["rm", "-rf", str(staging)], check=False, stderr=subprocess.DEVNULL)
            with contextlib.suppress(OSError):
                staging.symlink_to(tmp_path / "victim")
            with contextlib.suppress(OSError):
                staging.unlink()

    threads = [threading.Thread(target=vandal, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    outcomes: list[str] = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(outcomes) < 50_000:
            try:
                staged = storage.new_staged_file()
                try:
                    os.write(staged.fd, b"x" * 100)
                    storage.place(staged, ("s",), f"f{len(outcomes) % 20}.txt")  # most replace a file
                finally:
                    staged.discard()
                outcomes.append("stored")
            except Conflict:
                outcomes.append("send it again")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert "stored" in outcomes
    assert not (tmp_path / "victim").exists()


def test_the_first_folder_name_counts_and_extensions_are_the_stored_names(make_server: Callable[..., Server],
                                                                         tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, ALLOWED_EXTENSIONS=["txt", "tar.gz"]))
    twice = requests.post(f"{server.url}/api/send_files", data=[("folder_name", "first"), ("folder_name", "second")],
                          files={"4cat_uploads": ("a.txt", b"x")}, timeout=30)
    assert twice.json()["folder_name"] == "first"  # as Flask's request.form.get() read it
    names = [".txt", "_.txt", "..txt", "a.tar.gz", "b.TXT", "c.gz"]
    response = server.post("/api/send_files", data={"folder_name": "ext"},
                           files=[("4cat_uploads", (name, b"x")) for name in names])
    body = response.json()
    assert response.status_code == 200 and body["4cat_uploads"] == ["a.tar.gz", "b.TXT"]
    assert set(body["errors"]) == {".txt", "_.txt", "..txt", "c.gz"}  # stored as `txt`: no extension left
    assert sorted(p.name for p in (tmp_path / "uploads" / "ext" / "4cat_uploads").iterdir()) == ["a.tar.gz", "b.TXT"]


# -- downloads as HTTP says


def test_ranges_and_conditions_on_downloads_follow_rfc_9110(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "uploads" / "h" / "r"
    folder.mkdir(parents=True)
    (folder / "empty.txt").write_bytes(b"")
    (folder / "ten.txt").write_bytes(b"0123456789")
    url = "/api/download/h/r/ten.txt"
    empty = server.get("/api/download/h/r/empty.txt", headers={"Range": "bytes=-5"})
    assert empty.status_code == 200 and empty.content == b"" and "Content-Range" not in empty.headers
    zeros = server.get(url, headers={"Range": "bytes=" + "0" * 40 + "1-2"})
    assert zeros.status_code == 206 and zeros.content == b"12"
    past = server.get(url, headers={"Range": "bytes=20-"})
    assert past.status_code == 416 and past.headers["Content-Range"] == "bytes */10" and past.json()["reason"]
    whole = server.get(url)
    etag, modified = whole.headers["ETag"], whole.headers["Last-Modified"]
    assert server.get(url, headers={"If-None-Match": "*"}).status_code == 304
    assert server.get(url, headers={"If-None-Match": f'"x", W/{etag}'}).status_code == 304
    assert server.get(url, headers={"If-Modified-Since": modified}).status_code == 304
    assert server.get(url, headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 200
    assert server.get(url, headers={"If-Modified-Since": "not a date"}).status_code == 200
    refused = server.get(url, headers={"If-Match": '"nope"'})
    assert refused.status_code == 412 and refused.json()["reason"]
    assert server.get(url, headers={"If-Match": etag}).status_code == 200
    assert server.get(url, headers={"If-Unmodified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}).status_code == 412
    wrong = server.post(url)
    assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"] and wrong.json()["reason"]


def test_head_and_options_are_answered_as_flask_did(server: Server, tmp_path: Path) -> None:
    """The original ran on Flask, which answers HEAD on every GET route (the same status and headers, no
    body) and OPTIONS on every route (the methods it takes). A route that takes no GET still refuses HEAD,
    and every 405 names all the methods its path takes, whichever route of it was tried first."""
    (tmp_path / "uploads" / "heads").mkdir(parents=True)
    (tmp_path / "uploads" / "heads" / "a.txt").write_text("one\ntwo\n")
    for path, params in (("/api/list_filenames/heads", {}), ("/api/list_files", {"folder_name": "heads"}),
                         ("/jobs/", {}), ("/api/collections", {}), ("/api/health", {}),
                         ("/api/linecount/", {"folder": "heads", "file": "a.txt"})):
        got = server.get(path, params=params)
        head = requests.head(f"{server.url}{path}", params=params, timeout=30)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["Content-Type"] == got.headers["Content-Type"], path
        if path != "/jobs/":  # streamed: its length is not known ahead
            assert head.headers["Content-Length"] == got.headers["Content-Length"], path
    missing = requests.head(f"{server.url}/api/list_filenames/absent", timeout=30)
    assert missing.status_code == 404 and missing.content == b""
    refused = requests.head(f"{server.url}/api/send_files", timeout=30)
    assert refused.status_code == 405 and "POST" in refused.headers["Allow"]
    assert "head" not in server.get("/openapi.json").json()["paths"]["/api/list_filenames/{collection}"]
    # A followed log is not followed for a HEAD: the connection is free for the next request at once.
    running = server.submit("fake_local", ["--sleep", "30"])["key"]
    server.wait_status(running, "running")
    with requests.Session() as session:
        head = session.head(f"{server.url}/api/jobs/{running}/logs", params={"follow": "1"}, timeout=10)
        assert head.status_code == 200 and head.headers["Content-Type"].startswith("text/plain")
        assert session.get(f"{server.url}/api/health", timeout=5).status_code == 200
    assert requests.head(f"{server.url}/api/jobs/424242/logs", timeout=10).status_code == 404
    server.delete(f"/api/jobs/{running}")
    key = server.submit("fake_local", [])["key"]
    options = requests.options(f"{server.url}/api/jobs/{key}", timeout=30)
    assert options.status_code == 200 and options.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS"
    put = requests.put(f"{server.url}/api/jobs/{key}", timeout=30)
    assert put.status_code == 405 and put.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS" and put.json()["reason"]
    # A path that a route names outright is not also a service name for `POST /api/{endpoint}`.
    assert requests.options(f"{server.url}/api/health", timeout=30).headers["Allow"] == "GET, HEAD, OPTIONS"
    assert requests.put(f"{server.url}/api/collections", timeout=30).headers["Allow"] == "GET, HEAD, OPTIONS"
    assert requests.options(f"{server.url}/api/fake_local", timeout=30).headers["Allow"] == "OPTIONS, POST"
