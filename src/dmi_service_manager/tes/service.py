"""What the TES routes may ask: service-info, create, get, list and cancel tasks.

A task is a job of kind `tes` in the same store and queue as 4CAT's jobs; this module translates
between the TES shapes and the job service. A task that is refused is never stored.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..config import Config, parse_size
from ..errors import BadRequest, GpuUnavailable, NotFound, RuntimeUnavailable
from ..jobs.model import Job, Kind
from ..jobs.service import JobService
from ..jobs.store import NewJob, Store, TaskFilter
from .images import image_allowed
from .patterns import has_wildcard
from .schema import Task, parse_task
from .states import STATES, state_of
from .transfer import OUTPUT_SCHEMES, FileRoots, HttpPolicy, check_syntax, scheme_of
from .workload import rfc3339

log = logging.getLogger(__name__)

BACKEND_PARAMETERS = ("gpus", "gpu_memory", "timeout")
DEFAULT_PAGE_SIZE = 256
MAX_PAGE_SIZE = 2047  # the spec: "must be less than 2048"
VIEWS = ("MINIMAL", "BASIC", "FULL")
_SECONDS = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?")  # ASCII digits: float() would take 1_0 or inf


def _package_version() -> str:
    try:
        return version("dmi-service-manager")
    except PackageNotFoundError:
        return "0"


class TesService:
    def __init__(self, config: Config, jobs: JobService, store: Store, instance_id: str) -> None:
        self.config = config
        self.jobs = jobs
        self.store = store
        self.instance_id = instance_id
        self.roots = FileRoots(config.tes_file_roots)
        self.http = HttpPolicy.of(config.tes_http_allowed_networks, config.tes_http_max_bytes,
                                  config.tes_http_timeout)

    def service_info(self) -> dict[str, Any]:
        return {
            "id": f"net.digitalmethods.service-manager.{self.instance_id}",
            "name": "DMI Service Manager",
            "type": {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"},
            "description": "Runs containers as jobs in one GPU-aware queue shared with 4CAT's jobs.",
            "organization": {"name": "Digital Methods Initiative", "url": "https://digitalmethods.net"},
            "version": _package_version(),
            "storage": [*self.roots.urls(), "http://", "https://"],
            "tesResources_backend_parameters": list(BACKEND_PARAMETERS),
        }

    # -- create

    def create(self, body: Any, who: str) -> str:
        task = self._with_input_types(parse_task(body), body)
        for index, executor in enumerate(task.executors):
            if not image_allowed(executor.image, self.config.tes_allowed_images):
                field = f"executors[{index}].image"
                raise BadRequest(f"{field}: {executor.image!r} is not in this server's TES_ALLOWED_IMAGES",
                                 extra={"field": field})
        for index, item in enumerate(task.inputs):
            if not item.literal and item.url:
                check_syntax(item.url, f"inputs[{index}].url")
                self._check_input(index, item.url, item.type)
        for index, output in enumerate(task.outputs):
            check_syntax(output.url, f"outputs[{index}].url")
            field = f"outputs[{index}].url"
            if (scheme := scheme_of(output.url)) not in OUTPUT_SCHEMES:  # refused now, not after the executors ran
                raise BadRequest(f"{field}: this server cannot store outputs at {scheme}:// URLs; it stores them"
                                 " at file:// URLs below TES_FILE_ROOTS", extra={"field": field})
            directory = output.type == "DIRECTORY" or has_wildcard(output.path)
            self.roots.locate(output.url.rstrip("/") + "/x" if directory else output.url, field)
        parameters, notes = self._backend_parameters(task)
        resources = task.resources
        if resources is not None and resources.cpu_cores:
            self._check_cpus(resources.cpu_cores)
        document = task.model_dump(exclude_none=True)
        if resources is not None:
            document["resources"]["backend_parameters"] = parameters  # unsupported keys are neither kept nor shown
        gpus = int(parameters.get("gpus", "0"))
        if gpus and not self.config.gpu_enabled:
            raise BadRequest("resources.backend_parameters.gpus: this server has no GPUs enabled (GPU_ENABLED)",
                             extra={"field": "resources.backend_parameters.gpus"})
        task_id = secrets.token_hex(10)
        new = NewJob(
            jobtype="tes",
            kind=Kind.TES,
            details={"tes": {"id": task_id, "name": task.name, "by": who}},
            timeout=float(parameters.get("timeout", self.config.tes_default_timeout)),
            gpus=gpus,
            gpu_memory=parse_size(parameters["gpu_memory"]) if "gpu_memory" in parameters else None,
            cpus=float(resources.cpu_cores) if resources and resources.cpu_cores else None,
            mem_limit=int(resources.ram_gb * 1e9) if resources and resources.ram_gb else None,
            task_id=task_id,
            name=task.name,
            tags=dict(task.tags),
            task=document,
            task_log={"system_logs": notes} if notes else {},
        )
        try:
            job = self.jobs.enqueue(new)
        except GpuUnavailable as exc:
            raise BadRequest(f"resources.backend_parameters: {exc.message}",
                             extra={"field": "resources.backend_parameters"}) from None
        log.info("TES task %s stored as job %s for %s", task_id, job.id, who)
        return task_id

    def _with_input_types(self, task: Task, body: dict[str, Any]) -> Task:
        """The spec has the server fill in an input's `type` where the client left it out: a file:// URL that
        names a folder is a DIRECTORY, known now (and the folders a task mounts follow from it)."""
        folders = []
        for index, item in enumerate(task.inputs):
            if "type" in item.model_fields_set or item.literal or not item.url:
                continue
            check_syntax(item.url, f"inputs[{index}].url")  # before anything takes it apart
            if scheme_of(item.url) != "file":
                continue
            where = self.roots.locate(item.url, f"inputs[{index}].url", folder=True)
            if where.storage.is_folder(where.parts):
                folders.append(index)
        if not folders:
            return task
        inputs = [{**item, "type": "DIRECTORY"} if index in folders else item
                  for index, item in enumerate(body["inputs"])]
        return parse_task({**body, "inputs": inputs})

    def _check_cpus(self, wanted: int) -> None:
        backend = self.jobs.backend
        try:
            most = backend.most_cpus()
        except RuntimeUnavailable:
            return  # not known now: the engine itself refuses it at the start, and the task says why
        if most is not None and wanted > most:
            raise BadRequest(f"resources.cpu_cores: {wanted} asked for, and the {backend.engine} that runs tasks"
                             f" here has {most:g} CPUs", extra={"field": "resources.cpu_cores"})

    def _check_input(self, index: int, url: str, kind: str) -> None:
        field = f"inputs[{index}].url"
        scheme = scheme_of(url)
        if scheme == "file":
            self.roots.locate(url, field, folder=kind == "DIRECTORY")
        elif scheme in ("http", "https"):
            if kind == "DIRECTORY":
                raise BadRequest(f"{field}: a DIRECTORY input cannot come from an {scheme}:// URL",
                                 extra={"field": field})
            self.http.check_url(url, field)
        else:  # s3://, gs://, ...: no task of it could run here
            raise BadRequest(f"{field}: this server cannot fetch {scheme}:// URLs; it takes file:// URLs below"
                             " TES_FILE_ROOTS, http(s):// and content", extra={"field": field})

    def _backend_parameters(self, task: Task) -> tuple[dict[str, str], list[str]]:
        """The keys this server honours, checked; the others refused when strict, else noted and dropped."""
        resources = task.resources
        if resources is None:
            return {}, []
        kept: dict[str, str] = {}
        ignored: list[str] = []
        for key, value in resources.backend_parameters.items():
            name = key.lower()
            field = f"resources.backend_parameters.{key}"
            if name not in BACKEND_PARAMETERS:
                ignored.append(key)
                continue
            problem = _backend_problem(name, value)
            if problem:
                raise BadRequest(f"{field}: {value!r} is not {problem}", extra={"field": field})
            kept[name] = value
        if ignored and resources.backend_parameters_strict:
            field = f"resources.backend_parameters.{ignored[0]}"
            raise BadRequest(f"{field}: this server does not support it (it supports {', '.join(BACKEND_PARAMETERS)}),"
                             " and backend_parameters_strict is true", extra={"field": field})
        notes = [f"backend parameter {key!r} is not supported here and was ignored" for key in ignored]
        if "gpu_memory" in kept and int(kept.get("gpus", "0")) == 0:
            notes.append("backend parameter 'gpu_memory' was ignored: the task asks for no GPU (gpus)")
            del kept["gpu_memory"]
        return kept, notes

    # -- read

    def get(self, task_id: str, view: str | None) -> dict[str, Any]:
        chosen = _view(view)
        job = self.store.get_task(task_id)
        if job is None:
            raise NotFound(f"task {task_id!r} not found")
        return render(job, chosen)

    def list(self, *, name_prefix: str | None, state: str | None, tag_keys: list[str], tag_values: list[str],
             page_size: int | None, page_token: str | None, view: str | None) -> dict[str, Any]:
        chosen = _view(view)
        if state is not None and state not in STATES:
            raise BadRequest(f"state must be one of {', '.join(STATES)}", extra={"field": "state"})
        size = DEFAULT_PAGE_SIZE if page_size is None else page_size
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise BadRequest(f"page_size must be between 1 and {MAX_PAGE_SIZE}", extra={"field": "page_size"})
        if len(tag_values) > len(tag_keys):
            raise BadRequest("there are more tag_value than tag_key parameters", extra={"field": "tag_value"})
        tags = {key: tag_values[i] if i < len(tag_values) else "" for i, key in enumerate(tag_keys)}
        found = self.store.tasks(TaskFilter(name_prefix=name_prefix, state=state, tags=tags),
                                 before=_page_start(page_token), limit=size + 1, minimal=chosen == "MINIMAL")
        answer: dict[str, Any] = {"tasks": [render(job, chosen) for job in found[:size]]}
        if len(found) > size:
            answer["next_page_token"] = base64.urlsafe_b64encode(str(found[size - 1].id).encode()).decode()
        return answer

    def cancel(self, task_id: str, who: str) -> dict[str, Any]:
        job = self.store.get_task(task_id)
        if job is None:
            raise NotFound(f"task {task_id!r} not found")
        self.jobs.cancel(job.id, who, kind=Kind.TES)
        return {}


def _backend_problem(name: str, value: str) -> str | None:
    """Why a value of a supported backend parameter is unusable, or None."""
    if name == "gpus":
        return None if value.isascii() and value.isdigit() and int(value) <= 64 else "a number of GPUs (0-64)"
    if name == "gpu_memory":
        try:
            parse_size(value)
        except ValueError:
            return "a size such as 8GiB"
        return None
    if not _SECONDS.fullmatch(value):
        return "a positive number of seconds"
    return None if 0 < float(value) < 10**8 else "a positive number of seconds"


def _view(view: str | None) -> str:
    chosen = (view or "MINIMAL").upper()
    if chosen not in VIEWS or not (view or "").isascii():  # "basıc".upper() is "BASIC"
        raise BadRequest(f"view must be one of {', '.join(VIEWS)}", extra={"field": "view"})
    return chosen


def _page_start(token: str | None) -> int | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        text = ""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest("page_token is not one this server gave out", extra={"field": "page_token"})
    return int(text)


def render(job: Job, view: str) -> dict[str, Any]:
    """A task in one of the spec's views: MINIMAL (id, state), BASIC (no output texts, contents or
    system logs), FULL."""
    shown: dict[str, Any] = {"id": job.task_id, "state": state_of(job)}
    if view == "MINIMAL":
        return shown
    full = view == "FULL"
    document = dict(job.task)
    for key in ("name", "description", "resources", "volumes", "tags", "outputs"):
        if key in document:
            shown[key] = document[key]
    shown["inputs"] = [item if full else {k: v for k, v in item.items() if k != "content"}
                       for item in document.get("inputs", [])]
    shown["executors"] = document.get("executors", [])
    log_entry = _task_log(job, full)
    if log_entry is not None:
        shown["logs"] = [log_entry]
    shown["creation_time"] = rfc3339(job.created_at)
    return shown


def _task_log(job: Job, full: bool) -> dict[str, Any] | None:
    recorded = job.task_log
    if not recorded and job.started_at is None:
        return None
    entry: dict[str, Any] = {
        "logs": [item if full else {k: v for k, v in item.items() if k not in ("stdout", "stderr")}
                 for item in recorded.get("logs", [])],
        "outputs": recorded.get("outputs", []),
    }
    for key in ("start_time", "end_time", "metadata"):
        if recorded.get(key) is not None:
            entry[key] = recorded[key]
    if "start_time" not in entry and job.started_at is not None:
        entry["start_time"] = rfc3339(job.started_at)
    if full:
        entry["system_logs"] = list(recorded.get("system_logs", []))
    return entry
