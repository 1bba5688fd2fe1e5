"""GA4GH TES benchmarks, each beside a baseline measured in the same run.

    .venv/bin/python bench/tes_bench.py [--quick] [--concurrency N] [--requests N]

1. 200 trivial TES tasks (one executor: busybox running `true`) created through POST /ga4gh/tes/v1/tasks,
   N at a time (MAX_CONCURRENT_JOBS): time until all are COMPLETE, beside 200 `containers.run` calls
   through the Docker SDK from N threads, on Docker's default bridge network as TES executors are.
2. GET /ga4gh/tes/v1/tasks?view=MINIMAL, a page of 256, from a store holding 100,000 tasks (written
   straight into SQLite before the server starts): p50/p99 over 50 keep-alive requests (--requests), beside the
   same SELECT (the one `Store.tasks` runs) done with sqlite3 in this process.

--quick: 20 tasks and 5,000 rows, for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import requests

from common import BUSYBOX, ROOT, dsm_server, dsm_token, table, verdict, workdir

sys.path.insert(0, str(ROOT / "src"))
from dmi_service_manager.jobs.store import Store
from dmi_service_manager.runtime.images import build_service
from dmi_service_manager.tes.schema import parse_task

TES = "/ga4gh/tes/v1"
FINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED"}
TASK = {"name": "bench", "executors": [{"image": BUSYBOX, "command": ["true"]}]}
TES_CONFIG = {"TES_ENABLED": True, "TES_ALLOWED_IMAGES": [BUSYBOX]}
# What `Store.tasks` selects for a MINIMAL page with no filter and no page token.
MINIMAL_SQL = ("SELECT id, created_at, jobtype, status, claimed_at, stop_reason, failure, task_id, kind FROM jobs"
               " WHERE kind = 'tes' ORDER BY id DESC LIMIT ?")


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and nearest-rank p99, in ms."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered), math.ceil(len(ordered) * 0.99)) - 1]


def wait_all_final(session: requests.Session, url: str, ids: set[str], limit: float) -> dict[str, str]:
    """One light listing every 50 ms until every task of `ids` is final; their states."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        response = session.get(f"{url}{TES}/tasks", params={"view": "MINIMAL", "page_size": 2048}, timeout=30)
        response.raise_for_status()
        states = {t["id"]: t["state"] for t in response.json()["tasks"] if t["id"] in ids}
        if len(states) == len(ids) and all(s in FINAL for s in states.values()):
            return states
        time.sleep(0.05)
    raise RuntimeError(f"TES tasks did not finish within {limit} s")


def trivial_tasks(count: int, concurrency: int) -> None:
    assert count <= 2048, "one listing page must hold every task"
    client = docker.from_env()
    with workdir("dsm-bench-tes-") as folder, \
            dsm_server(folder, workers=1, MAX_CONCURRENT_JOBS=concurrency, **TES_CONFIG) as (url, _):
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {dsm_token(folder, 'bench', 'submit')}"
        started = time.perf_counter()
        ids = set()
        for _ in range(count):
            response = session.post(f"{url}{TES}/tasks", json=TASK, timeout=30)
            response.raise_for_status()
            ids.add(response.json()["id"])
        states = wait_all_final(session, url, ids, 600)
        ours = time.perf_counter() - started
        failed = sum(state != "COMPLETE" for state in states.values())

    def one(_: int) -> None:
        client.containers.run(BUSYBOX, ["true"], remove=True)  # the default bridge network, as TES executors

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    raw = time.perf_counter() - started
    table(f"{count} trivial TES tasks, {concurrency} at a time, created together", [
        ("time until all COMPLETE (s)", f"{ours:.1f}", f"{raw:.1f} (containers.run)",
         verdict(ours <= 1.15 * raw and failed == 0, f"within 1.15x of raw Docker ({ours / raw:.2f}x)")),
        ("tasks per second", f"{count / ours:.1f}", f"{count / raw:.1f}", f"failed: {failed}"),
    ])


def fill_store(database: Path, rows: int) -> float:
    """`rows` complete TES tasks written in one transaction, shaped as the server stores them; seconds taken."""
    started = time.perf_counter()
    Store(database).migrate()
    document = json.dumps(parse_task(TASK).model_dump(exclude_none=True))
    results = json.dumps({"returncode": 0, "error": "", "report": ""})
    now = time.time() - rows

    def row(index: int) -> tuple[Any, ...]:
        task_id = secrets.token_hex(10)
        at = now + index
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + ".000Z"
        task_log = json.dumps({"start_time": stamp, "end_time": stamp, "metadata": {"host": "bench",
                               "job_id": str(index + 1)}, "logs": [{"start_time": stamp, "end_time": stamp,
                                                                    "exit_code": 0, "stdout": "", "stderr": ""}],
                               "outputs": []})
        details = json.dumps({"tes": {"id": task_id, "name": "bench", "by": "token bench (127.0.0.1)"}})
        return (int(at), int(at) + 1, details, results, 86400.0, at, at, task_id, task_log, document)

    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO jobs (created_at, completed_at, jobtype, status, details, results, timeout, claimed_at,"
            " started_at, gpu_ids, kind, gpus, step, task_id, name, task_log, task)"
            " VALUES (?, ?, 'tes', 'complete', ?, ?, ?, ?, ?, '[]', 'tes', 0, 0, ?, 'bench', ?, ?)",
            (row(i) for i in range(rows)))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return time.perf_counter() - started


def sample(times: int, action: Callable[[], None], warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        action()
    found = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        found.append((time.perf_counter() - started) * 1000)
    return found


def list_page(rows: int, requests_count: int = 50, page: int = 256) -> None:
    with workdir("dsm-bench-tes-list-") as folder:
        database = folder / "jobs.db"
        filled = fill_store(database, rows)
        with dsm_server(folder, workers=2, **TES_CONFIG) as (url, _):
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {dsm_token(folder, 'bench-read', 'read')}"
            params = {"view": "MINIMAL", "page_size": page}

            def ours() -> None:
                response = session.get(f"{url}{TES}/tasks", params=params, timeout=30)
                response.raise_for_status()
                body = response.json()
                assert len(body["tasks"]) == page and "next_page_token" in body, "not a full page"

            http = sample(requests_count, ours)
            # A page from the middle of the store, through the page token the server hands out.
            token = session.get(f"{url}{TES}/tasks", params={**params, "page_size": 2048},
                                timeout=30).json()["next_page_token"]
            for _ in range(rows // 2 // 2048 - 1):
                token = session.get(f"{url}{TES}/tasks", params={**params, "page_size": 2048, "page_token": token},
                                    timeout=30).json()["next_page_token"]
            middle = sample(requests_count, lambda: session.get(
                f"{url}{TES}/tasks", params={**params, "page_token": token}, timeout=30).raise_for_status())

        conn = sqlite3.connect(database, isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            def bare() -> None:
                assert len(conn.execute(MINIMAL_SQL, (page + 1,)).fetchall()) == page + 1

            direct = sample(requests_count, bare)
        finally:
            conn.close()
    p50, p99 = percentiles(http)
    m50, m99 = percentiles(middle)
    b50, b99 = percentiles(direct)
    table(f"GET /tasks?view=MINIMAL, a page of {page}, from {rows:,} tasks ({requests_count} requests, keep-alive;"
          f" store filled in {filled:.1f} s)", [
        ("first page p50 / p99 (ms)", f"{p50:.1f} / {p99:.1f}", f"{b50:.2f} / {b99:.2f} (the SELECT, sqlite3)",
         verdict(p99 < 50, f"p99 < 50 ms ({p99 / b99:.0f}x the bare SELECT)")),
        ("middle page p50 / p99 (ms)", f"{m50:.1f} / {m99:.1f}", "-", verdict(m99 < 50, "p99 < 50 ms")),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 tasks and 5,000 rows: a smoke run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="listing requests timed (p99 of 50 is the worst)")
    args = parser.parse_args()
    build_service(str(Path(ROOT / "tests" / "images" / "busybox")), tag=BUSYBOX, log=lambda _: None)
    print(f"# GA4GH TES benchmarks ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')})")
    trivial_tasks(20 if args.quick else 200, args.concurrency)
    list_page(5_000 if args.quick else 100_000, requests_count=max(10, min(args.requests, 2000)))


if __name__ == "__main__":
    main()
