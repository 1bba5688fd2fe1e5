"""GET /metrics: Prometheus's text format, one scrape showing every worker, on real jobs and transfers.

The Grafana dashboard in deploy/grafana/ is built on these names; a test here checks that each name it
queries exists in a real scrape.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from dmi_service_manager.jobs.workload import exit_failure
from dmi_service_manager.runtime.base import CapturedLog, ContainerState
from support import Server, base_config, wait_until

ROOT = Path(__file__).resolve().parents[1]
POLL_ROUTE = "/api/jobs/{job_id:int}"


def scrape(server: Server, **kwargs: object) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """family or sample name -> {sorted labels: value}; families with no samples are present, empty."""
    response = server.get("/metrics", **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        found.setdefault(family.name, {})
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], sample: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for key, v in metrics.get(sample, {}).items() if wanted <= set(key))


@pytest.fixture
def gpu_server(make_server: Callable[..., Server], tmp_path: Path) -> Server:
    """Two workers, and GPUs declared by hand (nothing measures them on these machines)."""
    config = base_config(tmp_path, GPU_ENABLED=True, GPU_INVENTORY=[{"id": 0, "memory": "16GiB", "name": "Test A"},
                                                                     {"id": 1, "memory": "8GiB"}])
    config["DOCKER_ENDPOINTS"]["fake"]["gpu"] = False
    return make_server(config, workers=2)


def test_one_scrape_counts_the_requests_of_every_worker(gpu_server: Server) -> None:
    server = gpu_server
    key = server.submit("fake_local", ["--exit", "0"])["key"]
    server.wait_final(key)

    def polls() -> float:
        return value(scrape(server), "dsm_http_request_duration_seconds_count", route=POLL_ROUTE, status="200")

    # A request is counted just after its answer is sent: let the last poll of wait_final be counted first.
    def settled() -> float | None:
        first = polls()
        time.sleep(0.2)
        return first if polls() == first else None

    before = wait_until(settled, 10, what="the poll count to settle")
    for _ in range(40):  # a new connection each, as 4CAT polls: the kernel hands them to either worker
        with requests.Session() as session:
            assert session.get(f"{server.url}/api/jobs/{key}", timeout=30).status_code == 200
    for _ in range(3):  # whichever worker answers the scrape, it shows all of them
        wait_until(lambda: polls() - before == 40, 5, what="40 more polls counted")


def test_requests_are_labelled_by_route_template_never_by_raw_path(server: Server) -> None:
    for i in range(5):
        server.get(f"/api/jobs/{900000 + i}")
        server.get(f"/no/such/path/{i}-secret")
    text = server.get("/metrics").text
    assert "900000" not in text and "secret" not in text
    metrics = scrape(server)
    assert value(metrics, "dsm_http_request_duration_seconds_count", route=POLL_ROUTE, status="404") == 5
    assert value(metrics, "dsm_http_request_duration_seconds_count", route="(unmatched)", status="404") == 5


def test_jobs_by_state_failures_by_kind_and_wait_and_run_times(gpu_server: Server) -> None:
    server = gpu_server
    ok = server.submit("fake_local", ["--exit", "0"])["key"]
    failed = server.submit("fake_local", ["--exit", "3"])["key"]
    gpu_oom = server.submit("fake_local", ["--stderr", "RuntimeError: CUDA out of memory. Tried to allocate",
                                           "--exit", "1"])["key"]
    for key in (ok, failed, gpu_oom):
        server.wait_final(key)
    metrics = scrape(server)
    labels = {"service": "fake", "kind": "4cat"}
    assert value(metrics, "dsm_jobs", state="complete", **labels) == 1
    assert value(metrics, "dsm_jobs", state="error", **labels) == 2
    assert value(metrics, "dsm_jobs_started_total", **labels) == 3
    assert value(metrics, "dsm_jobs_finished_total", state="error", **labels) == 2
    assert value(metrics, "dsm_jobs_failed_total", failure="exit_code", **labels) == 1
    assert value(metrics, "dsm_jobs_failed_total", failure="gpu_oom", **labels) == 1
    assert value(metrics, "dsm_job_queue_wait_seconds_count", **labels) == 3
    assert value(metrics, "dsm_job_run_seconds_count", **labels) == 3
    assert value(metrics, "dsm_job_run_seconds_bucket", le="+Inf", **labels) == 3

    # The declared cards, and what placement holds on them (nothing: the fake service uses no GPU).
    assert value(metrics, "dsm_gpu_memory_total_bytes", card="0", name="Test A") == 16 * 1024**3
    assert value(metrics, "dsm_gpu_memory_total_bytes", card="1") == 8 * 1024**3
    assert value(metrics, "dsm_gpu_memory_reserved_bytes", card="0") == 0
    assert "dsm_gpu_memory_used_bytes" in metrics and not metrics["dsm_gpu_memory_used_bytes"]  # nothing measures


def test_uploads_and_downloads_count_files_and_bytes(server: Server) -> None:
    upload = server.post("/api/send_files", data={"folder_name": "c1"},
                         files=[("4cat_uploads", ("a.txt", b"x" * 1000)), ("4cat_uploads", ("b.txt", b"y" * 24))])
    assert upload.status_code == 200, upload.text
    assert server.get("/api/download/c1/4cat_uploads/a.txt").content == b"x" * 1000
    metrics = scrape(server)
    assert value(metrics, "dsm_files_total", direction="upload") == 2
    assert value(metrics, "dsm_file_bytes_total", direction="upload") == 1024
    assert value(metrics, "dsm_files_total", direction="download") == 1
    assert value(metrics, "dsm_file_bytes_total", direction="download") == 1000


def test_metrics_follow_the_access_rules_of_every_route(make_server: Callable[..., Server]) -> None:
    server = make_server(REQUIRE_TOKEN=True)
    refused = server.get("/metrics")
    assert refused.status_code == 401 and refused.json()["reason"]
    assert "dsm_jobs" in scrape(server, headers={"Authorization": f"Bearer {server.token('read')}"})


def test_every_metric_the_grafana_dashboard_queries_exists_in_a_real_scrape(gpu_server: Server) -> None:
    server = gpu_server
    server.wait_final(server.submit("fake_local", ["--exit", "2"])["key"])
    server.post("/api/send_files", data={"folder_name": "c"}, files=[("4cat_uploads", ("a.txt", b"x"))])
    assert server.get("/api/download/c/4cat_uploads/a.txt").status_code == 200
    metrics = scrape(server)
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dsm.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bdsm_[a-z_]+", target["expr"])}
    queried |= set(re.findall(r"\bdsm_[a-z_]+", json.dumps(dashboard["templating"])))
    assert len(queried) >= 12
    missing = sorted(name for name in queried if name not in metrics)
    assert not missing, f"the dashboard queries metrics a scrape does not have: {missing}"


def test_an_admin_can_turn_metrics_off(make_server: Callable[..., Server]) -> None:
    server = make_server(METRICS=False)
    refused = server.get("/metrics")
    assert refused.status_code == 404 and refused.json()["reason"]


@pytest.mark.parametrize(("stderr", "oom_killed", "failure"), [
    ("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", False, "gpu_oom"),
    ("RuntimeError: CUDA error: out of memory", False, "gpu_oom"),
    ("torch.OutOfMemoryError: CUDA out of memory.", False, "gpu_oom"),
    ("Exception in thread main java.lang.OutOfMemoryError: Java heap space", False, "exit_code"),  # the host's
    ("Traceback ...\nValueError: bad input", False, "exit_code"),
    ("", True, "oom"),
])
def test_a_failure_is_told_apart_by_what_ran_out(stderr: str, oom_killed: bool, failure: str) -> None:
    state = ContainerState(id="c", name="c", labels={}, status="exited", exit_code=1, started_at=None,
                           finished_at=None, image_id="", oom_killed=oom_killed)
    assert exit_failure(state, CapturedLog(text=stderr, truncated=False, total_bytes=len(stderr))).value == failure
