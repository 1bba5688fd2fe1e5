"""The `dsm` command line, image recipes cached by hash, and the demo a newcomer runs first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import docker
import pytest

from dmi_service_manager.runtime.images import RECIPE_LABEL, build_service, recipe_hash
from support import OCR, Server, dsm, free_port, wait_until


def test_submit_wait_jobs_logs_and_cancel_from_the_command_line(server: Server) -> None:
    done = dsm("submit", "--server", server.url, "--wait", "fake_local", "--", "--stdout", "from the cli")
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stdout and "from the cli" in done.stdout
    failed = dsm("submit", "--server", server.url, "--wait", "fake_local", "--", "--stderr", "broken", "--exit", "2")
    assert failed.returncode == 1 and "broken" in failed.stdout
    assert any(line.split() == ["returncode", "2"] for line in failed.stdout.splitlines()), failed.stdout
    listing = dsm("jobs", "--server", server.url)
    assert listing.returncode == 0 and "/api/fake_local" in listing.stdout and "complete" in listing.stdout
    assert "from the cli" in dsm("logs", "--server", server.url, "1").stdout
    key = server.submit("fake_local", ["--sleep", "60"])["key"]
    server.wait_status(key, "running")
    cancel = dsm("cancel", "--server", server.url, str(key), token=server.token("admin"))  # DELETE: admin only
    assert cancel.returncode == 0, cancel.stderr
    assert server.wait_final(key)["status"] == "error"
    missing = dsm("job", "--server", server.url, "4242")
    assert missing.returncode == 5 and "not found" in missing.stderr  # exit codes: dsm --help
    unreachable = dsm("jobs", "--server", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 3 and "cannot reach the server" in unreachable.stderr


def test_an_image_recipe_is_cached_by_hash_and_rebuilt_when_it_changes(tmp_path: Path, busybox_image: str,
                                                                      docker_client: docker.DockerClient) -> None:
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text(f"FROM {busybox_image}\nRUN echo one > /version\n")
    tag = "dsm-test-recipe:latest"
    lines: list[str] = []
    try:
        build_service(str(recipe), tag=tag, log=lines.append)
        first = docker_client.images.get(tag)
        assert first.labels[RECIPE_LABEL] == recipe_hash(recipe)
        lines.clear()
        build_service(str(recipe), tag=tag, log=lines.append)
        assert any("is up to date" in line for line in lines)
        assert docker_client.images.get(tag).id == first.id
        (recipe / "Dockerfile").write_text(f"FROM {busybox_image}\nRUN echo two > /version\n")
        build_service(str(recipe), tag=tag, log=lines.append)
        second = docker_client.images.get(tag)
        assert second.id != first.id and second.labels[RECIPE_LABEL] == recipe_hash(recipe)
        output = docker_client.containers.run(tag, ["cat", "/version"], remove=True, network_mode="none")
        assert output == b"two\n"
    finally:
        docker_client.images.remove(tag, force=True)


def test_build_service_reports_a_failing_recipe_clearly(tmp_path: Path, busybox_image: str) -> None:
    from dmi_service_manager.runtime.images import BuildFailed

    recipe = tmp_path / "broken"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text(f"FROM {busybox_image}\nRUN exit 3\n")
    with pytest.raises(BuildFailed, match="building dsm-test-broken:latest failed") as failed:
        build_service(str(recipe), tag="dsm-test-broken:latest", log=lambda _: None)
    assert "\n" not in str(failed.value) and "returned a non-zero code: 3" in str(failed.value)
    assert "no service recipe" in dsm("build-service", "no-such-service").stderr


def test_the_bundled_recipes_ship_inside_the_package_and_a_wrong_recipe_is_one_clear_line(tmp_path: Path) -> None:
    import dmi_service_manager
    from dmi_service_manager.runtime.images import BUNDLED_SERVICES, BuildFailed, bundled_recipes, find_recipe

    package = Path(dmi_service_manager.__file__).resolve().parent
    assert package / "services" == BUNDLED_SERVICES  # package data, not a folder of the checkout
    assert bundled_recipes() == ["ocr", "whisper"]
    assert find_recipe("ocr") == package / "services" / "ocr"
    recipe = tmp_path / "mine"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text("FROM scratch\n")
    assert find_recipe(str(recipe)) == recipe.resolve()
    with pytest.raises(BuildFailed) as unknown:
        find_recipe("nosuch")
    assert str(unknown.value) == ("no service recipe 'nosuch': give a bundled service (ocr, whisper) or a folder "
                                  "with a Dockerfile")
    with pytest.raises(BuildFailed, match="is not a service recipe: it has no Dockerfile"):
        find_recipe(str(tmp_path))
    (recipe / "host-files.txt").write_text("/no/such/file busybox\n")
    with pytest.raises(BuildFailed, match="line 1: the host file /no/such/file is missing"):
        build_service(str(recipe), log=lambda _: None)
    (recipe / "host-files.txt").write_text("# a comment\nonly-one-word\n")
    with pytest.raises(BuildFailed, match="line 2: expected '<host path> <name in the context>'"):
        recipe_hash(recipe)


def test_the_first_command_serves_the_embedded_defaults_and_the_demo_prints_the_text(
    tmp_path: Path, ocr_image: str
) -> None:
    # What run.sh does after installing: `dsm serve` on the embedded defaults, then `dsm demo`.
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "dmi_service_manager", "serve", "--port", str(port),
                               "--host", "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: dsm("jobs", "--server", f"http://127.0.0.1:{port}").returncode == 0, 30)
        demo = dsm("demo", "--server", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "results"), cwd=tmp_path)
        assert demo.returncode == 0, demo.stderr
        assert "The quick brown fox jumps over the lazy dog." in demo.stdout
        assert "Each image gets its own result file." in demo.stdout
        assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
            "sample_1.json", "sample_2.json", "sample_3.json"]
        assert (tmp_path / "dsm-data" / "jobs.db").exists()
    finally:
        server.terminate()
        server.wait(15)
        client = docker.from_env()
        for container in client.containers.list(all=True, filters={"ancestor": OCR}):
            if any(name.startswith("dsm-") for name in [container.name]):
                container.remove(force=True)
