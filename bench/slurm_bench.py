"""Slurm backend benchmark: trivial jobs through `dsm serve` with BACKEND: slurm, beside the same containers
handed to the same Slurm cluster by `sbatch` directly, in the same run.

    .venv/bin/python bench/slurm_bench.py [--quick] [--jobs N] [--all-at-once]

Needs root, Docker, and Slurm + MUNGE (installed with scripts/slurm.sh when missing). Starts a private two-node
Slurm cluster on this machine (tests/slurm_cluster.py: 4 CPUs per node, so at most 8 one-CPU jobs run at once)
in a scratch folder, then:

1. `dsm serve` (default workers) with BACKEND: slurm, SLURM_SPOOL_PATH in the scratch folder, SLURM_POLL_SECONDS
   left at its default, MAX_CONCURRENT_JOBS 8 and a busybox service (`sh -c`). N jobs (`["true"]`) are POSTed
   to /api/noop_local, then GET /jobs/?current=1 every 100 ms until all are final.
2. Baseline: N `sbatch --parsable --wrap "docker run --rm --network host dsm-test-busybox:latest true"`, at most
   8 of them in the cluster (pending, running or completing) at once, as the server keeps at most 8 (or all
   submitted together, --all-at-once); `squeue` every 100 ms until none is left.

One sbatch'd container runs before both, so that neither pays for a cold cluster. The cluster and the server
are stopped at the end, on failure too. All traffic is to 127.0.0.1 (and the cluster's private veth link).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import requests

from common import BUSYBOX, ROOT, dsm_server, log_problems, table, verdict, workdir

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
from dmi_service_manager.config import Config
from dmi_service_manager.runtime.images import build_service
from slurm_cluster import SlurmCluster, install_slurm, parse_record, slurm_missing

SERVICE = {"image_name": BUSYBOX, "local": True, "command": "sh -c", "data_path": "/app/data"}
WINDOW = 8  # MAX_CONCURRENT_JOBS for the server; jobs in the cluster at once for the baseline
POLL = 0.1
FINAL = ("complete", "error")
ACTIVE = "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED,REQUEUED,RESIZING,SIGNALING,STAGE_OUT"
RAW_COMMAND = f"docker run --rm --network host {BUSYBOX} true"
DEFAULT_POLL = Config.model_fields["slurm_poll_seconds"].default


def through_server(cluster: SlurmCluster, folder: Path, count: int, limit: float) -> dict[str, float]:
    """N jobs through `dsm serve` (BACKEND: slurm); seconds from the first POST until the poll sees all final."""
    (folder / "server").mkdir()
    with dsm_server(folder / "server", env=cluster.env, BACKEND="slurm",
                    SLURM_SPOOL_PATH=str(folder / "server" / "slurm-jobs"), MAX_CONCURRENT_JOBS=WINDOW,
                    DOCKER_ENDPOINTS={"noop": SERVICE}) as (url, _):
        session = requests.Session()
        started = time.perf_counter()
        keys = [session.post(f"{url}/api/noop_local", json={"args": ["true"]}, timeout=30).json()["key"]
                for _ in range(count)]
        submitted = time.perf_counter() - started
        deadline = time.monotonic() + limit
        peak = 0
        while True:
            jobs = session.get(f"{url}/jobs/", params={"current": "1"}, timeout=30).json()["jobs"]
            peak = max(peak, sum(j["status"] == "running" for j in jobs))
            if not [j for j in jobs if j["status"] not in FINAL]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server's jobs did not finish within {limit:.0f} s")
            time.sleep(POLL)
        elapsed = time.perf_counter() - started
        failed = sum(session.get(f"{url}/api/jobs/{k}", timeout=30).json()["job"]["status"] != "complete"
                     for k in keys)
        problems, first = log_problems(folder / "server" / "dsm.log")
    for line in first:
        print(f"server log: {line}")
    return {"seconds": elapsed, "failed": failed, "submit_seconds": submitted, "peak_running": peak,
            "log_errors": problems}


def active_ids(cluster: SlurmCluster) -> set[str]:
    return set(cluster.run("squeue", "--noheader", f"--states={ACTIVE}", "--format=%i").stdout.split())


def final_states(cluster: SlurmCluster) -> dict[str, dict[str, str]]:
    """Every ended job's record from the jobcomp file (kept beyond MinJobAge), by job id."""
    if not cluster.jobcomp_log.exists():
        return {}
    records = (parse_record(line) for line in cluster.jobcomp_log.read_text().splitlines() if line.strip())
    return {r["JobId"]: r for r in records if "JobId" in r}


def through_sbatch(cluster: SlurmCluster, count: int, all_at_once: bool, limit: float) -> dict[str, float]:
    """N sbatch'd `docker run`s; seconds from the first sbatch until squeue lists none of them."""
    window = count if all_at_once else WINDOW
    ours: set[str] = set()
    started = time.perf_counter()
    deadline = time.monotonic() + limit
    while True:
        active = active_ids(cluster) & ours
        while len(ours) < count and len(active) < window:
            job = str(cluster.submit("--wrap", RAW_COMMAND))
            ours.add(job)
            active.add(job)
        if len(ours) == count and not active:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the sbatch'd jobs did not finish within {limit:.0f} s")
        time.sleep(POLL)
    elapsed = time.perf_counter() - started
    time.sleep(0.5)  # the jobcomp lines of the last jobs
    ended = final_states(cluster)
    failed = sum(ended.get(j, {}).get("JobState") != "COMPLETED" or ended[j].get("ExitCode") != "0:0" for j in ours)
    return {"seconds": elapsed, "failed": failed}


def warm_up(cluster: SlurmCluster) -> None:
    job = cluster.submit("--wrap", RAW_COMMAND)
    record = cluster.wait_state(job, timeout=120)
    if record["JobState"] != "COMPLETED":
        raise RuntimeError(f"the warm-up job ended {record['JobState']}: {cluster.output(job)[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 jobs instead of 100: a smoke run")
    parser.add_argument("--jobs", type=int, help="how many jobs on each side (default 100, --quick 20)")
    parser.add_argument("--all-at-once", action="store_true",
                        help=f"baseline: every sbatch at once, not at most {WINDOW} in the cluster at once")
    args = parser.parse_args()
    count = args.jobs or (20 if args.quick else 100)
    if count < 1:
        parser.error("--jobs: at least 1")
    if os.geteuid() != 0:
        sys.exit("slurm_bench: the private Slurm cluster needs root")
    # SIGTERM ends the run through the finally blocks below, so that the cluster and the server are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if slurm_missing():
        print("installing Slurm and MUNGE (scripts/slurm.sh) ...", flush=True)
        install_slurm()
    build_service(str(ROOT / "tests" / "images" / "busybox"), tag=BUSYBOX, log=lambda _: None)
    limit = max(300.0, 10.0 * count)
    baseline = (f"all {count} submitted at once" if args.all_at_once
                else f"at most {WINDOW} in the cluster at once")
    print(f"# Slurm backend benchmark ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')})")
    print(f"server: default `dsm serve` (no --workers), BACKEND: slurm, MAX_CONCURRENT_JOBS: {WINDOW},"
          f" SLURM_POLL_SECONDS: {DEFAULT_POLL:g} (the default, not set in the config)")
    print(f"baseline: sbatch --parsable --wrap \"{RAW_COMMAND}\", {baseline}; both sides polled every"
          f" {POLL * 1000:.0f} ms")
    with workdir("dsm-bench-slurm-") as folder:
        cluster = SlurmCluster(folder / "cluster")
        try:
            cluster.start()
            print(f"cluster: nodes {', '.join(cluster.nodes)}, {cluster.cpus} CPUs each; one warm-up job first",
                  flush=True)
            warm_up(cluster)
            ours = through_server(cluster, folder, count, limit)
            raw = through_sbatch(cluster, count, args.all_at_once, limit)
            submitted = [r for r in final_states(cluster).values() if r.get("Name", "").startswith("dsm-")]
        finally:
            cluster.stop()
    ratio = ours["seconds"] / raw["seconds"]
    table(f"{count} trivial jobs through Slurm (busybox `true`), two nodes x {cluster.cpus} CPUs", [
        ("time until all done (s)", f"{ours['seconds']:.1f}", f"{raw['seconds']:.1f} (sbatch, {baseline})",
         f"ratio {ratio:.2f}x"),
        ("jobs per second", f"{count / ours['seconds']:.2f}", f"{count / raw['seconds']:.2f}", ""),
        ("failed", f"{ours['failed']:.0f}", f"{raw['failed']:.0f}",
         verdict(ours["failed"] == 0 and raw["failed"] == 0, "none failed")),
        ("Slurm jobs submitted", str(len(submitted)), str(count), verdict(len(submitted) == count, "one per job")),
        ("server: POSTing all (s) / peak running / log errors",
         f"{ours['submit_seconds']:.1f} / {ours['peak_running']:.0f} / {ours['log_errors']:.0f}", "-", ""),
    ], header=("measure", "dsm serve (BACKEND: slurm)", "sbatch directly", "note"))


if __name__ == "__main__":
    main()
