"""File manager benchmarks (issue 3), each beside a baseline measured in the same run.

    .venv/bin/python bench/files_bench.py [--quick]

1. 2,000 uploads of 1 KiB, one file per request: sequentially with a new connection each (as 4CAT's
   bare requests.post), and over 16 keep-alive connections (wrk); beside a bare Starlette route that
   only parses the multipart body and writes the file.
2. list_filenames of a collection of 50,000 files in nested folders, beside `find`.
3. linecount of a 1 GiB text file, beside `wc -l`.
4. A 2 GiB upload and download with curl, beside bare Starlette routes that only stream the body to
   disk and serve the file back; and the server's peak RSS.
The disk here is a shared virtual disk whose speed drifts, so rounds alternate between ours and the
baseline and the median is reported.

Every figure is for the default command, `dsm serve` with no `--workers` (one worker per CPU, at most 4),
as a user runs it; the bare baseline routes run on uvicorn with 2 workers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import requests

from common import ROOT, baseline_server, dsm_server, median_of, peak_rss_mib, table, timed, verdict, workdir, wrk

LUA = ROOT / "bench" / "upload.lua"
DEFAULT = "default `dsm serve` (no --workers) vs bare route on 2 workers"


def sequential_uploads(url: str, count: int, tag: str) -> float:
    """Files per second, each upload a fresh connection with a new name (4CAT's bare requests.post)."""
    payload = b"x" * 1024
    started = time.perf_counter()
    for index in range(count):
        response = requests.post(url, data={"folder_name": "seq"}, timeout=30,
                                 files=[("4cat_uploads", (f"{tag}-{index}.txt", payload))])
        response.raise_for_status()
    return count / (time.perf_counter() - started)


def uploads(quick: bool) -> None:
    count = 400 if quick else 2000
    rounds = 1 if quick else 5
    seconds = 3 if quick else 5
    with workdir("dsm-bench-up-") as folder:
        (folder / "ours").mkdir()
        (folder / "bare").mkdir()
        with dsm_server(folder / "ours") as (ours, _), \
                baseline_server(folder / "bare", workers=2) as (bare, _):
            seq_ours, seq_bare, wrk_ours, wrk_bare = [], [], [], []
            # Which goes first alternates, and each round's ratio is taken on its own: the disk's speed
            # drifts by more than the difference measured.
            for round_ in range(rounds):
                for which in (("ours", "bare") if round_ % 2 == 0 else ("bare", "ours")):
                    os.sync()
                    if which == "ours":
                        seq_ours.append(sequential_uploads(f"{ours}/api/send_files", count // rounds, f"o{round_}"))
                        wrk_ours.append(wrk(f"{ours}/api/send_files", seconds, 16, LUA))
                    else:
                        seq_bare.append(sequential_uploads(f"{bare}/upload", count // rounds, f"b{round_}"))
                        wrk_bare.append(wrk(f"{bare}/upload", seconds, 16, LUA))
    rate_ours = statistics.median(r["rate"] for r in wrk_ours)
    rate_bare = statistics.median(r["rate"] for r in wrk_bare)
    ratios = [o["rate"] / b["rate"] for o, b in zip(wrk_ours, wrk_bare, strict=True)]
    ratio = statistics.median(ratios)
    p99_ours = statistics.median(r["p99_ms"] for r in wrk_ours)
    p99_bare = statistics.median(r["p99_ms"] for r in wrk_bare)
    errors = sum(r["errors"] for r in wrk_ours)
    table(f"Uploads of 1 KiB, one file per request ({count} sequential; wrk {rounds}x{seconds} s, 16 connections,"
          f" rounds alternating which goes first); {DEFAULT}", [
        ("sequential, new connection each (files/s)", f"{statistics.median(seq_ours):.0f}",
         f"{statistics.median(seq_bare):.0f}", "-"),
        ("16 keep-alive connections (requests/s), median", f"{rate_ours:.0f}", f"{rate_bare:.0f}",
         verdict(rate_ours >= 2000 and ratio >= 0.7,
                 f">= 2000/s and >= 70% of bare (median of rounds: {ratio:.0%})")),
        ("each round (requests/s)", " ".join(f"{r['rate']:.0f}" for r in wrk_ours),
         " ".join(f"{r['rate']:.0f}" for r in wrk_bare), "ratios: " + " ".join(f"{r:.0%}" for r in ratios)),
        ("16 keep-alive connections, p99 (ms)", f"{p99_ours:.1f}", f"{p99_bare:.1f}", f"errors: {errors:.0f}"),
    ])


def listing(quick: bool) -> None:
    files = 5_000 if quick else 50_000
    with workdir("dsm-bench-list-") as folder:
        collection = folder / "uploads" / "big"
        per_dir = 500
        for index in range(files):
            sub = collection / f"part{index // per_dir // 10}" / f"batch{index // per_dir}"
            if index % per_dir == 0:
                sub.mkdir(parents=True)
            (sub / f"file{index}.json").touch()
        with dsm_server(folder) as (ours, _):
            requests.get(f"{ours}/api/list_filenames/big", timeout=60).raise_for_status()  # warm the cache

            def ask() -> None:
                body = requests.get(f"{ours}/api/list_filenames/big", timeout=60).json()
                assert sum(len(v) for v in body.values()) == files

            ours_time = median_of(5, lambda: timed(ask))
            find_time = median_of(5, lambda: timed(lambda: subprocess.run(
                ["find", str(collection)], stdout=subprocess.DEVNULL, check=True)))
    table(f"list_filenames of {files:,} files in nested folders (median of 5, warm cache); default `dsm serve`", [
        ("time (ms)", f"{ours_time * 1000:.0f}", f"{find_time * 1000:.0f} (find)",
         verdict(ours_time <= 3 * find_time, f"within 3x of find ({ours_time / find_time:.1f}x)")),
    ])


def linecount(quick: bool) -> None:
    size_mib = 128 if quick else 1024
    with workdir("dsm-bench-lines-") as folder:
        target = folder / "uploads" / "c" / "r" / "lines.txt"
        target.parent.mkdir(parents=True)
        line = b"x" * 99 + b"\n"
        block = line * 10_000
        with target.open("wb") as handle:
            for _ in range(size_mib * 1024 * 1024 // len(block)):
                handle.write(block)
        expected = target.stat().st_size // len(line)
        subprocess.run(["wc", "-l", str(target)], capture_output=True, check=True)  # warm the page cache
        with dsm_server(folder) as (ours, _):
            def first() -> None:
                assert requests.get(f"{ours}/api/linecount/", params={"folder": "c/r", "file": "lines.txt"},
                                    timeout=60).json() == {"lines": expected}

            full = timed(first)  # nothing cached yet: the whole file is counted
            again = median_of(5, lambda: timed(first))  # unchanged since: only the size is checked
        wc_time = median_of(5, lambda: timed(lambda: subprocess.run(["wc", "-l", str(target)], capture_output=True,
                                                                      check=True)))
    table(f"linecount of a {size_mib} MiB text file ({expected:,} lines, warm page cache); default `dsm serve`", [
        ("first count (ms)", f"{full * 1000:.0f}", f"{wc_time * 1000:.0f} (wc -l)",
         verdict(full <= 3 * wc_time, f"within 3x of wc -l ({full / wc_time:.1f}x)")),
        ("asked again, file unchanged (ms, median of 5)", f"{again * 1000:.0f}", f"{wc_time * 1000:.0f} (wc -l)",
         "-"),
    ])


def big_file(quick: bool) -> None:
    size_mib = 256 if quick else 2048
    with workdir("dsm-bench-big-") as folder:
        source = folder / "source.bin"
        subprocess.run(["dd", "if=/dev/urandom", f"of={source}", "bs=1M", f"count={size_mib}", "status=none"],
                       check=True)
        (folder / "ours").mkdir()
        (folder / "bare").mkdir()
        with dsm_server(folder / "ours") as (ours, process), \
                baseline_server(folder / "bare", workers=2) as (bare, _):
            def curl(*args: str) -> float:
                os.sync()  # no writeback of the previous transfer is left to slow this one down
                output = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_upload} %{speed_download}",
                                         "--fail", *args], capture_output=True, text=True, check=True).stdout.split()
                return max(float(value) for value in output) / 2**20

            up_ours, up_bare, down_ours, down_bare = [], [], [], []
            for round_ in range(1 if quick else 3):
                steps = [
                    lambda: up_ours.append(curl("-F", "folder_name=big", "-F", f"4cat_uploads=@{source}",
                                                f"{ours}/api/send_files")),
                    lambda: up_bare.append(curl("-T", str(source), "-X", "POST", f"{bare}/stream")),
                    lambda: down_ours.append(curl(f"{ours}/api/download/big/4cat_uploads/source.bin")),
                    lambda: down_bare.append(curl(f"{bare}/file")),
                ]
                order = [0, 1, 2, 3] if round_ % 2 == 0 else [1, 0, 3, 2]  # neither side always goes first
                for step in order:
                    steps[step]()
            rss = peak_rss_mib(process.pid)
        stored = folder / "ours" / "uploads" / "big" / "4cat_uploads" / "source.bin"
        same = not stored.exists() or stored.stat().st_size == source.stat().st_size
    up, upb = statistics.median(up_ours), statistics.median(up_bare)
    down, downb = statistics.median(down_ours), statistics.median(down_bare)
    table(f"One {size_mib} MiB file with curl (median of rounds); {DEFAULT}", [
        ("upload (MiB/s)", f"{up:.0f}", f"{upb:.0f}", verdict(up >= 0.8 * upb, f">= 80% of bare ({up / upb:.0%})")),
        ("download (MiB/s)", f"{down:.0f}", f"{downb:.0f}",
         verdict(down >= 0.8 * downb, f">= 80% of bare ({down / downb:.0%})")),
        ("server peak RSS (MiB)", f"{rss:.0f}", "-", verdict(rss < 150 and same, "< 150 MiB, flat in file size")),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round: a smoke run")
    parser.add_argument("--only", choices=["uploads", "listing", "linecount", "big"], action="append")
    args = parser.parse_args()
    print(f"# File manager benchmarks ({os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')})")
    for name, bench in (("uploads", uploads), ("listing", listing), ("linecount", linecount), ("big", big_file)):
        if not args.only or name in args.only:
            bench(args.quick)


if __name__ == "__main__":
    main()
