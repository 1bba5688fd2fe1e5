"""What Prometheus metrics cost, on the default `dsm serve` (no --workers flag).

1. Status polls (GET /api/jobs/<id>, wrk -t2 -c32, keep-alive; then a new connection per request, as 4CAT
   polls) with METRICS on (the default) beside the same server with METRICS off, alternated, median of
   the rounds. Target: metrics cost at most 10 % of the poll rate.
2. A scrape of GET /metrics with 10,000 jobs in the store (finished, failed of several kinds, waiting),
   beside a GET /api/health of the same server in the same run. Target: under 100 ms.

    .venv/bin/python bench/metrics_bench.py [--seconds 8] [--rounds 3] [--jobs 10000]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dsm_server, percentile, table, verdict, workdir, wrk
from dmi_service_manager.jobs.store import Store

DEFAULT = "default `dsm serve` (one worker per CPU, at most 4)"


def fill(database: Path, count: int) -> int:
    """`count` jobs as a busy month leaves them: mostly complete, some failed, a few waiting; returns one id."""
    Store(database).migrate()
    rng = random.Random(1)
    now = time.time()
    rows = []
    for i in range(count):
        created = int(now - rng.uniform(0, 30 * 86400))
        service = rng.choice(["ocr", "whisper", "clip", "blip2"])
        started = created + rng.uniform(0, 600)
        ended = int(started + rng.uniform(1, 3600))
        roll = rng.random()
        status, failure = (("complete", None) if roll < 0.85 else ("error", rng.choice(
            ["exit_code", "timeout", "engine", "gpu_oom", "cancel"])) if roll < 0.98 else ("pending", None))
        rows.append((created, f"{service}_remote", status, "{}", service, "remote", f"key{i}", "4cat", failure,
                     started if status != "pending" else None, ended if status != "pending" else None))
    with sqlite3.connect(database) as db:
        db.executemany("INSERT INTO jobs (created_at, jobtype, status, details, service, mode, dataset_key, kind,"
                       " failure, started_at, completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return int(db.execute("SELECT min(id) FROM jobs WHERE status = 'complete'").fetchone()[0])


def timed_gets(url: str, count: int) -> list[float]:
    times = []
    with requests.Session() as session:
        for _ in range(count):
            started = time.perf_counter()
            response = session.get(url, timeout=30)
            times.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()

    with workdir("dsm-metrics-bench-") as folder:
        (folder / "on").mkdir()
        (folder / "off").mkdir()
        key = fill(folder / "on" / "jobs.db", args.jobs)
        fill(folder / "off" / "jobs.db", args.jobs)
        with dsm_server(folder / "on") as (on, _), dsm_server(folder / "off", METRICS=False) as (off, _):
            assert requests.get(f"{off}/metrics", timeout=10).status_code == 404
            rates: dict[str, list[float]] = {"on": [], "off": [], "on new": [], "off new": []}
            for _ in range(args.rounds):  # alternated, so that a busy moment of the machine hits both
                for name, url in (("on", on), ("off", off)):
                    rates[name].append(wrk(f"{url}/api/jobs/{key}", args.seconds, 32)["rate"])
                    rates[f"{name} new"].append(wrk(f"{url}/api/jobs/{key}", args.seconds, 32,
                                                    headers=["Connection: close"])["rate"])
            scrapes = timed_gets(f"{on}/metrics", 50)
            health = timed_gets(f"{on}/api/health", 50)
            size = len(requests.get(f"{on}/metrics", timeout=30).content)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    rows = []
    for label, suffix in (("polls, keep-alive (req/s)", ""), ("polls, new connection each (req/s)", " new")):
        with_metrics, without = median(rates["on" + suffix]), median(rates["off" + suffix])
        ratio = with_metrics / without
        rows.append((label, f"{with_metrics:,.0f} (metrics on)", f"{without:,.0f} (metrics off)",
                     verdict(ratio >= 0.90, f"{ratio:.0%} of the rate without metrics (>= 90%)")))
    table(f"Metrics' cost on status polls; wrk -t2 -c32, {args.seconds} s x {args.rounds} rounds each, median;"
          f" {DEFAULT}", rows)
    p50, p99 = percentile(scrapes, 0.5), percentile(scrapes, 0.99)
    table(f"GET /metrics with {args.jobs:,} jobs in the store ({size:,} bytes), 50 scrapes; {DEFAULT}", [
        ("scrape p50 / p99 (ms)", f"{p50:.1f} / {p99:.1f}",
         f"{percentile(health, 0.5):.1f} / {percentile(health, 0.99):.1f} (GET /api/health)",
         verdict(p99 < 100, "p99 under 100 ms"))])


if __name__ == "__main__":
    main()
