"""A task's work area: the host folders behind the paths its executors see.

Every folder a task names (its volumes, the folders of its outputs and of redirected stdout and
stderr, its DIRECTORY inputs) becomes one bind mount, after folders inside another are folded into
it; a FILE input outside all of them is mounted as a file of its own, read-only. Executors see
nothing else of the host. Inputs are staged here before the first executor runs, when nothing but
this server has written to the area; outputs are read back without following links, because by
then executors have written there.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from ..files.storage import Parts, Storage, remove_tree
from ..runtime.base import Mount
from .patterns import has_wildcard
from .schema import Task


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def wildcard_base(path: str) -> str:
    """The deepest folder of a pattern that has no wildcard in it."""
    parts = path.split("/")
    for index, part in enumerate(parts):
        if has_wildcard(part):
            return "/".join(parts[:index]) or "/"
    return posixpath.dirname(path)


@dataclass(frozen=True)
class WorkArea:
    root: Path
    folders: tuple[str, ...]  # container folders, none inside another
    file_inputs: tuple[str, ...]  # container paths of FILE inputs outside every folder
    top_files: tuple[str, ...] = ()  # files right below / that executors write: never mount over the root

    @classmethod
    def of(cls, task: Task, root: Path) -> WorkArea:
        wanted: set[str] = set(task.volumes)
        written: set[str] = set()  # files that executors write, whose folder must be mounted
        for output in task.outputs:
            if has_wildcard(output.path):
                wanted.add(wildcard_base(output.path))
            elif output.type == "DIRECTORY":
                wanted.add(output.path)
            else:
                written.add(output.path)
        for executor in task.executors:
            written.update(r for r in (executor.stdout, executor.stderr) if r)
        wanted.update(posixpath.dirname(path) for path in written)
        for item in task.inputs:
            if item.type == "DIRECTORY":
                wanted.add(item.path)
        wanted.discard("/")  # never mounted over the image's root: files right below it are mounted one by one
        folders = sorted(f for f in wanted if not any(o != f and _is_under(f, o) for o in wanted))

        def outside(path: str) -> bool:
            return not any(_is_under(path, f) for f in folders)

        top = tuple(sorted(p for p in written if posixpath.dirname(p) == "/" and outside(p)))
        files = tuple(i.path for i in task.inputs if i.type == "FILE" and outside(i.path) and i.path not in top)
        return cls(root=root, folders=tuple(folders), file_inputs=files, top_files=top)

    def _folder_host(self, index: int) -> Path:
        return self.root / f"m{index}"

    def _file_host(self, index: int) -> Path:
        return self.root / f"f{index}"

    def create(self) -> None:
        """A fresh, empty area: a restarted preparation starts from nothing."""
        remove_area(self.root)
        self.root.mkdir(parents=True)
        for index in range(len(self.folders)):
            self._folder_host(index).mkdir()
        for index in range(len(self.top_files)):
            (self.root / f"t{index}").touch()

    def mounts(self) -> list[Mount]:
        found = [Mount(host=str(self._folder_host(i)), container=f) for i, f in enumerate(self.folders)]
        found += [Mount(host=str(self._file_host(i)), container=p, read_only=True)
                  for i, p in enumerate(self.file_inputs)]
        found += [Mount(host=str(self.root / f"t{i}"), container=p) for i, p in enumerate(self.top_files)]
        return found

    def input_target(self, path: str) -> Path:
        """Where on the host an input for `path` goes (the area is ours alone while inputs are staged)."""
        if path in self.file_inputs:
            return self._file_host(self.file_inputs.index(path))
        if path in self.top_files:
            return self.root / f"t{self.top_files.index(path)}"
        for index, folder in enumerate(self.folders):
            if _is_under(path, folder):
                inner = path[len(folder):].strip("/")
                return self._folder_host(index).joinpath(*inner.split("/")) if inner else self._folder_host(index)
        raise ValueError(f"{path} is outside the task's work area")

    def reader(self, path: str) -> tuple[Storage, Parts]:
        """A container path as a place to read from without following links (executors wrote here)."""
        if path in self.top_files:
            return Storage(self.root), (f"t{self.top_files.index(path)}",)
        for index, folder in enumerate(self.folders):
            if _is_under(path, folder):
                inner = path[len(folder):].strip("/")
                return Storage(self._folder_host(index)), tuple(inner.split("/")) if inner else ()
        raise ValueError(f"{path} is not in a folder of the task's work area")


def remove_area(root: Path) -> None:
    """A work area gone, however deep or odd the tree its executors left (never through a symlink)."""
    try:
        parent = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            os.stat(root.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return  # nothing to remove (a task's first preparation, or one that never had an area): no `rm`
        remove_tree(parent, root.name)
    finally:
        os.close(parent)
