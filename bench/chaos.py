"""kill -9 at random moments while jobs, uploads, cancels and TES tasks run; then check that nothing was lost,
nothing ran twice and no partial file is visible.

    .venv/bin/python bench/chaos.py [--quick] [--cycles N] [--seed S]

Three runs of the default `dsm serve`, each on a folder of its own, each for --cycles cycles:
1. whole server: in each cycle a new server starts, clients submit 4CAT jobs (each appends its own mark to one
   file in the 4CAT folder, then sleeps 0-3 s), upload files of 1-4 MiB with `send_files` and cancel random jobs
   with an admin token; at a random moment within 2.5 s the server's whole process tree gets SIGKILL;
2. one worker: the same clients against one server, and one of its worker processes gets SIGKILL each cycle
   (its supervisor starts another; the scheduler moves to a live worker);
3. TES: three-executor tasks sharing a volume (each executor appends its mark and writes an 8 MiB file), with
   four outputs to file:// URLs; the whole server killed as in 1.
With --slurm, runs 1 and 3 again with BACKEND: slurm on the private two-node cluster of the tests.
After the last cycle one more server starts and every job is waited for (at most --settle s). Counted: jobs and
tasks accepted and how they ended, jobs (never cancelled) that never ran, marks written more than once (a run
started twice), uploads answered 200 whose file is missing or of another size, files of another size or
unexpected name anywhere in the upload or TES folders, TES tasks whose marks are not exactly once and in order
or whose outputs are missing or short, TES work areas left, containers left, server log errors. The target
for each is 0.
Loopback only; bounded in cycles and time.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from common import (
    BUSYBOX,
    ROOT,
    Process,
    dsm_token,
    free_port,
    log_problems,
    process_tree,
    remove_containers,
    serve_args,
    server_instance,
    settle_containers,
    table,
    verdict,
    wait_http,
    workdir,
    write_config,
)

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
from dmi_service_manager.runtime.images import build_service
from slurm_cluster import SlurmCluster, install_slurm, slurm_missing

SERVICE = {"image_name": BUSYBOX, "local": True, "command": "sh -c", "data_path": "/app/data"}
FINAL = ("complete", "error")
TES_FINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")
BIG = 8 * 1024 * 1024  # each TES executor's output file
STEPS = 3


@dataclass
class Load:
    """What the clients were told was accepted, across every server of a run."""

    jobs: dict[int, str] = field(default_factory=dict)  # job id -> its mark
    cancelled: set[int] = field(default_factory=set)
    uploads: dict[str, int] = field(default_factory=dict)  # file name -> size
    tasks: dict[str, int] = field(default_factory=dict)  # TES task id -> its number
    sent: set[int] = field(default_factory=set)  # numbers of every TES task sent, answered or not
    counter: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def number(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


def _clients(url: str, load: Load, token: str, rng: random.Random,
             tes_root: Path | None) -> tuple[threading.Event, list[threading.Thread]]:
    """Start the clients of one cycle; they stop at the event, or at their first failed request (the kill)."""
    stop = threading.Event()

    def submit() -> None:
        session = requests.Session()
        while not stop.is_set():
            number = load.number()
            try:
                if tes_root:
                    _submit_task(session, url, token, number, load, tes_root)
                else:
                    mark = f"m{number}"
                    answer = session.post(f"{url}/api/noop_local", timeout=5, json={
                        "args": [f"echo {mark} >> /app/data/ran.txt; sleep {rng.randint(0, 3)}"]})
                    if answer.status_code == 202:
                        load.jobs[int(answer.json()["key"])] = mark
            except requests.RequestException:
                return
            time.sleep(0.2 if tes_root else 0.05)

    def upload() -> None:
        session = requests.Session()
        while not stop.is_set():
            size = rng.randint(1, 4) * 1024 * 1024
            name = f"f{rng.randrange(10**9)}-{size}.bin"
            try:
                answer = session.post(f"{url}/api/send_files", data={"folder_name": "chaos"}, timeout=10,
                                      files={"4cat_uploads": (name, os.urandom(size))})
            except requests.RequestException:
                return
            if answer.status_code == 200:
                load.uploads[name] = size

    def cancel() -> None:
        session = requests.Session()
        while not stop.is_set():
            time.sleep(rng.uniform(0.05, 0.4))
            if not load.jobs:
                continue
            job_id = rng.choice(list(load.jobs))
            load.cancelled.add(job_id)  # asked, whatever the answer: the job may end either way
            try:
                session.delete(f"{url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=5)
            except requests.RequestException:
                return

    threads = [threading.Thread(target=t) for t in ((submit,) if tes_root else (submit, upload, cancel))]
    for thread in threads:
        thread.start()
    return stop, threads


def _submit_task(session: requests.Session, url: str, token: str, number: int, load: Load, shared: Path) -> None:
    executors = [{"image": BUSYBOX, "command": [
        "sh", "-c", f"echo {number}-{step} >> /shared/log; head -c {BIG} /dev/zero > /shared/big{step}"]}
        for step in range(STEPS)]
    outputs = [{"url": f"file://{shared}/log-{number}.txt", "path": "/shared/log", "type": "FILE"}] + [
        {"url": f"file://{shared}/big-{number}-{step}.bin", "path": f"/shared/big{step}", "type": "FILE"}
        for step in range(STEPS)]
    load.sent.add(number)  # the server may store it and die before it answers
    answer = session.post(f"{url}/ga4gh/tes/v1/tasks", headers={"Authorization": f"Bearer {token}"}, timeout=5,
                          json={"name": f"chaos-{number}", "volumes": ["/shared"], "executors": executors,
                                "outputs": outputs})
    if answer.status_code == 200:
        load.tasks[answer.json()["id"]] = number


def _kill_whole(process: Process, _: random.Random) -> bool:
    os.killpg(process.pid, signal.SIGKILL)
    process.handle.wait()
    return True


def _kill_worker(process: Process, rng: random.Random) -> bool:
    workers = [pid for pid in process_tree(process.pid) if pid != process.pid and _is_worker(pid)]
    if workers:
        os.kill(rng.choice(workers), signal.SIGKILL)
    time.sleep(rng.uniform(0.5, 2.0))  # the clients go on meanwhile
    return False


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def run(name: str, cycles: int, rng: random.Random, kill: Callable[[Process, random.Random], bool],
        tes: bool, settle: float, slurm: SlurmCluster | None = None) -> list[tuple[str, ...]]:
    load = Load()
    with workdir(f"dsm-chaos-{name.split()[0]}-") as folder:
        tes_root = folder / "tes-data"
        tes_root.mkdir()
        backend = {"BACKEND": "slurm", "SLURM_SPOOL_PATH": str(folder / "slurm-jobs")} if slurm else {}
        config = write_config(folder, LOG_LEVEL="INFO", MAX_CONCURRENT_JOBS=4, DOCKER_ENDPOINTS={"noop": SERVICE},
                              TES_ENABLED=tes, TES_ALLOWED_IMAGES=[BUSYBOX], TES_FILE_ROOTS=[str(tes_root)],
                              TES_WORK_PATH=str(folder / "tes-work"), **backend)
        token = dsm_token(folder, "chaos", "admin")
        port = free_port()
        url = f"http://127.0.0.1:{port}"

        def start() -> Process:
            process = Process(serve_args(config, port), folder, env=slurm.env if slurm else None,
                              log=folder / "dsm.log")
            wait_http(f"{url}/api/", timeout=60)
            return process

        process = start()
        instance = server_instance(url)
        for _ in range(cycles):
            stop, threads = _clients(url, load, token, rng, tes_root if tes else None)
            time.sleep(rng.uniform(0.2, 2.5))
            killed = kill(process, rng)
            stop.set()
            for thread in threads:
                thread.join()
            if killed:
                process = start()
        try:
            ended, waited = _settle(url, token, load, tes, settle)
            left = settle_containers(instance, 30)  # each goes once its job's end is written
        finally:
            process.stop()
            remove_containers(instance)
        problems, first = log_problems(folder / "dsm.log")
        rows = [*_checks(folder, tes_root, load, ended, tes), ("containers left", *_listed(left)),
                ("server log errors", str(problems), problems)]
        for line in first:
            print(f"{name}: server log: {line}")
        for task, shown in ended.items():  # why a task did not complete, as its own logs say
            if tes and shown.get("state") != "COMPLETE":
                why = [line for log in shown.get("logs") or [] for line in log.get("system_logs") or []]
                print(f"{name}: task {task} {shown.get('state')}: {' | '.join(why)[:500]}")
    print(f"{name}: {cycles} cycles, the last server settled in {waited:.0f} s", file=sys.stderr)
    return [(name, what, found, "" if bad is None else verdict(bad == 0, "0")) for what, found, bad in rows]


def _settle(url: str, token: str, load: Load, tes: bool, limit: float) -> tuple[dict[Any, dict[str, Any]], float]:
    """Every accepted job or task as the last server tells it, once all are final or `limit` s have passed."""
    session = requests.Session()
    began = time.monotonic()
    ended: dict[Any, dict[str, Any]] = {}
    while True:
        if tes:  # every task stored, the unanswered ones too: listed by name
            ended = {task["id"]: task for task in _every_task(session, url, token)}
            done = all(t.get("state") in TES_FINAL for t in ended.values())
        else:
            ended = {job: session.get(f"{url}/api/jobs/{job}", timeout=10).json()["job"] for job in load.jobs}
            done = all(j["status"] in FINAL for j in ended.values())
        if done or time.monotonic() - began > limit:
            return ended, time.monotonic() - began
        time.sleep(1)


def _whole(tes_root: Path, number: int) -> bool:
    """A task's outputs: its log with each executor's mark once and in order, and every big file whole."""
    log = tes_root / f"log-{number}.txt"
    bigs = [tes_root / f"big-{number}-{step}.bin" for step in range(STEPS)]
    return (log.exists() and log.read_text().split() == [f"{number}-{s}" for s in range(STEPS)]
            and all(b.exists() and b.stat().st_size == BIG for b in bigs))


def _listed(items: list[Any]) -> tuple[str, int]:
    return (f"{len(items)} (e.g. {', '.join(map(str, items[:3]))})" if items else "0"), len(items)


def _every_task(session: requests.Session, url: str, token: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    page: str | None = None
    while True:
        params = {"name_prefix": "chaos-", "view": "FULL", "page_size": "256"}
        if page:
            params["page_token"] = page
        listed = session.get(f"{url}/ga4gh/tes/v1/tasks", headers={"Authorization": f"Bearer {token}"}, timeout=30,
                             params=params).json()
        tasks += listed.get("tasks", [])
        page = listed.get("next_page_token")
        if not page:
            return tasks


def _checks(folder: Path, tes_root: Path, load: Load, ended: dict[Any, dict[str, Any]],
            tes: bool) -> list[tuple[str, str, int | None]]:
    """(what was counted, what was found, how many are wrong; None for a figure that is not a check)."""
    if tes:
        states = collections.Counter(t.get("state") for t in ended.values())
        wrong = []
        for task, number in load.tasks.items():
            if task not in ended or ended[task].get("state") != "COMPLETE" or not _whole(tes_root, number):
                wrong.append(task)
        # A task sent but not answered (the kill came first) may have been stored: then it must run as well.
        unanswered = {task: int(t["name"].split("-")[1]) for task, t in ended.items() if task not in load.tasks}
        for task, number in unanswered.items():
            if not _whole(tes_root, number) or ended[task].get("state") != "COMPLETE":
                wrong.append(task)
        expected = {f"log-{n}.txt" for n in load.sent} | {f"big-{n}-{s}.bin" for n in load.sent for s in range(STEPS)}
        stray = [p.name for p in tes_root.iterdir() if p.is_file() and p.name not in expected]
        return [("accepted", f"{len(load.tasks)} tasks, and {len(unanswered)} stored whose answer the kill cut", None),
                ("ended", " ".join(f"{n} {s}" for s, n in sorted(states.items())), None),
                ("tasks not COMPLETE, an executor's mark not once and in order, or an output short",
                 *_listed(wrong)),
                ("stray files among the outputs", *_listed(stray)),
                ("work areas left by ended tasks", *_listed(
                    sorted(p.name for p in (folder / "tes-work").glob("*")) if (folder / "tes-work").exists() else []))]
    statuses = collections.Counter(j["status"] for j in ended.values())
    ran_file = folder / "4cat" / "ran.txt"
    marks = collections.Counter(ran_file.read_text().split() if ran_file.exists() else [])
    uploads = folder / "uploads" / "chaos" / "4cat_uploads"
    files = [p for p in (folder / "uploads").rglob("*") if p.is_file()]
    return [
        ("accepted", f"{len(load.jobs)} jobs ({len(load.cancelled)} asked to cancel), {len(load.uploads)} uploads",
         None),
        ("ended", " ".join(f"{n} {s}" for s, n in sorted(statuses.items())), None),
        ("jobs not final", *_listed([j for j, job in ended.items() if job["status"] not in FINAL])),
        ("jobs never cancelled that did not complete",
         *_listed([j for j, job in ended.items() if j not in load.cancelled and job["status"] != "complete"])),
        ("jobs never cancelled that never ran",
         *_listed([j for j, m in load.jobs.items() if j not in load.cancelled and m not in marks])),
        ("runs started twice (a mark written more than once)", *_listed([m for m, c in marks.items() if c > 1])),
        ("uploads answered 200 that are missing or short", *_listed(
            [n for n, size in load.uploads.items()
             if not (uploads / n).exists() or (uploads / n).stat().st_size != size])),
        ("partial or unexpected files under the upload folder", *_listed(
            [p.name for p in files if p.parent != uploads or not p.name.startswith("f")
             or p.stat().st_size != int(p.stem.split("-")[1])])),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 cycles a run: a smoke run")
    parser.add_argument("--cycles", type=int, default=15)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=300, help="seconds to wait for every job at the end")
    parser.add_argument("--slurm", action="store_true",
                        help="also both whole-server runs with BACKEND: slurm, on the private two-node cluster of the"
                             " tests (needs root; installs Slurm and MUNGE when missing)")
    args = parser.parse_args()
    cycles = 5 if args.quick else args.cycles
    build_service(str(ROOT / "tests" / "images" / "busybox"), tag=BUSYBOX, log=lambda _: None)
    rng = random.Random(args.seed)
    print(f"# kill -9 at random moments ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, seed {args.seed};"
          " default `dsm serve`)")
    rows = run("whole server, 4CAT", cycles, rng, _kill_whole, False, args.settle)
    rows += run("one worker, 4CAT", cycles, rng, _kill_worker, False, args.settle)
    rows += run("whole server, TES", cycles, rng, _kill_whole, True, args.settle)
    if args.slurm:
        if slurm_missing():
            install_slurm()
        with workdir("dsm-chaos-cluster-") as folder:
            cluster = SlurmCluster(folder / "cluster")
            try:
                cluster.start()
                rows += run("whole server, 4CAT, Slurm", cycles, rng, _kill_whole, False, args.settle, cluster)
                rows += run("whole server, TES, Slurm", cycles, rng, _kill_whole, True, args.settle, cluster)
            finally:
                cluster.stop()
    table(f"{cycles} kills per run", rows, header=("run", "counted", "found", "target"))


if __name__ == "__main__":
    main()
