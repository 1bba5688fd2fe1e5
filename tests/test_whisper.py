"""The bundled Whisper service, driven through the server as 4CAT's "Audio to text" processor drives it.

Clips are spoken by espeak-ng inside the image from known text, in the formats 4CAT sends and users upload;
transcripts are scored by word error rate against that text, beside faster-whisper run directly on the same
clips with the same model.
"""

from __future__ import annotations

import json
import re
import shlex
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from dmi_service_manager.runtime.images import build_service, image_file
from fourcat import FourCat
from support import ROOT, Server, base_config, dsm, wait_until

WHISPER = "dsm-whisper:latest"
DEFAULT_CONFIG = ROOT / "src" / "dmi_service_manager" / "defaults" / "config.yml"
GPU_DISABLED = "GPU not enabled on this instance of DMI Service Manager"
JOB_SECONDS = 240  # every wait on a job is bounded; a few short clips take seconds on two cores

# The first build of the image (a Debian base with mmdebstrap, wheels from PyPI) runs in a fixture.
pytestmark = pytest.mark.timeout(900)

CLIPS = {  # file name -> what is said
    "speech one.wav": "Digital methods study the web with its own tools.",
    "two.mp3": "Every clip in this test was spoken by a computer.",
    "three.ogg": "Whisper turns the speech in audio files into written words.",
    "four.m4a": "The weather is nice today and the park is full of people.",
    "five.flac": "Please send the results to the research team by Friday.",
    "six.mp4": "This video has a picture and a sound track.",
    "seven.webm": "Researchers collect posts from many social media platforms.",
}
GERMAN = "Guten Morgen. Heute ist ein schöner Tag, und die Sonne scheint."
# One thread per transcription, as the service runs several files side by side: the same arithmetic.
DIRECT = """
import json, sys
from faster_whisper import WhisperModel
model = WhisperModel(sys.argv[1], device="cpu", compute_type="int8", cpu_threads=1)
texts = {}
for path in sys.argv[2:]:
    segments, info = model.transcribe(path, language="en", beam_size=5)
    texts[path] = "".join(segment.text for segment in segments)
print(json.dumps(texts))
"""


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9äöüß']+", text.lower().replace("-", " "))


def word_error_rate(expected: str, found: str) -> float:
    """Word-level edit distance over the expected number of words."""
    wanted, got = words(expected), words(found)
    row = list(range(len(got) + 1))
    for i, word in enumerate(wanted, start=1):
        previous, row[0] = row[0], i
        for j, other in enumerate(got, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1] / max(len(wanted), 1)


@pytest.fixture(scope="module")
def whisper_image() -> str:
    docker.from_env().ping()
    return build_service("whisper", log=lambda _: None)


def render(client: docker.DockerClient, folder: Path, clips: dict[str, str], voice: str = "en-us") -> None:
    """Speak each text into its file in `folder` (the extension picks the format), in one container."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = []
    for index, (name, text) in enumerate(clips.items()):
        (folder / f".text{index}").write_text(text)
        steps.append(f"render-speech --voice {voice} --text-file data/.text{index} --out {shlex.quote('data/' + name)}")
    client.containers.run(WHISPER, ["sh", "-c", " && ".join(steps) + " > /dev/null"], remove=True,
                          network_mode="none", volumes={str(folder): {"bind": "/app/data", "mode": "rw"}})
    for index in range(len(clips)):
        (folder / f".text{index}").unlink()


@pytest.fixture(scope="module")
def clips(whisper_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    client = docker.from_env()
    render(client, folder, CLIPS)
    render(client, folder, {"german.wav": GERMAN}, voice="de")
    client.containers.run(WHISPER, ["render-speech", "--silence", "3", "--out", "data/silence.wav"], remove=True,
                          network_mode="none", volumes={str(folder): {"bind": "/app/data", "mode": "rw"}})
    (folder / "broken.mp3").write_bytes(b"ID3\x03\x00 this is not an mp3 at all " * 20)
    (folder / "empty.ogg").write_bytes(b"")
    return folder


def whisper_service(**changes: Any) -> dict[str, Any]:
    """The whisper service exactly as the embedded default configuration has it, with `changes`."""
    service: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG.read_text())["DOCKER_ENDPOINTS"]["whisper"]
    service.update(changes)
    return service


@pytest.fixture
def whisper_server(make_server: Callable[..., Server], tmp_path: Path, whisper_image: str) -> Server:
    config = base_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["whisper"] = whisper_service()
    return make_server(config)


def four_cat_body(results: str, files: list[str], model: str = "small", gpu: bool = True, prompt: str = "",
                  translate: bool = False, advanced: dict[str, Any] | None = None) -> dict[str, Any]:
    """The request body as 4CAT's audio_to_text.py builds it."""
    args = ["--output_dir", results, "--verbose", "False", "--output_format", "json", "--model", model]
    if not gpu:
        args += ["--device", "cpu"]
    if prompt:
        args += ["--initial_prompt", prompt]
    if translate:
        args += ["--task", "translate"]
    for setting, value in (advanced or {}).items():
        setting = setting if setting[:2] == "--" else "--" + setting.lstrip("-")
        args += [setting, str(value)]
    return {"args": args + files}


def direct_texts(client: docker.DockerClient, folder: Path, names: list[str], model: str = "base") -> dict[str, str]:
    """faster-whisper run directly in the same image on the same clips: file name -> text."""
    output = client.containers.run(
        WHISPER, ["/opt/whisper/venv/bin/python", "-c", DIRECT, f"/opt/whisper/models/{model}",
                  *[f"data/{name}" for name in names]],
        remove=True, network_mode="none", volumes={str(folder): {"bind": "/app/data", "mode": "ro"}})
    return {Path(path).name: text for path, text in json.loads(output).items()}


def results_of(job: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = json.loads(job["results"])
    return results


def test_the_gpu_check_tells_4cat_to_carry_on_on_the_cpu(whisper_server: Server) -> None:
    status, body = FourCat(whisper_server.url).check_gpu_memory("whisper")
    assert (status, body["reason"]) == (400, GPU_DISABLED)
    endpoints = whisper_server.get("/api/").json()["endpoints"]
    assert {"whisper_local", "whisper_remote"} <= {e.rsplit("/", 1)[-1] for e in endpoints}, endpoints


def test_remote_mode_transcribes_every_format_as_well_as_faster_whisper_directly(
        whisper_server: Server, clips: Path, tmp_path: Path, docker_client: docker.DockerClient) -> None:
    names = list(CLIPS)
    client = FourCat(whisper_server.url, mode="remote")
    files, results = client.send_files("audio-collection", "texts_abc", [clips / name for name in names])
    stored = [client.stored_name(name) for name in names]
    body = four_cat_body(f"data/{results}", [f"data/{files}/{name}" for name in stored],
                         advanced={"--language": "en"})
    result_url = client.submit("whisper", body)

    # While it runs, 4CAT counts the result files; every file listed must already be whole JSON.
    seen_counts: set[int] = set()
    unreadable: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            listed = client.folder_files(results).get(".", [])
            seen_counts.add(len(listed))
            for name in listed:
                response = whisper_server.get(f"/api/download/{results}/{name}")
                try:
                    json.loads(response.content)
                except ValueError:
                    unreadable.append(name)
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job = client.poll_until_done(result_url, wait_period=0.5, limit=JOB_SECONDS)
    finally:
        done.set()
        watcher.join(30)
    assert job["status"] == "complete"
    assert not unreadable and len(seen_counts - {0, len(names)}) >= 1, (unreadable, seen_counts)
    report = results_of(job)["report"]
    assert "model 'small' is not installed; running 'base' instead" in report, report

    saved = {p.name: json.loads(p.read_text()) for p in client.download_results("audio-collection", "texts_abc",
                                                                                   tmp_path / "downloaded")}
    assert sorted(saved) == sorted(Path(name).stem + ".json" for name in stored)
    assert "speech_one.json" in saved  # the name 4CAT predicts for "speech one.wav"
    direct = direct_texts(docker_client, clips, names)
    ours_total = direct_total = 0.0
    for name, stored_name in zip(names, stored, strict=True):
        result = saved[Path(stored_name).stem + ".json"]
        assert result["language"] == "en" and isinstance(result["text"], str) and "errors" not in result
        segment = result["segments"][0]
        assert segment["id"] == 0 and {"seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                                       "compression_ratio", "no_speech_prob"} <= set(segment)
        assert result["text"] == "".join(s["text"] for s in result["segments"])
        assert result["model"]["requested"] == "small" and result["model"]["name"] == "base"
        assert "WHISPER_MODEL_MAP" in result["model"]["how"]
        assert result["settings"]["device"] == "cpu" and result["settings"]["compute_type"] == "int8"
        ours, theirs = word_error_rate(CLIPS[name], result["text"]), word_error_rate(CLIPS[name], direct[name])
        assert ours <= theirs + 1e-9, (name, result["text"], direct[name])
        ours_total, direct_total = ours_total + ours, direct_total + theirs
    assert ours_total / len(names) <= 0.35, saved  # real transcripts, not noise
    print(f"mean word error rate: service {ours_total / len(names):.3f}, direct {direct_total / len(names):.3f}")


def test_local_mode_with_every_option_4cat_sends(whisper_server: Server, clips: Path, tmp_path: Path) -> None:
    staging = tmp_path / "4cat" / "staging-1"
    staging.mkdir(parents=True)
    for name in ("speech one.wav", "seven.webm"):
        (staging / name).write_bytes((clips / name).read_bytes())
    client = FourCat(whisper_server.url, mode="local")
    body = four_cat_body("data/texts-1", ["data/staging-1/speech one.wav", "data/staging-1/seven.webm"],
                         model="tiny.en", gpu=False, prompt="Digital methods, web, platforms.",
                         advanced={"no_speech_threshold": 0.2, "--logprob_threshold": -0.5, "--temperature": 0,
                                   "--beam_size": 3, "--condition_on_previous_text": False, "--language": "en",
                                   "--highlight_words": True})
    job = client.poll_until_done(client.submit("whisper", body), wait_period=0.5, limit=JOB_SECONDS)
    assert job["status"] == "complete"
    report = results_of(job)["report"]
    assert "option '--highlight_words True' is not supported by this service and is ignored" in report, report
    folder = tmp_path / "4cat" / "texts-1"
    assert sorted(p.name for p in folder.iterdir()) == ["seven.json", "speech one.json"]
    result = json.loads((folder / "speech one.json").read_text())
    assert result["model"]["name"] == "tiny.en" and result["model"]["how"] == "installed"
    settings = result["settings"]
    assert settings["device"] == "cpu" and settings["beam_size"] == 3 and settings["no_speech_threshold"] == 0.2
    assert settings["log_prob_threshold"] == -0.5 and settings["temperature"] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert settings["condition_on_previous_text"] is False and settings["language"] == "en"
    assert settings["initial_prompt"] == "Digital methods, web, platforms."
    assert word_error_rate(CLIPS["speech one.wav"], result["text"]) <= 0.5, result["text"]
    job_record = whisper_server.job(int(job["id"]))
    assert job_record["processed_records"] == 2 and job_record["message"] == "Transcribed 2 of 2 audio files"


def test_silence_a_corrupt_an_empty_and_a_missing_file_each_get_a_valid_result(
        whisper_server: Server, clips: Path, tmp_path: Path) -> None:
    folder = tmp_path / "4cat" / "mixed"
    folder.mkdir(parents=True)
    names = ["two.mp3", "silence.wav", "broken.mp3", "empty.ogg"]
    for name in names:
        (folder / name).write_bytes((clips / name).read_bytes())
    args = [f"data/mixed/{name}" for name in names] + ["data/mixed/missing.wav"]
    key = whisper_server.submit("whisper_local", four_cat_body("data/mixed/out", args)["args"], pass_key=True)["key"]
    job = whisper_server.wait_final(key, JOB_SECONDS)
    assert job["status"] == "complete", results_of(job)
    # what 4CAT shows the researcher: the files that could not be read are not counted as transcribed
    assert job["message"] == "Transcribed 2 of 5 audio files (3 could not be read)"
    out = folder / "out"
    found = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert sorted(found) == ["broken.json", "empty.json", "missing.json", "silence.json", "two.json"]
    assert word_error_rate(CLIPS["two.mp3"], found["two.json"]["text"]) <= 0.5
    assert found["silence.json"]["text"] == "" and found["silence.json"]["segments"] == []
    for name, reason in (("broken", "could not be decoded"), ("empty", "the file is empty (0 bytes)"),
                         ("missing", "file not found")):
        result = found[f"{name}.json"]
        assert result["text"] == "" and result["segments"] == [], result
        assert len(result["errors"]) == 1 and reason in result["errors"][0], result
    assert "2 of 5 file(s) transcribed, 3 failed" in results_of(job)["report"]


def test_inputs_that_share_a_stem_are_named_by_their_order_not_by_which_finishes_first(
        whisper_server: Server, clips: Path, tmp_path: Path) -> None:
    folder = tmp_path / "4cat" / "stems"
    folder.mkdir(parents=True)
    (folder / "fox.mp3").write_bytes((clips / "two.mp3").read_bytes())  # the longer clip: it finishes last
    (folder / "fox.wav").write_bytes((clips / "speech one.wav").read_bytes())
    args = ["data/stems/fox.mp3", "data/stems/fox.wav", "data/stems/sub/fox.wav"]
    (folder / "sub").mkdir()
    (folder / "sub" / "fox.wav").write_bytes((clips / "speech one.wav").read_bytes())
    key = whisper_server.submit("whisper_local", four_cat_body("data/stems/out", args, model="tiny.en")["args"])["key"]
    assert whisper_server.wait_final(key, JOB_SECONDS)["status"] == "complete"
    found = {p.name: json.loads(p.read_text())["text"] for p in (folder / "out").iterdir()}
    assert sorted(found) == ["fox.json", "fox.wav-2.json", "fox.wav.json"]
    assert word_error_rate(CLIPS["two.mp3"], found["fox.json"]) <= 0.5, found  # the first argument's


def test_a_cancelled_job_stops_at_once_rather_than_being_killed(whisper_server: Server, tmp_path: Path,
                                                                docker_client: docker.DockerClient) -> None:
    """The service runs as the container's process 1: it must handle SIGTERM itself, or every cancel and
    timeout would wait out the grace period and end in SIGKILL (exit 137)."""
    folder = tmp_path / "4cat" / "long"
    render(docker_client, folder, {"long.wav": " ".join(CLIPS.values()) * 6})  # minutes of speech
    key = whisper_server.submit("whisper_local", four_cat_body("data/long/out", ["data/long/long.wav"])["args"])["key"]
    wait_until(lambda: "whisper: running" in whisper_server.get(f"/api/jobs/{key}/logs").text, JOB_SECONDS,
               what="the model loaded")
    assert whisper_server.delete(f"/api/jobs/{key}").status_code == 202
    job = whisper_server.wait_final(key, 60)
    results = results_of(job)
    assert job["status"] == "error" and results["returncode"] == 143, results  # 128 + SIGTERM: not killed
    assert "whisper: stopped by SIGTERM" in results["error"]


def test_a_job_where_no_file_can_be_read_ends_in_error(whisper_server: Server, clips: Path, tmp_path: Path) -> None:
    folder = tmp_path / "4cat" / "bad"
    folder.mkdir(parents=True)
    (folder / "broken.mp3").write_bytes((clips / "broken.mp3").read_bytes())
    key = whisper_server.submit("whisper_local", four_cat_body("data/bad/out", ["data/bad/broken.mp3"])["args"])["key"]
    job = whisper_server.wait_final(key, JOB_SECONDS)
    results = results_of(job)
    assert job["status"] == "error" and results["returncode"] == 1
    assert "none of the 1 audio file(s) could be read" in results["error"], results
    assert json.loads((folder / "out" / "broken.json").read_text())["errors"]  # 4CAT still gets its row


def test_translation_to_english_and_language_detection(whisper_server: Server, clips: Path, tmp_path: Path) -> None:
    folder = tmp_path / "4cat" / "de"
    folder.mkdir(parents=True)
    (folder / "german.wav").write_bytes((clips / "german.wav").read_bytes())
    texts = {}
    for task, translate in (("transcribe", False), ("translate", True)):
        body = four_cat_body(f"data/de/{task}", ["data/de/german.wav"], translate=translate)
        job = whisper_server.wait_final(whisper_server.submit("whisper_local", body["args"])["key"], JOB_SECONDS)
        assert job["status"] == "complete", results_of(job)
        result = json.loads((folder / task / "german.json").read_text())
        assert result["language"] == "de" and result["settings"]["task"] == task
        texts[task] = result["text"].lower()
    assert "morgen" in texts["transcribe"] and "heute" in texts["transcribe"], texts
    assert "good morning" in texts["translate"] and "today" in texts["translate"], texts


def test_a_missing_model_without_a_mapping_fails_naming_the_installed_ones(
        make_server: Callable[..., Server], tmp_path: Path, whisper_image: str) -> None:
    config = base_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["whisper"] = whisper_service(environment={"WHISPER_MODEL_MAP": "small=xl"})
    server = make_server(config)
    for model, message in (
            ("medium", "the Whisper model 'medium' is not installed and WHISPER_MODEL_MAP has no entry for it. "
                       "Installed models: base, tiny.en."),
            ("small", "WHISPER_MODEL_MAP maps it to 'xl', which is not installed either. "
                      "Installed models: base, tiny.en.")):
        body = four_cat_body("data/x/out", ["data/x/a.wav"], model=model)
        job = server.wait_final(server.submit("whisper_local", body["args"])["key"], JOB_SECONDS)
        assert job["status"] == "error" and message in results_of(job)["error"], results_of(job)


def test_a_model_in_the_mounted_folder_answers_for_its_own_name_within_the_cpu_limit(
        make_server: Callable[..., Server], tmp_path: Path, clips: Path, whisper_image: str) -> None:
    models = tmp_path / "models"
    for name, data in image_file(WHISPER, "/opt/whisper/models/tiny.en").items():
        target = models / "faster-whisper-small" / Path(name).name  # as downloaded from Systran's repository
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    config = base_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["whisper"] = whisper_service(volumes=[f"{models}:/models:ro"], cpus=1)
    server = make_server(config)
    (tmp_path / "4cat" / "in").mkdir()
    (tmp_path / "4cat" / "in" / "two.mp3").write_bytes((clips / "two.mp3").read_bytes())
    body = four_cat_body("data/in/out", ["data/in/two.mp3"], model="small")
    job = server.wait_final(server.submit("whisper_local", body["args"])["key"], JOB_SECONDS)
    assert job["status"] == "complete", results_of(job)
    result = json.loads((tmp_path / "4cat" / "in" / "out" / "two.json").read_text())
    assert result["model"] == {**result["model"], "requested": "small", "name": "small", "how": "installed",
                               "path": "/models/faster-whisper-small", "multilingual": False}
    # the service's `cpus` limit is the CPU budget the transcription uses
    assert (result["settings"]["cpu_threads"], result["settings"]["workers"]) == (1, 1)


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(whisper_server: Server) -> None:
    job = whisper_server.wait_final(whisper_server.submit("whisper_local", four_cat_body(
        "data/x/out", ["data/x/a.wav"], advanced={"--device": "cuda"})["args"])["key"], JOB_SECONDS)
    assert job["status"] == "error" and "--device cuda was asked for, but this job has no GPU" in \
        results_of(job)["error"]


def test_a_gpu_without_the_cuda_libraries_names_the_gpu_variant(docker_client: docker.DockerClient,
                                                                clips: Path) -> None:
    # A device node where a GPU would be mounted: the CPU image has no cuBLAS, and says what to do.
    args = ["whisper", "--output_dir", "data/out", "--model", "base", "data/two.mp3"]
    with pytest.raises(docker.errors.ContainerError) as failure:
        docker_client.containers.run(WHISPER, args, remove=True, network_mode="none",
                                     devices=["/dev/null:/dev/nvidia0:rwm"],
                                     volumes={str(clips): {"bind": "/app/data", "mode": "rw"}})
    assert failure.value.exit_status == 1
    assert b"this job has a GPU, but the CUDA libraries are not in this image" in failure.value.stderr
    assert b"dsm build-service whisper --gpu" in failure.value.stderr
    # The same job sent with --device cpu, as 4CAT sends it when its GPU setting is off, runs on the CPU.
    output = docker_client.containers.run(WHISPER, [*args, "--device", "cpu"], remove=True, network_mode="none",
                                          devices=["/dev/null:/dev/nvidia0:rwm"],
                                          volumes={str(clips): {"bind": "/app/data", "mode": "rw"}})
    assert b"done: 1 of 1 file(s) transcribed" in output


@pytest.fixture
def speech_samples(whisper_image: str) -> Iterator[dict[str, bytes]]:
    yield {Path(name).name: data for name, data in image_file(WHISPER, "/app/samples").items()}


def test_the_demo_runs_what_a_whisper_only_server_offers(whisper_server: Server, tmp_path: Path) -> None:
    done = dsm("demo", "--server", whisper_server.url, "--out", str(tmp_path / "results"), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "no ocr_remote endpoint; skipping OCR" in done.stderr
    assert "Whisper job" in done.stdout and "heard:" in done.stdout
    assert any((tmp_path / "results-whisper").iterdir())


def test_the_image_carries_spoken_samples_and_their_text(speech_samples: dict[str, bytes]) -> None:
    assert sorted(speech_samples) == ["sample_1.txt", "sample_1.wav", "sample_2.mp3", "sample_2.txt",
                                      "sample_3.ogg", "sample_3.txt"]
    assert speech_samples["sample_1.txt"].startswith(b"The quick brown fox")
