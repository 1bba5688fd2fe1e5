"""A real, private Slurm cluster on this one machine, for tests: its own munged, slurmctld and slurmd(s).

    with SlurmCluster(tmp_path) as cluster:          # or cluster = SlurmCluster(tmp_path).start(); cluster.stop()
        job = cluster.submit("--gres=gpu:1", "--wrap", "nvidia-smi || true")
        cluster.wait_state(job, "COMPLETED")
        subprocess.run(["squeue"], env={**os.environ, **cluster.env})   # any Slurm client, given cluster.env

Everything lives in the given folder (configuration, state, spool, logs, the MUNGE key, stand-in GPU device
files), except the MUNGE socket, which goes in a short folder of its own under /tmp (Unix socket paths are short,
and munged wants every folder above its socket to be searchable by all, which pytest's 0700 folders are not).
Ports are chosen free, so a system Slurm (or another test's cluster) is left alone. Needs root, Slurm and MUNGE
(`bash scripts/slurm.sh` installs them: Debian bookworm ships Slurm 22.05).

Two nodes by default: `dsm1` is this machine as it is; `dsm2` is a second slurmd in its own UTS and network
namespace (hostname `dsm2`, reached over a veth pair on a private /24), which shares this machine's filesystem,
processes' view and Docker engine (jobs reach it through /var/run/docker.sock, like on a real node). `nodes=1`
gives the one-node cluster. Only `dsm1` has GPUs unless told otherwise (`gpus=(2, 0)`): two declared GPUs, so
that the third `--gres=gpu:1` job waits. Slurm's gres/gpu insists on a character device per GPU (a GPU without
`File=` is dropped, a plain file is refused), so the harness makes its own device nodes with NVIDIA's major
number (195) in the folder; nothing opens them. Jobs see CUDA_VISIBLE_DEVICES etc. as on a real GPU node.

Without cgroups (proctrack/linuxproc, task/none) Slurm cannot enforce memory or CPU limits and has no view of
processes outside the job's own process tree, such as a Docker container (a child of containerd, not of the
job). On scancel or at the time limit every process of the job gets SIGTERM, then SIGKILL KillWait seconds later:
the `docker run` client forwards the TERM to the container (which a PID 1 without a handler ignores, unless
`--init`), and once the client is killed the container runs on, unless the job script removes it itself
(tests/test_slurm_cluster.py shows both). The daemons die with the process that started them (PR_SET_PDEATHSIG);
what a killed test run leaves (slurmstepd and jobs) the next start() sweeps away.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel", "munged", "munge")
MARKER = "DSM_SLURM_CLUSTER"  # set in the environment of every daemon the harness starts, to find what is left
NVIDIA_MAJOR = 195
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE",
})


class SlurmError(RuntimeError):
    pass


def slurm_missing() -> list[str]:
    """The Slurm and MUNGE programs this machine lacks (none after `bash scripts/slurm.sh`)."""
    return [tool for tool in SLURM_TOOLS if not shutil.which(tool)]


def install_slurm(timeout: float = 900) -> None:
    """Runs scripts/slurm.sh (apt-get install slurm-wlm munge, where missing)."""
    if not slurm_missing():
        return
    result = subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sh")], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or slurm_missing():
        raise SlurmError(f"scripts/slurm.sh failed ({result.returncode}), still missing {slurm_missing()}:\n"
                         f"{result.stdout}{result.stderr}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2,
          on_fail: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    details = on_fail() if on_fail else ""
    raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}\n{details}")


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"--- {path}: (no such file)\n"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text) + "\n"


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _markers() -> dict[int, str]:
    """The processes whose environment has the harness's marker, and its value."""
    found = {}
    prefix = f"{MARKER}=".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(prefix):
                    found[int(entry.name)] = item[len(prefix):].decode(errors="replace")
    return found


def _kill_trees(select: Callable[[str], bool]) -> None:
    """SIGKILL to each marked process whose marker select() picks, and to all its descendants."""
    for _ in range(5):
        tree = _children()
        doomed: set[int] = set()
        todo = [pid for pid, marker in _markers().items() if select(marker)]
        while todo:
            pid = todo.pop()
            if pid not in doomed and pid != os.getpid():
                doomed.add(pid)
                todo.extend(tree.get(pid, []))
        if not doomed:
            return
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans() -> None:
    """What clusters of test runs that died without stop() (kill -9, a crash) left: their daemons, jobs and
    socket folders. (Their daemons die with the process that started them, but slurmstepd and jobs do not.)"""
    _kill_trees(lambda marker: marker.split("-")[0].isdigit() and not _alive(int(marker.split("-")[0])))
    for folder in Path("/tmp").glob("dsm-slurm-*-*"):
        owner = folder.name.split("-")[2]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it ends (prctl PR_SET_PDEATHSIG), so that
    a test run killed with -9 leaves no daemon behind. Start the cluster from the main thread: the signal comes
    when the starting *thread* ends."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def parse_record(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o` (or node, ...) as a dict: 'JobState=RUNNING Reason=None ...'.
    Values may hold spaces (Command=, WorkDir=...); a token without '=' belongs to the value before it."""
    record: dict[str, str] = {}
    key = ""
    for token in line.strip().split(" "):
        name, eq, value = token.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9_:/]*", name):
            key = name
            record[key] = value
        elif key:
            record[key] += " " + token
    return record


class SlurmCluster:
    """A private Slurm cluster: start() / stop(), or use it as a context manager. See the module's docstring."""

    def __init__(self, folder: Path, *, nodes: int = 2, gpus: Sequence[int] = (2, 0), cpus: int = 4,
                 memory_mb: int = 4096, kill_wait: int = 5, min_job_age: int = 300, cluster_name: str = "dsmtest",
                 partition: str = "dsm", extra_conf: Iterable[str] = (), start_timeout: float = 90) -> None:
        if nodes not in (1, 2):
            raise ValueError("nodes: 1 or 2")
        self.folder = Path(folder).resolve()
        self.nodes = [f"dsm{i + 1}" for i in range(nodes)]
        self.gpus = {name: (list(gpus)[i] if i < len(gpus) else 0) for i, name in enumerate(self.nodes)}
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.kill_wait = kill_wait
        self.min_job_age = min_job_age
        self.cluster_name = cluster_name
        self.partition = partition
        self.extra_conf = list(extra_conf)
        self.start_timeout = start_timeout
        self.hostname = socket.gethostname()
        self.marker = f"{os.getpid()}-{time.monotonic_ns()}"
        self.conf = self.folder / "slurm.conf"
        self.log_dir = self.folder / "log"
        self.controller_log = self.log_dir / "slurmctld.log"
        self.jobcomp_log = self.log_dir / "jobcomp.txt"
        self.ctld_port = 0
        self.slurmd_port = 0
        self.controller_addr = "127.0.0.1"
        self.node_addr: dict[str, str] = dict.fromkeys(self.nodes, "127.0.0.1")
        self._short: Path | None = None
        self._munged: subprocess.Popen[bytes] | None = None
        self._ctld: subprocess.Popen[bytes] | None = None
        self._slurmd: dict[str, subprocess.Popen[bytes]] = {}
        self._veth: str | None = None
        self._peer = ""
        self._started = False

    # -- the public face

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client needs on top of os.environ (the sbatch'd job inherits it too)."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def munge_socket(self) -> Path:
        assert self._short is not None
        return self._short / "munge.socket"

    def slurmd_log(self, node: str) -> Path:
        return self.log_dir / f"slurmd-{node}.log"

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster; raises SlurmError if it fails (unless check=False)."""
        result = subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True,
                                timeout=timeout, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                                cwd=self.folder)
        if check and result.returncode != 0:
            raise SlurmError(f"{shlex.join(cmd)} exited with {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def submit(self, *args: str) -> int:
        """sbatch --parsable ARGS...; the job id. Output goes to <folder>/jobs/slurm-<id>.out unless -o says."""
        (self.folder / "jobs").mkdir(exist_ok=True)
        out = [] if any(a in ("-o", "--output") or a.startswith("--output=") for a in args) else \
            ["--output", str(self.folder / "jobs" / "slurm-%j.out")]
        answer = self.run("sbatch", "--parsable", *out, *args).stdout.strip()
        return int(answer.split(";")[0])

    def output(self, job_id: int) -> str:
        path = self.folder / "jobs" / f"slurm-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def job(self, job_id: int) -> dict[str, str] | None:
        """`scontrol show job -o ID` as a dict (JobState, Reason, ExitCode, NodeList, ...); None once Slurm has
        forgotten it (MinJobAge seconds after it ended; there is no accounting database)."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0:
            if "Invalid job id" in result.stdout + result.stderr:
                return None
            raise SlurmError(f"scontrol show job {job_id}: {result.stdout}{result.stderr}")
        return parse_record(result.stdout.splitlines()[0])

    def state(self, job_id: int) -> str | None:
        job = self.job(job_id)
        return job["JobState"] if job else None

    def wait_state(self, job_id: int, *states: str, timeout: float = 60) -> dict[str, str]:
        """Waits until the job is in one of states (default: any final state); its record."""
        wanted = set(states) or FINAL_STATES

        def reached() -> dict[str, str] | None:
            job = self.job(job_id)
            return job if job and job["JobState"] in wanted else None

        record: dict[str, str] = _wait(reached, timeout, f"job {job_id} to be {'/'.join(sorted(wanted))}", 0.3,
                                       lambda: f"job: {self.job(job_id)}\n{self.logs()}")
        return record

    def node_states(self) -> dict[str, str]:
        lines = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        return dict(line.split(" ", 1) for line in lines if " " in line)

    def logs(self) -> str:
        files = [self.controller_log, *(self.slurmd_log(n) for n in self.nodes), self.folder / "munge" / "munged.log"]
        return "".join(_tail(f) for f in files)

    # -- starting and stopping

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmError("the Slurm test cluster needs root (slurmd runs jobs and namespaces need it)")
        if missing := slurm_missing():
            raise SlurmError(f"missing {missing}: run `bash scripts/slurm.sh` (or install_slurm())")
        sweep_orphans()
        self._started = True
        try:
            for sub in ("state", "spool", "log", "dev", "jobs", "munge"):
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
            self._short = Path(f"/tmp/dsm-slurm-{os.getpid()}-{time.monotonic_ns() % 10**9}")
            self._short.mkdir(mode=0o755)
            self._short.chmod(0o755)
            self._start_munge()
            self.ctld_port, self.slurmd_port = _free_port(), _free_port()
            if len(self.nodes) == 2:
                self._make_link()
            self._write_config()
            self.start_controller(clear=True)
            for node in self.nodes:
                self._start_slurmd(node)
            self.wait_nodes_idle(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        def idle() -> bool:
            states = self.node_states()
            return all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes)

        def fail() -> str:
            nodes = self.run("scontrol", "show", "node", "-o", check=False)
            return f"sinfo: {self.node_states()}\n{nodes.stdout}{nodes.stderr}\n{self.logs()}"

        _wait(idle, timeout, f"nodes {self.nodes} to be idle", 0.5, fail)

    def stop_controller(self) -> None:
        """slurmctld stops (SIGTERM, as `systemctl stop` would): clients get 'Unable to contact slurm controller';
        slurmd and running jobs go on, and report to the controller when it is back."""
        if self._ctld is not None:
            self._terminate(self._ctld, "slurmctld")
            self._ctld = None

    def start_controller(self, clear: bool = False) -> None:
        """slurmctld starts, recovering its saved state (jobs included) unless clear (-c)."""
        args = ["slurmctld", "-D", "-i", "-f", str(self.conf), *(["-c"] if clear else [])]
        self._ctld = self._spawn(args, self.log_dir / "slurmctld.stdout")

        def answers() -> bool:
            if self._ctld is not None and self._ctld.poll() is not None:
                raise SlurmError(f"slurmctld exited with {self._ctld.returncode}\n"
                                 f"{_tail(self.log_dir / 'slurmctld.stdout')}{_tail(self.controller_log)}")
            return "is UP" in self.run("scontrol", "ping", check=False, timeout=20).stdout

        _wait(answers, 60, "slurmctld to answer `scontrol ping`", 0.3, self.logs)

    def restart_controller(self, down_for: float = 0) -> None:
        """Stops slurmctld, waits down_for seconds, starts it again (state recovered); returns once it answers.
        Jobs keep running meanwhile; ones that end while it is down are reported when it is back."""
        self.stop_controller()
        time.sleep(down_for)
        self.start_controller()

    def stop(self) -> None:
        """Cancels what runs, stops every daemon and process it started (SIGTERM, then SIGKILL), removes the veth
        pair and the socket folder. Safe to call twice, and after a failed start."""
        if not self._started:
            return
        self._started = False
        if self._ctld is not None and self._ctld.poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--partition", self.partition, check=False, timeout=15)
                _wait(lambda: not self.run("squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i", check=False,
                                           timeout=15).stdout.strip(), self.kill_wait + 20, "jobs to end", 0.5)
        for node, process in list(self._slurmd.items()):
            self._terminate(process, f"slurmd {node}")
        self._slurmd.clear()
        self.stop_controller()
        # slurmstepd processes (and the job processes under them) outlive slurmd; find them by the marker in
        # their environment, with their descendants, and kill them.
        self._kill_leftovers()
        if self._munged is not None:
            self._terminate(self._munged, "munged")
            self._munged = None
        self._kill_leftovers()
        if self._veth:
            subprocess.run(["ip", "link", "del", self._veth], capture_output=True, check=False)
            self._veth = None
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)

    # -- the parts

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.folder, preexec_fn=_die_with_parent,
                                    env={**os.environ, **self.env, MARKER: self.marker})

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def _kill_leftovers(self) -> None:
        _kill_trees(lambda marker: marker == self.marker)

    def _start_munge(self) -> None:
        folder = self.folder / "munge"
        folder.chmod(0o700)
        key = folder / "munge.key"
        if not key.exists():
            if shutil.which("mungekey"):
                subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
            else:  # munge < 0.5.14: any 1024 random bytes will do
                key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        log = folder / "munged.log"
        args = ["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'munged.seed'}", f"--log-file={log}"]
        self._munged = self._spawn(args, folder / "munged.stdout")

        def ready() -> bool:
            if self._munged is not None and self._munged.poll() is not None:
                raise SlurmError(f"munged exited with {self._munged.returncode}\n"
                                 f"{_tail(folder / 'munged.stdout')}{_tail(log)}")
            if not self.munge_socket.exists():
                return False
            probe = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True, check=False)
            return probe.returncode == 0

        _wait(ready, 20, "munged", 0.1, lambda: _tail(log))

    def _make_link(self) -> None:
        """A veth pair for dsm2's namespace: this side 10.254.N.1 (slurmctld's and dsm1's address), dsm2 .2.
        Where that cannot be done (no iproute2 or util-linux tools, no CAP_NET_ADMIN), one node, with a warning."""
        if missing := [tool for tool in ("ip", "unshare", "nsenter", "hostname") if not shutil.which(tool)]:
            return self._one_node(f"missing {missing}")
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        for n in [*range(os.getpid() % 200 + 20, 250), *range(20, 250)]:
            if f"10.254.{n}." in used:
                continue
            host, peer = f"dsm{n}h{os.getpid() % 1000}", f"dsm{n}n{os.getpid() % 1000}"
            made = subprocess.run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer],
                                  capture_output=True, text=True, check=False)
            if made.returncode != 0:
                if "File exists" in made.stderr:
                    continue
                return self._one_node(f"`ip link add ... type veth` failed: {made.stderr.strip()}")
            self._veth = host
            self._peer = peer
            self.controller_addr = f"10.254.{n}.1"
            self.node_addr = {"dsm1": self.controller_addr, "dsm2": f"10.254.{n}.2"}
            for cmd in (["ip", "addr", "add", f"{self.controller_addr}/24", "dev", host],
                        ["ip", "link", "set", host, "up"]):
                subprocess.run(cmd, check=True, capture_output=True)
            return
        return self._one_node("no free 10.254.N.0/24 for the second node's link")

    def _one_node(self, why: str) -> None:
        warnings.warn(f"Slurm test cluster: one node only, no second slurmd in a namespace of its own: {why}",
                      stacklevel=3)
        self.nodes = self.nodes[:1]

    def _start_slurmd(self, node: str) -> None:
        (self.folder / "spool" / node).mkdir(parents=True, exist_ok=True)
        slurmd = ["slurmd", "-D", "-N", node, "-f", str(self.conf)]
        stdout = self.log_dir / f"slurmd-{node}.stdout"
        if node == "dsm1":
            process = self._spawn(slurmd, stdout)
        else:
            # Its own hostname and network: the shell waits until its end of the veth pair is in place and up.
            ready = self.folder / f"{node}.link-ready"
            ready.unlink(missing_ok=True)
            script = (f"i=0; while [ ! -e {shlex.quote(str(ready))} ]; do i=$((i+1)); [ $i -gt 300 ] && exit 99; "
                      f"sleep 0.1; done; hostname {node} && exec {shlex.join(slurmd)}")
            process = self._spawn(["unshare", "--uts", "--net", "sh", "-c", script], stdout)
            ns = ["nsenter", "-t", str(process.pid), "-n"]
            try:
                _wait(lambda: Path(f"/proc/{process.pid}/ns/net").exists()
                      and os.readlink(f"/proc/{process.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
                      10, f"{node}'s network namespace", 0.05)
                for cmd in (["ip", "link", "set", self._peer, "netns", str(process.pid)],
                            [*ns, "ip", "addr", "add", f"{self.node_addr[node]}/24", "dev", self._peer],
                            [*ns, "ip", "link", "set", self._peer, "up"],
                            [*ns, "ip", "link", "set", "lo", "up"]):
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise SlurmError(f"{shlex.join(cmd)} failed: {done.stderr}")
                ready.touch()
            except BaseException:
                self._terminate(process, f"slurmd {node}")
                raise
        self._slurmd[node] = process
        time.sleep(0.2)
        if process.poll() is not None:
            raise SlurmError(f"slurmd {node} exited with {process.returncode}\n{_tail(stdout)}"
                             f"{_tail(self.slurmd_log(node))}")

    def _write_config(self) -> None:
        f = self.folder
        lines = [
            "# Written by tests/slurm_cluster.py for a private test cluster; everything under this folder.",
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.hostname}({self.controller_addr})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}/%n",
            f"SlurmctldPidFile={f / 'state' / 'slurmctld.pid'}",
            f"SlurmdPidFile={f / 'spool'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.controller_log}",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            f"PlugStackConfig={f / 'plugstack.conf'}",
            # No cgroups: linuxproc tracks a job's processes by parentage; nothing is confined.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            # No slurmdbd, so no sacct; finished jobs stay in squeue/scontrol for MinJobAge seconds, and each
            # one that ends gets a line in the jobcomp file.
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp_log}",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=5,bf_interval=5",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=256",
            "GresTypes=gpu",
            "ReturnToService=2",
            # The node definitions below (CPUs, memory) are taken as they are, not checked against the machine.
            "SlurmdParameters=config_overrides",
            "SlurmctldTimeout=10",
            "SlurmdTimeout=30",
            "MessageTimeout=10",
            "TCPTimeout=5",
            "InactiveLimit=0",
            f"KillWait={self.kill_wait}",
            f"MinJobAge={self.min_job_age}",
            "OverTimeLimit=0",
            "Waittime=0",
            "HealthCheckInterval=0",
        ]
        gres = []
        for node in self.nodes:
            hostname = self.hostname if node == "dsm1" else node
            gpu = f" Gres=gpu:{self.gpus[node]}" if self.gpus[node] else ""
            lines.append(f"NodeName={node} NodeHostname={hostname} NodeAddr={self.node_addr[node]} CPUs={self.cpus} "
                         f"Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={self.memory_mb}{gpu} "
                         "State=UNKNOWN")
            if self.gpus[node]:
                devices = []
                for i in range(self.gpus[node]):
                    device = f / "dev" / f"{node}-nvidia{i}"
                    if not device.is_char_device():
                        device.unlink(missing_ok=True)
                        os.mknod(device, 0o600 | 0o020000, os.makedev(NVIDIA_MAJOR, i))
                    devices.append(str(device))
                gres.append(f"NodeName={node} Name=gpu File={','.join(devices)}")
        lines.append(f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        lines.extend(self.extra_conf)
        self.conf.write_text("\n".join(lines) + "\n")
        (f / "gres.conf").write_text("\n".join(gres) + "\n")
        (f / "plugstack.conf").write_text("")


if __name__ == "__main__":  # a cluster to play with: python tests/slurm_cluster.py [FOLDER]
    import tempfile

    install_slurm()
    with SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="dsm-slurm-"))) as cluster:
        print(f"export SLURM_CONF={cluster.conf}   # nodes {cluster.nodes}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
