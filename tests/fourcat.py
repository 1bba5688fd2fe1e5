"""A client that behaves as 4CAT's DmiServiceManager class does, request for request (protocol doc).

Bare `requests` calls with no session (a new connection each), 30 s timeouts, one file per upload
request popped from the end of the list with the results placeholder sent last, the details query as
a GET with a JSON body, and a poll loop that aborts on the fourth failed poll in the job's life.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import requests
from werkzeug.utils import secure_filename


class FourCatError(Exception):
    pass


class FourCat:
    def __init__(self, server: str, mode: str = "remote") -> None:
        self.api = server.rstrip("/") + "/api/"
        self.mode = mode
        self.failed_polls = 0
        self.progress: list[tuple[str | None, int | None]] = []

    def check_gpu_memory(self, service: str) -> tuple[int, dict[str, Any]]:
        response = requests.get(f"{self.api}check_gpu_mem/{service}", timeout=30)
        return response.status_code, response.json()

    def folder_files(self, folder: str) -> dict[str, list[str]]:
        response = requests.get(f"{self.api}list_filenames/{folder}", timeout=30)
        if response.status_code == 403:
            raise FourCatError("403: no permission")
        if response.status_code in (400, 405):
            raise FourCatError(f"400: {response.json()['reason']}")
        if response.status_code == 404:
            return {}
        if response.status_code != 200:
            raise FourCatError(f"unknown response {response.status_code}")
        listing: dict[str, list[str]] = response.json()
        return listing

    def send_files(self, collection: str, results: str, files: list[Path]) -> tuple[str, str]:
        existing = self.folder_files(collection)
        uploaded = existing.get("4cat_uploads", [])
        to_upload: list[tuple[str, Path]] = [("4cat_uploads", f) for f in files if f.name not in uploaded]
        if results not in existing:
            placeholder = files[0].parent / f"4CAT_{results}_blank.txt"
            placeholder.write_text("")
            to_upload = [(results, placeholder), *to_upload]  # popped last
        while to_upload:
            field, path = to_upload.pop()
            with path.open("rb") as handle:
                response = requests.post(f"{self.api}send_files", files=[(field, handle)],
                                         data={"folder_name": collection}, timeout=120)
            if response.status_code == 403:
                raise FourCatError("403")
            if response.status_code == 405:
                raise FourCatError("405: the whole dataset aborts")
        return f"{collection}/4cat_uploads", f"{collection}/{results}"

    def existing_jobs(self, dataset_key: str) -> list[dict[str, Any]]:
        response = requests.get(f"{self.api}jobs/details_query/", timeout=30, json={
            "details_key": "$.request_json.4CAT_dataset_key", "details_value": dataset_key})
        if response.status_code != 200:
            return []  # 4CAT reads any failure as "no job" and submits a duplicate
        jobs: list[dict[str, Any]] = response.json()["jobs"]
        return jobs

    def submit(self, service: str, data: dict[str, Any]) -> str:
        endpoint = f"{self.api}{service}_{self.mode}"
        response = requests.post(endpoint, json=data, timeout=30)
        if response.status_code == 202:
            result_url: str = response.json()["result_url"]
            return result_url
        if response.status_code == 404:
            raise FourCatError("404: the service may not be set up")
        raise FourCatError(f"{response.status_code}: {response.text}")

    def poll_until_done(self, result_url: str, wait_period: float = 0.2, limit: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(wait_period)
            try:
                response = requests.get(result_url, timeout=30)
                body = response.json()
                ok = response.status_code == 200 and body.get("status") == "success"
            except (requests.ConnectionError, ValueError):
                ok = False
            if not ok:
                self.failed_polls += 1  # never reset
                if self.failed_polls > 3:
                    raise FourCatError("fourth failed poll: the dataset is aborted")
                continue
            job = body["job"]
            if job["status"] not in ("created", "running", "pending", "complete", "error"):
                raise FourCatError(f"unknown status {job['status']!r}: the dataset is aborted")
            self.progress.append((job["message"], job["processed_records"]))
            if job["status"] in ("complete", "error"):
                results = json.loads(job["results"])
                if results["returncode"] != 0:
                    if "CUDA error: out of memory" in results["error"]:
                        raise FourCatError("out of GPU memory")
                    raise FourCatError(f"job failed: {results['error']}")
                return job
        raise AssertionError("the job did not end in time")

    def download_results(self, collection: str, results: str, local_dir: Path) -> list[Path]:
        folder = f"{collection}/{results}"
        saved = []
        for sub, names in self.folder_files(folder).items():
            remote = folder if sub == "." else f"{folder}/{sub}"
            target_dir = local_dir if sub == "." else local_dir / sub
            target_dir.mkdir(parents=True, exist_ok=True)
            for name in names:
                response = requests.get(f"{self.api}download/{remote}/{name}", timeout=30)
                (target_dir / name).write_bytes(response.content)  # written whatever the status
                saved.append(target_dir / name)
        return saved

    @staticmethod
    def stored_name(local_name: str) -> str:
        """The name 4CAT predicts the server stores an upload under."""
        return secure_filename(local_name)
