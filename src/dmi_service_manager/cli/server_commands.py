"""The commands run on the server's own machine: serve, check-config, token, build-service.

They read the configuration (and, for tokens, the server's database) directly; none of them talks HTTP.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from ..config import Config, load_config
from ..errors import ConfigError
from .exits import FAILED, USAGE, CliError
from .render import stdout_console, when

CONFIG_HELP = "config.yml (default: ./config.yml, else the embedded default)"


def _load(path: str | None) -> Any:
    """The config, with a database this process could open: a refusal is one line and exit 2."""
    from ..jobs.store import open_problem

    try:
        loaded = load_config(Path(path) if path else None)
    except ConfigError as exc:
        raise CliError(f"config error: {exc.message}", USAGE) from None
    problem = open_problem(Path(loaded.config.database_file))
    if problem:
        raise CliError(f"config error: DATABASE_FILE: {problem}", USAGE)
    return loaded


def default_workers() -> int:
    """One process per CPU: polls and uploads then use every core, as a bare app with as many workers
    would. Past four, an I/O-bound server gains little and each process costs its own memory."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


@click.command()
@click.option("--config", help=CONFIG_HELP)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=4000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=default_workers,
              help="worker processes, each serving every route (default: one per CPU, at most 4)")
@click.option("--access-log", is_flag=True, help="log every request")
def serve(config: str | None, host: str, port: int, workers: int, access_log: bool) -> int:
    """Run the HTTP API (and the job scheduler)."""
    import uvicorn

    from ..app import ENV_CONFIG, ENV_PORT, ENV_SUPERVISOR
    from ..checks import engine_warnings
    from ..runtime.backends import make_backend
    from ..serving import HEAD_SECONDS, MAX_HEAD_BYTES, MAX_HEADERS, raise_descriptor_limit, uvicorn_settings

    loaded = _load(config)
    settings = loaded.config
    _check_port(host, port)
    print(f"dsm: using {loaded.source}", file=sys.stderr)
    warnings = loaded.warnings + engine_warnings(settings, make_backend(settings, timeout=5)) + \
        _serving_warnings(settings, port)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    os.environ[ENV_CONFIG] = str(Path(config).resolve()) if config else ""
    os.environ[ENV_PORT] = str(port)
    os.environ[ENV_SUPERVISOR] = str(os.getpid())
    soft, hard = raise_descriptor_limit()
    print(f"dsm: open files: {soft} (hard limit {hard}); request heads: at most {MAX_HEAD_BYTES} bytes,"
          f" {MAX_HEADERS} headers, {HEAD_SECONDS:g} s", file=sys.stderr)
    uvicorn.run(
        "dmi_service_manager.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=access_log,
        log_level=settings.log_level.lower(),
        **uvicorn_settings(),
    )
    return 0


def _check_port(host: str, port: int) -> None:
    """A port another process listens on is one line and exit 1 (uvicorn would say it in its log format
    and exit 3, which the CLI's codes give to 'the server cannot be reached')."""
    import socket

    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"--host {host!r} is not an address of this machine: {exc.strerror}", USAGE) from None
    for family, kind, proto, _, address in found[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
            try:
                probe.bind(address)
            except OSError as exc:
                raise CliError(f"cannot listen on {host}:{port}: {exc.strerror} (another dsm serve? --port picks"
                               " another)", FAILED) from None


def _serving_warnings(config: Config, port: int) -> list[str]:
    """What only a start on this port can tell: where containers will post progress, and whether another
    server already runs the queue of this database."""
    from ..jobs.leader import Leadership
    from ..jobs.store import Store
    from ..tokens import Tokens

    warnings = []
    if config.require_token:
        store = Store(config.database_file)
        try:
            store.migrate()  # as the server's start does next
            tokens = Tokens(store).list()
        finally:
            store.close()  # the supervisor keeps no connection: the workers open their own
        if all(token.revoked_at is not None for token in tokens):
            warnings.append("REQUIRE_TOKEN is set but no token exists: every client, 4CAT too, is refused (401)"
                            " until an admin makes one with `dsm token create`")
    if config.dmi_sm_server:
        with contextlib.suppress(ValueError):
            named = urlsplit(config.dmi_sm_server)
            if named.hostname in ("localhost", "127.0.0.1", "::1") and named.port not in (None, port):
                warnings.append(f"DMI_SM_SERVER is {config.dmi_sm_server}, but this server listens on port {port}:"
                                " containers would post their progress to another port")
    holder = Leadership.of(config.database_file).held_elsewhere()
    if holder is not None:
        warnings.append(f"another server{f' (pid {holder})' if holder else ''} already runs the queue of"
                        f" {config.database_file}; this one serves requests for it, and takes the queue over only"
                        " once that one stops")
    return warnings


@click.command("check-config")
@click.argument("path", required=False)
@click.option("--strict", is_flag=True, help="fail on warnings too")
@click.option("--offline", is_flag=True, help="do not ask Docker about images and GPUs")
def check_config(path: str | None, strict: bool, offline: bool) -> int:
    """Validate a config and list the endpoints it would register."""
    from ..checks import describe_endpoints, engine_warnings
    from ..runtime.backends import make_backend

    loaded = _load(path)
    print(f"{loaded.source}: valid")
    endpoints = describe_endpoints(loaded.config)
    print("endpoints it would register:" if endpoints else "it would register no service endpoint")
    for line in endpoints:
        print(f"  {line}")
    warnings = loaded.warnings
    if not offline:
        backend = make_backend(loaded.config, timeout=5)
        engine = engine_warnings(loaded.config, backend)
        answers = not any(w.startswith(f"{backend.engine}:") for w in engine)
        print(f"backend: {backend.name} ({backend.engine}) " + ("answers" if answers else "does not answer"))
        warnings += engine
    for warning in warnings:
        print(f"warning: {warning}")
    if warnings and strict:
        print(f"{len(warnings)} warning(s); --strict fails on warnings", file=sys.stderr)
        return FAILED
    return 0


# -- tokens: in the server's database, made on the server's machine and shown once


def _tokens(config: str | None) -> Any:
    from ..jobs.store import Store
    from ..tokens import Tokens

    loaded = _load(config)
    database = Path(loaded.config.database_file).resolve()
    # A token in another database than the server's is never accepted: say which one this is.
    note = "" if database.exists() else "; a new database: no server has used it yet (is this the server's folder" \
        " or config? see --config)"
    print(f"tokens in {database} ({loaded.source}){note}", file=sys.stderr)
    store = Store(loaded.config.database_file)
    store.migrate()
    return Tokens(store)


def _name(positional: str | None, option: str | None, action: str) -> str:
    if positional and option and positional != option:
        raise click.UsageError(f"dsm token {action}: two names given ({positional!r} and --name {option!r})")
    name = option or positional
    if not name:
        raise click.UsageError(f"dsm token {action} needs a name (--name NAME)")
    return name


@click.group()
def token() -> None:
    """API tokens (TES, admin actions): create, list, revoke.

    Tokens live in the server's database, so these run on the server's machine with its config. A client
    sends one as `Authorization: Bearer <token>`; `dsm` client commands take it from DSM_TOKEN.
    """


@token.command("create")
@click.argument("name", required=False)
@click.option("--name", "name_option", help="the token's name")
@click.option("--scope", type=click.Choice(["read", "submit", "admin"]), default="submit", show_default=True,
              help="read: look; submit: also submit and upload; admin: also cancel and delete")
@click.option("--config", help=CONFIG_HELP)
def token_create(name: str | None, name_option: str | None, scope: str, config: str | None) -> int:
    """Make a token; only the token is printed on stdout, and only this once."""
    from ..errors import DsmError

    chosen = _name(name, name_option, "create")
    tokens = _tokens(config)
    try:
        made = tokens.create(chosen, scope)
    except DsmError as exc:
        raise CliError(f"token: {exc.message}", USAGE) from None
    print(made)
    print(f"token {chosen!r} ({scope}) created; it is shown only this once", file=sys.stderr)
    return 0


@token.command("list")
@click.option("--config", help=CONFIG_HELP)
def token_list(config: str | None) -> int:
    """Every token: name, scope, whether it is revoked; never the token itself."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "SCOPE", "STATE", "CREATED", "ID"):
        table.add_column(column, no_wrap=True)
    for row in _tokens(config).list():
        table.add_row(Text(row.name), row.scope, "revoked" if row.revoked_at else "active", when(row.created_at),
                      str(row.id))
    stdout_console().print(table)
    return 0


@token.command("revoke")
@click.argument("name", required=False)
@click.option("--name", "name_option", help="the token's name or id")
@click.option("--config", help=CONFIG_HELP)
def token_revoke(name: str | None, name_option: str | None, config: str | None) -> int:
    """Revoke a token by its name or id; it is refused (401) from then on."""
    chosen = _name(name, name_option, "revoke")
    if not _tokens(config).revoke(chosen):
        raise CliError(f"token: no active token named {chosen!r}", FAILED)
    print(f"token {chosen!r} revoked", file=sys.stderr)
    return 0


@click.command("build-service", short_help="Build a service image (ocr, whisper, a recipe).")
@click.argument("name")
@click.option("--force", is_flag=True, help="rebuild even when the recipe is unchanged")
@click.option("--gpu", is_flag=True,
              help="the GPU variant (e.g. whisper with the CUDA libraries), tagged dsm-<name>-gpu:latest")
@click.option("--models", metavar="DIR",
              help="bake the models in DIR (one model folder, or a folder of them) into the image (whisper)")
def build_service(name: str, force: bool, gpu: bool, models: str | None) -> int:
    """Build a bundled service image (ocr, whisper) or a recipe folder, without a registry.

    Prints the image's tag; the build's output goes to stderr. A failed build is one line and exit code 1.
    """
    import docker.errors

    from ..runtime.images import BuildFailed, find_recipe
    from ..runtime.images import build_service as build

    try:
        find_recipe(name)
    except BuildFailed as exc:  # a name that is no recipe: the command line is wrong, nothing failed
        raise CliError(exc.message, USAGE) from None
    started = time.monotonic()
    try:
        tag = build(name, force=force, log=lambda line: print(line, file=sys.stderr), gpu=gpu,
                    models=Path(models) if models else None)
    except docker.errors.DockerException as exc:
        raise CliError(f"building {name} failed after {time.monotonic() - started:.0f} s: {exc}") from None
    print(tag)
    return 0
