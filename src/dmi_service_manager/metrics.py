"""Prometheus metrics: what the server does, in names a Grafana dashboard (deploy/grafana/) is built on.

Two sources, so that one scrape of any worker shows the whole server:
- what happens in a request (its duration; files and bytes moved) is counted where it happens, in
  prometheus-client's multiprocess mode: each worker writes its counts to a file in a folder shared by
  the workers of one `dsm serve`, and a scrape adds them up;
- what the queue holds and has done (jobs by state, starts, ends and failures, waits and run times) is
  read from the database at scrape time: it is already there, survives restarts, and the scheduler,
  which runs in one worker only, need not count anything twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .pids import alive

_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"
_SUPERVISOR = "DSM_SUPERVISOR_PID"  # set by `dsm serve` for its workers (see app.py)


def _shared_folder() -> str:
    """The folder the workers of this server share: named for the process that started them. Folders of
    servers that are gone are removed, so that a restart starts its counters from zero."""
    given = os.environ.get(_MULTIPROC)
    if given and _private(Path(given)):
        return given
    supervisor = os.environ.get(_SUPERVISOR, "")
    owner = int(supervisor) if supervisor.isdigit() else os.getpid()
    base = Path(tempfile.gettempdir())
    prefix = f"dsm-metrics-{os.getuid()}-"
    for old in base.glob(prefix + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and int(pid) != owner and not alive(int(pid)) and _private(old):
            shutil.rmtree(old, ignore_errors=True)
    folder = base / f"{prefix}{owner}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    if not _private(folder):
        # Someone else made it (the name is guessable in a shared /tmp): never write counts there.
        return tempfile.mkdtemp(prefix=f"{prefix}{owner}-")
    return str(folder)


def _private(folder: Path) -> bool:
    """A real folder (not a link), ours, that nobody else may read or write."""
    try:
        info = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077 == 0


    return True


# prometheus-client picks its value store when it is first imported: the folder must be known by then.
os.environ[_MULTIPROC] = _shared_folder()

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402
from prometheus_client.core import (  # noqa: E402
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from .jobs.store import Store  # noqa: E402

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTTP_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BOUNDS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "(unmatched)"  # a path no route serves: its own label, never the raw path

_requests = Histogram("dsm_http_request_duration_seconds", "HTTP requests by route template, method and status",
                      ["route", "method", "status"], buckets=HTTP_BOUNDS, registry=None)
_files = Counter("dsm_files", "Files received by uploads or sent by downloads", ["direction"], registry=None)
_bytes = Counter("dsm_file_bytes", "Bytes received by uploads or sent by downloads", ["direction"], registry=None)
_request_children: dict[tuple[str, str, int], Any] = {}  # label lookups cost more than the count
_transfer_children: dict[str, tuple[Any, Any]] = {}


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    key = (route, method if method in METHODS else "other", status)
    child = _request_children.get(key)
    if child is None:
        child = _request_children[key] = _requests.labels(key[0], key[1], str(status))
    child.observe(seconds)


def transferred(direction: str, files: int, size: int) -> None:
    """Files and bytes an upload stored or a download sent (`direction`: upload or download)."""
    counters = _transfer_children.get(direction)
    if counters is None:
        counters = _transfer_children[direction] = (_files.labels(direction), _bytes.labels(direction))
    if files:
        counters[0].inc(files)
    if size:
        counters[1].inc(size)


class JobCollector(Collector):
    """The queue's figures, read from the database (and the GPU cards) at each scrape."""

    def __init__(self, store: Store, gpus: Callable[[], dict[str, Any]]) -> None:
        self.store = store
        self.gpus = gpus

    def collect(self) -> Iterator[Metric]:
        labels = ["service", "kind"]
        jobs = GaugeMetricFamily("dsm_jobs", "Jobs in the store by state", labels=["state", *labels])
        started = CounterMetricFamily("dsm_jobs_started", "Jobs whose container started", labels=labels)
        finished = CounterMetricFamily("dsm_jobs_finished", "Jobs that ended, by final state",
                                       labels=[*labels, "state"])
        failed = CounterMetricFamily("dsm_jobs_failed", "Jobs that ended in error, by the kind of failure"
                                     " (exit_code, oom, gpu_oom, timeout, engine, cancel, ...)",
                                     labels=[*labels, "failure"])
        totals: dict[str, dict[tuple[str, ...], int]] = {"jobs": {}, "started": {}, "finished": {},
                                                          "failed": {}}
        spans: dict[str, dict[tuple[str, str], _Histogram]] = {"wait": {}, "run": {}}
        for tally in self.store.tallies(JOB_BOUNDS):
            who = (tally.service, tally.kind)
            _add(totals["jobs"], (tally.status, *who), tally.count)
            if tally.started:
                _add(totals["started"], who, tally.count)
            if tally.status in ("complete", "error"):
                _add(totals["finished"], (*who, tally.status), tally.count)
            if tally.status == "error":
                _add(totals["failed"], (*who, tally.failure or "unknown"), tally.count)
            for span, index, total in (("wait", tally.wait_bucket, tally.wait_total),
                                       ("run", tally.run_bucket, tally.run_total)):
                if index is not None:
                    spans[span].setdefault(who, _Histogram()).add(index, tally.count, total)
        for family, name in ((jobs, "jobs"), (started, "started"), (finished, "finished"), (failed, "failed")):
            for values, count in sorted(totals[name].items()):
                family.add_metric(list(values), count)
            yield family
        for span, name, doc in (("wait", "dsm_job_queue_wait_seconds", "From submission to the container's start"),
                                ("run", "dsm_job_run_seconds", "From the container's start to the job's end")):
            histogram = HistogramMetricFamily(name, doc, labels=labels)
            for who, found in sorted(spans[span].items()):
                histogram.add_metric(list(who), found.buckets(), sum_value=found.total)
            yield histogram
        yield from self._gpus()

    def _gpus(self) -> Iterator[Metric]:
        card = ["card", "name"]
        total = GaugeMetricFamily("dsm_gpu_memory_total_bytes", "Memory of each GPU card", labels=card)
        used = GaugeMetricFamily("dsm_gpu_memory_used_bytes", "Memory in use on each card, as NVML measures it"
                                 " (absent for cards nothing measures)", labels=card)
        reserved = GaugeMetricFamily("dsm_gpu_memory_reserved_bytes", "Memory this server's placement holds on each"
                                     " card for the jobs it runs", labels=card)
        held = GaugeMetricFamily("dsm_gpu_jobs", "Jobs holding each card", labels=card)
        overview = self.gpus()
        for found in overview["cards"]:
            names = [found["id"], found["name"]]
            total.add_metric(names, found["total"])
            if found["used"] is not None:
                used.add_metric(names, found["used"])
            reserved.add_metric(names, found["reserved"])
            held.add_metric(names, len(found["jobs"]))
        yield from (total, used, reserved, held)


class _Histogram:
    """Counts by bucket index, turned into Prometheus's cumulative buckets."""

    def __init__(self) -> None:
        self.counts = [0] * (len(JOB_BOUNDS) + 1)
        self.total = 0.0

    def add(self, index: int, count: int, total: float) -> None:
        self.counts[index] += count
        self.total += total

    def buckets(self) -> list[tuple[str, float]]:
        running, answer = 0, []
        for bound, count in zip([*map(_bound, JOB_BOUNDS), "+Inf"], self.counts, strict=True):
            running += count
            answer.append((bound, float(running)))
        return answer


def _add(table: dict[tuple[str, ...], int], key: tuple[str, ...], count: int) -> None:
    table[key] = table.get(key, 0) + count


def _bound(value: float) -> str:
    return repr(float(value))


class Metrics:
    """The scrape: this server's workers' counts and the queue's figures, in the text format."""

    def __init__(self, store: Store, gpus: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, path=os.environ[_MULTIPROC])  # type: ignore[no-untyped-call]
        self.registry.register(JobCollector(store, gpus))

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


class HttpMetrics:
    """ASGI middleware timing every request, labelled by the route's template (`/api/jobs/{job_id:int}`),
    never the raw path: a path is what a client chooses, and would make a new series per request."""

    def __init__(self, app: Any, plain_routes: dict[Any, str]) -> None:
        self.app = app
        self.plain_routes = plain_routes  # endpoint -> template, for plain Starlette routes (the poll): the
        # router names only FastAPI's own routes in the scope

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or self.plain_routes.get(scope.get("endpoint")) \
                or UNMATCHED
            with contextlib.suppress(Exception):  # a count lost is better than a request lost
                observe_request(route, scope["method"], status, time.perf_counter() - started)

