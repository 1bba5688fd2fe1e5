"""A TES v1.1 task as a client sends it, validated: every refusal names the field it is about.

Paths inside the container become paths in the task's work area on the host, so they are held to
the same rules as uploaded names: absolute, no `..`, no control characters, and never over the
places an executor needs from its image (`/`, `/proc`, `/sys`, `/dev`, our own `/.dsm`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import BadRequest
from ..runtime.base import check_argv
from .patterns import has_wildcard

MAX_CONTENT_BYTES = 1024 * 1024
MIN_RAM_GB = 6 * 1024 * 1024 / 1e9
RESERVED = ("/proc", "/sys", "/dev", "/.dsm")


def container_path(value: str) -> str:
    """An absolute path inside the container, in its one normal form."""
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path inside the container, not {value!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value) or "\\" in value:
        raise ValueError("must not contain control characters or backslashes")
    parts = [p for p in value.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"must not contain '.' or '..' components: {value!r}")
    if not parts:
        raise ValueError("must not be the container's root folder")
    normal = "/" + "/".join(parts)
    if any(normal == r or normal.startswith(r + "/") for r in RESERVED):
        raise ValueError(f"must not be inside {', '.join(RESERVED)}")
    if len(normal.encode()) > 4096:
        raise ValueError("is too long")
    return normal


ContainerPath = Annotated[str, AfterValidator(container_path)]


class _Model(BaseModel):
    # Clients send fields of newer or older versions of the spec; those we do not know are ignored.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Executor(_Model):
    image: str = Field(min_length=1, max_length=1024)
    command: list[str] = Field(min_length=1)
    workdir: str | None = None
    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    ignore_error: StrictBool = False  # "yes" is no boolean

    @field_validator("command")
    @classmethod
    def _argv(cls, value: list[str]) -> list[str]:
        if any("\x00" in item for item in value):
            raise ValueError("must not contain NUL bytes")
        return value

    @field_validator("workdir", "stdin", "stdout", "stderr")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return None if value is None else container_path(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not key or "=" in key or "\x00" in key or "\x00" in item:
                raise ValueError(f"{key!r} is not a usable variable name and value")
        return value


class Input(_Model):
    name: str | None = None
    description: str | None = None
    url: str | None = None
    path: str
    type: Literal["FILE", "DIRECTORY"] = "FILE"
    content: str | None = Field(None, max_length=MAX_CONTENT_BYTES)
    streamable: StrictBool | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return container_path(value)

    @property
    def literal(self) -> bool:
        """Whether the input is its `content`: the spec ignores the url only for a content that is not empty
        (an empty content with no url is an empty file)."""
        return bool(self.content) or (self.content is not None and not self.url)

    @model_validator(mode="after")
    def _source(self) -> Input:
        if self.content is None and not self.url:
            raise ValueError("url: an input needs a url or a content")
        if self.literal and self.type == "DIRECTORY":
            raise ValueError("type: an input with a content is a FILE")
        if self.content is not None:
            try:
                size = len(self.content.encode("utf-8"))
            except UnicodeEncodeError:
                raise ValueError("content: not valid UTF-8 text (a lone surrogate)") from None
            if size > MAX_CONTENT_BYTES:
                raise ValueError(f"content: may be at most {MAX_CONTENT_BYTES} bytes")
        return self


class Output(_Model):
    name: str | None = None
    description: str | None = None
    url: str = Field(min_length=1)
    path: str
    path_prefix: str | None = None
    type: Literal["FILE", "DIRECTORY"] = "FILE"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return container_path(value)

    @model_validator(mode="after")
    def _prefix(self) -> Output:
        if has_wildcard(self.path):
            if self.path_prefix is None:
                raise ValueError("path_prefix: required, because the path has wildcards")
            if has_wildcard(self.path_prefix):
                raise ValueError("path_prefix: must not have wildcards")
            if not self.path.startswith(self.path_prefix.rstrip("/") or "/"):  # "/data/", or "/data/sample_"
                raise ValueError("path_prefix: must be the start of the path")
        return self


class Resources(_Model):
    cpu_cores: int | None = Field(None, ge=1, le=4096)
    preemptible: StrictBool | None = None
    ram_gb: float | None = Field(None, gt=0, le=1024 * 1024)
    disk_gb: float | None = Field(None, gt=0, le=1024 * 1024 * 1024)
    zones: list[str] | None = None
    backend_parameters: dict[str, str] = Field(default_factory=dict)
    backend_parameters_strict: StrictBool = False


class Task(_Model):
    name: str | None = Field(None, max_length=4096)
    description: str | None = None
    inputs: list[Input] = Field(default_factory=list, max_length=10_000)
    outputs: list[Output] = Field(default_factory=list, max_length=10_000)
    resources: Resources | None = None
    executors: list[Executor] = Field(min_length=1, max_length=1000)
    volumes: list[ContainerPath] = Field(default_factory=list, max_length=1000)
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 1000:
            raise ValueError("may hold at most 1000 tags")
        return value


def field_name(location: tuple[int | str, ...]) -> str:
    """`('executors', 0, 'image')` as the field a client wrote: `executors[0].image`."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "task"


def parse_task(body: Any) -> Task:
    """A new task, or a BadRequest naming the first field that is wrong and why."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a TES task: a JSON object with at least 'executors'")
    try:
        task = Task.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = first["msg"].removeprefix("Value error, ")
        inner = re.match(r"(\w+): (.*)", message) if first["type"] == "value_error" else None
        if inner:  # a check across fields names the one it is about
            location, message = (*location, inner.group(1)), inner.group(2)
        where = field_name(location)
        if first["type"] == "missing":
            message = "is required"
        raise BadRequest(f"{where}: {message}", extra={"field": where}) from None
    refused = _cannot_run(task)
    if refused:
        where, message = refused
        raise BadRequest(f"{where}: {message}", extra={"field": where})
    return task


def _cannot_run(task: Task) -> tuple[str, str] | None:
    """(field, why) for a task that could never start, refused when it is submitted rather than ended at its
    start with the engine's words. Only new tasks are held to it: a task stored by an earlier version runs
    as it was accepted."""
    paths = _paths(task)
    for field, path in paths:
        if any(len(part.encode()) > 255 for part in path.split("/")):
            return field, "has a name longer than 255 bytes, more than a file system takes"
    for index, executor in enumerate(task.executors):
        if problem := check_argv(executor.command, "Pass long data to the task as an input instead."):
            return f"executors[{index}].command", problem
    if task.resources and task.resources.ram_gb is not None and task.resources.ram_gb < MIN_RAM_GB:
        return "resources.ram_gb", f"must be at least {MIN_RAM_GB:.4f} (6 MiB, the least Docker takes)"
    return _unmountable(task, paths)


def _paths(task: Task) -> list[tuple[str, str]]:
    """(field, container path) of every path a task names."""
    found = [(f"volumes[{i}]", p) for i, p in enumerate(task.volumes)]
    found += [(f"inputs[{i}].path", item.path) for i, item in enumerate(task.inputs)]
    found += [(f"outputs[{i}].path", item.path) for i, item in enumerate(task.outputs)]
    for index, executor in enumerate(task.executors):
        found += [(f"executors[{index}].{name}", path) for name in ("workdir", "stdin", "stdout", "stderr")
                  if (path := getattr(executor, name)) is not None]
    return found


def _unmountable(task: Task, paths: list[tuple[str, str]]) -> tuple[str, str] | None:
    """Paths that could never be mounted together: an input has a path of its own, a file holds no other
    path, and a folder is no file."""
    files: dict[str, str] = {}  # container path -> the field that makes it a file
    inputs: dict[str, str] = {}
    for index, item in enumerate(task.inputs):
        field = f"inputs[{index}].path"
        if item.path in inputs:
            return field, f"the same path as {inputs[item.path]}"
        inputs[item.path] = field
        if item.type == "FILE":
            files[item.path] = field
    for index, executor in enumerate(task.executors):
        for name in ("stdout", "stderr"):
            path = getattr(executor, name)
            if path is not None:
                files.setdefault(path, f"executors[{index}].{name}")
    for index, output in enumerate(task.outputs):
        if output.type == "FILE" and not has_wildcard(output.path):
            files.setdefault(output.path, f"outputs[{index}].path")
    folders = [(f"volumes[{i}]", p) for i, p in enumerate(task.volumes)]
    folders += [(f"inputs[{i}].path", item.path) for i, item in enumerate(task.inputs) if item.type == "DIRECTORY"]
    folders += [(f"outputs[{i}].path", o.path) for i, o in enumerate(task.outputs) if o.type == "DIRECTORY"]
    folders += [(f"executors[{i}].workdir", e.workdir) for i, e in enumerate(task.executors) if e.workdir]
    for field, path in folders:
        if path in files:
            return field, f"{path} is a folder here and a file in {files[path]}"
    # A trie of the files' components: whether a path runs through a file costs one step per component.
    trie: dict[str, Any] = {}
    for path, field in files.items():
        place = trie
        for part in path.split("/")[1:]:
            place = place.setdefault(part, {})
        place[""] = (path, field)  # "" is never a component of a normal path
    for field, path in paths:
        node: dict[str, Any] | None = trie
        for part in path.split("/")[1:-1]:
            node = node.get(part) if node is not None else None
            if node is None:
                break
            if "" in node:
                return field, f"inside {node[''][0]}, which {node[''][1]} makes a file"
    return None
