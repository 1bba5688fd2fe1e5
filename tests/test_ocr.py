"""The bundled OCR service, driven through the server as 4CAT's "Text from image" processor drives it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from fourcat import FourCat
from support import OCR, Server, base_config, wait_until

SENTENCES = [
    "The quick brown fox jumps over the lazy dog",
    "Digital methods study the web with its own tools",
    "Every dataset in this test was rendered from known text",
]


def words(text: str) -> list[str]:
    return re.findall(r"[a-zäöüß0-9]+", text.lower())


def word_recall(expected: str, found: str) -> float:
    wanted, got = words(expected), set(words(found))
    return sum(1 for word in wanted if word in got) / len(wanted)


def render(client: docker.DockerClient, folder: Path, name: str, text: str, **size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    options = [f"--{key}={value}" for key, value in size.items()]
    client.containers.run(OCR, ["render-text", "--text", text, "--out", f"data/{name}", *options], remove=True,
                          network_mode="none", volumes={str(folder): {"bind": "/app/data", "mode": "rw"}})
    return folder / name


@pytest.fixture
def ocr_server(make_server: Callable[..., Server], tmp_path: Path, ocr_image: str) -> Server:
    config = base_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["ocr"] = {"image_name": ocr_image, "local": True, "remote": True, "command": "ocr",
                                         "data_path": "/app/data"}
    return make_server(config)


def four_cat_args(results: str, images: list[str], **extra: Any) -> dict[str, Any]:
    args = ["--model", "paddle_ocr", "--output_dir", results, "--images", *images]
    for key, value in extra.items():
        args += [f"--{key}", value]
    return {"args": args, "timeout": max(2 * len(images), 600)}


def test_local_mode_reads_back_the_rendered_sentences(ocr_server: Server, tmp_path: Path,
                                                       docker_client: docker.DockerClient) -> None:
    images = tmp_path / "4cat" / "staging" / "images"
    for index, sentence in enumerate(SENTENCES):
        render(docker_client, images, f"img{index}.png", sentence)
    client = FourCat(ocr_server.url, mode="local")
    job = client.poll_until_done(client.submit("ocr", four_cat_args(
        "data/staging/results", [f"data/staging/images/img{i}.png" for i in range(len(SENTENCES))])))
    assert job["status"] == "complete"
    for index, sentence in enumerate(SENTENCES):
        result = json.loads((tmp_path / "4cat" / "staging" / "results" / f"img{index}.json").read_text())
        assert result["success"] is True and result["filename"] == f"img{index}.png"
        assert result["model_type"].startswith("tesseract") and result["requested_model"] == "paddle_ocr"
        assert word_recall(sentence, result["simplified_text"]["raw_text"]) >= 0.9
        assert {"text", "confidence", "box"} <= set(result["raw_output"][0])


def test_remote_mode_uploads_runs_and_downloads(ocr_server: Server, tmp_path: Path,
                                               docker_client: docker.DockerClient) -> None:
    local = tmp_path / "local"
    render(docker_client, local, "first page.png", SENTENCES[0] + "\\n" + SENTENCES[1])
    client = FourCat(ocr_server.url, mode="remote")
    files, results = client.send_files("ocr-collection", "ocr-results", [local / "first page.png"])
    job = client.poll_until_done(client.submit("ocr", four_cat_args(
        f"data/{results}", [f"data/{files}/{client.stored_name('first page.png')}"])))
    saved = client.download_results("ocr-collection", "ocr-results", tmp_path / "downloaded")
    assert job["status"] == "complete"
    assert [p.name for p in saved] == ["first_page.json"]
    text = json.loads(saved[0].read_text())["simplified_text"]["raw_text"]
    assert text.count("\n") >= 1  # Tesseract's line break kept
    assert word_recall(SENTENCES[0] + " " + SENTENCES[1], text) >= 0.9


def test_a_broken_and_a_missing_image_each_get_their_own_failure_file(ocr_server: Server, tmp_path: Path,
                                                                      docker_client: docker.DockerClient) -> None:
    folder = tmp_path / "4cat" / "mixed"
    render(docker_client, folder, "good.png", SENTENCES[2])
    (folder / "broken.png").write_bytes(b"\x89PNG this is not really an image")
    (folder / "blank.png").write_bytes((folder / "good.png").read_bytes())
    render(docker_client, folder, "blank.png", " ")
    answer = ocr_server.submit("ocr_local", four_cat_args("data/mixed/out", [
        "data/mixed/good.png", "data/mixed/broken.png", "data/mixed/missing.png", "data/mixed/blank.png"])["args"])
    assert ocr_server.wait_final(answer["key"], 120)["status"] == "complete"
    out = folder / "out"
    assert json.loads((out / "good.json").read_text())["success"] is True
    for name, reason in (("broken", "could not be read"), ("missing", "not found"), ("blank", "no text")):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["success"] is False and reason in result["error"], result
        assert result["filename"] == f"{name}.png" and result["model_type"].startswith("tesseract")
    assert sorted(p.name for p in out.iterdir()) == ["blank.json", "broken.json", "good.json", "missing.json"]


def test_a_job_none_of_whose_images_exists_ends_error_saying_why(ocr_server: Server, tmp_path: Path) -> None:
    """Not one path naming a file means wrong paths (an upload's folder given in local mode, say), not bad
    images: each still gets its failure file, and the job ends `error`. (A job with an unreadable, a blank
    or a missing image among good ones completes: see the test above.)"""
    (tmp_path / "4cat" / "none").mkdir(parents=True)
    answer = ocr_server.submit("ocr_local", four_cat_args("data/none/out", [
        "data/none/a.png", "data/mixed/b.png"])["args"])
    job = ocr_server.wait_final(answer["key"], 120)
    results = json.loads(job["results"])
    assert job["status"] == "error" and results["returncode"] == 1
    assert "none of the 2 image(s) exists; first: image not found: data/none/a.png" in results["error"]
    assert sorted(p.name for p in (tmp_path / "4cat" / "none" / "out").iterdir()) == ["a.json", "b.json"]


def test_result_files_appear_one_by_one_and_progress_is_posted(ocr_server: Server, tmp_path: Path,
                                                               docker_client: docker.DockerClient) -> None:
    folder = tmp_path / "uploads" / "many" / "images"
    names = []
    for index in range(10):
        names.append(f"p{index}.png")
        render(docker_client, folder, names[-1], f"Page {index} of a long scanned document\\n" * 12, height=1000)
    body = four_cat_args("data/many/results", [f"data/many/images/{n}" for n in names])
    key = ocr_server.post("/api/ocr_remote", json={**body, "pass_key": True}).json()["key"]
    counts = set()
    client = FourCat(ocr_server.url)

    def finished() -> bool:
        counts.add(len(client.folder_files("many").get("results", [])))
        return ocr_server.job(key)["status"] in ("complete", "error")

    wait_until(finished, 180, 0.05)
    assert ocr_server.job(key)["status"] == "complete"
    assert len(counts - {0, 10}) >= 1, counts  # some but not all result files, while it ran
    job = ocr_server.job(key)
    assert job["processed_records"] == 10 and job["message"] == "Processed 10 of 10 images"


def test_a_second_language_works(ocr_server: Server, tmp_path: Path, docker_client: docker.DockerClient) -> None:
    folder = tmp_path / "4cat" / "lang"
    sentence = "Grüße aus München über die schöne Straße"
    render(docker_client, folder, "de.png", sentence)
    answer = ocr_server.submit("ocr_local", [*four_cat_args("data/lang/out", ["data/lang/de.png"])["args"],
                                             "--lang", "deu"])
    assert ocr_server.wait_final(answer["key"], 60)["status"] == "complete"
    text = json.loads((folder / "out" / "de.json").read_text())["simplified_text"]["raw_text"]
    assert word_recall(sentence, text) >= 0.85, text
    assert "ü" in text and "ß" in text


def test_unknown_options_are_refused_like_every_dmi_service(ocr_server: Server) -> None:
    job = ocr_server.wait_final(ocr_server.submit("ocr_local", ["--output_dir", "data/x", "--images", "data/a.png",
                                                                "--bogus"])["key"])
    assert job["status"] == "error" and "unrecognized arguments: --bogus" in json.loads(job["results"])["error"]


def test_only_result_files_are_left_in_the_results_folder(ocr_server: Server, tmp_path: Path,
                                                          docker_client: docker.DockerClient) -> None:
    folder = tmp_path / "uploads" / "clean"
    render(docker_client, folder / "in", "a.png", SENTENCES[0])
    key = ocr_server.submit("ocr_remote", four_cat_args("data/clean/out", ["data/clean/in/a.png"])["args"])["key"]
    assert ocr_server.wait_final(key, 60)["status"] == "complete"
    assert FourCat(ocr_server.url).folder_files("clean/out") == {".": ["a.json"]}


def test_a_cancelled_job_stops_at_once_rather_than_being_killed(ocr_server: Server, tmp_path: Path,
                                                                docker_client: docker.DockerClient) -> None:
    """The service runs as the container's process 1: it must handle SIGTERM itself, or every cancel and
    timeout would wait out the grace period and end in SIGKILL (exit 137)."""
    folder = tmp_path / "uploads" / "long" / "images"
    render(docker_client, folder, "page.png", "A long scanned page of text\\n" * 12, height=1000)
    body = four_cat_args("data/long/results", ["data/long/images/page.png"] * 300, workers="1")
    key = ocr_server.post("/api/ocr_remote", json=body).json()["key"]
    results = tmp_path / "uploads" / "long" / "results"
    wait_until(lambda: results.exists() and any(results.iterdir()), 120, what="the first result file")
    assert ocr_server.delete(f"/api/jobs/{key}").status_code == 202
    job = ocr_server.wait_final(key, 60)
    outcome = json.loads(job["results"])
    assert job["status"] == "error" and outcome["returncode"] == 143, outcome  # 128 + SIGTERM: not killed
    assert "ocr: stopped by SIGTERM" in outcome["error"]
