"""OCR for 4CAT's "Text from image" processor, on Tesseract.

4CAT sends `--model <name> --output_dir data/<results> --images data/<files>/<img> ...`. Whatever model
it names (paddle_ocr, ...), this service runs Tesseract and records what it ran in `model_type`.
One JSON file per image is written as soon as that image is done, because 4CAT counts result files
for its progress bar; with `--database_key` and `--dmi_sm_server` progress is also posted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

PROGRESS_EVERY_IMAGES = 5
PROGRESS_EVERY_SECONDS = 2.0
TESSERACT_TIMEOUT = 300


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ocr", description=__doc__)
    parser.add_argument("--model", default="tesseract", help="the model 4CAT asks for; Tesseract runs either way")
    parser.add_argument("--output_dir", required=True, help="folder for one <image name>.json per image")
    parser.add_argument("--images", nargs="+", action="extend", required=True, help="image files")
    parser.add_argument("--lang", default="eng", help="Tesseract language(s), e.g. eng, deu or eng+nld")
    parser.add_argument("--database_key", help="job id, for progress updates")
    parser.add_argument("--dmi_sm_server", help="DMI Service Manager URL, for progress updates")
    parser.add_argument("--workers", type=int, default=0, help="images at once (default: one per CPU)")
    return parser.parse_args(argv)


def tesseract_version() -> str:
    done = subprocess.run(["tesseract", "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].strip() if first else "tesseract"


def text_and_words(tsv: str) -> tuple[str, list[dict[str, Any]]]:
    """Tesseract's TSV as text (lines joined by \\n, blocks by \\n\\n) and words with boxes."""
    blocks: dict[int, dict[tuple[int, int], list[str]]] = {}
    words: list[dict[str, Any]] = []
    rows = tsv.splitlines()
    header = rows[0].split("\t") if rows else []
    for row in rows[1:]:
        values = dict(zip(header, row.split("\t"), strict=False))
        text = values.get("text", "").strip()
        if values.get("level") != "5" or not text:
            continue
        block, paragraph, line = int(values["block_num"]), int(values["par_num"]), int(values["line_num"])
        blocks.setdefault(block, {}).setdefault((paragraph, line), []).append(text)
        words.append({
            "text": text,
            "confidence": float(values.get("conf", -1)),
            "box": {key: int(values[key]) for key in ("left", "top", "width", "height")},
            "block": block,
            "paragraph": paragraph,
            "line": line,
            "word": int(values["word_num"]),
        })
    text = "\n\n".join(
        "\n".join(" ".join(line_words) for _, line_words in sorted(lines.items()))
        for _, lines in sorted(blocks.items())
    )
    return text, words


NOT_FOUND = "image not found"


def recognise(path: str, lang: str, model_type: str, requested: str) -> dict[str, Any]:
    """One image's result; whatever goes wrong with one image never stops the others."""
    try:
        return _recognise(path, lang, model_type, requested)
    except Exception as exc:
        return {"filename": os.path.basename(path), "model_type": model_type, "requested_model": requested,
                "success": False, "error": f"OCR failed: {type(exc).__name__}: {exc}"}


def _recognise(path: str, lang: str, model_type: str, requested: str) -> dict[str, Any]:
    name = os.path.basename(path)
    result: dict[str, Any] = {"filename": name, "model_type": model_type, "requested_model": requested}
    if not os.path.isfile(path):
        return {**result, "success": False, "error": f"{NOT_FOUND}: {path}"}
    environment = {**os.environ, "OMP_THREAD_LIMIT": "1"}  # one thread per image; images run side by side
    try:
        done = subprocess.run(["tesseract", path, "stdout", "-l", lang, "tsv"], capture_output=True, text=True,
                              errors="replace", check=False, env=environment, timeout=TESSERACT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {**result, "success": False, "error": f"Tesseract took more than {TESSERACT_TIMEOUT} s"}
    if done.returncode != 0:
        problem = " ".join(done.stderr.strip().splitlines()[-2:]) or f"exit code {done.returncode}"
        return {**result, "success": False, "error": f"the image could not be read: {problem}"}
    text, words = text_and_words(done.stdout)
    if not text.strip():
        return {**result, "success": False, "error": "no text found in the image"}
    return {**result, "success": True, "simplified_text": {"raw_text": text}, "raw_output": words}


PARTIAL_DIR = ".ocr-partial"


def write_result(output_dir: str, result: dict[str, Any]) -> None:
    """Write <image name without extension>.json in one rename, so nobody reads half a file.

    The file is first written in a hidden folder beside the results (same file system, so the rename is
    atomic), never in the results folder itself, where 4CAT counts and later parses every file.
    """
    stem = os.path.splitext(result["filename"])[0] or "image"
    target = os.path.join(output_dir, f"{stem}.json")
    partial = os.path.join(output_dir, PARTIAL_DIR)
    os.makedirs(partial, exist_ok=True)
    temporary = os.path.join(partial, f"{stem}.{os.getpid()}.{threading.get_ident()}.json")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(result, handle, ensure_ascii=False)
    os.replace(temporary, target)


class Progress:
    def __init__(self, key: str | None, server: str | None, total: int) -> None:
        self.url = f"{server.rstrip('/')}/status_update/" if key and server else None
        self.key = key
        self.total = total
        self.sent_at = 0.0
        self.sent_count = -1

    def report(self, done: int, force: bool = False) -> None:
        if self.url is None:
            return
        due = (done - self.sent_count >= PROGRESS_EVERY_IMAGES
               or time.monotonic() - self.sent_at > PROGRESS_EVERY_SECONDS)
        if not (force or due):
            return
        query = urllib.parse.urlencode({"key": self.key, "status": "running", "processed_records": done,
                                        "message": f"Processed {done} of {self.total} images"})
        try:
            urllib.request.urlopen(urllib.request.Request(f"{self.url}?{query}", data=b"", method="POST"), timeout=5)
        except OSError as exc:
            print(f"progress update failed: {exc}", file=sys.stderr)
        self.sent_at, self.sent_count = time.monotonic(), done


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    model_type = tesseract_version()
    progress = Progress(args.database_key, args.dmi_sm_server, len(args.images))
    workers = args.workers or os.cpu_count() or 1
    failed = 0
    missing = 0  # paths that name no file
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(recognise, path, args.lang, model_type, args.model) for path in args.images]
        for done, future in enumerate(as_completed(futures), start=1):
            result = future.result()
            write_result(args.output_dir, result)
            failed += not result["success"]
            missing += not result["success"] and result["error"].startswith(NOT_FOUND)
            progress.report(done)
    progress.report(len(args.images), force=True)
    with contextlib.suppress(OSError):  # left only if another writer still uses it
        os.rmdir(os.path.join(args.output_dir, PARTIAL_DIR))
    print(f"OCR done: {len(args.images) - failed} of {len(args.images)} images with text ({model_type}, "
          f"language {args.lang})")
    if args.images and missing == len(args.images):
        # Not one path names a file: the paths are wrong (an upload's path in local mode, say), not the images.
        # Each has its failure file, as 4CAT expects of a bad image; the job itself fails, so 4CAT says so.
        print(f"ocr: none of the {len(args.images)} image(s) exists; first: {NOT_FOUND}: {args.images[0]}",
              file=sys.stderr)
        return 1
    return 0


def _stopped(signum: int, _frame: Any) -> None:
    """A stop (`docker stop`, a cancel, a timeout) ends the run at once. The service runs as the container's
    process 1, which the kernel never ends for a signal it has no handler for: without this, every stop
    would wait out the server's grace period and end in SIGKILL. Each file written so far is whole."""
    os.write(2, f"ocr: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)
    sys.exit(main(sys.argv[1:]))
