"""Shared pieces of the benchmarks: servers to measure, wrk, timing and the side-by-side table.

Every benchmark starts its own servers on loopback, bounds its loops in count and time, and prints
each figure beside a baseline measured in the same run on the same machine.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BUSYBOX = "dsm-test-busybox:latest"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A scratch folder on the same disk as the project (not tmpfs), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Process:
    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None, log: Path | None = None):
        self.log = log or cwd / "process.log"
        self.handle = subprocess.Popen(args, cwd=cwd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                       env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.handle.pid

    def stop(self) -> None:
        if self.handle.poll() is None:
            os.killpg(self.handle.pid, signal.SIGTERM)
            try:
                self.handle.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.handle.pid, signal.SIGKILL)


def write_config(folder: Path, **config: Any) -> Path:
    """A config under `folder` (its database, upload and 4CAT folders there too), with `config` on top."""
    (folder / "uploads").mkdir(exist_ok=True)
    (folder / "4cat").mkdir(exist_ok=True)
    settings: dict[str, Any] = {"DATABASE_FILE": str(folder / "jobs.db"), "UPLOAD_FOLDER_PATH": str(folder / "uploads"),
                                "4CAT_DATASETS_PATH": str(folder / "4cat"), "LOG_LEVEL": "WARNING",
                                "DOCKER_ENDPOINTS": {}}
    settings.update(config)
    (folder / "config.yml").write_text(yaml.safe_dump(settings))
    return folder / "config.yml"


def serve_args(config: Path, port: int, workers: int | None = None) -> list[str]:
    """`dsm serve` on loopback; workers=None passes no `--workers`, as a user runs it."""
    args = [PYTHON, "-m", "dmi_service_manager", "serve", "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port)]
    return args + (["--workers", str(workers)] if workers is not None else [])


@contextmanager
def dsm_server(folder: Path, workers: int | None = None, env: dict[str, str] | None = None,
               **config: Any) -> Iterator[tuple[str, Process]]:
    """`dsm serve` with a config of its own under `folder`.

    workers=None passes no `--workers` flag: the server runs exactly as a user's `dsm serve` does (its default
    is one worker per CPU, at most 4). An int passes `--workers N`. `env`: added to os.environ for the server's
    process (e.g. a Slurm cluster's SLURM_CONF).
    """
    port = free_port()
    process = Process(serve_args(write_config(folder, **config), port, workers), folder, env=env,
                      log=folder / "dsm.log")
    instance = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/")
        with suppress(requests.RequestException, KeyError, ValueError):
            instance = server_instance(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.stop()
        if instance:  # hygiene: a server stopped with jobs under way leaves their containers for its next start
            try:
                removed = remove_containers(instance)
            except Exception as exc:  # Docker gone: nothing to clean, and no reason to hide the bench's own error
                removed = [f"(not checked: {exc})"]
            if removed:
                print(f"bench: removed {len(removed)} container(s) that the stopped server (instance {instance})"
                      f" left: {', '.join(removed[:5])}", file=sys.stderr)


@contextmanager
def baseline_server(folder: Path, workers: int = 2, database: Path | None = None,
                    loop: str | None = None) -> Iterator[tuple[str, Process]]:
    """The bare Starlette routes of bench/baseline_app.py, with the same uvicorn settings as `dsm serve`.
    `loop`: uvicorn's --loop (default: uvicorn's own choice, uvloop when installed, as `dsm serve`)."""
    port = free_port()
    env = {"BASELINE_ROOT": str(folder), "PYTHONPATH": str(ROOT / "bench")}
    if database:
        env["BASELINE_DB"] = str(database)
    process = Process([PYTHON, "-m", "uvicorn", "baseline_app:app", "--host", "127.0.0.1", "--port", str(port),
                       "--workers", str(workers), "--log-level", "warning", "--no-access-log", "--no-server-header",
                       "--backlog", "4096", *(["--loop", loop] if loop else [])], folder, env=env,
                      log=folder / "baseline.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/row/0")
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.stop()


def wrk_args(url: str, seconds: int, connections: int, script: Path | None = None, threads: int = 2,
             headers: list[str] | None = None) -> list[str]:
    if shutil.which("wrk") is None:
        raise SystemExit("bench: the load comes from wrk, which is not installed here (Debian: apt-get install wrk)")
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
    for header in headers or []:
        args += ["-H", header]
    if script:
        args += ["-s", str(script)]
    return [*args, url]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s, p99 latency in ms, non-2xx answers and socket errors, from wrk --latency's report."""
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p99_match = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    p99 = float(p99_match.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99_match.group(2)] if p99_match else 0.0
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {"rate": rate, "p99_ms": p99, "errors": float(errors.group(1)) if errors else 0.0,
            "socket_errors": float(sum(int(n) for n in sockets.groups())) if sockets else 0.0}


def wrk(url: str, seconds: int, connections: int, script: Path | None = None, threads: int = 2,
        headers: list[str] | None = None) -> dict[str, float]:
    """Requests/s, p99 latency in ms, and errors, from wrk --latency. `headers`: e.g. ["Connection: close"],
    with which wrk opens a new connection for every request."""
    args = wrk_args(url, seconds, connections, script, threads, headers)
    return parse_wrk(subprocess.run(args, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout)


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), children included (uvicorn workers)."""
    total = 0.0
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
                    .stdout.split()]
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total = max(total, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return total


def table(title: str, rows: Sequence[tuple[str, ...]],
          header: tuple[str, ...] = ("measure", "dmi-service-manager", "baseline", "target")) -> None:
    """rows: (what, ours, baseline, verdict) unless the header names other columns."""
    print(f"\n## {title}\n")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def verdict(ok: bool, text: str) -> str:
    return f"{'met' if ok else 'MISSED'}: {text}"


def dsm_token(folder: Path, name: str, scope: str = "submit") -> str:
    """A new API token from `dsm token create`, against the config that `dsm_server(folder)` wrote."""
    done = subprocess.run([PYTHON, "-m", "dmi_service_manager", "token", "create", "--config",
                           str(folder / "config.yml"), "--name", name, "--scope", scope],
                          cwd=folder, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"dsm token create failed: {done.stderr.strip()}")
    return done.stdout.strip()


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (fraction 0.99 = p99); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def process_tree(pid: int) -> list[int]:
    """pid and every process below it (uvicorn's workers and whatever they start), from /proc."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                queue += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU these processes (all their threads) have used so far, from /proc."""
    total = 0
    for pid in pids:
        with suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent not idle (summed over its CPUs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICKS


class CpuSplit:
    """Where the machine's CPU went while a block ran: this process (the benchmark's client), a server's
    processes, and everything else (the Docker engine, containerd, runc and the kernel's work for them).
    On a machine whose CPUs are all busy, each of them takes time from the others."""

    def __init__(self, server_pid: int) -> None:
        self.server = process_tree(server_pid)
        self.client = self.server_cpu = self.other = self.wall = 0.0

    def __enter__(self) -> CpuSplit:
        self._start = (time.process_time(), cpu_seconds(self.server), machine_busy_seconds(), time.monotonic())
        return self

    def __exit__(self, *_: object) -> None:
        client, server, busy, wall = (a - b for a, b in zip(
            (time.process_time(), cpu_seconds(self.server), machine_busy_seconds(), time.monotonic()),
            self._start, strict=True))
        self.client, self.server_cpu, self.other, self.wall = client, server, busy - client - server, wall

    @property
    def busy_share(self) -> float:
        """How much of the machine's CPU capacity was in use."""
        return (self.client + self.server_cpu + self.other) / (self.wall * (os.cpu_count() or 1))


def tree_usage(pid: int) -> tuple[float, int, int]:
    """(resident MiB, open descriptors, processes), summed over the process tree under pid."""
    rss, fds, count = 0.0, 0, 0
    for each in process_tree(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
            fds += len(os.listdir(f"/proc/{each}/fd"))
            count += 1
        except OSError:
            continue
    return rss, fds, count


def log_problems(log: Path, limit: int = 5) -> tuple[int, list[str]]:
    """Lines in a server log that say ERROR, CRITICAL or Traceback: how many, and the first few distinct."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return 0, []
    bad = [line for line in lines if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]
    distinct: list[str] = []
    for line in bad:
        if line not in distinct and len(distinct) < limit:
            distinct.append(line[:300])
    return len(bad), distinct


def server_instance(url: str) -> str:
    """The id that labels this server's containers (dmi-service-manager.instance), from /api/health."""
    return str(requests.get(f"{url}/api/health", timeout=30).json()["instance"])


def instance_containers(instance: str) -> list[dict[str, Any]]:
    """This server's containers (label dmi-service-manager.instance=<instance>), running or not."""
    import docker

    labelled = {"label": f"dmi-service-manager.instance={instance}"}
    return list(docker.from_env().api.containers(all=True, filters=labelled))


def settle_containers(instance: str, timeout: float = 60) -> list[str]:
    """Wait (bounded) until the server has removed its containers; returns the names of those still there."""
    deadline = time.monotonic() + timeout
    left = instance_containers(instance)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = instance_containers(instance)
    return [",".join(c.get("Names") or [c["Id"][:12]]) for c in left]


def remove_containers(instance: str) -> list[str]:
    """Bench hygiene once the server is stopped: force-remove what it left behind; returns their names."""
    import docker

    api = docker.from_env().api
    left = instance_containers(instance)
    for container in left:
        try:
            api.remove_container(container["Id"], force=True)
        except docker.errors.NotFound:
            continue
    return [",".join(c.get("Names") or [c["Id"][:12]]) for c in left]
