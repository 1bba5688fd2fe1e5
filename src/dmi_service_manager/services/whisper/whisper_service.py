"""Speech to text for 4CAT's "Audio to text" processor, on faster-whisper (CTranslate2).

4CAT sends openai-whisper's command line:
    --output_dir data/<results> --verbose False --output_format json --model small [--device cpu]
    [--initial_prompt TEXT] [--task translate] [--<option> <value> ...] data/<files>/<audio> ...
and reads back one `<audio name without extension>.json` per file, in openai-whisper's shape (`text`,
`segments`, `language`). Each file is written whole, as soon as it is done. A file that cannot be read gets
`{"text": "", "segments": [], "errors": [...]}` and the others go on; the job fails only when no file could
be read, when the model is missing, or when the GPU cannot be used.

Models are CTranslate2 conversions of Whisper, one folder each (model.bin, config.json, tokenizer.json,
vocabulary.*), found in the folders of WHISPER_MODELS_PATH (default `/models:/opt/whisper/models`: what an
admin mounts, then what is baked into the image). A model that is not installed is replaced as
WHISPER_MODEL_MAP says ("small=base,medium=base,*.en=tiny.en"); without an entry the job fails, naming the
installed ones. Options this service does not know are reported and ignored.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import glob
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

SAMPLING_RATE = 16000
SILENCE_PEAK = 1e-4  # below this peak (about -80 dBFS) a file is digital silence: no speech to look for
PROGRESS_EVERY_SECONDS = 2.0
PARTIAL_DIR = ".whisper-partial"
DEFAULT_MODELS_PATH = "/models:/opt/whisper/models"
CUDA_LIBRARY = "libcublas.so.12"
GPU_HINT = ("build the GPU variant (dsm build-service whisper --gpu) and set the service's image_name to "
            "dsm-whisper-gpu:latest, or send --device cpu")
# openai-whisper's name for a size, and the versions that answer to it, newest first
ALIASES = {"large": ["large-v3", "large-v2", "large-v1"], "turbo": ["large-v3-turbo"],
           "large-v3-turbo": ["turbo"]}
# Whisper's languages by name (openai-whisper accepts a name or a code for --language)
_LANGUAGES = (
    "english:en chinese:zh german:de spanish:es russian:ru korean:ko french:fr japanese:ja portuguese:pt "
    "turkish:tr polish:pl catalan:ca dutch:nl arabic:ar swedish:sv italian:it indonesian:id hindi:hi "
    "finnish:fi vietnamese:vi hebrew:he ukrainian:uk greek:el malay:ms czech:cs romanian:ro danish:da "
    "hungarian:hu tamil:ta norwegian:no thai:th urdu:ur croatian:hr bulgarian:bg lithuanian:lt latin:la "
    "maori:mi malayalam:ml welsh:cy slovak:sk telugu:te persian:fa latvian:lv bengali:bn serbian:sr "
    "azerbaijani:az slovenian:sl kannada:kn estonian:et macedonian:mk breton:br basque:eu icelandic:is "
    "armenian:hy nepali:ne mongolian:mn bosnian:bs kazakh:kk albanian:sq swahili:sw galician:gl marathi:mr "
    "punjabi:pa sinhala:si khmer:km shona:sn yoruba:yo somali:so afrikaans:af occitan:oc georgian:ka "
    "belarusian:be tajik:tg sindhi:sd gujarati:gu amharic:am yiddish:yi lao:lo uzbek:uz faroese:fo "
    "haitian_creole:ht pashto:ps turkmen:tk nynorsk:nn maltese:mt sanskrit:sa luxembourgish:lb myanmar:my "
    "tibetan:bo tagalog:tl malagasy:mg assamese:as tatar:tt hawaiian:haw lingala:ln hausa:ha bashkir:ba "
    "javanese:jw sundanese:su cantonese:yue burmese:my valencian:ca flemish:nl haitian:ht letzeburgesch:lb "
    "pushto:ps panjabi:pa moldavian:ro moldovan:ro sinhalese:si castilian:es mandarin:zh")
LANGUAGE_NAMES = dict(pair.split(":") for pair in _LANGUAGES.split())


class UsageError(Exception):
    """A bad command line: exit 2, like argparse."""


class JobFailed(Exception):
    """The whole job cannot go on (no model, no GPU): exit 1 with this message."""


# -- the command line ---------------------------------------------------------------------------------


def str2bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError("expected True or False")


def optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "") else float(text)


def optional_text(text: str) -> str | None:
    return None if text.strip().lower() in ("none", "") else text


def choice(*allowed: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"choose from {', '.join(allowed)}")
        return text
    return convert


def suppress_tokens(text: str) -> list[int]:
    return [int(token) for token in text.split(",") if token.strip()]


# openai-whisper's options (and a few of faster-whisper's): name -> (convert, default)
OPTIONS: dict[str, tuple[Callable[[str], Any], Any]] = {
    "model": (str, "small"),
    "model_dir": (str, None),
    "device": (str, "auto"),
    "output_dir": (str, "."),
    "output_format": (choice("json", "txt", "vtt", "srt", "tsv", "all"), "json"),
    "verbose": (str2bool, False),
    "task": (choice("transcribe", "translate"), "transcribe"),
    "language": (optional_text, None),
    "temperature": (float, 0.0),
    "best_of": (int, 5),
    "beam_size": (int, 5),
    "patience": (optional_float, None),
    "length_penalty": (optional_float, None),
    "suppress_tokens": (suppress_tokens, [-1]),
    "initial_prompt": (optional_text, None),
    "condition_on_previous_text": (str2bool, True),
    "fp16": (str2bool, True),
    "temperature_increment_on_fallback": (optional_float, 0.2),
    "compression_ratio_threshold": (optional_float, 2.4),
    "logprob_threshold": (optional_float, -1.0),
    "no_speech_threshold": (optional_float, 0.6),
    "word_timestamps": (str2bool, False),
    "prepend_punctuations": (str, "\"'“¿([{-"),
    "append_punctuations": (str, "\"'.。,，!！?？:：”)]}、"),
    "threads": (int, 0),
    "clip_timestamps": (str, "0"),
    "hallucination_silence_threshold": (optional_float, None),
    # faster-whisper's own
    "compute_type": (str, "auto"),
    "vad_filter": (str2bool, False),
    "repetition_penalty": (float, 1.0),
    "no_repeat_ngram_size": (int, 0),
    "hotwords": (optional_text, None),
    "workers": (int, 0),
    # the service manager's progress reports
    "database_key": (str, None),
    "dmi_sm_server": (str, None),
}
USAGE = """usage: whisper [--model NAME] [--output_dir DIR] [--output_format json|txt|vtt|srt|tsv|all]
               [--device auto|cpu|cuda] [--task transcribe|translate] [--language LANG]
               [--initial_prompt TEXT] [--<openai-whisper option> VALUE ...] audio [audio ...]
Options: """ + " ".join(f"--{name}" for name in OPTIONS)


@dataclass
class CommandLine:
    values: dict[str, Any]
    files: list[str]
    notes: list[str] = field(default_factory=list)


def parse_command_line(argv: list[str]) -> CommandLine:
    """openai-whisper's options in any order, then (or among them) the audio files.

    An option this service does not know is noted and skipped with its value (4CAT always sends
    `--name value` pairs), unless the next word is itself an option or an existing file.
    """
    values = {name: default for name, (_, default) in OPTIONS.items()}
    files: list[str] = []
    notes: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        index += 1
        if word == "--":
            files += argv[index:]
            break
        if word in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if not (word.startswith("--") and len(word) > 2):
            files.append(word)
            continue
        name, has_value, inline = word[2:].partition("=")
        name = name.replace("-", "_")
        if name in OPTIONS:
            if not has_value:
                if index >= len(argv):
                    raise UsageError(f"argument --{name}: expected a value")
                inline, index = argv[index], index + 1
            try:
                values[name] = OPTIONS[name][0](inline)
            except ValueError as exc:
                raise UsageError(f"argument --{name}: invalid value {inline!r} ({exc})") from None
            continue
        if not has_value and index < len(argv) and not argv[index].startswith("--") \
                and not os.path.exists(argv[index]):
            inline, index = argv[index], index + 1
        shown = f"--{name} {inline}" if inline else f"--{name}"
        notes.append(f"option {shown!r} is not supported by this service and is ignored")
    return CommandLine(values, files, notes)


# -- models -------------------------------------------------------------------------------------------


def model_folder(folder: str) -> str | None:
    """`folder` if it holds a CTranslate2 model, or its newest snapshot in a Hugging Face cache folder."""
    if os.path.isfile(os.path.join(folder, "model.bin")):
        return folder
    snapshots = [s for s in glob.glob(os.path.join(folder, "snapshots", "*")) if model_folder(s)]
    return max(snapshots, key=os.path.getmtime) if snapshots else None


def model_name(entry: str) -> str:
    """A folder's model name: `small` for `small`, `faster-whisper-small` or `models--Systran--faster-whisper-small`."""
    name = entry.split("--")[-1] if entry.startswith("models--") else entry
    if name.startswith("faster-distil-whisper-"):
        return "distil-" + name[len("faster-distil-whisper-"):]
    for prefix in ("faster-whisper-", "whisper-"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def installed_models(search: list[str]) -> dict[str, str]:
    """name -> folder; the first folder of the search path wins."""
    found: dict[str, str] = {}
    for root in search:
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            path = model_folder(os.path.join(root, entry))
            if path:
                found.setdefault(model_name(entry), path)
    return found


def parse_model_map(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.replace(";", ",").replace("\n", ",").split(","):
        if not item.strip():
            continue
        asked, equals, answer = item.partition("=")
        if not equals or not asked.strip() or not answer.strip():
            raise JobFailed(f"WHISPER_MODEL_MAP: {item.strip()!r} is not requested=installed (e.g. small=base)")
        pairs.append((asked.strip(), answer.strip()))
    return pairs


@dataclass(frozen=True)
class ModelChoice:
    requested: str
    name: str
    path: str
    how: str


def choose_model(requested: str, installed: dict[str, str], mapping: list[tuple[str, str]]) -> ModelChoice:
    if os.path.isdir(requested) and model_folder(requested):
        return ModelChoice(requested, os.path.basename(requested.rstrip("/")), str(model_folder(requested)),
                           "a model folder named by path")

    def find(name: str) -> tuple[str, str] | None:
        for candidate in [name, *ALIASES.get(name, [])]:
            if candidate in installed:
                return candidate, installed[candidate]
        return None

    names = ", ".join(sorted(installed)) or "none"
    found = find(requested)
    if found:
        how = "installed" if found[0] == requested else f"installed as {found[0]}"
        return ModelChoice(requested, found[0], found[1], how)
    rule = next(((asked, answer) for asked, answer in mapping if asked == requested), None) \
        or next(((asked, answer) for asked, answer in mapping if fnmatch.fnmatchcase(requested, asked)), None)
    if rule is None:
        raise JobFailed(f"the Whisper model {requested!r} is not installed and WHISPER_MODEL_MAP has no entry for it. "
                        f"Installed models: {names}. Install it in the model folder or map it to an installed "
                        f"one in the service's environment (e.g. WHISPER_MODEL_MAP: \"{requested}=base\").")
    found = find(rule[1])
    if found is None:
        raise JobFailed(f"the Whisper model {requested!r} is not installed, and WHISPER_MODEL_MAP maps it to "
                        f"{rule[1]!r}, which is not installed either. Installed models: {names}.")
    return ModelChoice(requested, found[0], found[1], f"WHISPER_MODEL_MAP maps {rule[0]} to {rule[1]}")


# -- where it runs ------------------------------------------------------------------------------------


def cpu_limit() -> int:
    """The CPUs this container may use: its CPU set, capped by its cgroup's CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except OSError:
        count = os.cpu_count() or 1
    quota: float | None = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as handle:
            limit, period = handle.read().split()[:2]
        if limit != "max":
            quota = int(limit) / int(period)
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError):
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as p:
                limit_us, period_us = int(q.read()), int(p.read())
            if limit_us > 0:
                quota = limit_us / period_us
    if quota:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def gpu_attached() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


@dataclass(frozen=True)
class Placement:
    device: str
    device_index: list[int]
    compute_type: str
    cpu_threads: int
    workers: int


def place(values: dict[str, Any], files: int) -> Placement:
    """Where the model runs: CUDA in float16 when the job has a GPU (and --device cpu was not sent), else the
    CPU in int8 with as many threads as the container may use, spread over files run side by side."""
    import ctranslate2

    device = str(values["device"]).lower()
    if device == "auto":
        device = "cuda" if gpu_attached() else "cpu"
    cpus = values["threads"] if values["threads"] > 0 else cpu_limit()
    if device == "cpu":
        workers = values["workers"] or min(files, cpus)
        workers = max(1, min(workers, files))
        compute = "int8" if values["compute_type"] == "auto" else values["compute_type"]
        placement = Placement("cpu", [0], compute, max(1, cpus // workers), workers)
    elif device == "cuda" or device.startswith("cuda:"):
        if not gpu_attached():
            raise JobFailed("--device cuda was asked for, but this job has no GPU: the server attaches one only "
                            "with GPU_ENABLED and the service's gpu: True. Send --device cpu to run on the CPU.")
        try:
            ctypes.CDLL(CUDA_LIBRARY)
        except OSError as exc:
            raise JobFailed(f"this job has a GPU, but the CUDA libraries are not in this image ({exc}); "
                            f"{GPU_HINT}.") from None
        count = ctranslate2.get_cuda_device_count()
        if count < 1:
            raise JobFailed("this job has a GPU device, but CUDA finds none: the NVIDIA driver library "
                            "(libcuda.so.1, mounted by the NVIDIA container runtime) is missing or does not "
                            "match the device. Send --device cpu to run on the CPU.")
        indexes = [int(device.split(":")[1])] if ":" in device else list(range(count))
        workers = max(1, min(values["workers"] or len(indexes), files)) if len(indexes) > 1 else 1
        compute = values["compute_type"]
        if compute == "auto":
            compute = "float16" if values["fp16"] else "float32"
        placement = Placement("cuda", indexes, compute, max(1, min(cpus, 4)), workers)
    else:
        raise UsageError(f"argument --device: {values['device']!r} is not cpu, cuda, cuda:N or auto")
    supported = ctranslate2.get_supported_compute_types(placement.device)
    if placement.compute_type not in supported and placement.compute_type != "default":
        raise JobFailed(f"compute type {placement.compute_type!r} is not supported on {placement.device} "
                        f"(supported: {', '.join(sorted(supported))})")
    return placement


# -- transcribing -------------------------------------------------------------------------------------


def transcribe_options(values: dict[str, Any]) -> dict[str, Any]:
    """faster-whisper's arguments for openai-whisper's options, with openai-whisper's defaults."""
    import numpy as np

    temperature = values["temperature"]
    increment = values["temperature_increment_on_fallback"]
    temperatures = [round(float(t), 4) for t in np.arange(temperature, 1.0 + 1e-6, increment)] \
        if increment else [temperature]
    options: dict[str, Any] = {
        "task": values["task"],
        "language": values["language"],
        "beam_size": values["beam_size"],
        "best_of": values["best_of"],
        "patience": values["patience"] if values["patience"] is not None else 1.0,
        "length_penalty": values["length_penalty"] if values["length_penalty"] is not None else 1.0,
        "temperature": temperatures or [temperature],
        "compression_ratio_threshold": values["compression_ratio_threshold"],
        "log_prob_threshold": values["logprob_threshold"],
        "no_speech_threshold": values["no_speech_threshold"],
        "condition_on_previous_text": values["condition_on_previous_text"],
        "initial_prompt": values["initial_prompt"],
        "suppress_tokens": values["suppress_tokens"],
        "word_timestamps": values["word_timestamps"],
        "prepend_punctuations": values["prepend_punctuations"],
        "append_punctuations": values["append_punctuations"],
        "clip_timestamps": values["clip_timestamps"],
        "hallucination_silence_threshold": values["hallucination_silence_threshold"],
        "vad_filter": values["vad_filter"],
        "repetition_penalty": values["repetition_penalty"],
        "no_repeat_ngram_size": values["no_repeat_ngram_size"],
        "hotwords": values["hotwords"],
    }
    return options


def language_code(language: str, supported: list[str]) -> str | None:
    """The code of a language given by code or name; None for one outside `supported` (an English-only
    model's list); a UsageError for one Whisper does not know at all."""
    lowered = language.strip().lower()
    code = lowered if lowered in LANGUAGE_NAMES.values() else LANGUAGE_NAMES.get(lowered.replace(" ", "_"))
    if code is None or (code not in supported and len(supported) > 1):
        raise UsageError(f"argument --language: {language!r} is not a language this model knows "
                         f"(a code such as en, nl, de, or a name such as Dutch)")
    return code if code in supported else None


class Transcriber:
    def __init__(self, choice: ModelChoice, placement: Placement, options: dict[str, Any]) -> None:
        import ctranslate2
        import faster_whisper
        from faster_whisper import WhisperModel

        self.choice, self.placement = choice, placement
        try:
            self.model = WhisperModel(choice.path, device=placement.device, device_index=placement.device_index,
                                      compute_type=placement.compute_type, cpu_threads=placement.cpu_threads,
                                      num_workers=placement.workers, local_files_only=True)
        except Exception as exc:
            if "out of memory" in str(exc).lower() and placement.device == "cuda":
                raise JobFailed(f"CUDA error: out of memory while loading {choice.name} ({describe(exc)})") from None
            raise JobFailed(f"the model {choice.name} ({choice.path}) could not be loaded: {describe(exc)}") from None
        self.multilingual = bool(self.model.model.is_multilingual)
        self.options = dict(options)
        self.notes: list[str] = []
        if not self.multilingual:
            if self.options["task"] == "translate":
                self.notes.append(f"the model {choice.name} is English-only: --task translate has no effect")
            if self.options["language"] is not None and language_code(self.options["language"], ["en"]) != "en":
                self.notes.append(f"the model {choice.name} is English-only: --language "
                                  f"{self.options['language']} has no effect")
            self.options["language"] = "en"  # what such a model always transcribes
        elif self.options["language"] is not None:
            self.options["language"] = language_code(self.options["language"], list(self.model.supported_languages))
        self.record = {
            "model": {"requested": choice.requested, "name": choice.name, "path": choice.path, "how": choice.how,
                      "multilingual": self.multilingual,
                      "engine": f"faster-whisper {faster_whisper.__version__}, CTranslate2 {ctranslate2.__version__}"},
            "settings": {"device": placement.device, "compute_type": placement.compute_type,
                         "cpu_threads": placement.cpu_threads, "workers": placement.workers, **self.options},
        }

    def failed(self, reason: str) -> dict[str, Any]:
        return {"text": "", "segments": [], "errors": [reason], **self.record}

    def transcribe(self, path: str, on_segment: Callable[[Any], None] | None = None) -> dict[str, Any]:
        """One file's result; a file that cannot be read or transcribed gets its errors, never an exception
        (except running out of GPU memory, which no later file would escape either)."""
        import av
        import numpy as np
        from faster_whisper import decode_audio

        if not os.path.isfile(path):
            return self.failed(f"file not found: {path}")
        if os.path.getsize(path) == 0:
            return self.failed("the file is empty (0 bytes)")
        try:
            with av.open(path) as container:
                if not container.streams.audio:
                    return self.failed("the file has no audio track")
            audio = decode_audio(path, sampling_rate=SAMPLING_RATE)
        except Exception as exc:
            return self.failed(f"the audio could not be decoded: {describe(exc)}")
        if audio.size == 0:
            return self.failed("the file holds no audio samples")
        duration = round(audio.size / SAMPLING_RATE, 3)
        if float(np.abs(audio).max()) < SILENCE_PEAK:
            return {"text": "", "segments": [], "language": self.options["language"], "duration": duration,
                    "notes": ["digital silence: no speech to transcribe"], **self.record}
        try:
            segments, info = self.model.transcribe(audio, **self.options)
            found = []
            for number, segment in enumerate(segments):
                if on_segment:
                    on_segment(segment)
                found.append(segment_dict(number, segment))
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower() and self.placement.device == "cuda":
                raise JobFailed(f"CUDA error: out of memory ({exc})") from None
            return self.failed(f"transcription failed: {describe(exc)}")
        except Exception as exc:
            return self.failed(f"transcription failed: {describe(exc)}")
        return {"text": "".join(s["text"] for s in found), "segments": found, "language": info.language,
                "language_probability": round(float(info.language_probability), 4), "duration": duration,
                **self.record}


def segment_dict(number: int, segment: Any) -> dict[str, Any]:
    """openai-whisper's segment: 0-based id, seek in frames, times in seconds."""
    result = {"id": number, "seek": segment.seek, "start": round(segment.start, 3), "end": round(segment.end, 3),
              "text": segment.text, "tokens": list(segment.tokens), "temperature": segment.temperature,
              "avg_logprob": segment.avg_logprob, "compression_ratio": segment.compression_ratio,
              "no_speech_prob": segment.no_speech_prob}
    if segment.words:
        result["words"] = [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3),
                            "probability": w.probability} for w in segment.words]
    return result


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# -- writing results ----------------------------------------------------------------------------------


def timestamp(seconds: float, comma: bool = False, always_hours: bool = False) -> str:
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds_part, milliseconds = divmod(milliseconds, 1000)
    text = f"{minutes:02d}:{seconds_part:02d}{',' if comma else '.'}{milliseconds:03d}"
    return f"{hours:02d}:{text}" if hours or always_hours else text


def render(result: dict[str, Any], kind: str) -> bytes:
    segments = result.get("segments", [])
    if kind == "json":
        return json.dumps(result).encode()
    if kind == "txt":
        return "".join(s["text"].strip() + "\n" for s in segments).encode()
    if kind == "tsv":
        rows = ["start\tend\ttext"] + [f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t"
                                       f"{s['text'].strip().replace(chr(9), ' ')}" for s in segments]
        return ("\n".join(rows) + "\n").encode()
    if kind == "vtt":
        cues = [f"{timestamp(s['start'])} --> {timestamp(s['end'])}\n{s['text'].strip()}\n" for s in segments]
        return ("WEBVTT\n\n" + "\n".join(cues)).encode()
    cues = [f"{i}\n{timestamp(s['start'], True, True)} --> {timestamp(s['end'], True, True)}\n{s['text'].strip()}\n"
            for i, s in enumerate(segments, start=1)]
    return "\n".join(cues).encode()


class Publisher:
    """Writes result files so that each appears whole or not at all: an unnamed file (O_TMPFILE) linked
    into place once written, else a file in a hidden folder renamed into place."""

    def __init__(self, folder: str, paths: list[str]) -> None:
        self.folder = folder
        self.partial: str | None = None
        self.names = result_names(paths)

    def name_for(self, path: str, kind: str) -> str:
        return f"{self.names[path]}.{kind}"

    def publish(self, name: str, data: bytes) -> None:
        target = os.path.join(self.folder, name)
        try:
            descriptor = os.open(self.folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
            self._publish_by_rename(target, data)
            return
        folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc link: a dir_fd makes os.link use linkat
            source, name = f"/proc/self/fd/{descriptor}", os.path.basename(target)
            try:
                os.link(source, name, dst_dir_fd=folder, follow_symlinks=True)
            except FileExistsError:
                os.unlink(name, dir_fd=folder)
                os.link(source, name, dst_dir_fd=folder, follow_symlinks=True)
        finally:
            os.close(descriptor)
            os.close(folder)

    def _publish_by_rename(self, target: str, data: bytes) -> None:
        self.partial = os.path.join(self.folder, PARTIAL_DIR)
        os.makedirs(self.partial, exist_ok=True)
        temporary = os.path.join(self.partial, f"{os.path.basename(target)}.{os.getpid()}.{threading.get_ident()}")
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, target)

    def close(self) -> None:
        if self.partial:
            with contextlib.suppress(OSError):
                os.rmdir(self.partial)


def result_names(paths: list[str]) -> dict[str, str]:
    """Each input's result name, without the format's extension, fixed by the order of the arguments (files
    are transcribed side by side, so the order they finish in is chance): `<stem>` as openai-whisper names
    it; a later input with a stem already given gets `<name with extension>`, then `<name>-2`, `-3`..."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for path in paths:
        if path in names:
            continue
        base = os.path.basename(path)
        stem = os.path.splitext(base)[0] or base
        name = next(n for n in (stem, base, *(f"{base}-{i}" for i in range(2, len(paths) + 2))) if n not in taken)
        names[path] = name
        taken.add(name)
    return names


class Progress:
    def __init__(self, key: str | None, server: str | None, total: int) -> None:
        self.url = f"{server.rstrip('/')}/status_update/" if key and server else None
        self.key, self.total, self.sent_at = key, total, 0.0

    def report(self, done: int, failed: int = 0, force: bool = False) -> None:
        """`done` files of the total are through (4CAT's count), `failed` of them could not be read."""
        if self.url is None or not (force or time.monotonic() - self.sent_at >= PROGRESS_EVERY_SECONDS
                                    or done == self.total):
            return
        message = f"Transcribed {done - failed} of {self.total} audio files"
        if failed:
            message += f" ({failed} could not be read)"
        query = urllib.parse.urlencode({"key": self.key, "status": "running", "processed_records": done,
                                        "message": message})
        try:
            urllib.request.urlopen(urllib.request.Request(f"{self.url}?{query}", data=b"", method="POST"), timeout=5)
        except OSError as exc:
            print(f"whisper: progress update failed: {exc}", file=sys.stderr)
        self.sent_at = time.monotonic()


# -- the job ------------------------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"whisper: {text}", flush=True)


def run(argv: list[str]) -> int:
    command = parse_command_line(argv)
    values = command.values
    for note in command.notes:
        say(note)
    if not command.files:
        raise UsageError("no audio files given")
    search = [values["model_dir"]] if values["model_dir"] else []
    search += [p for p in os.environ.get("WHISPER_MODELS_PATH", DEFAULT_MODELS_PATH).split(":") if p]
    installed = installed_models(search)
    choice = choose_model(values["model"], installed, parse_model_map(os.environ.get("WHISPER_MODEL_MAP", "")))
    if choice.how.startswith("WHISPER_MODEL_MAP"):
        say(f"model {choice.requested!r} is not installed; running {choice.name!r} instead ({choice.how}; "
            f"installed: {', '.join(sorted(installed))})")
    placement = place(values, len(command.files))
    started = time.monotonic()
    transcriber = Transcriber(choice, placement, transcribe_options(values))
    for note in transcriber.notes:
        say(note)
    threads = f"{placement.cpu_threads} thread{'s' if placement.cpu_threads > 1 else ''}"
    say(f"running {choice.name} ({choice.path}) on {placement.device} ({placement.compute_type}, "
        f"{placement.workers} at once, {threads} each) for {len(command.files)} file(s); "
        f"loaded in {time.monotonic() - started:.1f} s")
    os.makedirs(values["output_dir"], exist_ok=True)
    publisher = Publisher(values["output_dir"], command.files)
    kinds = ["txt", "vtt", "srt", "tsv", "json"] if values["output_format"] == "all" else [values["output_format"]]
    progress = Progress(values["database_key"], values["dmi_sm_server"], len(command.files))
    verbose = values["verbose"]

    def show(segment: Any) -> None:
        print(f"[{timestamp(segment.start)} --> {timestamp(segment.end)}] {segment.text}", flush=True)

    def one(path: str) -> tuple[str, dict[str, Any], float]:
        began = time.monotonic()
        result = transcriber.transcribe(path, show if verbose and placement.workers == 1 else None)
        for kind in kinds:
            publisher.publish(publisher.name_for(path, kind), render(result, kind))
        return path, result, time.monotonic() - began

    read = failed = 0
    audio_seconds = 0.0
    first_error = ""
    try:
        with ThreadPoolExecutor(max_workers=placement.workers) as pool:
            futures = [pool.submit(one, path) for path in command.files]
            for done, future in enumerate(as_completed(futures), start=1):
                path, result, seconds = future.result()
                if result.get("errors"):
                    failed += 1
                    first_error = first_error or f"{path}: {result['errors'][0]}"
                    say(f"[{done}/{len(futures)}] {path}: failed: {result['errors'][0]}")
                else:
                    read += 1
                    audio_seconds += result.get("duration", 0.0)
                    text = " ".join(result["text"].split())
                    say(f"[{done}/{len(futures)}] {path}: {result.get('duration', 0):.1f} s of audio in "
                        f"{seconds:.1f} s, language {result.get('language')}: "
                        f"{text[:120] + ('...' if len(text) > 120 else '') or '(no speech)'}")
                progress.report(done, failed)
    finally:
        publisher.close()
    elapsed = time.monotonic() - started
    say(f"done: {read} of {len(command.files)} file(s) transcribed, {failed} failed; {audio_seconds:.1f} s of "
        f"audio in {elapsed:.1f} s with {choice.name} (asked for {choice.requested}) on {placement.device}")
    if read == 0:
        print(f"whisper: none of the {len(command.files)} audio file(s) could be read; first: {first_error}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    try:
        return run(argv)
    except UsageError as exc:
        print(f"{USAGE.splitlines()[0]}\nwhisper: error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"whisper: {exc}", file=sys.stderr)
        return 1


def _stopped(signum: int, _frame: Any) -> None:
    """A stop (`docker stop`, a cancel, a timeout) ends the run at once. The service runs as the container's
    process 1, which the kernel never ends for a signal it has no handler for: without this, every stop
    would wait out the server's grace period and end in SIGKILL. Each file written so far is whole."""
    os.write(2, f"whisper: stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)
    sys.exit(main(sys.argv[1:]))
