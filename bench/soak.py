"""A bounded soak (issue 4): thousands of 4CAT datasets in remote mode through the default `dsm serve`.

    .venv/bin/python bench/soak.py [--quick] [--jobs N] [--in-flight 8] [--poll-interval 1] [--max-minutes M]

Each dataset is driven as 4CAT's client drives one in remote mode, every request a bare `requests` call on a
new connection: list the collection, upload a few small files with `send_files` (one file per request, the
results placeholder last), ask the details query, submit to `fake_remote` (the busybox stand-in service, which
writes one result file per input into `--output_dir`), poll `result_url` until final (each poll also lists the
collection, as 4CAT counts result files when a job has no message), list and download the results, check them,
and delete the collection (`DELETE /api/files/<collection>`). About 8 datasets are in flight at any time.
4CAT polls every 5 to 30 s; the soak polls every second (--poll-interval) to get through 10,000 jobs in a
bounded time.

The server's memory (RSS summed over its process tree) and open descriptors are sampled from /proc every few
seconds. Reported: both after warm-up (the first 10 % of jobs) and at the end (flat within 10 %?), stuck jobs
(not final within --stuck-after s), containers left (labelled with this server's instance), orphan files (any
file left under the upload folder, anything in `.dsm-staging`), request latencies and the throughput.
Loopback only; bounded in count (--jobs) and time (--max-minutes).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from common import (
    BUSYBOX,
    ROOT,
    dsm_server,
    dsm_token,
    log_problems,
    percentile,
    server_instance,
    settle_containers,
    table,
    tree_usage,
    verdict,
    workdir,
)

sys.path.insert(0, str(ROOT / "src"))
from dmi_service_manager.runtime.images import build_service

SERVICE = {"image_name": BUSYBOX, "local": False, "remote": True, "command": "fake-service",
           "data_path": "/app/data"}
FINAL = ("complete", "error")
STAGING = ".dsm-staging"


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    complete: int = 0
    errors: int = 0  # jobs that ended `error`
    stuck: list[str] = field(default_factory=list)  # result URLs not final in time
    bad_results: int = 0  # complete, but the result files are not what the service wrote
    failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # failed requests by kind
    failure_examples: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def fail(self, kind: str, why: str) -> None:
        with self.lock:
            self.failures[kind] += 1
            if len(self.failure_examples) < 5:
                self.failure_examples.append(f"{kind}: {why[:200]}")


class FourCat:
    """4CAT's remote-mode calls, each a bare request on a new connection, timed per kind."""

    def __init__(self, url: str, tally: Tally, admin_token: str) -> None:
        self.api = f"{url}/api/"
        self.tally = tally
        self.admin = {"Authorization": f"Bearer {admin_token}"}  # the clean-up is an admin's, as 4CAT never deletes

    def call(self, kind: str, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        timeout = 120 if kind == "upload" else 30
        started = time.perf_counter()
        try:
            response = requests.request(method, path if path.startswith("http") else self.api + path,
                                        timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            self.tally.fail(kind, f"{type(exc).__name__}: {exc}")
            return None
        finally:
            elapsed = time.perf_counter() - started
            with self.tally.lock:
                self.tally.latency[kind].append(elapsed)
        if response.status_code not in ok:
            self.tally.fail(kind, f"HTTP {response.status_code}: {response.text[:150]}")
            return None
        return response

    def dataset(self, index: int, files: int, poll_interval: float, stuck_after: float) -> None:
        collection, results = f"soak-{index:06d}", f"results-{index:06d}"
        inputs = {f"item {n}.txt": (f"dataset {index} item {n} " * (8 + n)).encode() for n in range(files)}
        listing = self.call("list", "GET", f"list_filenames/{collection}", ok=(200, 404))
        if listing is None:
            return
        # 4CAT pops from the end of its list: the inputs go first, the results placeholder last.
        uploads = [(results, f"4CAT_{results}_blank.txt", b"")] + [("4cat_uploads", n, b) for n, b in inputs.items()]
        while uploads:
            subfolder, name, body = uploads.pop()
            self.call("upload", "POST", "send_files", data={"folder_name": collection},
                      files=[(subfolder, (name, body))])
        self.call("details query", "GET", "jobs/details_query/",
                  json={"details_key": "$.request_json.4CAT_dataset_key", "details_value": collection})
        stored = [f"data/{collection}/4cat_uploads/{name.replace(' ', '_')}" for name in inputs]
        answer = self.call("submit", "POST", "fake_remote", ok=(202,),
                           json={"args": ["--output_dir", f"data/{collection}/{results}", *stored],
                                 "4CAT_dataset_key": collection})
        if answer is None:
            return
        result_url = answer.json()["result_url"]
        deadline = time.monotonic() + stuck_after
        status = ""
        while time.monotonic() < deadline:
            time.sleep(poll_interval)
            polled = self.call("poll", "GET", result_url)
            self.call("list", "GET", f"list_filenames/{collection}")  # 4CAT counts result files for progress
            if polled is not None and (status := polled.json()["job"]["status"]) in FINAL:
                break
        with self.tally.lock:
            self.tally.done += 1
            if status == "complete":
                self.tally.complete += 1
            elif status == "error":
                self.tally.errors += 1
            else:
                self.tally.stuck.append(result_url)
        if status not in FINAL:
            return  # its collection stays: a job may still use it
        found = self.call("list", "GET", f"list_filenames/{collection}/{results}")
        names = (found.json().get(".", []) if found is not None else [])
        good = sorted(names) == sorted(f"{n.replace(' ', '_')}.txt" for n in inputs)
        for name in names:
            got = self.call("download", "GET", f"download/{collection}/{results}/{name}")
            good = good and got is not None and got.content.startswith(b"processed ")
        if status == "complete" and not good:
            with self.tally.lock:
                self.tally.bad_results += 1
        self.call("delete", "DELETE", f"files/{collection}", headers=self.admin)


def sampler(pid: int, tally: Tally, every: float, stop: threading.Event,
            samples: list[tuple[float, int, float, int, int]]) -> None:
    started = time.monotonic()
    while not stop.is_set():
        rss, fds, processes = tree_usage(pid)
        samples.append((time.monotonic() - started, tally.done, rss, fds, processes))
        stop.wait(every)


def window(samples: list[tuple[float, int, float, int, int]], low: int, high: int) -> tuple[float, float]:
    """Median RSS and descriptors over the samples taken while `low` to `high` jobs were done."""
    inside = [s for s in samples if low <= s[1] <= high] or samples[-3:]
    return statistics.median(s[2] for s in inside), statistics.median(s[3] for s in inside)


def leftovers(uploads: Path) -> tuple[list[str], list[str], int]:
    """(files left under the upload folder outside staging, files in staging, folders in staging)."""
    files, staged, staged_dirs = [], [], 0
    for root, dirs, names in os.walk(uploads):
        relative = Path(root).relative_to(uploads)
        in_staging = relative.parts[:1] == (STAGING,)
        if in_staging:
            staged += [str(relative / n) for n in names]
            staged_dirs += len(dirs)
        else:
            files += [str(relative / n) for n in names]
    return files, staged, staged_dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 jobs: a smoke run")
    parser.add_argument("--jobs", type=int, help="datasets (jobs) in all (default 10,000; quick 300)")
    parser.add_argument("--in-flight", type=int, default=8, help="datasets in flight at once")
    parser.add_argument("--files", type=int, default=3, help="input files per dataset")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls of one job")
    parser.add_argument("--stuck-after", type=float, default=300, help="a job not final after this is stuck")
    parser.add_argument("--sample-every", type=float, help="seconds between samples (default 5; quick 1)")
    parser.add_argument("--max-minutes", type=float, help="stop submitting after this (default 300; quick 20)")
    args = parser.parse_args()
    count = args.jobs or (300 if args.quick else 10_000)
    every = args.sample_every or (1.0 if args.quick else 5.0)
    limit = 60 * (args.max_minutes or (20 if args.quick else 300))
    build_service(str(Path(ROOT / "tests" / "images" / "busybox")), tag=BUSYBOX, log=lambda _: None)
    print(f"# Soak: {count} datasets in remote mode, {args.in_flight} in flight, {args.files} files each, polls every"
          f" {args.poll_interval:g} s ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')})")
    sys.stdout.flush()
    tally = Tally()
    samples: list[tuple[float, int, float, int, int]] = []
    with workdir("dsm-soak-") as folder:
        with dsm_server(folder, MAX_CONCURRENT_JOBS=args.in_flight, DOCKER_ENDPOINTS={"fake": SERVICE}) as (url,
                                                                                                           server):
            instance = server_instance(url)
            fourcat = FourCat(url, tally, dsm_token(folder, "soak-admin", "admin"))
            numbers = itertools.count()
            lock = threading.Lock()
            deadline = time.monotonic() + limit
            submitted = 0

            def worker(_: int) -> None:
                nonlocal submitted
                while time.monotonic() < deadline:
                    with lock:
                        index = next(numbers)
                        if index >= count:
                            return
                        submitted += 1
                    fourcat.dataset(index, args.files, args.poll_interval, args.stuck_after)

            stop = threading.Event()
            watcher = threading.Thread(target=sampler, args=(server.pid, tally, every, stop, samples), daemon=True)
            watcher.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(args.in_flight) as pool:
                list(pool.map(worker, range(args.in_flight)))
            elapsed = time.perf_counter() - started
            stop.set()
            watcher.join()
            not_final = [j for j in requests.get(f"{url}/jobs/", params={"current": "1"}, timeout=60).json()["jobs"]
                         if j["status"] not in FINAL]
            left = settle_containers(instance, 15)  # a container may be on its way out as its job ends
            orphans, staged, staged_dirs = leftovers(folder / "uploads")
            counts = requests.get(f"{url}/api/health", timeout=30).json().get("database", {}).get("jobs")
            problems, first_problems = log_problems(folder / "dsm.log")
        staged_after_stop = leftovers(folder / "uploads")[1]
    warm_rss, warm_fds = window(samples, count // 10, count * 15 // 100)
    end_rss, end_fds = window(samples, tally.done * 90 // 100, tally.done)
    peak_rss, peak_fds = max(s[2] for s in samples), max(s[3] for s in samples)
    stuck = len(tally.stuck) + len(not_final)
    table(f"Soak: {tally.done} of {count} datasets in {elapsed:.0f} s ({tally.done / elapsed:.2f} jobs/s), default"
          f" `dsm serve` ({samples[-1][4]} processes)", [
              ("server RSS, all processes (MiB)", f"{warm_rss:.1f}", f"{end_rss:.1f} (peak {peak_rss:.1f})",
               verdict(end_rss <= 1.10 * warm_rss, f"flat within 10% ({end_rss / warm_rss - 1:+.1%})")),
              ("server open descriptors", f"{warm_fds:.0f}", f"{end_fds:.0f} (peak {peak_fds})",
               verdict(end_fds <= 1.10 * warm_fds, f"flat within 10% ({end_fds / warm_fds - 1:+.1%})")),
              ("jobs complete / error / stuck", "-", f"{tally.complete} / {tally.errors} / {stuck}",
               verdict(stuck == 0 and tally.errors == 0, "0 stuck, 0 error")),
              ("complete with wrong result files", "-", str(tally.bad_results), verdict(tally.bad_results == 0, "0")),
              ("containers left (this instance)", "-", str(len(left)), verdict(not left, "0")),
              ("orphan files (uploads, outside staging)", "-", str(len(orphans)), verdict(not orphans, "0")),
              (f"files in {STAGING} (running / after stop)", "-", f"{len(staged)} / {len(staged_after_stop)}"
               f" ({staged_dirs} folder(s))", verdict(not staged and not staged_after_stop, "0")),
              ("failed requests", "-", str(sum(tally.failures.values())) +
               (f" {dict(tally.failures)}" if tally.failures else ""), verdict(not tally.failures, "0")),
              ("server log error lines", "-", str(problems), ""),
          ], header=("measure", "after warm-up (10%)", "at the end", "target"))
    rows = []
    for kind, values in sorted(tally.latency.items()):
        slow = sum(v > 1 for v in values)
        rows.append((kind, str(len(values)), f"{statistics.median(values) * 1000:.1f} / "
                     f"{percentile(values, 0.99) * 1000:.1f} / {max(values) * 1000:.0f}", str(slow)))
    table("Request latencies during the soak (each a new connection)", rows,
          header=("request", "count", "p50 / p99 / max (ms)", "over 1 s"))
    print(f"\njobs in the store at the end: {counts}; samples: {len(samples)} every {every:g} s")
    for line in tally.failure_examples:
        print(f"failure: {line}")
    for line in first_problems:
        print(f"server log: {line}")
    for name in (orphans + staged)[:5]:
        print(f"left over: {name}")
    if tally.stuck or not_final:
        print("stuck:", tally.stuck[:5], [j["id"] for j in not_final[:5]])


if __name__ == "__main__":
    main()
