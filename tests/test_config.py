"""Every existing config.yml loads unchanged; a bad one is refused with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dmi_service_manager.config import LoadedConfig, load_config
from dmi_service_manager.errors import ConfigError
from support import dsm

ORIGINAL_EXAMPLE = """\
# Rename/copy this file as config.yml and edit as necessary
DATABASE_FILE: database.db
DMI_SM_SERVER: http://localhost:4000
SECRET_KEY: secret key # Flask application secret key

TRUSTED_PROXIES: # Be sure to include Docker proxy (e.g., 172.17.0.1 )
#  - 172.17.0.1

IP_WHITELIST: # Leave blank for access to all
#  - 172.17.0.1

UPLOAD_FOLDER_PATH: {uploads}

ALLOWED_EXTENSIONS: # extensions allowed to be uploaded
  - png
  - jpg
  - wav

4CAT_DATASETS_PATH: {fourcat}

GPU_ENABLED: False
WHISPER_GPU: True
WHISPER_LIVE: False  # Constantly running Whipser container

DOCKER_ENDPOINTS:
  whisper:
    image_name: whisper
    local: True
    remote: False
    command: whisper
    data_path: /app/data/
  blip2:
    image_name: blip2
    local: True
    remote: True
    command: python3 blip2.py
    data_path: /app/data
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "uploads").mkdir(exist_ok=True)
    (tmp_path / "4cat").mkdir(exist_ok=True)
    path = tmp_path / "config.yml"
    path.write_text(text.format(uploads=tmp_path / "uploads", fourcat=tmp_path / "4cat"))
    return path


def test_the_originals_example_config_loads_unchanged(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, ORIGINAL_EXAMPLE), env={})
    config = loaded.config
    assert config.trusted_proxies == [] and config.ip_whitelist == []
    assert config.allowed_extensions == ["png", "jpg", "wav"]
    assert config.docker_endpoints["blip2"].argv_prefix() == ["python3", "blip2.py"]
    assert config.endpoints() == {"whisper_local": ("whisper", "local"), "blip2_local": ("blip2", "local"),
                                  "blip2_remote": ("blip2", "remote")}
    assert config.database_file == tmp_path / "database.db"
    assert any("WHISPER_GPU" in w for w in loaded.warnings)
    assert any("WHISPER_LIVE" in w for w in loaded.warnings)


@pytest.mark.parametrize(("change", "message"), [
    (("GPU_ENABLED", "GPU_ENABLD"), "unknown key: GPU_ENABLD (did you mean GPU_ENABLED?)"),
    (("GPU_ENABLED", "gpu_enabled"), "unknown key: gpu_enabled (did you mean GPU_ENABLED?)"),
    (("remote: False", "remotee: False"), "unknown key: DOCKER_ENDPOINTS.whisper.remotee (did you mean remote?)"),
    (("GPU_ENABLED", "SOMETHING_ELSE"), "unknown key: SOMETHING_ELSE"),
])
def test_an_unknown_or_mistyped_key_refuses_to_start_naming_it(tmp_path: Path, change: tuple[str, str],
                                                               message: str) -> None:
    """The protocol: a clear start-up error naming the key, not a setting lost in silence."""
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, ORIGINAL_EXAMPLE.replace(*change, 1)), env={})
    assert message in refused.value.message


@pytest.mark.parametrize(("change", "message"), [
    (("GPU_ENABLED: False", "GPU_ENABLED: maybe"), "GPU_ENABLED"),
    (("local: True\n    remote: False", "local: sometimes\n    remote: False"), "DOCKER_ENDPOINTS.whisper.local"),
    (("    data_path: /app/data/\n", "    data_path: app/data\n"), "DOCKER_ENDPOINTS.whisper.data_path"),
    (("GPU_ENABLED: False", "GPU_ENABLED: False\nMAX_CONCURRENT_JOBS: lots"), "MAX_CONCURRENT_JOBS"),
    (("TRUSTED_PROXIES: #", "TRUSTED_PROXIES: [not-an-ip] #"), "TRUSTED_PROXIES"),
    (("    command: whisper\n", "    command: whisper 'unclosed\n"), "DOCKER_ENDPOINTS.whisper.command"),
    (("GPU_ENABLED: False", "GPU_ENABLED: False\nTES_CORS_ORIGINS: [https://example.org/path]"), "TES_CORS_ORIGINS"),
])
def test_a_value_of_the_wrong_type_refuses_to_start_naming_the_key(tmp_path: Path, change: tuple[str, str],
                                                                    message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, ORIGINAL_EXAMPLE.replace(*change)), env={})
    assert message in caught.value.message and "not valid YAML" not in caught.value.message


def test_a_folder_that_does_not_exist_for_an_enabled_mode_is_refused(tmp_path: Path) -> None:
    text = ORIGINAL_EXAMPLE.replace("4CAT_DATASETS_PATH: {fourcat}", "4CAT_DATASETS_PATH: /nonexistent/4cat")
    with pytest.raises(ConfigError, match="4CAT_DATASETS_PATH: the folder /nonexistent/4cat does not exist"):
        load_config(write(tmp_path, text), env={})


def test_a_blank_folder_only_disables_that_mode_with_a_warning(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, ORIGINAL_EXAMPLE.replace("4CAT_DATASETS_PATH: {fourcat}",
                                                                  "4CAT_DATASETS_PATH:")), env={})
    assert loaded.config.endpoints() == {"blip2_remote": ("blip2", "remote")}
    assert any("4CAT_DATASETS_PATH is not set" in w for w in loaded.warnings)


@pytest.mark.parametrize(("line", "expected"), [
    ('IP_WHITELIST: ""', {"ip_whitelist": []}),  # the original's "anyone"
    ("TRUSTED_PROXIES: '  '", {"trusted_proxies": []}),
    ('4CAT_DATASETS_PATH: ""', {"fourcat_datasets_path": None}),  # not the config's own folder
    ('DATABASE_FILE: ""', {"database_file": "dsm.db"}),  # the default, not the config's own folder
    ('DMI_SM_SERVER: ""', {"dmi_sm_server": None}),
    ('IP_WHITELIST: "10.0.0.1, 10.1.0.0/16 ::1"', {"ip_whitelist": ["10.0.0.1", "10.1.0.0/16", "::1"]}),
    ("TRUSTED_PROXIES: 127.0.0.1", {"trusted_proxies": ["127.0.0.1"]}),  # the original tested `in` a string
    ("ALLOWED_EXTENSIONS: png,.JPG", {"allowed_extensions": ["png", "jpg"]}),
    ("SECRET_KEY: 12345", {"secret_key": "12345"}),  # a YAML number, read by nothing
])
def test_blank_and_string_values_an_original_config_may_hold_load(tmp_path: Path, line: str,
                                                                   expected: dict[str, object]) -> None:
    key = line.split(":")[0]
    text = "\n".join(x for x in ORIGINAL_EXAMPLE.splitlines() if not x.startswith(key + ":") and
                     not (key == "ALLOWED_EXTENSIONS" and x.startswith("  - ") and len(x) < 10)) + "\n" + line + "\n"
    config = load_config(write(tmp_path, text), env={}).config
    for name, value in expected.items():
        got = getattr(config, name)
        assert (got.name if name == "database_file" else got) == value, (name, got)


def test_settings_that_cannot_work_are_named(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, ORIGINAL_EXAMPLE.replace("http://localhost:4000", "localhost:4000/")), env={})
    assert any("DMI_SM_SERVER 'localhost:4000/' is not an http:// or https:// URL" in w for w in loaded.warnings)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=f"UPLOAD_FOLDER_PATH: {tmp_path / 'a-file'} is not a folder"):
        load_config(write(tmp_path, ORIGINAL_EXAMPLE.replace("UPLOAD_FOLDER_PATH: {uploads}",
                                                             f"UPLOAD_FOLDER_PATH: {tmp_path / 'a-file'}")), env={})


@pytest.mark.parametrize("database", ["a-folder", "/proc/jobs.db", "not-sqlite.db"])
def test_a_database_that_cannot_be_opened_is_a_config_error_not_a_crash_loop(tmp_path: Path, database: str) -> None:
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "not-sqlite.db").write_text("this is no database\n" * 100)
    config = write(tmp_path, ORIGINAL_EXAMPLE.replace("DATABASE_FILE: database.db", f"DATABASE_FILE: {database}"))
    for command in (["check-config", "--offline", str(config)], ["token", "list", "--config", str(config)],
                    ["serve", "--config", str(config), "--port", "0"]):
        done = dsm(*command)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "config error: DATABASE_FILE: " in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "not-sqlite.db").read_text() == "this is no database\n" * 100


def test_dsm_environment_variables_override_keys(tmp_path: Path) -> None:
    env = {"DSM_GPU_ENABLED": "true", "DSM_IP_WHITELIST": "[10.0.0.0/8, '::1']", "DSM_MAX_UPLOAD_BYTES": "2GiB"}
    loaded = load_config(write(tmp_path, ORIGINAL_EXAMPLE), env=env)
    assert loaded.config.gpu_enabled is True
    assert loaded.config.ip_whitelist == ["10.0.0.0/8", "::1"]
    assert loaded.config.max_upload_bytes == 2 * 1024**3
    assert env_warnings(loaded) == []
    assert loaded.source.endswith("with DSM_GPU_ENABLED, DSM_IP_WHITELIST, DSM_MAX_UPLOAD_BYTES from the environment")
    with pytest.raises(ConfigError, match=r"IP_WHITELIST \(set by DSM_IP_WHITELIST\): 'x' is not an IP address"):
        load_config(write(tmp_path, ORIGINAL_EXAMPLE), env={"DSM_IP_WHITELIST": "[x]"})  # the file is not at fault


@pytest.mark.parametrize(("name", "value", "named"), [
    ("DSM_DOCKER_ENDPOINTS", "{x: {image_name: a, data_path: /d, remote: true, gpu_memroy: 8GiB}}",
     "DOCKER_ENDPOINTS.x.gpu_memroy (did you mean gpu_memory?)"),
    ("DSM_GPU_INVENTORY", "[{id: 0, memory: 8GiB, nmae: x}]", "GPU_INVENTORY[0].nmae (did you mean name?)"),
])
def test_a_typo_inside_a_service_or_card_set_by_a_variable_refuses_to_start(tmp_path: Path, name: str, value: str,
                                                                            named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, ORIGINAL_EXAMPLE), env={name: value, "DSM_GPU_ENABLED": "true"})
    assert named in refused.value.message and f"(set by {name})" in refused.value.message


def env_warnings(loaded: LoadedConfig) -> list[str]:
    return [w for w in loaded.warnings if "environment" in w]


def test_a_near_miss_of_a_key_in_the_environment_warns_once_with_a_hint(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, ORIGINAL_EXAMPLE), env={"DSM_GPU_ENABLE": "true", "DSM_LOGLEVEL": "DEBUG"})
    assert loaded.config.gpu_enabled is False  # the example's value: a typo sets nothing
    assert env_warnings(loaded) == [
        "environment variable DSM_GPU_ENABLE names no config key (did you mean GPU_ENABLED?); it is ignored",
        "environment variable DSM_LOGLEVEL names no config key (did you mean LOG_LEVEL?); it is ignored",
    ]


@pytest.mark.parametrize("name", ["DSM_SOMETHING_ELSE", "DSM_NO_SUCH_KEY", "DSM_TOKEN", "DSM_SERVER", "DSM_CONFIG",
                                  "DSM_PORT", "DSM_WHEELS_CACHE", "DSM_SLURM_CLUSTER", "DSM_"])
def test_other_dsm_environment_variables_are_not_ours_and_stay_silent(tmp_path: Path, name: str) -> None:
    # The CLI's DSM_SERVER and DSM_TOKEN, the image builder's DSM_WHEELS_CACHE, whatever a site sets.
    quiet = load_config(write(tmp_path, ORIGINAL_EXAMPLE), env={})
    loaded = load_config(write(tmp_path, ORIGINAL_EXAMPLE), env={name: "http://10.0.0.1:4000"})
    assert loaded.warnings == quiet.warnings and loaded.config == quiet.config


def test_dsm_token_and_dsm_server_are_never_config_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Even if a config key TOKEN or SERVER existed, these two belong to the dsm client commands.
    import dmi_service_manager.config as config_module

    monkeypatch.setattr(config_module, "_KNOWN_TOP", config_module._KNOWN_TOP | {"TOKEN", "SERVER"})
    env = {"DSM_TOKEN": "dsm_secret", "DSM_SERVER": "http://10.0.0.1:4000", "DSM_LOG_LEVEL": "DEBUG"}
    warnings: list[str] = []
    assert config_module._env_overrides(env, warnings) == {"LOG_LEVEL": "DEBUG"}
    assert warnings == []


def test_check_config_prints_the_endpoints_and_strict_fails_on_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, ORIGINAL_EXAMPLE)
    done = dsm("check-config", str(path), "--offline")
    assert done.returncode == 0, done.stderr
    assert "POST /api/whisper_local" in done.stdout and "POST /api/blip2_remote" in done.stdout
    assert "whisper_remote" not in done.stdout
    assert "warning: unknown key WHISPER_GPU" in done.stdout
    strict = dsm("check-config", str(path), "--offline", "--strict")
    assert strict.returncode == 1
    clean = yaml.safe_load(path.read_text())
    del clean["WHISPER_GPU"], clean["WHISPER_LIVE"]
    path.write_text(yaml.safe_dump(clean))
    assert dsm("check-config", str(path), "--offline", "--strict").returncode == 0


def test_check_config_warns_about_images_that_are_not_in_the_engine(tmp_path: Path, busybox_image: str) -> None:
    done = dsm("check-config", str(write(tmp_path, ORIGINAL_EXAMPLE)))
    assert "images not in the Docker engine: whisper (whisper), blip2 (blip2)" in done.stdout


def test_serve_refuses_a_bad_config_with_a_message_naming_the_key(tmp_path: Path) -> None:
    done = dsm("serve", "--config", str(write(tmp_path, ORIGINAL_EXAMPLE.replace("GPU_ENABLED: False",
                                                                                  "GPU_ENABLED: [1]"))))
    assert done.returncode == 2
    assert "config error: GPU_ENABLED" in done.stderr


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    done = dsm("check-config", str(tmp_path / "nope.yml"))
    assert done.returncode == 2 and "cannot read the config file" in done.stderr


def test_without_a_config_the_embedded_default_is_used_and_its_folders_made(tmp_path: Path) -> None:
    done = dsm("check-config", "--offline", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "embedded default configuration: valid" in done.stdout
    assert "POST /api/ocr_local" in done.stdout
    assert (tmp_path / "dsm-data" / "uploads").is_dir() and (tmp_path / "dsm-data" / "4cat").is_dir()


def test_with_gpus_enabled_the_embedded_default_gives_whisper_a_card_and_never_ocr(tmp_path: Path) -> None:
    done = dsm("check-config", "--offline", cwd=tmp_path, env={"DSM_GPU_ENABLED": "true"})
    assert done.returncode == 0, done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.strip().startswith("POST")}
    assert "dsm-whisper:latest (GPU)" in lines["/api/whisper_local"]
    assert "dsm-ocr:latest (CPU)" in lines["/api/ocr_local"]  # tesseract: CPUs only


def test_config_example_documents_every_key_and_loads(tmp_path: Path) -> None:
    from dmi_service_manager.config import Config, GpuCardConfig, ServiceConfig

    text = (Path(__file__).resolve().parents[1] / "config.example.yml").read_text()
    for name, field in Config.model_fields.items():
        assert f"{field.alias or name}:" in text, field.alias or name
    for name in ServiceConfig.model_fields:
        assert f"{name}:" in text, name
    for name in GpuCardConfig.model_fields:
        assert f"{name}:" in text, name
    (tmp_path / "dsm-data" / "4cat").mkdir(parents=True)
    (tmp_path / "dsm-data" / "uploads").mkdir()
    (tmp_path / "config.yml").write_text(text)
    assert load_config(tmp_path / "config.yml", env={}).warnings == []
