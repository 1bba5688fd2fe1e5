"""The TES workload: a task's executors run in order, one container each, in one work area.

Before the first executor (INITIALIZING) the work area is made and the inputs are staged; after the
last, the outputs are copied out. What happened is kept in the job's `task_log`, written with each
step, so a restart of this server resumes at the right executor with the log of those before it.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shlex
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..config import Config
from ..errors import DsmError
from ..jobs.launch import stop_failure
from ..jobs.model import Failure, Job, JobStatus, error_results
from ..jobs.workload import CannotRun, Ended, KeepGoing, NextStep, StepExit, exit_failure
from ..runtime.base import LABEL_INSTANCE, LABEL_JOB, LABEL_STEP, ContainerSpec, Mount, StartFailed
from .images import image_allowed
from .patterns import has_wildcard, path_matches
from .schema import Input, Output, Task
from .transfer import (
    Cancelled,
    FileRoots,
    HttpPolicy,
    TransferFailed,
    copy_in,
    copy_out,
    scheme_of,
    write_file,
)
from .workarea import WorkArea, remove_area, wildcard_base

log = logging.getLogger(__name__)

HELPER_DIR = "/.dsm"
_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
# Runs an executor's argv with its redirections. The command is found on the image's PATH by hand,
# because a static busybox shell would otherwise prefer its own applet of the same name.
_REDIRECT = (
    'p="$1"; shift; case "$p" in */*) ;; *) IFS=:; f=""; for d in ${PATH:-/usr/local/sbin:/usr/local/bin:'
    '/usr/sbin:/usr/bin:/sbin:/bin}; do if [ -f "$d/$p" ] && [ -x "$d/$p" ]; then f="$d/$p"; break; fi; done;'
    ' unset IFS; [ -n "$f" ] || { echo "$p: command not found" >&2; exit 127; }; p="$f";; esac; exec "$p" "$@"'
)


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_static_elf(path: str) -> bool:
    """Whether a binary runs in any image: an ELF file without a program interpreter."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
                return False
            order: Literal["little", "big"] = "little" if head[5] == 1 else "big"
            offset, size, count = (int.from_bytes(head[0x20:0x28], order), int.from_bytes(head[0x36:0x38], order),
                                   int.from_bytes(head[0x38:0x3A], order))
            handle.seek(offset)
            table = handle.read(size * count)
    except OSError:
        return False
    return all(int.from_bytes(table[i * size:i * size + 4], order) != 3 for i in range(count))  # 3: PT_INTERP


def static_busybox() -> str | None:
    return next((p for p in _BUSYBOX_CANDIDATES if os.path.isfile(p) and _is_static_elf(p)), None)


class TesWorkload:
    def __init__(self, config: Config, instance_id: str) -> None:
        self.config = config
        self.instance_id = instance_id
        self.roots = FileRoots(config.tes_file_roots)
        self.http = HttpPolicy.of(config.tes_http_allowed_networks, config.tes_http_max_bytes,
                                  config.tes_http_timeout)

    def _root(self, job_id: int) -> Path:
        return self.config.tes_work_folder / str(job_id)

    def area(self, job: Job, task: Task | None = None) -> WorkArea:
        return WorkArea.of(task or Task.model_validate(job.task), self._root(job.id))

    def cleanup(self, job: Job) -> None:
        """The work area goes only once the task's end is on record: a crash before that leaves the next
        server the same files to read the end from again (its outputs are copied again, whole)."""
        remove_area(self._root(job.id))

    def sweep(self, active: set[int]) -> None:
        """Work areas of tasks that ended, where a crash came between the record of the end and the clean-up."""
        try:
            entries = list(self.config.tes_work_folder.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name.isdigit() and int(entry.name) not in active:
                try:
                    remove_area(entry)
                except OSError as exc:  # one area the server may not remove keeps none of the others
                    log.warning("could not remove the work area %s of an ended task: %s", entry, exc)

    # -- before the first executor

    def prepare(self, job: Job, keep_going: KeepGoing) -> None:
        task = Task.model_validate(job.task)
        for index, wanted in enumerate(task.outputs):
            if scheme_of(wanted.url) != "file":
                raise CannotRun(f"outputs[{index}].url: this server cannot store outputs at"
                                f" {scheme_of(wanted.url)}:// URLs; it serves file:// below TES_FILE_ROOTS",
                                Failure.OUTPUT)
        area = self.area(job, task)
        if task.resources and task.resources.disk_gb:
            self.config.tes_work_folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.config.tes_work_folder).free
            if free < task.resources.disk_gb * 1e9:
                raise CannotRun(f"resources.disk_gb asks for {task.resources.disk_gb:g} GB and the work area has"
                                f" {free / 1e9:.1f} GB free", Failure.INPUT)
        try:
            area.create()
            for index, item in enumerate(task.inputs):
                self._stage(index, item, area, keep_going)
        except Cancelled:  # the start that follows ends it as cancelled, with the canceller's words
            log.info("task %s (job %s): staging its inputs stopped, as it was cancelled", job.task_id, job.id)
            return
        except TransferFailed as exc:
            raise CannotRun(str(exc), Failure.INPUT) from None
        except OSError as exc:
            raise CannotRun(f"staging inputs failed: {exc}", Failure.INPUT) from None
        log.info("task %s (job %s): %d input(s) staged", job.task_id, job.id, len(task.inputs))

    def _stage(self, index: int, item: Input, area: WorkArea, keep_going: KeepGoing) -> None:
        target = area.input_target(item.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        field = f"inputs[{index}]"
        if item.literal or not item.url:
            write_file(target, [(item.content or "").encode("utf-8")])
            return
        url = item.url
        scheme = scheme_of(url)
        if scheme == "file":
            try:
                source = self.roots.locate(url, f"{field}.url", folder=item.type == "DIRECTORY")
            except DsmError as exc:
                raise TransferFailed(exc.message) from None
            copy_in(source, item.type == "DIRECTORY", target, keep_going)
        elif scheme in ("http", "https"):
            if item.type == "DIRECTORY":
                raise TransferFailed(f"{field}: a DIRECTORY input cannot come from an {scheme}:// URL")
            self.http.fetch(url, target, keep_going)
        else:
            raise TransferFailed(f"{field}.url: this server cannot fetch {scheme}:// URLs; it serves file://"
                                 " (below TES_FILE_ROOTS), http:// and https://")

    # -- each executor

    def spec(self, job: Job, gpu_ids: list[str]) -> ContainerSpec:
        task = Task.model_validate(job.task)
        executor = task.executors[job.step]
        if not image_allowed(executor.image, self.config.tes_allowed_images):
            raise StartFailed(f"executors[{job.step}].image {executor.image!r} is no longer in TES_ALLOWED_IMAGES")
        area = self.area(job, task)
        mounts = area.mounts()
        entrypoint = list(executor.command)
        redirects = [(symbol, path) for symbol, path in (("<", executor.stdin), (">", executor.stdout),
                                                         ("2>", executor.stderr)) if path]
        if redirects:
            busybox = static_busybox()
            if busybox is None:
                raise StartFailed("this executor redirects stdin, stdout or stderr, which needs a static busybox on"
                                  " the server (apt-get install busybox-static)")
            mounts.append(Mount(host=busybox, container=f"{HELPER_DIR}/busybox", read_only=True))
            script = _REDIRECT + "".join(f" {symbol} {shlex.quote(path)}" for symbol, path in redirects)
            entrypoint = [f"{HELPER_DIR}/busybox", "sh", "-c", script, "tes-executor", *executor.command]
        return ContainerSpec(
            name=f"dsm-{self.instance_id}-{job.id}-{job.step}",
            image=executor.image,
            argv=[],
            entrypoint=entrypoint,
            labels={LABEL_INSTANCE: self.instance_id, LABEL_JOB: str(job.id), LABEL_STEP: str(job.step)},
            mounts=mounts,
            network="bridge",  # never the host's network: a task is the client's code
            environment=_environment(executor.env, gpu_ids, engine_places=bool(job.gpus) and not gpu_ids),
            gpu_ids=gpu_ids,
            gpus=job.gpus if self.config.gpu_enabled else 0,
            timeout=job.timeout,
            mem_limit=job.mem_limit,
            cpus=job.cpus,
            workdir=executor.workdir,
        )

    def step_ended(self, job: Job, exit: StepExit) -> Ended | NextStep:
        task = Task.model_validate(job.task)
        executor = task.executors[job.step]
        state = exit.state
        code = state.exit_code if state.exit_code is not None else -1
        task_log = _started(job)
        # Docker may stamp a very short run's start a moment after its end; a log never says so.
        ended = max(state.finished_at, state.started_at) if state.finished_at and state.started_at \
            else state.finished_at
        task_log.setdefault("logs", []).append({
            "start_time": rfc3339(state.started_at),
            "end_time": rfc3339(ended),
            "exit_code": code,
            "stdout": exit.stdout.text,
            "stderr": exit.stderr.text,
        })
        if job.stop_reason:
            return self._ended(job, task_log, job.stop_detail or "The task was stopped.", stop_failure(job))
        if state.exit_code is None:  # the engine lost the run: ours to report, not the executor's
            why = f"executor {job.step} ({executor.image}) was lost by the engine"
            return self._ended(job, task_log, why + (f": {state.error}" if state.error else ""), Failure.ENGINE)
        if code != 0 and not executor.ignore_error:
            why = f"executor {job.step} ({executor.image}) exited with code {code}"
            if state.oom_killed:
                why += "; it was killed for using more memory than resources.ram_gb allows"
            elif state.error:  # it never ran: its command is not in the image
                why += f": {state.error}"
            if exit.engine_outage:
                return self._ended(job, task_log, f"{why} while the {exit.engine_outage} restarted", Failure.ENGINE)
            return self._ended(job, task_log, why, exit_failure(state, exit.stderr),
                               returncode=code, stderr=exit.stderr.text)
        if job.step + 1 < len(task.executors):
            return NextStep(step=job.step + 1, task_log=task_log)
        try:
            area = self.area(job, task)
            task_log["outputs"] = self._collect(task, area)
        except TransferFailed as exc:
            return self._ended(job, task_log, f"copying the outputs failed: {exc}", Failure.OUTPUT)
        task_log["end_time"] = rfc3339(ended)
        return Ended(status=JobStatus.COMPLETE, results={"returncode": 0, "error": exit.stderr.text,
                                                         "report": exit.stdout.text}, task_log=task_log)

    def failed(self, job: Job, message: str, failure: Failure) -> Ended:
        return self._ended(job, _started(job), message, failure)

    def _ended(self, job: Job, task_log: dict[str, Any], why: str, failure: Failure, *, returncode: int = 1,
               stderr: str = "") -> Ended:
        task_log.setdefault("system_logs", []).append(why)
        task_log["end_time"] = rfc3339(datetime.now(UTC).timestamp())
        return Ended(status=JobStatus.ERROR, failure=failure, task_log=task_log,
                     results=error_results(why + (f"\n{stderr}" if stderr else ""), returncode=returncode))

    # -- after the last executor

    def _collect(self, task: Task, area: WorkArea) -> list[dict[str, str]]:
        copied: list[dict[str, str]] = []
        for index, output in enumerate(task.outputs):
            try:
                copied += self._collect_one(output, area)
            except DsmError as exc:
                raise TransferFailed(f"outputs[{index}] ({output.path}): {exc.message}") from None
            except ValueError as exc:
                raise TransferFailed(f"outputs[{index}] ({output.path}): {exc}") from None
        return copied

    def _collect_one(self, output: Output, area: WorkArea) -> list[dict[str, str]]:
        if has_wildcard(output.path):
            base = wildcard_base(output.path)
            prefix = (output.path_prefix or "").rstrip("/")
            matches = [p for p in _files_below(area, base) if path_matches(output.path, p)]
            return [self._copy(area, path, output.url.rstrip("/") + "/" + (path[len(prefix):].lstrip("/")
                                                                            or posixpath.basename(path)))
                    for path in sorted(matches)]
        if output.type == "DIRECTORY":
            return [self._copy(area, path, output.url.rstrip("/") + "/" + path[len(output.path):].lstrip("/"))
                    for path in sorted(_files_below(area, output.path))]
        return [self._copy(area, output.path, output.url)]

    def _copy(self, area: WorkArea, path: str, url: str) -> dict[str, str]:
        storage, parts = area.reader(path)
        if not parts:
            raise TransferFailed(f"{path} is a folder; declare the output as a DIRECTORY")
        size = copy_out(storage, parts, self.roots.locate(url, "output url"))
        return {"url": url, "path": path, "size_bytes": str(size)}


def _environment(env: dict[str, str], gpu_ids: list[str], *, engine_places: bool) -> dict[str, str]:
    """The executor's variables, less any that would choose GPUs: a task sees only the cards it was given
    (those this server placed it on, or those the engine allocates when it places GPUs itself)."""
    chosen = {k: v for k, v in env.items() if not k.upper().startswith("NVIDIA_")}
    if not engine_places:
        chosen["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu_ids) if gpu_ids else "void"
    return chosen


def _started(job: Job) -> dict[str, Any]:
    task_log = dict(job.task_log)
    # the task began when it was taken from the queue (its inputs are staged before any executor starts)
    began = [t for t in (job.claimed_at, job.started_at) if t is not None]
    task_log.setdefault("start_time", rfc3339(min(began)) if began else None)
    task_log.setdefault("metadata", {"host": socket.gethostname(), "job_id": str(job.id)})
    return task_log


def _files_below(area: WorkArea, folder: str) -> list[str]:
    """Container paths of the files below `folder`, read from the area without following links."""
    storage, parts = area.reader(folder)
    try:
        tree = storage.list_tree(parts) if parts else storage.list_tree(())
    except DsmError:
        return []
    top = folder.rstrip("/")
    return [f"{top}/{name}" if sub == "." else f"{top}/{sub}/{name}" for sub, names in tree.items() for name in names]



