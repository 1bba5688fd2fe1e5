"""The Slurm backend: each run is a Slurm batch job that runs the container on the node Slurm picks.

Submitted with Slurm's own command-line tools (`sbatch --parsable`, `squeue`, `scancel`, `scontrol ping`):
they are on every Slurm installation, need no extra daemon (slurmrestd is optional and often absent) and
speak to the controller with the munge credentials the server's host already has. A run is named for the
server's instance and the job (`dsm-<instance>-<job>[-<step>]`), so that a restarted server finds its own
runs and two servers never touch each other's.

The batch script runs the same container as the Docker backend would (image, argv, mounts, user,
environment, the GPUs Slurm allocated) through the node's container engine, and writes its outcome (exit
code, stdout, stderr) into the run's folder under SLURM_SPOOL_PATH, which every node must see: a job that
Slurm has already forgotten (there is no accounting database) still ends with its real result. `scancel`,
a Slurm time limit and this server's own stop all reach the script as SIGTERM, which stops the container.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pwd
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..config import Config
from ..errors import RuntimeUnavailable
from .base import (
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_STEP,
    CapturedLog,
    ContainerEvent,
    ContainerSpec,
    ContainerState,
    Launched,
    StartFailed,
)

log = logging.getLogger(__name__)

COMMAND_SECONDS = 30.0
QUEUE_SECONDS = 0.5
NODE_CANNOT_SEE = 200  # the exit code a script uses when the node lacks a folder the job needs
# How long a run that Slurm says has ended may show no outcome before it counts as dead: a shared file system
# (NFS) may show a file a node wrote that late, having cached that it was not there (acdirmax: 60 s).
OUTCOME_GRACE_SECONDS = 60.0
_ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
          "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
_WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED"}


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _fits_env_file(key: str, value: str) -> bool:
    """Whether Docker's (and Podman's) --env-file reads KEY=value back as it was given."""
    return bool(_ENV_NAME.fullmatch(key)) and "\n" not in value and "\r" not in value and "\x00" not in value


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _account() -> str:
    """The user this server submits as (its Slurm jobs are that user's)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no name for this uid (a container's): Slurm takes the number too
        return str(os.getuid())


def _labels(name: str) -> dict[str, str]:
    """The labels a Docker container would carry, read back from the run's name."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] != "dsm":
        return {}
    labels = {LABEL_INSTANCE: parts[1], LABEL_JOB: parts[2]}
    if len(parts) > 3:
        labels[LABEL_STEP] = parts[3]
    return labels


class SpoolLogStream:
    """A run's output files as they grow; close() (from any thread) ends the wait for more at once."""

    def __init__(self, chunks: Iterator[bytes], stop: threading.Event) -> None:
        self._chunks = chunks
        self._stop = stop

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        self._stop.set()


class SlurmBackend:
    name = "slurm"
    engine = "Slurm cluster"
    places_gpus = True

    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = config.slurm_spool_folder
        self.container_engine = config.slurm_container_engine
        self.grace = config.stop_grace_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, tuple[str, str, str]]] | None = None
        self._submitted: dict[str, float] = {}  # run -> when this process submitted it
        self._no_outcome: dict[str, float] = {}  # run -> when it was first seen ended without an outcome

    # -- talking to Slurm

    def _run(self, *command: str, check: bool = True) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_SECONDS, check=False)
        except FileNotFoundError:
            raise RuntimeUnavailable(f"{command[0]} is not installed on this server (Slurm's client tools)") from None
        except subprocess.TimeoutExpired:
            raise RuntimeUnavailable(f"{command[0]} did not answer within {COMMAND_SECONDS:g} s") from None
        if check and done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            lowered = text.lower()
            if any(word in lowered for word in ("unable to contact", "connection refused", "timed out",
                                                "communication", "slurm_load", "socket timed", "zero bytes")):
                raise RuntimeUnavailable(f"the Slurm controller is not reachable: {text[:300]}")
            raise StartFailed(f"{command[0]} failed: {text[:500]}")
        return done.stdout

    def ping(self) -> None:
        output = self._run("scontrol", "ping", check=False)
        if " is UP" not in output:
            raise RuntimeUnavailable(f"the Slurm controller is not reachable: {output.strip() or 'no answer'}")

    def _queue(self, *, fresh: bool = False) -> dict[str, tuple[str, str, str]]:
        """Runs that Slurm knows: name -> (Slurm job id, state, start time). One `squeue` serves every question
        asked within QUEUE_SECONDS (the scheduler asks several per job), except where a stale answer could
        submit a job twice."""
        with self._lock:
            if not fresh and self._cached and time.monotonic() - self._cached[0] < QUEUE_SECONDS:
                return self._cached[1]
        asked = time.monotonic()  # what the answer can know of: a job submitted after this is not in it
        # only this account's jobs: any user can name a job dsm-<instance>-<id>, and must never have it taken for
        # ours (nor have it cancelled, where this account is a Slurm operator)
        output = self._run("squeue", "--noheader", "--all", "--states=all", f"--user={_account()}",
                           "--format=%j|%i|%T|%S")
        found: dict[str, tuple[str, str, str]] = {}
        for line in output.splitlines():
            name, _, rest = line.strip().partition("|")
            job_id, state, started = [*rest.split("|"), "", "", ""][:3]
            if name.startswith("dsm-"):
                found[name] = (job_id, state, started)
        with self._lock:
            self._cached = (asked, found)
        return found

    # -- one run's folder

    def _folder(self, name: str) -> Path:
        return self.spool / name

    def _read(self, name: str, file: str) -> str | None:
        try:
            return (self._folder(name) / file).read_text().strip()
        except OSError:
            return None

    # -- the interface

    def launch(self, spec: ContainerSpec) -> Launched:
        folder = self._folder(spec.name)
        queued = self._queue(fresh=True).get(spec.name)
        if queued is not None or self._read(spec.name, "exit_code") is not None:
            return Launched(spec.name, self._started(spec.name))  # submitted before a crash: never twice
        script = folder / "job.sh"
        # Never requeued (a run must not happen twice), and none of this server's environment (its DOCKER_HOST,
        # CUDA_VISIBLE_DEVICES, ...) leaks into the job: the script says all the container gets.
        command = ["sbatch", "--parsable", f"--job-name={spec.name}", f"--chdir={folder}", "--output=/dev/null",
                   "--error=slurm.err", "--no-requeue", "--export=NONE",
                   f"--signal=B:TERM@{max(int(self.grace), 5)}"]
        if self.config.slurm_partition:
            command.append(f"--partition={self.config.slurm_partition}")
        if self.config.slurm_account:
            command.append(f"--account={self.config.slurm_account}")
        if spec.gpus:
            command.append(f"--gres=gpu:{spec.gpus}")
        if spec.cpus:
            command.append(f"--cpus-per-task={math.ceil(spec.cpus)}")
        if spec.mem_limit:
            command.append(f"--mem={math.ceil(spec.mem_limit / 1024**2)}M")
        if spec.timeout:
            # Slurm counts minutes; ours stops the run on time too, so Slurm's limit is a little later.
            command.append(f"--time={math.ceil(spec.timeout / 60) + 1}")
        command += [*self.config.slurm_extra_args, str(script)]
        with self._lock:  # until sbatch answers, its folder must read as waiting, not as a run Slurm forgot
            self._submitted[spec.name] = math.inf
        try:
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)  # the spool is shared storage: a run's environment and output are its own
            _write_private(folder / "env", "".join(f"{k}={v}\n" for k, v in spec.environment.items()
                                                   if _fits_env_file(k, v)))
            script.write_text(self._script(spec))
            job_id = self._run(*command).strip().split(";")[0]
            (folder / "jobid").write_text(job_id + "\n")
        except BaseException:
            with self._lock:
                self._submitted.pop(spec.name, None)
            raise
        with self._lock:
            self._submitted[spec.name] = time.monotonic()
            self._cached = None
        log.info("%s submitted to Slurm as job %s", spec.name, job_id)
        return Launched(spec.name, None)

    def _script(self, spec: ContainerSpec) -> str:
        q = shlex.quote
        engine = self.container_engine
        args = ["run", "--rm", "--init", "--name", spec.name, "--network", spec.network]
        for key, value in spec.labels.items():
            args += ["--label", f"{key}={value}"]
        for mount in spec.mounts:
            args += ["-v", f"{mount.host}:{mount.container}" + (":ro" if mount.read_only else "")]
        # Values go in a file only the account reads (a command line is every node user's to see in `ps`);
        # the few that such a file cannot hold (a line break, a name Docker would refuse there) on the line.
        args += ["--env-file", str(self._folder(spec.name) / "env")]
        for key, value in spec.environment.items():
            if not _fits_env_file(key, value):
                args += ["-e", f"{key}={value}"]
        if not spec.gpus and "NVIDIA_VISIBLE_DEVICES" not in spec.environment:
            # a node's cards are other users' too: a CUDA image's own NVIDIA_VISIBLE_DEVICES=all would see them
            args += ["-e", "NVIDIA_VISIBLE_DEVICES=void"]
        if spec.user:
            args += ["--user", spec.user]
        if spec.workdir:
            args += ["--workdir", spec.workdir]
        if spec.shm_size:
            args += ["--shm-size", str(spec.shm_size)]
        if spec.mem_limit:
            args += ["--memory", str(spec.mem_limit)]
        if spec.cpus:
            args += ["--cpus", f"{spec.cpus:g}"]
        entry_args: list[str] = []
        if spec.entrypoint:
            args += ["--entrypoint", spec.entrypoint[0]]
            entry_args = spec.entrypoint[1:]
        tail = [spec.image, *entry_args, *spec.argv]
        gpu_flag = ('gpu=(-e "NVIDIA_VISIBLE_DEVICES=$SLURM_JOB_GPUS")' if self.config.gpu_device_mode == "environment"
                    else 'gpu=(--gpus "\\"device=$SLURM_JOB_GPUS\\"")')
        checks = "\n".join(  # the path quoted for the shell in the message too: a path is text, never code
            f'[ -e {q(m.host)} ] || fail "node $(hostname) cannot see "{q(m.host)}": the folders a job uses (the'
            ' data folders, TES_WORK_PATH, service volumes) must be on storage every Slurm node mounts at the same'
            ' path"'
            for m in spec.mounts)
        return f"""#!/bin/bash
# {spec.name}: one container run by the DMI Service Manager on this node. Its outcome is written here.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 077
finish() {{ echo "$1" > exit_code.tmp && mv -f exit_code.tmp exit_code; exit 0; }}
fail() {{ echo "$1" >> stderr; finish {NODE_CANNOT_SEE}; }}
date +%s.%N > started
{checks}
gpu=()
if [ {spec.gpus} -gt 0 ]; then
  [ -n "${{SLURM_JOB_GPUS:-}}" ] || fail "Slurm gave this job no GPU ids on node $(hostname) (SLURM_JOB_GPUS is\
 empty): its gres.conf must name each card's device (File=/dev/nvidia0 ...)"
  {gpu_flag}
fi
stop() {{ {engine} stop -t {int(self.grace)} {q(spec.name)} >/dev/null 2>&1; }}
trap stop TERM INT
{engine} {" ".join(q(a) for a in args)} "${{gpu[@]}}" {" ".join(q(a) for a in tail)} > stdout 2> stderr &
child=$!
while :; do wait "$child"; code=$?; kill -0 "$child" 2>/dev/null || break; done
finish "$code"
"""

    def _started(self, name: str) -> float | None:
        text = self._read(name, "started")
        try:
            return float(text) if text else None
        except ValueError:
            return None

    def inspect(self, run_id: str) -> ContainerState | None:
        return self._state(run_id, self._queue())

    def _state(self, name: str, queue: dict[str, tuple[str, str, str]]) -> ContainerState | None:
        folder = self._folder(name)
        code_text = self._read(name, "exit_code")
        queued = queue.get(name)
        job_id = queued[0] if queued else (self._read(name, "jobid") or "")
        if code_text is not None:
            try:
                code: int | None = int(code_text)
            except ValueError:
                code = None
            finished = (folder / "exit_code").stat().st_mtime if (folder / "exit_code").exists() else None
            status, error = "exited", ""
        elif queued is not None and queued[1] not in _ENDED:
            status = "waiting" if queued[1] in _WAITING else "running"
            code, finished, error = None, None, ""
        elif queued is None and self._newer_than_queue(name):
            status, code, finished, error = "waiting", None, None, ""  # submitted after that squeue answered
        elif queued is not None or folder.is_dir():
            if self._outcome_may_still_show(name):
                status, code, finished, error = "running", None, None, ""
            else:  # Slurm ended (or forgot) it before its script wrote an outcome: killed hard, or the node failed
                state = queued[1] if queued else "no longer known to Slurm"
                slurm_err = (self._read(name, "slurm.err") or "")[-500:]
                status, code, finished = "dead", None, time.time()
                error = (f"the Slurm job {job_id} ended ({state}) without writing its outcome into {folder} (a node"
                         f" that cannot see SLURM_SPOOL_PATH cannot even start the job there). {slurm_err}").strip()
        else:
            return None
        return ContainerState(id=name, name=name, labels=_labels(name), status=status, exit_code=code,
                              started_at=self._started(name), finished_at=finished, image_id="", error=error)

    def _outcome_may_still_show(self, name: str) -> bool:
        """Whether a run that ended without a visible outcome is still within OUTCOME_GRACE_SECONDS of when
        that was first seen. Listing its folder makes an NFS client read the folder again."""
        with self._lock:
            first = self._no_outcome.setdefault(name, time.monotonic())
        with contextlib.suppress(OSError):
            os.listdir(self._folder(name))
        return time.monotonic() - first < OUTCOME_GRACE_SECONDS

    def _newer_than_queue(self, name: str) -> bool:
        with self._lock:
            submitted = self._submitted.get(name)
            asked = self._cached[0] if self._cached else None
        return submitted is not None and (asked is None or asked < submitted)

    def stop(self, run_id: str, grace: float) -> None:
        job_id = self._job_id(run_id)
        if job_id:
            self._run("scancel", "--batch", "--signal=TERM", job_id, check=False)  # the script stops the container
            deadline = time.monotonic() + grace + 15
            while time.monotonic() < deadline and self._read(run_id, "exit_code") is None:
                queued = self._queue(fresh=True).get(run_id)
                if queued is None or queued[1] in _WAITING or queued[1] in _ENDED:
                    break
                time.sleep(0.5)
            self._run("scancel", job_id, check=False)  # whatever is left of it, and a job still waiting

    def _job_id(self, name: str) -> str | None:
        queued = self._queue().get(name)
        return queued[0] if queued else self._read(name, "jobid")

    def remove(self, run_id: str) -> None:
        queued = self._queue().get(run_id)
        if queued is not None and queued[1] not in _ENDED:
            self._run("scancel", queued[0], check=False)
        shutil.rmtree(self._folder(run_id), ignore_errors=True)
        with self._lock:
            self._no_outcome.pop(run_id, None)

    def outputs(self, run_id: str, limit: int) -> tuple[CapturedLog, CapturedLog]:
        return self._output(run_id, "stdout", limit), self._output(run_id, "stderr", limit)

    def _output(self, run_id: str, stream: str, limit: int) -> CapturedLog:
        path = self._folder(run_id) / stream
        try:
            with path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                handle.seek(max(size - limit, 0))
                data = handle.read(limit)
        except OSError:
            return CapturedLog(text="", truncated=False, total_bytes=0)
        return CapturedLog(text=data.decode("utf-8", "replace"), truncated=size > limit, total_bytes=size)

    def follow_logs(self, run_id: str, tail: int | None, follow: bool) -> SpoolLogStream:
        return SpoolLogStream(self._chunks(run_id, tail, follow, stop := threading.Event()), stop)

    def _chunks(self, run_id: str, tail: int | None, follow: bool, stop: threading.Event) -> Iterator[bytes]:
        """Both streams' files as they grow (lines of the two may interleave coarsely)."""
        folder = self._folder(run_id)
        offsets = {"stdout": 0, "stderr": 0}
        if tail is not None:
            for stream in offsets:
                with contextlib.suppress(OSError):
                    data = (folder / stream).read_bytes()
                    offsets[stream] = len(data) - len(b"\n".join(data.splitlines()[-tail:])) if tail else len(data)
        while True:
            done = (folder / "exit_code").exists()
            for stream, offset in offsets.items():
                with contextlib.suppress(OSError), (folder / stream).open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read(1024 * 1024)
                    if data:
                        offsets[stream] += len(data)
                        yield data
            if not follow or done or not folder.is_dir() or stop.wait(0.5):
                return

    def labelled(self, labels: dict[str, str]) -> list[ContainerState]:
        prefix = f"dsm-{labels.get(LABEL_INSTANCE, '')}-"
        queue = self._queue()
        names = {n for n in queue if n.startswith(prefix)}
        if self.spool.is_dir():
            names |= {p.name for p in self.spool.iterdir() if p.name.startswith(prefix)}
        states = [self._state(name, queue) for name in sorted(names)]
        return [s for s in states if s is not None]

    def running_of_images(self, images: list[str], unless: dict[str, str]) -> list[ContainerState]:
        return []  # Slurm accounts for every GPU it hands out; nothing runs there behind its back

    def events(self, labels: dict[str, str]) -> SlurmEventStream:
        self.ping()
        return SlurmEventStream(self, labels, self.config.slurm_poll_seconds)

    def image_id(self, image: str) -> str | None:
        return f"{image} (on the Slurm nodes)"  # the nodes' engines hold the images; this server cannot tell

    def gpu_problem(self) -> str | None:
        return None  # Slurm allocates the cards (GRES); the nodes' engine hands them to the container

    def most_cpus(self) -> float | None:
        return None  # the partition's nodes may differ and change; sbatch says when none can


class SlurmEventStream:
    """The end of each run, found by asking Slurm and the runs' folders every few seconds."""

    def __init__(self, backend: SlurmBackend, labels: dict[str, str], every: float) -> None:
        self.backend = backend
        self.labels = labels
        self.every = every
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[ContainerEvent]:
        ended = {s.id for s in self.backend.labelled(self.labels) if s.ended}  # the reconcile pass has these
        while not self._closed.wait(self.every):
            for state in self.backend.labelled(self.labels):
                if state.ended and state.id not in ended:
                    ended.add(state.id)
                    yield ContainerEvent(container_id=state.id, action="die", labels=state.labels)
            ended &= {p.name for p in self.backend.spool.iterdir()} if self.backend.spool.is_dir() else set()

    def close(self) -> None:
        self._closed.set()
