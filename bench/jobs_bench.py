"""Job engine benchmarks (issue 4), each beside a baseline measured in the same run.

    .venv/bin/python bench/jobs_bench.py [--quick] [--concurrency N]

1. 200 trivial jobs (a container that exits at once) submitted together, N at a time: time until all
   are complete, beside 200 `containers.run` calls through the Docker SDK with the same concurrency.
2. Submit latency (p50/p99) while 50 jobs run.
3. Status polls (GET /api/jobs/<id>, 32 connections, wrk) beside a bare Starlette route that reads one
   row from the same SQLite database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import requests

from common import BUSYBOX, ROOT, baseline_server, dsm_server, table, verdict, workdir, wrk

sys.path.insert(0, str(ROOT / "src"))
from dmi_service_manager.runtime.images import build_service

SERVICE = {"image_name": BUSYBOX, "local": True, "command": "sh -c", "data_path": "/app/data"}


def wait_all_final(url: str, limit: float) -> None:
    """One light request every 50 ms: the bench must not steal the CPU it measures."""
    deadline = time.monotonic() + limit
    session = requests.Session()
    while time.monotonic() < deadline:
        jobs = session.get(f"{url}/jobs/", params={"current": "1"}, timeout=30).json()["jobs"]
        if not [j for j in jobs if j["status"] not in ("complete", "error")]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"jobs did not finish within {limit} s")


def trivial_jobs(count: int, concurrency: int) -> None:
    client = docker.from_env()
    with workdir("dsm-bench-jobs-") as folder:
        with dsm_server(folder, workers=1, MAX_CONCURRENT_JOBS=concurrency,
                        DOCKER_ENDPOINTS={"noop": SERVICE}) as (url, _):
            session = requests.Session()
            started = time.perf_counter()
            keys = [session.post(f"{url}/api/noop_local", json={"args": ["true"]}, timeout=30).json()["key"]
                    for _ in range(count)]
            wait_all_final(url, 600)
            ours = time.perf_counter() - started
            failed = sum(session.get(f"{url}/api/jobs/{k}", timeout=30).json()["job"]["status"] != "complete"
                         for k in keys)

        def one(_: int) -> None:
            client.containers.run(BUSYBOX, ["sh", "-c", "true"], network_mode="host", remove=True,
                                  volumes={str(folder / "4cat"): {"bind": "/app/data", "mode": "rw"}})

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(count)))
        raw = time.perf_counter() - started
    table(f"{count} trivial jobs, {concurrency} at a time, submitted together", [
        ("time until all complete (s)", f"{ours:.1f}", f"{raw:.1f} (containers.run)",
         verdict(ours <= 1.15 * raw and failed == 0, f"within 1.15x of raw Docker ({ours / raw:.2f}x)")),
        ("jobs per second", f"{count / ours:.1f}", f"{count / raw:.1f}", f"failed: {failed}"),
    ])


def latency_and_polls(quick: bool) -> None:
    running = 10 if quick else 50
    seconds = 3 if quick else 5
    with workdir("dsm-bench-poll-") as folder:
        (folder / "bare").mkdir()
        with dsm_server(folder, workers=2, MAX_CONCURRENT_JOBS=running,
                        DOCKER_ENDPOINTS={"noop": SERVICE}) as (url, _):
            session = requests.Session()
            long = [session.post(f"{url}/api/noop_local", json={"args": ["sleep 120"]}, timeout=30).json()["key"]
                    for _ in range(running)]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [session.get(f"{url}/api/jobs/{k}", timeout=30).json()["job"]["status"] for k in long]
                if states.count("running") == running:
                    break
                time.sleep(0.2)
            latencies = []
            for _ in range(200):
                started = time.perf_counter()
                response = session.post(f"{url}/api/noop_local", json={"args": ["true"]}, timeout=30)
                latencies.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 202
            latencies.sort()
            p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]
            poll_key = long[0]
            with baseline_server(folder / "bare", workers=2, database=folder / "jobs.db") as (bare, _):
                ours_runs, bare_runs = [], []
                for _ in range(1 if quick else 3):
                    ours_runs.append(wrk(f"{url}/api/jobs/{poll_key}", seconds, 32))
                    bare_runs.append(wrk(f"{bare}/row/{poll_key}", seconds, 32))
            for key in long:
                session.delete(f"{url}/api/jobs/{key}", timeout=30)
    rate = statistics.median(r["rate"] for r in ours_runs)
    bare_rate = statistics.median(r["rate"] for r in bare_runs)
    table(f"Submit latency with {running} jobs running; status polls with 32 connections", [
        ("submit latency p50 / p99 (ms)", f"{p50:.1f} / {p99:.1f}", "-", verdict(p99 < 50, "p99 < 50 ms")),
        ("GET /api/jobs/<id> (requests/s)", f"{rate:.0f}", f"{bare_rate:.0f} (one SQLite row)",
         verdict(rate >= 5000 and rate >= 0.4 * bare_rate, f">= 5000/s and >= 40% of bare ({rate / bare_rate:.0%})")),
        ("poll p99 (ms)", f"{statistics.median(r['p99_ms'] for r in ours_runs):.1f}",
         f"{statistics.median(r['p99_ms'] for r in bare_runs):.1f}",
         f"errors: {sum(r['errors'] for r in ours_runs):.0f}"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and shorter runs: a smoke run")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    build_service(str(Path(ROOT / "tests" / "images" / "busybox")), tag=BUSYBOX, log=lambda _: None)
    print(f"# Job engine benchmarks ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')})")
    trivial_jobs(40 if args.quick else 200, args.concurrency)
    latency_and_polls(args.quick)


if __name__ == "__main__":
    main()
