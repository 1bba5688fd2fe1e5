"""`dsm demo`: OCR on the sample images, driven over HTTP exactly as 4CAT drives a remote server.

Upload the samples one file per request, create the results folder with 4CAT's placeholder, submit
`ocr_remote`, poll the job, list the results folder and download each result: then print the text.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import requests

from .runtime.images import image_file

SAMPLES_IMAGE = "dsm-ocr:latest"
POLL_SECONDS = 1.0
WAIT_SECONDS = 600.0


def _check(response: requests.Response, what: str) -> dict[str, object]:
    if response.status_code >= 400:
        raise SystemExit(f"demo: {what} failed with {response.status_code}: {response.text[:500]}")
    body: dict[str, object] = response.json()
    return body


def run_demo(server: str, download_to: Path) -> int:
    api = server.rstrip("/") + "/api/"
    samples = {Path(name).name: data for name, data in image_file(SAMPLES_IMAGE, "/app/samples").items()
               if name.endswith(".png")}
    if not samples:
        raise SystemExit(f"demo: the image {SAMPLES_IMAGE} holds no samples; rebuild it: dsm build-service ocr")
    collection, results = f"demo-{uuid.uuid4().hex[:8]}", "ocr-results"
    print(f"demo: uploading {len(samples)} sample images to collection {collection}", file=sys.stderr)
    for name, data in sorted(samples.items()):
        _check(requests.post(api + "send_files", data={"folder_name": collection},
                             files=[("4cat_uploads", (name, data))], timeout=120), f"uploading {name}")
    placeholder = f"4CAT_{results}_blank.txt"
    _check(requests.post(api + "send_files", data={"folder_name": collection},
                         files=[(results, (placeholder, b""))], timeout=120), "creating the results folder")
    args = ["--model", "paddle_ocr", "--output_dir", f"data/{collection}/{results}", "--images",
            *[f"data/{collection}/4cat_uploads/{name}" for name in sorted(samples)]]
    submitted = _check(requests.post(api + "ocr_remote", json={"args": args, "timeout": 600}, timeout=30),
                       "submitting the OCR job")
    result_url = str(submitted["result_url"])
    print(f"demo: job {submitted['key']} submitted; polling {result_url}", file=sys.stderr)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        job = _check(requests.get(result_url, timeout=30), "polling")["job"]
        assert isinstance(job, dict)
        if job["status"] in ("complete", "error"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: job still {job['status']} after {WAIT_SECONDS:.0f} s")
        time.sleep(POLL_SECONDS)
    job_results = json.loads(job["results"])
    if job["status"] != "complete":
        raise SystemExit(f"demo: the OCR job failed: {job_results.get('error')}")
    listing = _check(requests.get(f"{api}list_filenames/{collection}/{results}", timeout=30), "listing results")
    names = listing.get(".", [])
    assert isinstance(names, list)
    download_to.mkdir(parents=True, exist_ok=True)
    print(f"\nOCR job {job['id']} complete: {len(names)} result files, saved in {download_to}/\n")
    for name in sorted(names):
        response = requests.get(f"{api}download/{collection}/{results}/{name}", timeout=30)
        _check(response, f"downloading {name}")
        target = download_to / os.path.basename(name)
        target.write_bytes(response.content)
        result = json.loads(response.content)
        text = result.get("simplified_text", {}).get("raw_text") if result.get("success") else result.get("error")
        print(f"--- {result['filename']} ({result['model_type']})\n{text}\n")
    return 0
