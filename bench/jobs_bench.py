"""Job engine benchmarks (issues 3 and 4), each beside a baseline measured in the same run.

    .venv/bin/python bench/jobs_bench.py [--quick] [--concurrency N]

Every figure is for the default command, `dsm serve` with no `--workers` (one worker per CPU, at most 4),
as a user runs it; the bare baseline route runs on uvicorn with 2 workers.

1. 200 trivial jobs (a container that exits at once) submitted together, N at a time: time until all
   are complete, beside 200 `containers.run` calls through the Docker SDK with the same concurrency.
2. 40 trivial jobs (busybox, exits at once, host network, one bind mount of the 4CAT folder) submitted
   8 at a time through POST /api/<service>_local, each polled every 50 ms until final, beside the same 40
   `containers.run(..., remove=True)` calls from 8 threads (target: within 1.10x), in 5 rounds that
   alternate which goes first; the verdict is the median of the rounds' ratios. With a per-job time
   breakdown from Docker's events and the client's clock: submit -> create -> start -> die -> the poll
   that first sees `complete` (for the SDK: call -> create -> start -> die -> the call returns), and the
   CPU each side used per job: the client (this script), the server, everything else (the engine, runc,
   the kernel). A third column runs the SDK's calls again while each client polls the bare route every
   50 ms until its call returns: what the polls alone cost this machine, answered by the least a server can
   do. Then the same with one client per CPU.
3. Submit latency (p50/p99) while 50 jobs run.
4. Status polls (GET /api/jobs/<id>, wrk -t2 -c32) beside a bare Starlette route that reads one row from
   the same SQLite database: over keep-alive connections, and with a new connection per request (as 4CAT
   polls: wrk with "Connection: close" reconnects for every request); 5 rounds, the verdict the median of
   the rounds' ratios.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import requests

from common import (
    BUSYBOX,
    ROOT,
    CpuSplit,
    baseline_server,
    dsm_server,
    dsm_token,
    log_problems,
    percentile,
    server_instance,
    settle_containers,
    table,
    verdict,
    workdir,
    wrk,
)

sys.path.insert(0, str(ROOT / "src"))
from dmi_service_manager.runtime.images import build_service

SERVICE = {"image_name": BUSYBOX, "local": True, "command": "sh -c", "data_path": "/app/data"}
DEFAULT = "default `dsm serve` (no --workers)"
LABEL_JOB = "dmi-service-manager.job"
LABEL_INSTANCE = "dmi-service-manager.instance"
LABEL_RAW = "dsm-bench.raw"  # the SDK baseline's containers, so that their events can be told apart
FINAL = ("complete", "error")


def wait_all_final(url: str, limit: float) -> None:
    """One light request every 50 ms: the bench must not steal the CPU it measures."""
    deadline = time.monotonic() + limit
    session = requests.Session()
    while time.monotonic() < deadline:
        jobs = session.get(f"{url}/jobs/", params={"current": "1"}, timeout=30).json()["jobs"]
        if not [j for j in jobs if j["status"] not in FINAL]:
            return
        time.sleep(0.05)
    raise RuntimeError(f"jobs did not finish within {limit} s")


def trivial_jobs(count: int, concurrency: int) -> None:
    client = docker.from_env()
    with workdir("dsm-bench-jobs-") as folder:
        with dsm_server(folder, MAX_CONCURRENT_JOBS=concurrency, DOCKER_ENDPOINTS={"noop": SERVICE}) as (url, _):
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
    table(f"{count} trivial jobs, {concurrency} at a time, submitted together; {DEFAULT}", [
        ("time until all complete (s)", f"{ours:.1f}", f"{raw:.1f} (containers.run)",
         verdict(ours <= 1.15 * raw and failed == 0, f"within 1.15x of raw Docker ({ours / raw:.2f}x)")),
        ("jobs per second", f"{count / ours:.1f}", f"{count / raw:.1f}", f"failed: {failed}"),
    ])


class DockerEvents:
    """Container events as they happen, {label value: {action: wall time in s}}, for containers carrying
    labels[0] (and the rest). Streamed live from before the run: the daemon keeps only its last 256 events
    for `since` queries, too few on a busy machine."""

    def __init__(self, client: docker.DockerClient, labels: list[str]) -> None:
        self.key = labels[0].split("=")[0]
        self.found: dict[str, dict[str, float]] = {}
        self.stream = client.events(decode=True, filters={"type": "container", "label": labels})
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                attributes = (event.get("Actor") or {}).get("Attributes") or {}
                name = attributes.get(self.key)
                if name is not None and "timeNano" in event:
                    action = event.get("status") or event.get("Action", "")
                    self.found.setdefault(name, {}).setdefault(action, event["timeNano"] / 1e9)
        except Exception:  # closing the stream from the other thread ends the read
            pass

    def close(self) -> dict[str, dict[str, float]]:
        time.sleep(0.5)  # the last die events are on their way
        self.stream.close()
        self.thread.join(5)
        return self.found


def segments(start: float, events: dict[str, float], end: float) -> dict[str, float] | None:
    """Milliseconds between the client's start, Docker's create, start and die, and the client's end."""
    if not all(k in events for k in ("create", "start", "die")):
        return None
    points = [start, events["create"], events["start"], events["die"], end]
    names = ["to create", "create to start", "start to die", "die to seen", "total"]
    values = [(b - a) * 1000 for a, b in itertools.pairwise(points)] + [(end - start) * 1000]
    return dict(zip(names, values, strict=True))


def paced_jobs(count: int, concurrency: int, rounds: int, note: str = "") -> None:
    """The issue's 40 trivial jobs: `concurrency` clients, each submits one job and polls it every 50 ms until
    final, then the next; beside as many threads of containers.run(..., remove=True). Docker's events give the
    breakdown, /proc the CPU each side used. The two alternate for `rounds` rounds (which goes first rotates
    too), and the verdict is the median of the rounds' ratios: this machine's disk and CPU drift by more than
    the difference measured.

    A third column runs the SDK's calls again while each client polls the bare route every 50 ms until its
    call returns: what the polls alone cost a machine whose CPUs the engine already fills, answered by the
    least a server can do. Its ratio is the floor for any server measured this way on this machine."""
    client = docker.from_env()
    with workdir("dsm-bench-paced-") as folder, dsm_server(folder, MAX_CONCURRENT_JOBS=concurrency,
                    DOCKER_ENDPOINTS={"noop": SERVICE}) as (url, server):
        (folder / "bare").mkdir()
        instance = server_instance(url)
        times: dict[str, list[float]] = {"ours": [], "raw": [], "polled": []}
        ours_parts: list[dict[str, float]] = []
        raw_parts: list[dict[str, float]] = []
        cpu: dict[str, list[CpuSplit]] = {"ours": [], "raw": [], "polled": []}
        failed = 0
        _paced_ours(client, url, instance, concurrency, concurrency)  # warm-up, not counted: both paths'
        _paced_raw(client, folder, concurrency, concurrency)  # first calls and images are hot
        with baseline_server(folder / "bare", database=folder / "jobs.db") as (bare, bare_process):
            poll_url = f"{bare}/row/1"  # the warm-up's first job
            requests.get(poll_url, timeout=30).raise_for_status()
            arms = list(times)
            for round_ in range(rounds):
                for which in arms[round_ % 3:] + arms[:round_ % 3]:
                    # Each run starts on a quiet machine: the server's last removals done, dirty pages written.
                    settle_containers(instance, 30)
                    os.sync()
                    time.sleep(1)
                    # The server's CPU is counted on every side: idle, it still costs a little.
                    with CpuSplit(bare_process.pid if which == "polled" else server.pid) as split:
                        if which == "ours":
                            seconds, parts, not_complete = _paced_ours(client, url, instance, count, concurrency)
                            ours_parts += parts
                            failed += not_complete
                        elif which == "raw":
                            seconds, parts = _paced_raw(client, folder, count, concurrency)
                            raw_parts += parts
                        else:
                            seconds, _ = _paced_raw(client, folder, count, concurrency, poll_url=poll_url)
                    times[which].append(seconds)
                    cpu[which].append(split)
        problems, first_problems = log_problems(folder / "dsm.log")
    ratios = [o / r for o, r in zip(times["ours"], times["raw"], strict=True)]
    floors = [p / r for p, r in zip(times["polled"], times["raw"], strict=True)]
    ratio, floor = statistics.median(ratios), statistics.median(floors)
    median = {w: statistics.median(t) for w, t in times.items()}
    table(f"{count} trivial jobs (busybox, host network, one bind mount), {concurrency} clients each submitting"
          f" and polling every 50 ms, {rounds} rounds in rotating order; {DEFAULT}{note}", [
              ("time until all final (s), median", f"{median['ours']:.2f}",
               f"{median['raw']:.2f} ({concurrency} threads of containers.run)",
               verdict(ratio <= 1.10 and failed == 0, f"<= 1.10x the raw SDK (median of rounds: {ratio:.2f}x)")),
              ("each round (s)", " ".join(f"{t:.2f}" for t in times["ours"]),
               " ".join(f"{t:.2f}" for t in times["raw"]), "ratios: " + " ".join(f"{r:.2f}" for r in ratios)),
              ("jobs per second, median", f"{count / median['ours']:.1f}", f"{count / median['raw']:.1f}",
               f"not complete: {failed}; server log errors: {problems}"),
              ("the SDK's calls, each client polling the bare route every 50 ms meanwhile (s), median", "",
               f"{median['polled']:.2f}", f"{floor:.2f}x the SDK alone: the polls' own share of this machine,"
               f" the floor for any server (rounds: {' '.join(f'{r:.2f}' for r in floors)})"),
          ])
    rows = []
    for name, what in (("to create", "submit -> create (SDK: call -> create)"), ("create to start", "create -> start"),
                       ("start to die", "start -> die (the container's own run)"),
                       ("die to seen", "die -> poll sees complete (SDK: -> call returns)"),
                       ("total", "submit -> seen complete (SDK: the call)")):
        ours_ms = [p[name] for p in ours_parts]
        raw_ms = [p[name] for p in raw_parts]
        rows.append((what, f"{statistics.median(ours_ms):.0f} / {percentile(ours_ms, 0.9):.0f}" if ours_ms else "-",
                     f"{statistics.median(raw_ms):.0f} / {percentile(raw_ms, 0.9):.0f}" if raw_ms else "-", ""))
    rows[3] = (*rows[3][:3], "ours includes up to 50 ms of poll interval")
    table(f"Per-job time (ms, median / p90) from Docker events and the client's clock ({len(ours_parts)} of"
          f" {count * rounds} jobs, {len(raw_parts)} of {count * rounds} SDK calls with all events)", rows,
          header=("segment", "dmi-service-manager", "containers.run", "note"))

    def per_job(which: str, part: str) -> str:
        return f"{statistics.median(getattr(s, part) for s in cpu[which]) * 1000 / count:.0f}"

    busy = {w: f"{statistics.median(s.busy_share for s in cpu[w]):.0%}" for w in cpu}
    table(f"CPU per job (ms of one CPU, median of rounds) from /proc; the machine's {os.cpu_count()} CPUs were"
          f" {busy['ours']} busy during our rounds, {busy['raw']} during the SDK's, {busy['polled']} during the"
          f" SDK's with polls", [
              ("the client: this bench (ours: the submit and the polls; SDK: its calls)", per_job("ours", "client"),
               per_job("raw", "client"), per_job("polled", "client"), "4CAT's poll pattern, with requests"),
              ("the server, all its processes", per_job("ours", "server_cpu"), per_job("raw", "server_cpu"),
               per_job("polled", "server_cpu"), "SDK: our idle server; with polls: the bare route's"),
              ("everything else: Docker engine, containerd, runc, the kernel", per_job("ours", "other"),
               per_job("raw", "other"), per_job("polled", "other"), ""),
          ], header=("who", "dmi-service-manager", "containers.run", "containers.run + polls", "note"))
    for line in first_problems:
        print(f"server log: {line}")


def _paced_ours(client: docker.DockerClient, url: str, instance: str, count: int,
                concurrency: int) -> tuple[float, list[dict[str, float]], int]:
    """One round through the server: (seconds, per-job segments, jobs not complete)."""
    numbers = itertools.count()
    lock = threading.Lock()
    records: list[tuple[str, float, float, str]] = []  # (job id, submitted, seen final, status)

    def client_loop(_: int) -> None:
        session = requests.Session()
        while True:
            with lock:
                if next(numbers) >= count:
                    return
            submitted = time.time()
            answer = session.post(f"{url}/api/noop_local", json={"args": ["true"]}, timeout=30).json()
            deadline = time.monotonic() + 120
            status = answer.get("status", "")
            while time.monotonic() < deadline:
                time.sleep(0.05)
                status = session.get(answer["result_url"], timeout=30).json()["job"]["status"]
                if status in FINAL:
                    break
            with lock:
                records.append((str(answer["key"]), submitted, time.time(), status))

    recorder = DockerEvents(client, [LABEL_JOB, f"{LABEL_INSTANCE}={instance}"])
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    seconds = time.perf_counter() - started
    events = recorder.close()
    parts = [p for key, sub, seen, _ in records if (p := segments(sub, events.get(key, {}), seen))]
    return seconds, parts, sum(status != "complete" for *_, status in records)


def _paced_raw(client: docker.DockerClient, folder: Path, count: int, concurrency: int,
               poll_url: str | None = None) -> tuple[float, list[dict[str, float]]]:
    """One round of the same containers through the SDK: (seconds, per-call segments). With `poll_url`, each
    client polls it every 50 ms while its call runs, as 4CAT would poll a job."""
    run = uuid.uuid4().hex[:8]
    calls: dict[str, tuple[float, float]] = {}

    def one(index: int) -> None:
        begun = time.time()
        client.containers.run(BUSYBOX, ["sh", "-c", "true"], network_mode="host", remove=True,
                              labels={LABEL_RAW: f"{run}-{index}"},
                              volumes={str(folder / "4cat"): {"bind": "/app/data", "mode": "rw"}})
        calls[f"{run}-{index}"] = (begun, time.time())

    def polled(runner: ThreadPoolExecutor, session: requests.Session, index: int) -> None:
        call = runner.submit(one, index)
        while True:
            time.sleep(0.05)
            session.get(poll_url, timeout=30).json()  # type: ignore[arg-type]
            if call.done():
                call.result()
                return

    def client_loop(indexes: list[int]) -> None:
        session = requests.Session()
        with ThreadPoolExecutor(1) as runner:
            for index in indexes:
                polled(runner, session, index)

    recorder = DockerEvents(client, [LABEL_RAW])
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        if poll_url is None:
            list(pool.map(one, range(count)))
        else:
            list(pool.map(client_loop, [list(range(count))[i::concurrency] for i in range(concurrency)]))
    seconds = time.perf_counter() - started
    events = recorder.close()
    return seconds, [p for key, (sub, done) in calls.items() if (p := segments(sub, events.get(key, {}), done))]


def latency_and_polls(quick: bool) -> None:
    running = 10 if quick else 50
    seconds = 3 if quick else 5
    close = ["Connection: close"]
    with workdir("dsm-bench-poll-") as folder:
        (folder / "bare").mkdir()
        with dsm_server(folder, MAX_CONCURRENT_JOBS=running, DOCKER_ENDPOINTS={"noop": SERVICE}) as (url, _):
            session = requests.Session()
            long = [session.post(f"{url}/api/noop_local", json={"args": ["sleep 120"]}, timeout=30).json()["key"]
                    for _ in range(running)]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [session.get(f"{url}/api/jobs/{k}", timeout=30).json()["job"]["status"] for k in long]
                if states.count("running") == running:
                    break
                time.sleep(0.2)
            latencies, queued = [], []
            for _ in range(200):
                started = time.perf_counter()
                response = session.post(f"{url}/api/noop_local", json={"args": ["true"]}, timeout=30)
                latencies.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 202
                queued.append(response.json()["key"])
            p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
            poll_key = long[0]
            runs: dict[str, list[dict[str, float]]] = {"ours": [], "bare": [], "ours new": [], "bare new": []}
            with baseline_server(folder / "bare", workers=2, database=folder / "jobs.db") as (bare, _):
                for round_ in range(1 if quick else 5):
                    steps = [lambda: runs["ours"].append(wrk(f"{url}/api/jobs/{poll_key}", seconds, 32)),
                             lambda: runs["bare"].append(wrk(f"{bare}/row/{poll_key}", seconds, 32)),
                             lambda: runs["ours new"].append(wrk(f"{url}/api/jobs/{poll_key}", seconds, 32,
                                                                 headers=close)),
                             lambda: runs["bare new"].append(wrk(f"{bare}/row/{poll_key}", seconds, 32,
                                                                 headers=close))]
                    for step in ([0, 1, 2, 3] if round_ % 2 == 0 else [1, 0, 3, 2]):  # neither side always first
                        steps[step]()
            # The 200 submitted jobs wait behind the long ones: cancel them first (at once, they never started),
            # then the long ones, which stop with a grace period; let the server finish before it is stopped.
            admin = {"Authorization": f"Bearer {dsm_token(folder, 'bench-admin', 'admin')}"}
            for key in queued + long:
                session.delete(f"{url}/api/jobs/{key}", timeout=30, headers=admin)
            wait_all_final(url, 120)
            unfinished = settle_containers(server_instance(url), 60)
            problems, first_problems = log_problems(folder / "dsm.log")

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[name])

    def errors(name: str) -> str:
        found = runs[name]
        return f"non-2xx {sum(r['errors'] for r in found):.0f}, socket {sum(r['socket_errors'] for r in found):.0f}"

    def share(ours: str, bare: str) -> float:
        """The median of the rounds' own ratios: this machine drifts by more than a round's difference."""
        return statistics.median(o["rate"] / b["rate"] for o, b in zip(runs[ours], runs[bare], strict=True))

    def rounds(name: str) -> str:
        return " ".join(f"{r['rate']:.0f}" for r in runs[name])

    keep, keep_bare, keep_share = med("ours", "rate"), med("bare", "rate"), share("ours", "bare")
    new, new_bare, new_share = med("ours new", "rate"), med("bare new", "rate"), share("ours new", "bare new")
    table(f"Submit latency with {running} jobs running; status polls, wrk -t2 -c32; {DEFAULT}"
          " vs bare route on 2 workers", [
              ("submit latency p50 / p99 (ms)", f"{p50:.1f} / {p99:.1f}", "-", verdict(p99 < 50, "p99 < 50 ms")),
              ("GET /api/jobs/<id>, keep-alive (requests/s), median", f"{keep:.0f}",
               f"{keep_bare:.0f} (one SQLite row)",
               verdict(keep >= 5000 and keep_share >= 0.6,
                       f">= 5000/s and >= 60% of bare (median of rounds: {keep_share:.0%})")),
              ("  each round", rounds("ours"), rounds("bare"), ""),
              ("  p99 (ms)", f"{med('ours', 'p99_ms'):.1f}", f"{med('bare', 'p99_ms'):.1f}", errors("ours")),
              ("GET /api/jobs/<id>, new connection each (requests/s), median", f"{new:.0f}", f"{new_bare:.0f}",
               verdict(new_share >= 0.6, f">= 60% of bare (median of rounds: {new_share:.0%})")),
              ("  each round", rounds("ours new"), rounds("bare new"), ""),
              ("  p99 (ms)", f"{med('ours new', 'p99_ms'):.1f}", f"{med('bare new', 'p99_ms'):.1f}",
               errors("ours new") + f"; bare: {errors('bare new')}"),
          ])
    if problems:
        print(f"server log: {problems} error line(s)", *first_problems, sep="\n  ")
    if unfinished:
        print(f"containers still there 60 s after the cancels (the server stopped with them): {len(unfinished)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer jobs and shorter runs: a smoke run")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    build_service(str(Path(ROOT / "tests" / "images" / "busybox")), tag=BUSYBOX, log=lambda _: None)
    print(f"# Job engine benchmarks ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')})")
    trivial_jobs(40 if args.quick else 200, args.concurrency)
    paced_jobs(40, args.concurrency, 1 if args.quick else 5)
    few = min(max(2, os.cpu_count() or 2), args.concurrency)
    if few < args.concurrency:
        # The same with as many clients as CPUs: each job waits less inside the engine, so it is polled fewer
        # times; the difference between the two runs is the polls' share of the machine.
        paced_jobs(40, few, 1 if args.quick else 5, note=f" ({few} clients: one per CPU)")
    latency_and_polls(args.quick)


if __name__ == "__main__":
    main()
