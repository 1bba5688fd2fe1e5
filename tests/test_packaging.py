"""The package as someone installs it: `pip install .` (not editable) must carry the service recipes.

How the installed copy is made, quickly and with no network beyond what setup.sh itself needed:
- a fresh virtual environment (`python -m venv --without-pip`, no system site-packages);
- the project's own pip installs this checkout into it, non-editable and `--no-deps`
  (`pip --python <venv> install --no-deps <copy>`): a real wheel built from a copy of pyproject.toml,
  README.md and src/ (so that no build/ or egg-info lands in the working tree); building it fetches the
  setuptools that pyproject.toml asks for from the same index that setup.sh's `pip install -e` used;
- the dependencies (FastAPI, Docker SDK, ...) are not installed again: a `.pth` file in the fresh venv puts
  the project venv's site-packages folder at the end of `sys.path`. A folder named in a `.pth` file is only
  added to the path, its own `.pth` files are not read, so the project venv's editable finder (the
  `__editable__` file that points at src/) stays out, and the fresh site-packages comes first anyway;
  the test checks that `dmi_service_manager` is imported from the fresh venv.
Then the installed `dsm` runs from an unrelated working directory with PYTHONPATH cleared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from support import OCR, ROOT

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with this checkout installed non-editable; returns the venv folder."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                           str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz-dsm-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def run_installed(venv: Path, program: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`program` (python, dsm) of the fresh venv, from `cwd`, without the test's PYTHONPATH or venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return subprocess.run([str(venv / "bin" / program), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300, check=False)


def test_the_installed_package_builds_its_bundled_recipe_from_site_packages(installed: Path, tmp_path: Path,
                                                                              ocr_image: str) -> None:
    site = Path(run_installed(installed, "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                              cwd=tmp_path).stdout.strip())
    where = run_installed(installed, "python", "-c",
                          "import dmi_service_manager.runtime.images as i; print(i.__file__); "
                          "print(i.find_recipe('ocr')); print(i.find_recipe('whisper')); print(i.bundled_recipes())",
                          cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, ocr, whisper, names = where.stdout.splitlines()
    assert Path(module).is_relative_to(site), module  # not the checkout's src/
    assert Path(ocr) == site / "dmi_service_manager" / "services" / "ocr"
    assert Path(whisper) == site / "dmi_service_manager" / "services" / "whisper"
    assert names == "['ocr', 'whisper']"
    # Every file of the recipes shipped: the installed copies hash as the checkout's do.
    hashes = run_installed(installed, "python", "-c",
                           "from dmi_service_manager.runtime.images import find_recipe, recipe_hash; "
                           "print(recipe_hash(find_recipe('ocr')), recipe_hash(find_recipe('whisper')))", cwd=tmp_path)
    from dmi_service_manager.runtime.images import find_recipe, recipe_hash

    assert hashes.stdout.split() == [recipe_hash(find_recipe("ocr")), recipe_hash(find_recipe("whisper"))]
    assert (site / "dmi_service_manager" / "services" / "whisper" / "models" / "README.md").is_file()

    # The image is built (the ocr_image fixture), so the installed dsm finds it up to date and names it.
    built = run_installed(installed, "dsm", "build-service", "ocr", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip() == OCR
    assert "is up to date" in built.stderr
    # A recipe given as a folder still works.
    folder = run_installed(installed, "python", "-c",
                           f"from dmi_service_manager.runtime.images import find_recipe; "
                           f"print(find_recipe({str(ROOT / 'tests' / 'images' / 'busybox')!r}))", cwd=tmp_path)
    assert folder.stdout.strip() == str(ROOT / "tests" / "images" / "busybox")


def test_the_installed_dsm_reports_an_unknown_recipe_in_one_line(installed: Path, tmp_path: Path) -> None:
    failed = run_installed(installed, "dsm", "build-service", "nosuch", cwd=tmp_path)
    assert failed.returncode != 0
    assert "Traceback" not in failed.stderr, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert "no service recipe 'nosuch'" in lines[0] and "ocr, whisper" in lines[0]
