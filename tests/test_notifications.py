"""Webhooks to allowed hosts only, retried with backoff; abandoned jobs are cancelled when asked to."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import pytest

from support import Server, base_config, containers_of, wait_until


class Receiver:
    """A loopback HTTP server that records what is POSTed to it and fails the first `failures` times."""

    def __init__(self, failures: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.times.append(time.monotonic())
                if receiver.failures > 0:
                    receiver.failures -= 1
                    self.send_response(503)
                else:
                    receiver.received.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver(failures=2)
    yield made
    made.server.shutdown()


def test_the_final_job_record_is_posted_to_an_allowed_callback_with_retries(
    make_server: Callable[..., Server], tmp_path: Path, receiver: Receiver
) -> None:
    server = make_server(base_config(tmp_path, CALLBACK_ALLOWED_HOSTS=["127.0.0.1"]))
    key = server.submit("fake_local", ["--stdout", "called back"], callback_url=receiver.url)["key"]
    wait_until(lambda: receiver.received, 30, what="the callback")
    record = receiver.received[0]["job"]
    assert record["id"] == key and record["status"] == "complete"
    assert "called back" in json.loads(record["results"])["report"]
    assert len(receiver.times) == 3  # two refusals, then delivered
    assert receiver.times[2] - receiver.times[1] > receiver.times[1] - receiver.times[0]  # backing off


def test_a_callback_to_a_host_not_on_the_allow_list_is_refused(make_server: Callable[..., Server],
                                                               tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, CALLBACK_ALLOWED_HOSTS=["hooks.example.org"]))
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest/meta-data", "file:///etc/passwd",
                "http://hooks.example.org.evil.net/x", "gopher://hooks.example.org/", 42):
        response = server.post("/api/fake_local", json={"args": [], "callback_url": url})
        assert response.status_code == 400, url
        assert "callback_url" in response.json()["reason"]
    no_list = make_server(base_config(tmp_path / "b"))
    assert no_list.post("/api/fake_local", json={"args": [], "callback_url": "http://127.0.0.1/"}).status_code == 400


def test_an_abandoned_job_is_cancelled_with_the_reason(make_server: Callable[..., Server], tmp_path: Path,
                                                        docker_client: docker.DockerClient) -> None:
    server = make_server(base_config(tmp_path, ABANDON_AFTER_HOURS=2 / 3600))  # two seconds
    key = server.submit("fake_local", ["--sleep", "120"])["key"]

    def ended() -> bool:  # read from the database: asking the server would be a poll, and keep the job alive
        with contextlib.closing(sqlite3.connect(server.config["DATABASE_FILE"])) as db:
            return bool(db.execute("SELECT status FROM jobs WHERE id = ?", (key,)).fetchone()[0] == "error")

    wait_until(ended, 30, 0.2, "the abandoned job to end")
    job = server.job(key)
    assert "Nobody asked about this job" in json.loads(job["results"])["error"]
    wait_until(lambda: containers_of(docker_client, server.instance, key) == [], 10, what="its container removed")
    assert "cancelled it as abandoned" in server.log()


def test_a_polled_job_is_not_abandoned(make_server: Callable[..., Server], tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, ABANDON_AFTER_HOURS=4 / 3600))
    key = server.submit("fake_local", ["--sleep", "10"])["key"]  # outlives two abandonment windows
    deadline = time.monotonic() + 30
    while (job := server.job(key))["status"] not in ("complete", "error") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job["status"] == "complete"
