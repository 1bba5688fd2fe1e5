"""OCR benchmark (issue 5): images per second through the server, beside Tesseract run directly.

    .venv/bin/python bench/ocr_bench.py [--images 100]

100 images of about one megapixel, rendered from known text, are OCR'd (a) by one job submitted to
the server as 4CAT's "Text from image" processor submits it (local mode), timed from the submit to
the job's completion, and (b) by one `docker run` of the same image calling `tesseract` on the same
images in a shell loop (one image after another, one thread each). Both include one container start.
The service runs one Tesseract per CPU side by side, which is why it can beat the plain loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import docker
import requests

from common import ROOT, dsm_server, table, verdict, workdir

sys.path.insert(0, str(ROOT / "src"))
from dmi_service_manager.runtime.images import build_service

TEXT = ("Page {n}: the service manager runs containers as jobs\\nfor 4CAT, which captures and analyses social"
        " media.\\nEach image here was rendered from known text\\nso that the words can be checked afterwards.\\n") * 4


def render(client: docker.DockerClient, image: str, folder: Path, count: int) -> list[str]:
    script = " && ".join(
        f"render-text --width 1000 --height 1000 --size 28 --text '{TEXT.format(n=i)}' --out data/img{i}.png"
        for i in range(count))
    client.containers.run(image, ["sh", "-c", script + " > /dev/null"], remove=True, network_mode="none",
                          volumes={str(folder): {"bind": "/app/data", "mode": "rw"}})
    return [f"img{i}.png" for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    image = build_service("ocr", log=lambda _: None)
    client = docker.from_env()
    print(f"# OCR benchmark ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')})")
    with workdir("dsm-bench-ocr-") as folder:
        images_dir = folder / "4cat" / "images"
        images_dir.mkdir(parents=True)
        names = render(client, image, images_dir, args.images)
        service = {"image_name": image, "local": True, "command": "ocr", "data_path": "/app/data"}
        with dsm_server(folder, workers=1, DOCKER_ENDPOINTS={"ocr": service}) as (url, _):
            body = {"args": ["--model", "paddle_ocr", "--output_dir", "data/results", "--images",
                             *[f"data/images/{n}" for n in names]], "timeout": max(2 * len(names), 600)}
            started = time.perf_counter()
            result_url = requests.post(f"{url}/api/ocr_local", json=body, timeout=30).json()["result_url"]
            while (job := requests.get(result_url, timeout=30).json()["job"])["status"] not in ("complete", "error"):
                time.sleep(0.2)
            ours = time.perf_counter() - started
        assert job["status"] == "complete", job["results"]
        done = len(list((folder / "4cat" / "results").glob("*.json")))
        loop = "for f in data/images/*.png; do tesseract \"$f\" \"data/direct/$(basename \"$f\" .png)\" -l eng tsv" \
               " >/dev/null 2>&1; done"
        (folder / "4cat" / "direct").mkdir()
        started = time.perf_counter()
        # One thread per tesseract, as the service runs it: with OpenMP's default here (a thread per CPU,
        # busy-waiting) the same loop is about ten times slower, which would flatter the service.
        client.containers.run(image, ["sh", "-c", loop], remove=True, network_mode="none",
                              environment={"OMP_THREAD_LIMIT": "1"},
                              volumes={str(folder / "4cat"): {"bind": "/app/data", "mode": "rw"}})
        direct = time.perf_counter() - started
        direct_done = len(list((folder / "4cat" / "direct").glob("*.tsv")))
    table(f"OCR of {len(names)} rendered images of 1000x1000 pixels", [
        ("images per second", f"{done / ours:.2f}", f"{direct_done / direct:.2f} (tesseract in a shell loop)",
         verdict(ours <= 1.2 * direct, f"within 1.2x of direct ({ours / direct:.2f}x the time)")),
        ("total time (s)", f"{ours:.1f}", f"{direct:.1f}", f"result files: {done} / {direct_done}"),
    ])


if __name__ == "__main__":
    main()
