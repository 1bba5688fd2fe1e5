"""`dsm demo`: OCR on the sample images and speech to text on the spoken samples, driven over HTTP exactly
as 4CAT drives a remote server.

For each service: upload the samples one file per request, create the results folder with 4CAT's
placeholder, submit `<service>_remote`, poll the job, list the results folder and download each result:
then print the text. The Whisper part runs when the server offers `whisper_remote` and its image is built.
The samples are read from the service images, so the demo runs where they are built: on the server's host.
Requests go through the CLI's client: a refusal is one line and the CLI's exit code (401: 4, 404: 5).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors

from .cli.client import Client, decode
from .cli.exits import FAILED, NOT_FOUND, CliError
from .runtime.images import image_file

SAMPLES_IMAGE = "dsm-ocr:latest"
SPEECH_IMAGE = "dsm-whisper:latest"
POLL_SECONDS = 1.0
WAIT_SECONDS = 600.0


def _post(client: Client, path: str, **sent: Any) -> dict[str, Any]:
    body: dict[str, Any] = decode(client.request("POST", path, **sent))
    return body


def _endpoints(client: Client) -> list[str]:
    endpoints = client.get_json("/api/").get("endpoints")
    return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in endpoints] if isinstance(endpoints, list) else []


def _samples(image: str) -> dict[str, bytes]:
    try:
        return {Path(name).name: data for name, data in image_file(image, "/app/samples").items()}
    except docker.errors.ImageNotFound:
        raise
    except docker.errors.DockerException as exc:
        raise CliError(f"demo: the samples come from the local image {image}, so the demo runs on the server's"
                       f" host, beside its Docker engine: {exc}", FAILED) from None


def _run_remote_job(client: Client, service: str, results: str, samples: dict[str, bytes],
                    args_for: Callable[[str, list[str]], list[str]]) -> tuple[dict[str, Any], str, list[str]]:
    """Upload `samples`, run `<service>_remote` with `args_for(results folder, input paths)`: the final job,
    the collection and the names of the result files."""
    collection = f"demo-{uuid.uuid4().hex[:8]}"
    print(f"demo: uploading {len(samples)} samples for {service} to collection {collection}", file=sys.stderr)
    for name, data in sorted(samples.items()):
        _post(client, "/api/send_files", data={"folder_name": collection}, files=[("4cat_uploads", (name, data))])
    placeholder = f"4CAT_{results}_blank.txt"
    _post(client, "/api/send_files", data={"folder_name": collection}, files=[(results, (placeholder, b""))])
    inputs = [f"data/{collection}/4cat_uploads/{name}" for name in sorted(samples)]
    args = args_for(f"data/{collection}/{results}", inputs)
    submitted = _post(client, f"/api/{service}_remote", json={"args": args, "timeout": 600})
    print(f"demo: job {submitted['key']} submitted; polling {submitted['result_url']}", file=sys.stderr)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        job = client.get_json(f"/api/jobs/{submitted['key']}")["job"]
        assert isinstance(job, dict)
        if job["status"] in ("complete", "error"):
            break
        if time.monotonic() > deadline:
            raise CliError(f"demo: job {job['id']} still {job['status']} after {WAIT_SECONDS:.0f} s", FAILED)
        time.sleep(POLL_SECONDS)
    job_results = json.loads(job["results"])
    if job["status"] != "complete":
        raise CliError(f"demo: the {service} job failed: {job_results.get('error')}", FAILED)
    listing = client.get_json(f"/api/list_filenames/{collection}/{results}")
    names = listing.get(".", [])
    assert isinstance(names, list)
    return job, collection, sorted(names)


def _download(client: Client, folder: str, name: str, download_to: Path) -> dict[str, Any]:
    response = client.request("GET", f"/api/download/{folder}/{name}")
    download_to.mkdir(parents=True, exist_ok=True)
    (download_to / os.path.basename(name)).write_bytes(response.content)
    result: dict[str, Any] = json.loads(response.content)
    return result


def run_demo(client: Client, download_to: Path) -> int:
    """`client`: the server, with a token where it requires one (a `submit` token will do)."""
    offered = _endpoints(client)  # before anything is uploaded: a refusal leaves nothing behind
    if "ocr_remote" not in offered and "whisper_remote" not in offered:
        raise CliError(f"demo: {client.base} offers neither ocr_remote nor whisper_remote (its config has no ocr or"
                       " whisper service with remote: True)", NOT_FOUND)
    if "ocr_remote" in offered:
        _ocr_demo(client, download_to)
    else:
        print("demo: the server has no ocr_remote endpoint; skipping OCR", file=sys.stderr)
    if "whisper_remote" in offered:
        _speech_demo(client, download_to.with_name(download_to.name + "-whisper"), alone="ocr_remote" not in offered)
    else:
        print("demo: the server has no whisper_remote endpoint; skipping speech to text", file=sys.stderr)
    return 0


def _ocr_demo(client: Client, download_to: Path) -> None:
    try:
        samples = {name: data for name, data in _samples(SAMPLES_IMAGE).items() if name.endswith(".png")}
    except docker.errors.ImageNotFound:
        samples = {}
    if not samples:
        raise CliError(f"demo: the image {SAMPLES_IMAGE} is missing or holds no samples; build it on this host:"
                       " dsm build-service ocr", FAILED)
    results = "ocr-results"
    job, collection, names = _run_remote_job(client, "ocr", results, samples, lambda out, paths: [
        "--model", "paddle_ocr", "--output_dir", out, "--images", *paths])
    print(f"\nOCR job {job['id']} complete: {len(names)} result files, saved in {download_to}/\n")
    for name in names:
        result = _download(client, f"{collection}/{results}", name, download_to)
        text = result.get("simplified_text", {}).get("raw_text") if result.get("success") else result.get("error")
        print(f"--- {result['filename']} ({result['model_type']})\n{text}\n")


def _speech_demo(client: Client, download_to: Path, *, alone: bool) -> None:
    """The spoken samples through whisper_remote, as 4CAT's "Audio to text" sends them (model small).
    `alone`: the only demo the server offers, so a missing image is the demo's failure, not a skip."""
    try:
        files = _samples(SPEECH_IMAGE)
    except docker.errors.ImageNotFound:
        if alone:
            raise CliError(f"demo: the image {SPEECH_IMAGE} is missing; build it on this host: dsm build-service"
                           " whisper", FAILED) from None
        print(f"demo: {SPEECH_IMAGE} is not built (dsm build-service whisper); skipping speech to text",
              file=sys.stderr)
        return
    clips = {name: data for name, data in files.items() if not name.endswith(".txt")}
    results = "whisper-results"
    job, collection, names = _run_remote_job(client, "whisper", results, clips, lambda out, paths: [
        "--output_dir", out, "--verbose", "False", "--output_format", "json", "--model", "small", *paths])
    print(f"Whisper job {job['id']} complete: {len(names)} result files, saved in {download_to}/\n")
    for name in names:
        result = _download(client, f"{collection}/{results}", name, download_to)
        said = files.get(f"{Path(name).stem}.txt", b"").decode().strip().replace("\n", " ")
        model = result.get("model", {})
        heard = " ".join(str(result.get("text", "")).split()) or "; ".join(result.get("errors", []))
        print(f"--- {Path(name).stem} ({model.get('name')} for {model.get('requested')}, "
              f"{result.get('language')})\nsaid:  {said}\nheard: {heard}\n")
