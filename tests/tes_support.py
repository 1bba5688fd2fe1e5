"""Helpers for the GA4GH TES tests: tokens, a TES config, a raw client that checks every answer against the
official OpenAPI description, a py-tes client, and a local HTTP server that remembers who asked it for what."""

from __future__ import annotations

import copy
import functools
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import requests
import tes
import yaml
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from support import BUSYBOX, INSTANCE_LABEL, ROOT, Server, base_config, wait_until

TES_PATH = "/ga4gh/tes/v1"
FINAL_STATES = frozenset({"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED"})
VIEWS = ("MINIMAL", "BASIC", "FULL")

# -- the official OpenAPI description, used unchanged

SPEC_CANDIDATES = [ROOT / "docs" / "tes" / "task_execution_service.openapi.yaml"]  # a copy, unchanged
SPEC_URI = "urn:ga4gh:tes:v1.1:openapi"
# tesServiceInfo and tesServiceType $ref this document, which cannot be fetched here; below is a local copy of the
# two schemas they use, as published in ga4gh-service-info v1.0.0 (service-info.yaml).
SERVICE_INFO_URI = "https://raw.githubusercontent.com/ga4gh-discovery/ga4gh-service-info/v1.0.0/service-info.yaml"
SERVICE_INFO_SCHEMAS: dict[str, Any] = {
    "components": {"schemas": {
        "ServiceType": {
            "description": "Type of a GA4GH service",
            "type": "object",
            "required": ["group", "artifact", "version"],
            "properties": {
                "group": {"type": "string"},
                "artifact": {"type": "string"},
                "version": {"type": "string"},
            },
        },
        "Service": {
            "description": "GA4GH service",
            "type": "object",
            "required": ["id", "name", "type", "organization", "version"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "type": {"$ref": "#/components/schemas/ServiceType"},
                "description": {"type": "string"},
                "organization": {
                    "type": "object",
                    "required": ["name", "url"],
                    "properties": {"name": {"type": "string"}, "url": {"type": "string", "format": "uri"}},
                },
                "contactUrl": {"type": "string", "format": "uri"},
                "documentationUrl": {"type": "string", "format": "uri"},
                "createdAt": {"type": "string", "format": "date-time"},
                "updatedAt": {"type": "string", "format": "date-time"},
                "environment": {"type": "string"},
                "version": {"type": "string"},
            },
        },
    }},
}


def spec_path() -> Path:
    for path in SPEC_CANDIDATES:
        if path.is_file():
            return path
    raise AssertionError(f"the TES OpenAPI description is not at {SPEC_CANDIDATES}")


@functools.lru_cache(maxsize=2)
def _registry(minimal: bool) -> Registry:
    spec = yaml.safe_load(spec_path().read_text())
    if minimal:
        # The spec's MINIMAL view is "id and state only", yet tesTask requires `executors` (for the create body).
        # A MINIMAL answer is checked against tesTask with that one `required` dropped; everything else unchanged.
        spec = copy.deepcopy(spec)
        spec["components"]["schemas"]["tesTask"].pop("required", None)
    return Registry().with_resources([
        (SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT4)),
        (SERVICE_INFO_URI, Resource.from_contents(SERVICE_INFO_SCHEMAS, default_specification=DRAFT4)),
    ])


def schema_errors(schema: str, body: Any, minimal: bool = False) -> list[str]:
    validator = OAS30Validator({"$ref": f"{SPEC_URI}#/components/schemas/{schema}"}, registry=_registry(minimal),
                               format_checker=OAS30Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(body)]


def assert_valid(schema: str, body: Any, minimal: bool = False) -> None:
    errors = schema_errors(schema, body, minimal)
    assert not errors, f"answer does not match {schema}: {errors}\n{body!r}"


def assert_view_shape(task: dict[str, Any], view: str) -> None:
    """What each view may hold, as the spec's `view` parameter lists it."""
    if view == "MINIMAL":
        assert set(task) == {"id", "state"}, task
        return
    if view == "BASIC":
        for executor_log in (log for task_log in task.get("logs", []) for log in task_log.get("logs", [])):
            assert "stdout" not in executor_log and "stderr" not in executor_log, task
        assert all("content" not in one for one in task.get("inputs", [])), task
        assert all("system_logs" not in task_log for task_log in task.get("logs", [])), task


# -- configuration and tokens


def tes_config(folder: Path, **overrides: Any) -> dict[str, Any]:
    """A config with TES open to the test image, one file root (`folder/tes-data`) and a work area."""
    root = folder / "tes-data"
    root.mkdir(parents=True, exist_ok=True)
    config = base_config(folder, TES_ENABLED=True, TES_ALLOWED_IMAGES=[BUSYBOX], TES_FILE_ROOTS=[str(root)],
                         TES_WORK_PATH=str(folder / "tes-work"))
    config.update(overrides)
    return config


def token_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    if not server.config_path.exists():
        server.write_config()
    return subprocess.run([sys.executable, "-m", "dmi_service_manager", "token", *args, "--config",
                           str(server.config_path)], capture_output=True, text=True, timeout=60, cwd=server.tmp_path)


def create_token(server: Server, name: str, scope: str = "submit") -> str:
    done = token_cli(server, "create", "--name", name, "--scope", scope)
    assert done.returncode == 0, f"token create failed ({done.returncode}): {done.stdout}{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"token create printed {done.stdout!r}"
    return lines[0].strip()


def revoke_token(server: Server, name: str) -> None:
    done = token_cli(server, "revoke", name)
    assert done.returncode == 0, f"token revoke failed ({done.returncode}): {done.stdout}{done.stderr}"


def tes_client(server: Server, token: str | None) -> tes.HTTPClient:
    return tes.HTTPClient(server.url, token=token, timeout=30)


# -- the raw client


class TesApi:
    """The TES routes over plain HTTP. Every 200 answer is checked against the official schema of its route
    (and task answers against their view) before a test sees it."""

    def __init__(self, server: Server, token: str | None) -> None:
        self.server = server
        self.token = token
        self.base = server.url + TES_PATH

    def with_token(self, token: str | None) -> TesApi:
        return TesApi(self.server, token)

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if self.token is not None:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        response = requests.request(method, self.base + path, headers=headers, timeout=30, **kwargs)
        if response.status_code == 200:
            self._check(method.upper(), path, kwargs.get("params"), response.json())
        return response

    @staticmethod
    def _check(method: str, path: str, params: Any, body: Any) -> None:
        query = dict(params) if isinstance(params, dict) else dict(params or [])
        view = str(query.get("view", "MINIMAL"))
        if path == "/service-info":
            assert_valid("tesServiceInfo", body)
        elif path == "/tasks" and method == "GET":
            assert_valid("tesListTasksResponse", body, minimal=view == "MINIMAL")
            for task in body["tasks"]:
                assert_view_shape(task, view)
        elif path == "/tasks" and method == "POST":
            assert_valid("tesCreateTaskResponse", body)
        elif path.endswith(":cancel"):
            assert_valid("tesCancelTaskResponse", body)
        elif path.startswith("/tasks/") and method == "GET":
            assert_valid("tesTask", body, minimal=view == "MINIMAL")
            assert_view_shape(body, view)

    # -- the calls a test makes when it expects them to succeed

    def create(self, task: dict[str, Any]) -> str:
        response = self.call("POST", "/tasks", json=task)
        assert response.status_code == 200, f"{response.status_code}: {response.text}"
        task_id: str = response.json()["id"]
        assert isinstance(task_id, str) and task_id
        return task_id

    def task(self, task_id: str, view: str = "FULL") -> dict[str, Any]:
        response = self.call("GET", f"/tasks/{task_id}", params={"view": view})
        assert response.status_code == 200, f"{response.status_code}: {response.text}"
        body: dict[str, Any] = response.json()
        return body

    def state(self, task_id: str) -> str:
        return str(self.task(task_id, "MINIMAL")["state"])

    def list(self, params: Any = None) -> dict[str, Any]:
        response = self.call("GET", "/tasks", params=params)
        assert response.status_code == 200, f"{response.status_code}: {response.text}"
        body: dict[str, Any] = response.json()
        return body

    def ids(self, params: list[tuple[str, str]] | None = None, page_size: int | None = None) -> list[str]:
        """Every task id the list holds (with these filters), walking all pages."""
        found: list[str] = []
        token: str | None = None
        for _ in range(10_000):
            query = list(params or [])
            if page_size is not None:
                query.append(("page_size", str(page_size)))
            if token:
                query.append(("page_token", token))
            page = self.list(query)
            found += [task["id"] for task in page["tasks"]]
            token = page.get("next_page_token") or None
            if not token:
                return found
        raise AssertionError("the page tokens never end")

    def cancel(self, task_id: str) -> requests.Response:
        return self.call("POST", f"/tasks/{task_id}:cancel")

    def service_info(self) -> dict[str, Any]:
        response = self.call("GET", "/service-info")
        assert response.status_code == 200, f"{response.status_code}: {response.text}"
        body: dict[str, Any] = response.json()
        return body

    def wait(self, task_id: str, states: frozenset[str] | set[str] = FINAL_STATES, timeout: float = 60.0,
             view: str = "FULL") -> dict[str, Any]:
        wait_until(lambda: self.state(task_id) in states, timeout, 0.1, f"task {task_id} to be one of {states}")
        return self.task(task_id, view)


def assert_error(response: requests.Response, status: int, field: str | None = None) -> dict[str, Any]:
    """An error answer as the doc promises: the status, and JSON with status, message and reason."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    assert body.get("status") == "error" and isinstance(body.get("message"), str) and body["message"], body
    assert "reason" in body, body
    if field is not None:
        assert field in f"{body['message']} {body.get('reason')}", f"the answer does not name {field}: {body}"
    return body


def system_logs(task: dict[str, Any]) -> str:
    return "\n".join(line for task_log in task.get("logs", []) for line in task_log.get("system_logs", []))


def executor_logs(task: dict[str, Any]) -> list[dict[str, Any]]:
    logs: list[dict[str, Any]] = task["logs"][0]["logs"] if task.get("logs") else []
    return logs


# -- one TES-enabled server, with what a test needs to reach it


@dataclass
class Tes:
    server: Server
    token: str
    root: Path  # the one TES_FILE_ROOT
    work: Path  # TES_WORK_PATH

    @property
    def api(self) -> TesApi:
        return TesApi(self.server, self.token)

    @property
    def client(self) -> tes.HTTPClient:
        return tes_client(self.server, self.token)

    def file_url(self, path: Path | str) -> str:
        return f"file://{path}"


def open_tes(server: Server) -> Tes:
    token = create_token(server, f"tests-{server.port}", "submit")
    return Tes(server, token, Path(server.config["TES_FILE_ROOTS"][0]), Path(server.config["TES_WORK_PATH"]))


def echo_task(text: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"executors": [{"image": BUSYBOX, "command": ["echo", text]}], **fields}


def sleep_task(seconds: float, **fields: Any) -> dict[str, Any]:
    return {"executors": [{"image": BUSYBOX, "command": ["sleep", str(seconds)]}], **fields}


# -- the host and its containers


def files_holding(folder: Path, secret: str) -> list[Path]:
    """Regular files below `folder` (links not followed) whose content holds `secret`."""
    found = []
    for parent, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(parent) / name
            try:
                if stat.S_ISREG(path.lstat().st_mode) and secret.encode() in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def container_with_env(client: docker.DockerClient, instance: str | None, marker: str) -> Any:
    """The container of this server whose environment holds `marker` (a KEY=value the test gave the executor)."""
    def find() -> Any:
        for container in client.containers.list(all=True, filters={"label": f"{INSTANCE_LABEL}={instance}"},
                                                ignore_removed=True):  # another test's, removed while listed
            if marker in (container.attrs["Config"].get("Env") or []):
                return container
        return None
    return wait_until(find, 30, 0.1, f"a container with {marker}")


def container_events(client: docker.DockerClient, instance: str | None, since: float,
                     actions: tuple[str, ...] = ("create", "start")) -> list[dict[str, Any]]:
    """The engine's events for this server's containers from `since` until now."""
    time.sleep(0.2)
    events = client.events(since=since, until=time.time(), decode=True, filters={
        "type": "container", "label": f"{INSTANCE_LABEL}={instance}"})
    return [event for event in events if event.get("Action") in actions]


# -- a local HTTP server for http(s):// inputs


@dataclass
class Redirect:
    location: str
    status: int = 302


@dataclass
class Unsized:
    """A body sent without Content-Length, so only counting the bytes finds its size."""

    body: bytes


@dataclass
class Slow:
    """A body sent `count` pieces at a time, `pause` seconds apart, without Content-Length; `finished` once
    every piece went out."""

    piece: bytes
    count: int
    pause: float
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass
class FileServer:
    """An HTTP server on a loopback address that serves fixed routes and logs each request as 'METHOD /path'."""

    host: str = "127.0.0.1"
    routes: dict[str, bytes | Redirect | Unsized | Slow] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                owner.requests.append(f"{self.command} {self.path}")
                route = owner.routes.get(self.path.split("?")[0])
                if isinstance(route, Redirect):
                    self.send_response(route.status)
                    self.send_header("Location", route.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif isinstance(route, Slow):
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    for _ in range(route.count):
                        try:
                            self.wfile.write(route.piece)
                            self.wfile.flush()
                        except OSError:
                            return  # the client hung up
                        time.sleep(route.pause)
                    route.finished.set()
                elif isinstance(route, Unsized):
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    if send_body:
                        self.wfile.write(route.body)
                elif route is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(route)))
                    self.end_headers()
                    if send_body:
                        self.wfile.write(route)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
