"""The configuration file and its `DSM_` environment overrides, validated.

Every key of the original DMI Service Manager's `config.yml` keeps its meaning, so an existing file
loads unchanged. Nothing else in this package reads YAML or `os.environ` for settings.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

GPU_DISABLED_REASON = "GPU not enabled on this instance of DMI Service Manager"
DEFAULT_CONFIG = Path(__file__).parent / "defaults" / "config.yml"
ENV_PREFIX = "DSM_"
# `DSM_<KEY>` overrides the config key KEY. Any other `DSM_` variable is someone else's (the CLI's, a site's)
# and is ignored in silence, save a near miss of a key (DSM_GPU_ENABLE), which gets one warning with a hint.
# These are read elsewhere and are never config keys, even if a key of that name appears one day.
ENV_RESERVED = {"DSM_CONFIG", "DSM_PORT", "DSM_SUPERVISOR_PID", "DSM_SERVER", "DSM_TOKEN", "DSM_WHEELS_CACHE"}

MAX_SIZE = 2**62  # bytes: below SQLite's largest integer
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def split_url(url: str) -> SplitResult:
    """A URL taken apart, its host and port included: urllib parses those lazily and raises ValueError for a
    malformed IPv6 literal, a host that NFKC normalisation changes or a port out of range. Raised here, at
    once, every later use of the parts is safe."""
    parts = urlsplit(url)
    parts.hostname  # noqa: B018
    parts.port  # noqa: B018
    return parts


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as '20GiB', '512m' or '1.5 GB'."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as '10GiB'")
    size: float | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a size cannot be negative")
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size is None:
        raise ValueError(f"{value!r} is not a size (use bytes, or a string such as '10GiB' or '512MB')")
    if not size <= MAX_SIZE:  # also false for NaN
        raise ValueError(f"{value!r} is larger than any size this server can store ({MAX_SIZE} bytes)")
    return int(size)


class _Model(BaseModel):
    # Unknown keys are kept so that they can be reported (see _unknown_key_warnings).
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)


class GpuCardConfig(_Model):
    """One GPU declared by hand, for hosts where NVML is absent (and for tests)."""

    id: str
    memory: int
    name: str = "declared GPU"

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return parse_size(value)


class ServiceConfig(_Model):
    """One entry of DOCKER_ENDPOINTS: an image and how to run it."""

    image_name: str
    data_path: str
    local: bool = False
    remote: bool = False
    command: str | None = None
    # Keys the original did not have; each optional.
    gpu: bool | None = None
    gpu_memory: int | None = None
    gpus: int = Field(default=1, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    network: str = "host"
    user: str | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    volumes: list[str] = Field(default_factory=list)
    shm_size: int | None = None
    mem_limit: int | None = None
    cpus: float | None = Field(default=None, gt=0)
    timeout: float = Field(default=3600, gt=0)
    pass_key: bool = False

    @field_validator("image_name", "data_path")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("data_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must be an absolute path inside the container, not {value!r}")
        return value

    @field_validator("command")
    @classmethod
    def _splittable(cls, value: str | None) -> str | None:
        if value is not None:
            shlex.split(value)  # raises ValueError on an unclosed quote
        return value

    @field_validator("gpu_memory", "shm_size", "mem_limit", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else parse_size(value)

    @field_validator("environment", mode="before")
    @classmethod
    def _environment(cls, value: Any) -> Any:
        if isinstance(value, list):  # ["KEY=value", ...] as in docker-compose
            pairs = {}
            for item in value:
                if not isinstance(item, str) or "=" not in item:
                    raise ValueError(f"{item!r} is not KEY=value")
                key, _, val = item.partition("=")
                pairs[key] = val
            return pairs
        if isinstance(value, dict):
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
        return value

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, value: list[str]) -> list[str]:
        for item in value:
            parts = item.split(":")
            if len(parts) not in (2, 3) or not parts[0].startswith("/") or not parts[1].startswith("/"):
                raise ValueError(f"{item!r} is not /host/path:/container/path[:ro|rw]")
            if len(parts) == 3 and parts[2] not in ("ro", "rw"):
                raise ValueError(f"{item!r}: the mode must be ro or rw")
        return value

    def argv_prefix(self) -> list[str]:
        return shlex.split(self.command) if self.command else []


class Config(_Model):
    """The whole configuration; attribute names are the YAML keys in lower case."""

    database_file: Path = Field(alias="DATABASE_FILE")
    dmi_sm_server: str | None = Field(default=None, alias="DMI_SM_SERVER")
    secret_key: str | None = Field(default=None, alias="SECRET_KEY")
    trusted_proxies: list[str] = Field(default_factory=list, alias="TRUSTED_PROXIES")
    ip_whitelist: list[str] = Field(default_factory=list, alias="IP_WHITELIST")
    fourcat_datasets_path: Path | None = Field(default=None, alias="4CAT_DATASETS_PATH")
    upload_folder_path: Path | None = Field(default=None, alias="UPLOAD_FOLDER_PATH")
    allowed_extensions: list[str] | None = Field(default=None, alias="ALLOWED_EXTENSIONS")
    gpu_enabled: bool = Field(default=False, alias="GPU_ENABLED")
    docker_endpoints: dict[str, ServiceConfig] = Field(default_factory=dict, alias="DOCKER_ENDPOINTS")
    # Keys the original did not have.
    docker_host: str | None = Field(default=None, alias="DOCKER_HOST")
    max_concurrent_jobs: int = Field(default=8, ge=1, alias="MAX_CONCURRENT_JOBS")
    gpu_inventory: list[GpuCardConfig] | None = Field(default=None, alias="GPU_INVENTORY")
    gpu_device_mode: Literal["device_requests", "environment"] = Field(
        default="device_requests", alias="GPU_DEVICE_MODE"
    )
    queue_max_passes: int = Field(default=5, ge=0, alias="QUEUE_MAX_PASSES")
    max_upload_bytes: int = Field(default=20 * 1024**3, alias="MAX_UPLOAD_BYTES")
    upload_fsync: bool = Field(default=False, alias="UPLOAD_FSYNC")
    retention_days: float | None = Field(default=None, gt=0, alias="RETENTION_DAYS")
    stop_grace_seconds: float = Field(default=10, ge=0, alias="STOP_GRACE_SECONDS")
    log_max_bytes: int = Field(default=1024**2, ge=1024, alias="LOG_MAX_BYTES")
    callback_allowed_hosts: list[str] = Field(default_factory=list, alias="CALLBACK_ALLOWED_HOSTS")
    abandon_after_hours: float | None = Field(default=None, gt=0, alias="ABANDON_AFTER_HOURS")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", alias="LOG_LEVEL")
    # Where jobs run: the local Docker engine, or a Slurm cluster (see docs/scaling.md).
    backend: Literal["docker", "slurm"] = Field(default="docker", alias="BACKEND")
    slurm_partition: str | None = Field(default=None, alias="SLURM_PARTITION")
    slurm_account: str | None = Field(default=None, alias="SLURM_ACCOUNT")
    slurm_container_engine: Literal["docker", "podman"] = Field(default="docker", alias="SLURM_CONTAINER_ENGINE")
    slurm_spool_path: Path | None = Field(default=None, alias="SLURM_SPOOL_PATH")
    slurm_poll_seconds: float = Field(default=1.0, gt=0, le=60, alias="SLURM_POLL_SECONDS")
    slurm_extra_args: list[str] = Field(default_factory=list, alias="SLURM_EXTRA_ARGS")
    # Bearer tokens (`dsm token create`): off, 4CAT's routes need only the IP allow-list, as 4CAT sends
    # no token; on, every route does. Cancelling, deleting and TES always need one.
    require_token: bool = Field(default=False, alias="REQUIRE_TOKEN")
    # Prometheus metrics at GET /metrics, and the request timing they need (see README, "Metrics").
    metrics: bool = Field(default=True, alias="METRICS")
    # The GA4GH TES front door: off unless an admin opens it (see docs/tes.md).
    tes_enabled: bool = Field(default=False, alias="TES_ENABLED")
    tes_allowed_images: list[str] = Field(default_factory=list, alias="TES_ALLOWED_IMAGES")
    tes_file_roots: list[Path] = Field(default_factory=list, alias="TES_FILE_ROOTS")
    tes_work_path: Path | None = Field(default=None, alias="TES_WORK_PATH")
    tes_http_allowed_networks: list[str] = Field(default_factory=list, alias="TES_HTTP_ALLOWED_NETWORKS")
    tes_http_max_bytes: int = Field(default=10 * 1024**3, ge=0, alias="TES_HTTP_MAX_BYTES")
    tes_http_timeout: float = Field(default=300, gt=0, alias="TES_HTTP_TIMEOUT")
    tes_default_timeout: float = Field(default=86400, gt=0, alias="TES_DEFAULT_TIMEOUT")
    tes_cors_origins: list[str] = Field(default_factory=list, alias="TES_CORS_ORIGINS")

    @field_validator("trusted_proxies", "ip_whitelist", "tes_http_allowed_networks", "allowed_extensions",
                     "tes_allowed_images", "tes_cors_origins", mode="before")
    @classmethod
    def _list_in_a_string(cls, value: Any) -> Any:
        """`IP_WHITELIST: "10.0.0.1, 10.0.0.2"`: the original tested `address in value`, so a string of
        addresses worked there; none of these lists' items holds a comma or a space."""
        return [item for item in re.split(r"[\s,]+", value) if item] if isinstance(value, str) else value

    @field_validator("secret_key", mode="before")
    @classmethod
    def _any_scalar(cls, value: Any) -> Any:
        """Read by nothing here (the original's Flask sessions); `SECRET_KEY: 12345` must not refuse a start."""
        return str(value) if isinstance(value, int | float) else value

    @field_validator("max_upload_bytes", "log_max_bytes", "tes_http_max_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("trusted_proxies", "ip_whitelist", "tes_http_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(str(item).strip(), strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
        return [str(item).strip() for item in value]

    @field_validator("tes_cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        """What a browser sends as `Origin`: scheme://host[:port], nothing after it (or "*", any site)."""
        for item in value:
            if item != "*" and not re.fullmatch(r"https?://[^/\s?#]+", item):
                raise ValueError(f"{item!r} is not an origin such as https://tes.example.org or http://host:8080")
        return [item.rstrip("/") for item in value]

    @field_validator("tes_file_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        for root in value:
            if not root.is_absolute() or str(root) == "/":
                raise ValueError(f"{str(root)!r} must be an absolute folder other than /")
        return value

    @field_validator("allowed_extensions")
    @classmethod
    def _extensions(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [str(ext).lower().lstrip(".") for ext in value]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _service_names(self) -> Config:
        for name in self.docker_endpoints:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"DOCKER_ENDPOINTS: {name!r} is not a usable service name (letters, digits, _ . -)")
        return self

    # -- what the rest of the package asks of the configuration

    def folder_for(self, mode: str) -> Path | None:
        return self.fourcat_datasets_path if mode == "local" else self.upload_folder_path

    def endpoints(self) -> dict[str, tuple[str, str]]:
        """Submit endpoint name -> (service, mode), for the services whose folder is configured."""
        found: dict[str, tuple[str, str]] = {}
        for name, service in self.docker_endpoints.items():
            for mode, enabled in (("local", service.local), ("remote", service.remote)):
                if enabled and self.folder_for(mode) is not None:
                    found[f"{name}_{mode}"] = (name, mode)
        return found

    def service_uses_gpu(self, name: str) -> bool:
        service = self.docker_endpoints[name]
        return self.gpu_enabled and service.gpu is not False

    def server_url(self, port: int) -> str:
        return (self.dmi_sm_server or f"http://localhost:{port}").rstrip("/")

    @property
    def slurm_spool_folder(self) -> Path:
        """Where Slurm jobs' scripts and outcomes live: SLURM_SPOOL_PATH (on storage every node sees), else
        `slurm-jobs` beside the database."""
        return self.slurm_spool_path or self.database_file.parent / "slurm-jobs"

    @property
    def tes_work_folder(self) -> Path:
        """Where TES tasks' work areas live: TES_WORK_PATH, else `tes-work` beside the database."""
        return self.tes_work_path or self.database_file.parent / "tes-work"


@dataclass
class LoadedConfig:
    config: Config
    warnings: list[str] = field(default_factory=list)
    source: str = ""


_KNOWN_TOP = {f.alias or name for name, f in Config.model_fields.items()}
ORIGINAL_UNUSED = frozenset({"WHISPER_GPU", "WHISPER_LIVE"})  # in the original's config example, read by nothing
_KNOWN_SERVICE = set(ServiceConfig.model_fields)
_KNOWN_GPU = set(GpuCardConfig.model_fields)


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    if not close:
        close = difflib.get_close_matches(key.upper(), sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _drop_blanks(value: Any) -> Any:
    """A blank YAML value means 'unset', as in the original's example file; at the top level an empty
    string does too (`IP_WHITELIST: ""` was the original's "anyone", `4CAT_DATASETS_PATH: ""` its "not
    here"). Deeper down an empty string is a value (a service's environment variable set to nothing)."""
    if isinstance(value, dict):
        return {k: _drop_blanks(v) for k, v in value.items() if v is not None}
    return value


def _drop_top_level_blanks(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in _drop_blanks(data).items() if not (isinstance(v, str) and not v.strip())}


def _env_overrides(env: Mapping[str, str], warnings: list[str]) -> dict[str, Any]:
    """The config keys set by `DSM_<KEY>` variables; see ENV_PREFIX for the rule on the other `DSM_` ones."""
    overrides: dict[str, Any] = {}
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_RESERVED:
            continue
        key = name[len(ENV_PREFIX):]
        if key not in _KNOWN_TOP:
            hint = _suggest(key, _KNOWN_TOP)
            if hint:  # a near miss of a key is most likely a typo; anything else is not ours
                warnings.append(f"environment variable {name} names no config key{hint}; it is ignored")
            continue
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: not a valid YAML value: {exc}") from None
    return overrides


def _unknown_key_warnings(data: dict[str, Any]) -> list[str]:
    """The protocol's rule: an unknown or mistyped key refuses to start, naming the key (and the nearest
    known one). The original's own example config carries keys it never read (ORIGINAL_UNUSED): those
    are warnings, so that such a config works unchanged."""
    warnings, unknown = [], []
    for key in data:
        if key in ORIGINAL_UNUSED:
            warnings.append(f"unknown key {key}: the original's, unused by it and by this server; it is ignored")
        elif key not in _KNOWN_TOP:
            unknown.append(f"{key}{_suggest(str(key), _KNOWN_TOP)}")
    services = data.get("DOCKER_ENDPOINTS")
    if isinstance(services, dict):
        for name, service in services.items():
            if isinstance(service, dict):
                unknown += [f"DOCKER_ENDPOINTS.{name}.{key}{_suggest(str(key), _KNOWN_SERVICE)}"
                            for key in service if key not in _KNOWN_SERVICE]
    inventory = data.get("GPU_INVENTORY")
    if isinstance(inventory, list):
        for index, card in enumerate(inventory):
            if isinstance(card, dict):
                unknown += [f"GPU_INVENTORY[{index}].{key}{_suggest(str(key), _KNOWN_GPU)}"
                            for key in card if key not in _KNOWN_GPU]
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''}: {'; '.join(unknown)} (every key is"
                          " listed in config.example.yml)")
    return warnings


def _format_validation(exc: ValidationError, from_env: Mapping[str, Any] | None = None) -> str:
    """One line per problem, named by key; a key set by a DSM_ variable says so (the file may be right)."""
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "config"
        if error["loc"] and str(error["loc"][0]) in (from_env or {}):
            location += f" (set by {ENV_PREFIX}{error['loc'][0]})"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "required key is missing"
        lines.append(f"{location}: {message}")
    return "; ".join(lines)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for key in ("DATABASE_FILE", "4CAT_DATASETS_PATH", "UPLOAD_FOLDER_PATH", "TES_WORK_PATH", "SLURM_SPOOL_PATH"):
        value = data.get(key)
        if isinstance(value, str | Path):
            data[key] = str((base / Path(value).expanduser()).resolve())
    roots = data.get("TES_FILE_ROOTS")
    if isinstance(roots, list):  # resolved, so that a URL is compared with the real folder
        data["TES_FILE_ROOTS"] = [str(Path(r).expanduser().resolve()) if isinstance(r, str) and r.startswith("/")
                                  else r for r in roots]


def _check_folders(config: Config, create: bool) -> list[str]:
    """A folder that a service's mode needs must exist; one left blank only disables that mode."""
    warnings = []
    db_folder = config.database_file.parent
    if create:
        db_folder.mkdir(parents=True, exist_ok=True)
    if not db_folder.is_dir():
        raise ConfigError(f"DATABASE_FILE: the folder {db_folder} does not exist")
    for mode, key in (("local", "4CAT_DATASETS_PATH"), ("remote", "UPLOAD_FOLDER_PATH")):
        users = [name for name, s in config.docker_endpoints.items() if getattr(s, mode)]
        folder = config.folder_for(mode)
        if folder is None:
            if users:
                warnings.append(
                    f"{key} is not set, so the {mode} endpoints of {', '.join(users)} are not available"
                )
            continue
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir() and (users or mode == "remote"):
            raise ConfigError(f"{key}: {folder} is not a folder" if folder.exists() else
                              f"{key}: the folder {folder} does not exist")
    for name, service in config.docker_endpoints.items():
        if not service.local and not service.remote:
            warnings.append(f"DOCKER_ENDPOINTS.{name}: neither local nor remote is enabled, so it has no endpoint")
        for volume in service.volumes:
            host = volume.split(":")[0]
            if not Path(host).exists():
                warnings.append(f"DOCKER_ENDPOINTS.{name}.volumes: {host} does not exist on this host")
    if config.dmi_sm_server is not None and not re.fullmatch(r"https?://[^/\s]+(/\S*)?", config.dmi_sm_server):
        # a warning: the original read it only to hand it to containers, so a config may carry an unused one
        warnings.append(f"DMI_SM_SERVER {config.dmi_sm_server!r} is not an http:// or https:// URL (such as"
                        " http://localhost:4000): containers cannot post their progress to it")
    if config.gpu_inventory is not None and not config.gpu_enabled:
        warnings.append("GPU_INVENTORY is set but GPU_ENABLED is not, so it is not used")
    if config.backend == "slurm":
        try:
            config.slurm_spool_folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"SLURM_SPOOL_PATH: cannot create {config.slurm_spool_folder}: {exc.strerror}") from None
        if config.gpu_enabled and config.gpu_inventory is None:
            warnings.append("BACKEND is slurm and GPU_ENABLED is set: declare the cards a job can get in"
                            " GPU_INVENTORY, so that 4CAT's GPU check can answer from the cluster's view")
    if config.tes_enabled:
        for root in config.tes_file_roots:
            if not root.is_dir():
                raise ConfigError(f"TES_FILE_ROOTS: the folder {root} does not exist")
        try:
            config.tes_work_folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"TES_WORK_PATH: cannot create {config.tes_work_folder}: {exc.strerror}") from None
        if not config.tes_allowed_images:
            warnings.append("TES_ENABLED is set but TES_ALLOWED_IMAGES is empty, so no TES task can be created")
    return warnings


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read, override from the environment, validate. Raises ConfigError naming the key at fault.

    With no path, `./config.yml` is used when present (as the original did), else the embedded
    default configuration, whose folders are created under `./dsm-data`.
    """
    env = os.environ if env is None else env
    embedded = False
    if path is None:
        path = Path("config.yml") if Path("config.yml").is_file() else DEFAULT_CONFIG
        embedded = path == DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")

    warnings = _unknown_key_warnings(data)
    overrides = _env_overrides(env, warnings)
    nested: dict[str, Any] = {key: overrides[key] for key in ("DOCKER_ENDPOINTS", "GPU_INVENTORY") if key in overrides}
    try:  # the same rule for a service or card given by a variable: a typo there refuses to start too
        _unknown_key_warnings(nested)
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} (set by {', '.join(ENV_PREFIX + key for key in nested)})") from None
    data.update(overrides)
    data = _drop_top_level_blanks(data)
    data.setdefault("DATABASE_FILE", "dsm.db")
    _resolve_paths(data, Path.cwd() if embedded else path.resolve().parent)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, overrides)) from None
    warnings += _check_folders(config, create=embedded)
    source = "embedded default configuration" if embedded else str(path)
    if overrides:
        source += ", with " + ", ".join(ENV_PREFIX + key for key in sorted(overrides)) + " from the environment"
    return LoadedConfig(config=config, warnings=warnings, source=source)
