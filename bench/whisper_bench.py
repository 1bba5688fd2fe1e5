"""Whisper benchmark: seconds of audio transcribed per second of wall time, through the server beside
faster-whisper run directly on the same clips with the same model.

    .venv/bin/python bench/whisper_bench.py [--quick] [--rounds N]

Speech is rendered from known text with espeak-ng inside the image: one long file (about 5 minutes; 1 with
--quick) and many short files (24 of about 5 s; 8 with --quick). Each is transcribed (a) by one job submitted
to the server as 4CAT's "Audio to text" processor submits it (local mode, `--model small`, which the default
configuration maps to the bundled `base`), timed from the submit to the job's completion, and (b) by one
`docker run` of the same image running faster-whisper directly on the same files, one after another, with
the same model, int8 on the CPU and a thread per CPU. Both include one container start and one model load.
Rounds alternate (3; 1 with --quick); medians are shown. Target: at least 0.9 of direct for the long file;
with many files the service runs one transcription per CPU side by side, as the OCR service does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import docker
import requests
import yaml

from common import ROOT, dsm_server, table, verdict, workdir

sys.path.insert(0, str(ROOT / "src"))
from dmi_service_manager.runtime.images import build_service

SENTENCES = [
    "Researchers use digital methods to study how people talk about the news online.",
    "Every post in the dataset was captured with its date, its author and the platform it came from.",
    "The service manager runs each request as a container and hands the results back when it is done.",
    "Speech in videos and voice messages is turned into text so that it can be searched and counted.",
    "A small model runs quickly on a laptop, while a large one needs a graphics card to keep up.",
    "The weather was fine on the day of the interview, and the recording is clear from start to end.",
]
DIRECT = """
import json, os, sys, time
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[1], device="cpu", compute_type="int8", cpu_threads=len(os.sched_getaffinity(0)))
texts = {}
for path in sys.argv[2:]:
    segments, info = model.transcribe(path, language="en")
    texts[os.path.basename(path)] = "".join(segment.text for segment in segments)
print(json.dumps(texts))
"""


def render(client: docker.DockerClient, image: str, folder: Path, texts: dict[str, str]) -> float:
    """Speak each text into folder/<name>; the total duration in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (_, text) in enumerate(texts.items()):
        (folder / f".text{index}").write_text(text)
    steps = " && ".join(f"render-speech --text-file data/.text{i} --out data/{name}" for i, name in enumerate(texts))
    client.containers.run(image, ["sh", "-c", steps + " > /dev/null"], remove=True, network_mode="none",
                          volumes={str(folder): {"bind": "/app/data", "mode": "rw"}})
    for index in range(len(texts)):
        (folder / f".text{index}").unlink()
    script = ("import sys; from faster_whisper import decode_audio; "
              "print(sum(len(decode_audio(p)) for p in sys.argv[1:]) / 16000)")
    output = client.containers.run(image, ["/opt/whisper/venv/bin/python", "-c", script,
                                           *[f"data/{name}" for name in texts]],
                                   remove=True, network_mode="none",
                                   volumes={str(folder): {"bind": "/app/data", "mode": "ro"}})
    return float(output)


def through_server(url: str, folder: str, names: list[str], results: str) -> float:
    body = {"args": ["--output_dir", f"data/{results}", "--verbose", "False", "--output_format", "json",
                     "--model", "small", "--language", "en", *[f"data/{folder}/{n}" for n in names]]}
    started = time.perf_counter()
    result_url = requests.post(f"{url}/api/whisper_local", json=body, timeout=30).json()["result_url"]
    deadline = time.monotonic() + 3600
    while (job := requests.get(result_url, timeout=30).json()["job"])["status"] not in ("complete", "error"):
        if time.monotonic() > deadline:
            raise SystemExit("the job did not end within an hour")
        time.sleep(0.2)
    elapsed = time.perf_counter() - started
    assert job["status"] == "complete", job["results"]
    return elapsed


def directly(client: docker.DockerClient, image: str, root: Path, folder: str,
             names: list[str]) -> tuple[float, dict[str, str]]:
    started = time.perf_counter()
    output = client.containers.run(image, ["/opt/whisper/venv/bin/python", "-c", DIRECT, "/opt/whisper/models/base",
                                           *[f"data/{folder}/{n}" for n in names]],
                                   remove=True, network_mode="host",
                                   volumes={str(root): {"bind": "/app/data", "mode": "ro"}})
    return time.perf_counter() - started, json.loads(output)


def texts_of(root: Path, results: str) -> dict[str, str]:
    return {path.stem: json.loads(path.read_text())["text"] for path in (root / results).glob("*.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 minute of speech, 8 short files")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default 3; 1 with --quick)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    image = build_service("whisper", log=lambda _: None)
    client = docker.from_env()
    long_sentences = 8 if args.quick else 40
    short_files = 8 if args.quick else 24
    print(f"# Whisper benchmark ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{'quick' if args.quick else 'full'}, {rounds} round(s))")
    with workdir("dsm-bench-whisper-") as work:
        root = work / "4cat"
        long_text = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(long_sentences))
        long_seconds = render(client, image, root / "long", {"long.wav": long_text})
        short = {f"clip{i:02d}.wav": SENTENCES[i % len(SENTENCES)] for i in range(short_files)}
        short_seconds = render(client, image, root / "short", short)
        defaults = yaml.safe_load((ROOT / "src/dmi_service_manager/defaults/config.yml").read_text())
        service = {**defaults["DOCKER_ENDPOINTS"]["whisper"], "image_name": image, "remote": False}
        rows = []
        with dsm_server(work, workers=1, DOCKER_ENDPOINTS={"whisper": service}) as (url, _):
            for label, folder, names, seconds in (("one long file", "long", ["long.wav"], long_seconds),
                                                  (f"{short_files} short files", "short", list(short),
                                                   short_seconds)):
                ours: list[float] = []
                theirs: list[float] = []
                same = True
                direct_texts: dict[str, str] = {}
                for round_number in range(rounds):
                    results = f"results-{folder}-{round_number}"
                    order = ["ours", "direct"] if round_number % 2 == 0 else ["direct", "ours"]
                    for which in order:
                        if which == "ours":
                            ours.append(through_server(url, folder, names, results))
                        else:
                            elapsed, direct_texts = directly(client, image, root, folder, names)
                            theirs.append(elapsed)
                    served = texts_of(root, results)
                    same = same and all(served.get(Path(n).stem) == direct_texts.get(n) for n in names)
                ours_rate = seconds / statistics.median(ours)
                direct_rate = seconds / statistics.median(theirs)
                ratio = ours_rate / direct_rate
                target = (verdict(ratio >= 0.9, f">= 0.9 of direct: {ratio:.2f}") if folder == "long"
                          else f"{ratio:.2f}x direct (one file per CPU side by side)")
                rows.append((f"{label}: {seconds:.0f} s of speech, audio s per wall s", f"{ours_rate:.2f}",
                             f"{direct_rate:.2f} (faster-whisper in one docker run)", target))
                rows.append((f"{label}: wall time (s), median", f"{statistics.median(ours):.1f}",
                             f"{statistics.median(theirs):.1f}", f"same transcripts: {'yes' if same else 'no'}"))
    table("Whisper (base, int8 on the CPU) through the server beside faster-whisper directly", rows)


if __name__ == "__main__":
    main()
