"""Build service images where no registry is reachable, cached by a hash of their recipe.

A recipe is a folder holding a Dockerfile and, optionally:
- `packages.txt`: Debian packages for a base system made with `mmdebstrap` and `docker import`; the
  Dockerfile starts `ARG BASE` / `FROM ${BASE}`, so no `FROM <remote>` is ever needed;
- `host-files.txt`: lines of `<host path> <name in the build context>` (e.g. a static busybox).
The image is tagged `<name>:latest` and labelled with the recipe's hash, and rebuilt only when the
hash changes.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors

from ..errors import DsmError, RuntimeUnavailable
from .docker import DockerBackend

RECIPE_LABEL = "dmi-service-manager.recipe"
SUITE = "bookworm"
REPO_SERVICES = Path(__file__).resolve().parents[3] / "services"

Log = Callable[[str], None]


class BuildFailed(DsmError):
    pass


def find_recipe(name: str) -> Path:
    """A bundled service by name (`ocr`), or a path to a recipe folder."""
    for candidate in (Path(name), REPO_SERVICES / name):
        if (candidate / "Dockerfile").is_file():
            return candidate.resolve()
    raise BuildFailed(f"no service recipe {name!r}: expected {REPO_SERVICES / name}/Dockerfile")


def _host_files(recipe: Path) -> list[tuple[Path, str]]:
    listing = recipe / "host-files.txt"
    if not listing.is_file():
        return []
    pairs = []
    for line in listing.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            host, name = line.split()
            pairs.append((Path(host), name))
    return pairs


def recipe_hash(recipe: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in recipe.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(recipe)).encode() + b"\0" + path.read_bytes())
    for host, name in _host_files(recipe):
        digest.update(name.encode() + b"\0" + hashlib.sha256(host.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _packages(recipe: Path) -> list[str]:
    listing = recipe / "packages.txt"
    if not listing.is_file():
        return []
    return [word for line in listing.read_text().splitlines() for word in line.split("#")[0].split()]


def _build_base(api: docker.APIClient, name: str, packages: list[str], log: Log) -> str:
    """A Debian base with `packages`, made by mmdebstrap and imported; cached by its package list."""
    key = hashlib.sha256(f"{SUITE} {' '.join(sorted(packages))}".encode()).hexdigest()[:16]
    tag = f"dsm-base-{name}:{key}"
    try:
        api.inspect_image(tag)
        log(f"base {tag} is cached")
        return tag
    except docker.errors.ImageNotFound:
        pass
    if not shutil.which("mmdebstrap"):
        raise BuildFailed("mmdebstrap is not installed (apt-get install mmdebstrap); it builds the base system")
    with tempfile.TemporaryDirectory(prefix="dsm-base-") as folder:
        tar = Path(folder) / "rootfs.tar"
        command = ["mmdebstrap", "--variant=essential", "--include=" + ",".join(packages),
                   "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                   SUITE, str(tar)]
        log("$ " + " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildFailed(f"mmdebstrap failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        log(f"importing {tar.stat().st_size // 2**20} MiB as {tag}")
        repository, _, version = tag.partition(":")
        api.import_image_from_file(str(tar), repository=repository, tag=version)
    return tag


def _context(recipe: Path) -> io.BytesIO:
    """The build context as a tar: the recipe folder plus the host files it asks for."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(recipe.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(recipe)))
        for host, name in _host_files(recipe):
            tar.add(host, arcname=name)
    buffer.seek(0)
    return buffer


def build_service(name: str, *, force: bool = False, log: Log = print, runtime: DockerBackend | None = None,
                  tag: str | None = None) -> str:
    """Build (or find cached) the image for a recipe; returns its tag."""
    recipe = find_recipe(name)
    image_name = tag or f"dsm-{recipe.name}:latest"
    digest = recipe_hash(recipe)
    api = (runtime or DockerBackend()).api
    try:
        if not force:
            try:
                labels = api.inspect_image(image_name)["Config"].get("Labels") or {}
                if labels.get(RECIPE_LABEL) == digest:
                    log(f"{image_name} is up to date (recipe {digest})")
                    return image_name
            except docker.errors.ImageNotFound:
                pass
        buildargs = {}
        packages = _packages(recipe)
        if packages:
            buildargs["BASE"] = _build_base(api, recipe.name, packages, log)
        log(f"building {image_name} from {recipe} (recipe {digest})")
        output = api.build(fileobj=_context(recipe), custom_context=True, tag=image_name, rm=True, forcerm=True,
                           buildargs=buildargs, labels={RECIPE_LABEL: digest}, decode=True)
        for chunk in output:
            if "error" in chunk:
                raise BuildFailed(f"building {image_name} failed: {chunk['error'].strip()}")
            text = chunk.get("stream", "").rstrip()
            if text:
                log(text)
    except docker.errors.APIError as exc:
        raise BuildFailed(f"building {image_name} failed: {exc.explanation or exc}") from None
    except (docker.errors.DockerException, ConnectionError) as exc:
        raise RuntimeUnavailable(f"the Docker engine is not reachable: {exc}") from None
    return image_name


def image_file(image: str, path: str, runtime: DockerBackend | None = None) -> dict[str, bytes]:
    """The files under `path` inside an image (e.g. the OCR samples), read without running it."""
    api = (runtime or DockerBackend()).api
    container = api.create_container(image=image, command=["true"])
    try:
        stream, _ = api.get_archive(container["Id"], path)
        buffer = io.BytesIO(b"".join(stream))
    finally:
        api.remove_container(container["Id"], force=True)
    files = {}
    with tarfile.open(fileobj=buffer) as tar:
        for member in tar.getmembers():
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None:
                files[member.name] = handle.read()
    return files


__all__ = ["BuildFailed", "build_service", "find_recipe", "image_file", "recipe_hash"]
