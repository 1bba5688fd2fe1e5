"""`dsm demo`: OCR on the sample images and speech to text on the spoken samples, driven over HTTP exactly
as 4CAT drives a remote server.

For each service: upload the samples one file per request, create the results folder with 4CAT's
placeholder, submit `<service>_remote`, poll the job, list the results folder and download each result:
then print the text. The Whisper part runs when the server offers `whisper_remote` and its image is built.
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
import requests

from .runtime.images import image_file

SAMPLES_IMAGE = "dsm-ocr:latest"
SPEECH_IMAGE = "dsm-whisper:latest"
POLL_SECONDS = 1.0
WAIT_SECONDS = 600.0


def _check(response: requests.Response, what: str) -> dict[str, object]:
    if response.status_code >= 400:
        raise SystemExit(f"demo: {what} failed with {response.status_code}: {response.text[:500]}")
    body: dict[str, object] = response.json()
    return body


def _run_remote_job(http: requests.Session, api: str, service: str, results: str, samples: dict[str, bytes],
                    args_for: Callable[[str, list[str]], list[str]]) -> tuple[dict[str, Any], str, list[str]]:
    """Upload `samples`, run `<service>_remote` with `args_for(results folder, input paths)`: the final job,
    the collection and the names of the result files."""
    collection = f"demo-{uuid.uuid4().hex[:8]}"
    print(f"demo: uploading {len(samples)} samples for {service} to collection {collection}", file=sys.stderr)
    for name, data in sorted(samples.items()):
        _check(http.post(api + "send_files", data={"folder_name": collection},
                             files=[("4cat_uploads", (name, data))], timeout=120), f"uploading {name}")
    placeholder = f"4CAT_{results}_blank.txt"
    _check(http.post(api + "send_files", data={"folder_name": collection},
                         files=[(results, (placeholder, b""))], timeout=120), "creating the results folder")
    inputs = [f"data/{collection}/4cat_uploads/{name}" for name in sorted(samples)]
    args = args_for(f"data/{collection}/{results}", inputs)
    submitted = _check(http.post(api + f"{service}_remote", json={"args": args, "timeout": 600}, timeout=30),
                       f"submitting the {service} job")
    result_url = str(submitted["result_url"])
    print(f"demo: job {submitted['key']} submitted; polling {result_url}", file=sys.stderr)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        job = _check(http.get(result_url, timeout=30), "polling")["job"]
        assert isinstance(job, dict)
        if job["status"] in ("complete", "error"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: job still {job['status']} after {WAIT_SECONDS:.0f} s")
        time.sleep(POLL_SECONDS)
    job_results = json.loads(job["results"])
    if job["status"] != "complete":
        raise SystemExit(f"demo: the {service} job failed: {job_results.get('error')}")
    listing = _check(http.get(f"{api}list_filenames/{collection}/{results}", timeout=30), "listing results")
    names = listing.get(".", [])
    assert isinstance(names, list)
    return job, collection, sorted(names)


def _download(http: requests.Session, api: str, folder: str, name: str, download_to: Path) -> dict[str, Any]:
    response = http.get(f"{api}download/{folder}/{name}", timeout=30)
    _check(response, f"downloading {name}")
    download_to.mkdir(parents=True, exist_ok=True)
    (download_to / os.path.basename(name)).write_bytes(response.content)
    result: dict[str, Any] = json.loads(response.content)
    return result


def run_demo(server: str, download_to: Path, token: str | None = None) -> int:
    """`token`: sent as a bearer token, for a server with REQUIRE_TOKEN (a `submit` token will do)."""
    api = server.rstrip("/") + "/api/"
    http = requests.Session()
    if token:
        http.headers["Authorization"] = f"Bearer {token}"
    samples = {Path(name).name: data for name, data in image_file(SAMPLES_IMAGE, "/app/samples").items()
               if name.endswith(".png")}
    if not samples:
        raise SystemExit(f"demo: the image {SAMPLES_IMAGE} holds no samples; rebuild it: dsm build-service ocr")
    results = "ocr-results"
    job, collection, names = _run_remote_job(http, api, "ocr", results, samples, lambda out, paths: [
        "--model", "paddle_ocr", "--output_dir", out, "--images", *paths])
    print(f"\nOCR job {job['id']} complete: {len(names)} result files, saved in {download_to}/\n")
    for name in names:
        result = _download(http, api, f"{collection}/{results}", name, download_to)
        text = result.get("simplified_text", {}).get("raw_text") if result.get("success") else result.get("error")
        print(f"--- {result['filename']} ({result['model_type']})\n{text}\n")
    _speech_demo(http, api, download_to.with_name(download_to.name + "-whisper"))
    return 0


def _speech_demo(http: requests.Session, api: str, download_to: Path) -> None:
    """The spoken samples through whisper_remote, as 4CAT's "Audio to text" sends them (model small)."""
    endpoints = _check(http.get(api, timeout=30), "listing the endpoints").get("endpoints")
    names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in endpoints] if isinstance(endpoints, list) else []
    if "whisper_remote" not in names:
        print("demo: the server has no whisper_remote endpoint; skipping speech to text", file=sys.stderr)
        return
    try:
        files = {Path(name).name: data for name, data in image_file(SPEECH_IMAGE, "/app/samples").items()}
    except docker.errors.ImageNotFound:
        print(f"demo: {SPEECH_IMAGE} is not built (dsm build-service whisper); skipping speech to text",
              file=sys.stderr)
        return
    clips = {name: data for name, data in files.items() if not name.endswith(".txt")}
    results = "whisper-results"
    job, collection, names = _run_remote_job(http, api, "whisper", results, clips, lambda out, paths: [
        "--output_dir", out, "--verbose", "False", "--output_format", "json", "--model", "small", *paths])
    print(f"Whisper job {job['id']} complete: {len(names)} result files, saved in {download_to}/\n")
    for name in names:
        result = _download(http, api, f"{collection}/{results}", name, download_to)
        said = files.get(f"{Path(name).stem}.txt", b"").decode().strip().replace("\n", " ")
        model = result.get("model", {})
        heard = " ".join(str(result.get("text", "")).split()) or "; ".join(result.get("errors", []))
        print(f"--- {Path(name).stem} ({model.get('name')} for {model.get('requested')}, "
              f"{result.get('language')})\nsaid:  {said}\nheard: {heard}\n")
