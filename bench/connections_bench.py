"""New connections under a keep-alive burst (issue 2), beside the bare baseline route.

    .venv/bin/python bench/connections_bench.py [--quick] [--seconds S] [--connections N]

The default `dsm serve` (no --workers), one job in its store. In the background wrk holds 1,000 keep-alive
connections polling GET /api/jobs/<id> (wrk -t4 -c1000 -d20s); meanwhile a probe opens a NEW connection for
every request (a bare requests.get, no session, 30 s timeout: as 4CAT polls) every 100 ms and records each
latency and each failure. Reported beside the same probe with no load, and beside the same burst and probe
against a bare Starlette route reading the same SQLite row on uvicorn with 2 workers: once with uvicorn's default
event loop (uvloop when installed, as `dsm serve` runs), once with `--loop asyncio`. Target: the probe's p99
under 1 s while the burst runs, and no failure. Loopback only; every loop bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from common import (
    BUSYBOX,
    ROOT,
    baseline_server,
    dsm_server,
    log_problems,
    parse_wrk,
    percentile,
    table,
    verdict,
    workdir,
    wrk_args,
)

sys.path.insert(0, str(ROOT / "src"))
from dmi_service_manager.runtime.images import build_service

SERVICE = {"image_name": BUSYBOX, "local": True, "command": "sh -c", "data_path": "/app/data"}
PROBE_EVERY = 0.1
PROBE_TIMEOUT = 30


def raise_open_files(wanted: int) -> int:
    """wrk opens one descriptor per connection and inherits this process's soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < wanted:
        raise SystemExit(f"open-file limit {soft} is below the {wanted} that wrk needs (hard limit {hard})")
    return soft


class Probe:
    """A request on a new connection every 100 ms (open loop: a slow answer does not delay the next probe)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def one(self) -> None:
        started = time.perf_counter()
        try:
            response = requests.get(self.url, timeout=PROBE_TIMEOUT, headers={"Connection": "close"})
            ok = response.status_code == 200
            why = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            ok, why = False, type(exc).__name__
        elapsed = time.perf_counter() - started
        with self.lock:
            self.latencies.append(elapsed)
            if not ok:
                self.failures.append(why)

    def run(self, seconds: float) -> Probe:
        count = int(seconds / PROBE_EVERY)
        started = time.monotonic()
        with ThreadPoolExecutor(64) as pool:
            for index in range(count):
                time.sleep(max(0.0, started + index * PROBE_EVERY - time.monotonic()))
                pool.submit(self.one)
        return self

    def summary(self) -> str:
        values = self.latencies
        return (f"{statistics.median(values) * 1000:.1f} / {percentile(values, 0.99) * 1000:.1f} /"
                f" {max(values) * 1000:.1f}") if values else "-"

    def p99(self) -> float:
        return percentile(self.latencies, 0.99)


def burst(poll_url: str, seconds: int, connections: int) -> tuple[Probe, Probe, dict[str, float]]:
    """The probe with no load, then the probe during wrk's keep-alive burst (from 2 s in to 1 s before its end)."""
    quiet = Probe(poll_url).run(min(5.0, seconds / 2))
    process = subprocess.Popen(wrk_args(poll_url, seconds, connections, threads=4), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2)
        loaded = Probe(poll_url).run(max(1.0, seconds - 3))
        output, _ = process.communicate(timeout=seconds + 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed: {output}")
    return quiet, loaded, parse_wrk(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="an 8 s burst instead of 20 s: a smoke run")
    parser.add_argument("--seconds", type=int, help="length of the wrk burst (default 20, quick 8)")
    parser.add_argument("--connections", type=int, default=1000, help="wrk's keep-alive connections")
    args = parser.parse_args()
    seconds = args.seconds or (8 if args.quick else 20)
    limit = raise_open_files(args.connections + 500)
    build_service(str(Path(ROOT / "tests" / "images" / "busybox")), tag=BUSYBOX, log=lambda _: None)
    print(f"# New connections under a keep-alive burst ({os.cpu_count()} CPUs, open files {limit},"
          f" {time.strftime('%Y-%m-%d %H:%M')})")
    with workdir("dsm-bench-conn-") as folder:
        (folder / "bare").mkdir()
        with dsm_server(folder, DOCKER_ENDPOINTS={"noop": SERVICE}) as (url, _):
            key = requests.post(f"{url}/api/noop_local", json={"args": ["true"]}, timeout=30).json()["key"]
            deadline = time.monotonic() + 60
            while requests.get(f"{url}/api/jobs/{key}", timeout=30).json()["job"]["status"] not in ("complete",
                                                                                                       "error"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the one job did not finish within 60 s")
                time.sleep(0.1)
            ours = burst(f"{url}/api/jobs/{key}", seconds, args.connections)
            problems, first_problems = log_problems(folder / "dsm.log")
        with baseline_server(folder / "bare", workers=2, database=folder / "jobs.db") as (bare, _):
            base = burst(f"{bare}/row/{key}", seconds, args.connections)
        with baseline_server(folder / "bare", workers=2, database=folder / "jobs.db", loop="asyncio") as (bare, _):
            plain = burst(f"{bare}/row/{key}", seconds, args.connections)
    rows = []
    for name, (quiet, loaded, load) in (("default `dsm serve`", ours), ("bare route, 2 workers", base),
                                        ("bare route, 2 workers, --loop asyncio", plain)):
        rows += [
            (f"{name}: probe, no load", quiet.summary(), f"{len(quiet.latencies)} / {len(quiet.failures)}", ""),
            (f"{name}: probe during the burst", loaded.summary(), f"{len(loaded.latencies)} / {len(loaded.failures)}",
             verdict(loaded.p99() < 1 and not loaded.failures, "p99 < 1 s, no failure")),
            (f"{name}: the burst itself (wrk)", f"{load['rate']:.0f} requests/s, p99 {load['p99_ms']:.0f} ms",
             f"non-2xx {load['errors']:.0f}, socket errors {load['socket_errors']:.0f}", ""),
        ]
    table(f"A new connection every {PROBE_EVERY * 1000:.0f} ms while wrk -t4 -c{args.connections} -d{seconds}s polls"
          " GET /api/jobs/<id> over keep-alive", rows,
          header=("measure", "p50 / p99 / max (ms)", "probes / failures", "target"))
    for quiet, loaded, _ in (ours, base, plain):
        if loaded.failures or quiet.failures:
            print("probe failures:", sorted(set(quiet.failures + loaded.failures)))
    if problems:
        print(f"server log: {problems} error line(s)", *first_problems, sep="\n  ")


if __name__ == "__main__":
    main()
