"""Build service images where no registry is reachable, cached by a hash of their recipe.

A recipe is a folder holding a Dockerfile and, optionally:
- `packages.txt`: Debian packages for a base system made with `mmdebstrap` and `docker import`; the
  Dockerfile starts `ARG BASE` / `FROM ${BASE}`, so no `FROM <remote>` is ever needed;
- `host-files.txt`: lines of `<host path> <name in the build context>` (e.g. a static busybox);
- `wheels.txt`: pinned Python wheels (a pip requirements file with hashes), fetched on the host with
  `pip download` for Debian's Python and put in the build context as `wheels/`, so that the build
  installs them with no network; cached on the host by the file's hash;
- `wheels-gpu.txt`: more wheels for the GPU variant (`gpu=True`, e.g. CUDA libraries), tagged
  `dsm-<name>-gpu:latest`;
- a `models/` folder: a recipe that has one takes `models=DIR`, whose models join it in the context.
The image is tagged `dsm-<name>:latest` and labelled with the recipe's hash, and rebuilt only when the
hash changes. The hash covers the recipe's files by their path inside the recipe folder, so the same recipe
hashes the same wherever it lies (a checkout, an installed package).

The bundled recipes (`ocr`, `whisper`) ship inside the package, in `dmi_service_manager/services/`, as
package data. Every failure a build can expect (no such recipe, a failed step) raises `BuildFailed` with a
one-line message; the details go to `log`.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import docker
import docker.errors

from ..errors import DsmError, RuntimeUnavailable
from .docker import DockerBackend

RECIPE_LABEL = "dmi-service-manager.recipe"
SUITE = "bookworm"
PYTHON_VERSION = "3.11"  # the suite's python3: host-fetched wheels are chosen for it
WHEELS_TIMEOUT = 3600
# The recipes that ship with the package (package data, beside this package's modules).
BUNDLED_SERVICES = Path(__file__).resolve().parents[1] / "services"

Log = Callable[[str], None]


class BuildFailed(DsmError):
    pass


def bundled_recipes() -> list[str]:
    """The names of the recipes that ship with the package, e.g. ["ocr", "whisper"]."""
    if not BUNDLED_SERVICES.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_SERVICES.iterdir() if (p / "Dockerfile").is_file())


def find_recipe(name: str) -> Path:
    """A bundled service by name (`ocr`), or a path to a recipe folder (a folder holding a Dockerfile)."""
    for candidate in (Path(name), BUNDLED_SERVICES / name):
        if (candidate / "Dockerfile").is_file():
            return candidate.resolve()
    if Path(name).is_dir():
        raise BuildFailed(f"{name} is not a service recipe: it has no Dockerfile")
    bundled = ", ".join(bundled_recipes()) or f"none found in {BUNDLED_SERVICES}"
    raise BuildFailed(f"no service recipe {name!r}: give a bundled service ({bundled}) or a folder with a Dockerfile")


def _one_line(text: str, limit: int = 300) -> str:
    """The last non-blank line of a tool's output (where the error usually is), shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    return last if len(last) <= limit else last[:limit] + "..."


def _host_files(recipe: Path) -> list[tuple[Path, str]]:
    listing = recipe / "host-files.txt"
    if not listing.is_file():
        return []
    pairs = []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            words = line.split()
            if len(words) != 2:
                raise BuildFailed(f"{listing} line {number}: expected '<host path> <name in the context>'")
            host = Path(words[0])
            if not host.is_file():
                raise BuildFailed(f"{listing} line {number}: the host file {host} is missing")
            pairs.append((host, words[1]))
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
            log(done.stderr.strip()[-4000:])
            raise BuildFailed(f"mmdebstrap failed ({done.returncode}): {_one_line(done.stderr)}")
        log(f"importing {tar.stat().st_size // 2**20} MiB as {tag}")
        repository, _, version = tag.partition(":")
        api.import_image_from_file(str(tar), repository=repository, tag=version)
    return tag


def wheels_cache() -> Path:
    """Where fetched wheels are kept on the host: $DSM_WHEELS_CACHE, else the user's cache folder."""
    configured = os.environ.get("DSM_WHEELS_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmi-service-manager" / "wheels"


def _wheel_lists(recipe: Path, gpu: bool) -> list[Path]:
    lists = [recipe / "wheels.txt"] if (recipe / "wheels.txt").is_file() else []
    if gpu:
        if not (recipe / "wheels-gpu.txt").is_file():
            raise BuildFailed(f"the recipe {recipe.name!r} has no GPU variant (no wheels-gpu.txt)")
        lists.append(recipe / "wheels-gpu.txt")
    return lists


def _fetch_wheels(listing: Path, log: Log) -> Path:
    """The wheels of a requirements file, for the suite's Python on this machine's architecture."""
    machine = platform.machine()
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(17, 37)] + [f"manylinux2014_{machine}"]
    options = ["--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
               "--abi", "cp" + PYTHON_VERSION.replace(".", ""), *[a for p in platforms for a in ("--platform", p)]]
    key = hashlib.sha256(listing.read_bytes() + " ".join(options).encode()).hexdigest()[:16]
    folder = wheels_cache() / f"{listing.parent.name}-{listing.stem}-{key}"
    if (folder / ".complete").is_file():
        log(f"wheels of {listing.name} are cached in {folder}")
        return folder
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet", *options,
               "--dest", str(partial), "--requirement", str(listing)]
    log(f"fetching the wheels of {listing} into {folder}")
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=WHEELS_TIMEOUT)
    except subprocess.TimeoutExpired:
        shutil.rmtree(partial, ignore_errors=True)
        raise BuildFailed(f"fetching the wheels of {listing} took more than {WHEELS_TIMEOUT} s") from None
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        log(done.stderr.strip()[-4000:])
        raise BuildFailed(f"fetching the wheels of {listing} failed: {_one_line(done.stderr)}")
    (partial / ".complete").touch()
    try:
        partial.rename(folder)
    except OSError:  # another build fetched them meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _model_entries(recipe: Path, models: Path) -> list[tuple[Path, str]]:
    """The models of DIR as context entries under models/: DIR itself if it is one model, else its folders."""
    if not (recipe / "models").is_dir():
        raise BuildFailed(f"the recipe {recipe.name!r} takes no models (it has no models/ folder)")
    if not models.is_dir():
        raise BuildFailed(f"--models {models}: not a folder")
    if (models / "model.bin").is_file():
        return [(models, f"models/{models.resolve().name}")]
    entries = [(path, f"models/{path.name}") for path in sorted(models.iterdir()) if path.is_dir()]
    if not entries:
        raise BuildFailed(f"--models {models}: no model folders in it")
    return entries


@contextmanager
def _context(recipe: Path, extra: list[tuple[Path, str]] | None = None) -> Iterator[IO[bytes]]:
    """The build context as a tar (in a temporary file: wheels and models can be large): the recipe folder,
    the host files it asks for, and `extra` (host path, name in the context; folders whole, links followed)."""
    with tempfile.TemporaryFile(prefix="dsm-context-") as handle:
        with tarfile.open(fileobj=handle, mode="w") as tar:
            for path in sorted(recipe.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    tar.add(path, arcname=str(path.relative_to(recipe)))
            for host, name in _host_files(recipe):
                tar.add(host, arcname=name)
            tar.dereference = True
            for host, name in extra or []:
                tar.add(host, arcname=name)
        handle.seek(0)
        yield handle


def build_service(name: str, *, force: bool = False, log: Log = print, runtime: DockerBackend | None = None,
                  tag: str | None = None, gpu: bool = False, models: Path | None = None) -> str:
    """Build (or find cached) the image for a recipe; returns its tag.

    `gpu` builds the recipe's GPU variant (its wheels-gpu.txt too); `models` bakes a folder of models in.
    """
    recipe = find_recipe(name)
    image_name = tag or f"dsm-{recipe.name}{'-gpu' if gpu else ''}:latest"
    digest = recipe_hash(recipe)
    model_entries = _model_entries(recipe, models) if models is not None else []
    if gpu or model_entries:
        extras = hashlib.sha256(f"{digest} gpu={gpu}".encode())
        for host, entry in model_entries:
            extras.update(f"{entry} {_tree_digest(host)}".encode())
        digest = extras.hexdigest()[:16]
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
        extra = [(wheel, f"wheels/{wheel.name}") for listing in _wheel_lists(recipe, gpu)
                 for wheel in sorted(_fetch_wheels(listing, log).glob("*.whl"))]
        extra += model_entries
        log(f"building {image_name} from {recipe} (recipe {digest})")
        with _context(recipe, extra) as context:
            output = api.build(fileobj=context, custom_context=True, tag=image_name, rm=True, forcerm=True,
                               buildargs=buildargs, labels={RECIPE_LABEL: digest}, decode=True)
            for chunk in output:
                if "error" in chunk:
                    raise BuildFailed(f"building {image_name} failed: {' '.join(chunk['error'].split())[:300]}")
                text = chunk.get("stream", "").rstrip()
                if text:
                    log(text)
    except docker.errors.APIError as exc:
        raise BuildFailed(f"building {image_name} failed: {_one_line(str(exc.explanation or exc))}") from None
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


__all__ = ["BUNDLED_SERVICES", "BuildFailed", "build_service", "bundled_recipes", "find_recipe", "image_file",
           "recipe_hash", "wheels_cache"]
