"""`dsm`: the command line. This module owns the group and how a failure ends; the commands live in
server_commands (run on the server's machine) and client_commands (over HTTP to a running server).

An expected failure never shows a traceback: it is one line on stderr and an exit code from exits.py.
"""

from __future__ import annotations

import os
import sys
from typing import Any
from urllib.parse import urlsplit

import click
import requests

from ..errors import ConfigError, DsmError
from . import client_commands, server_commands
from .client import one_line, unreachable
from .exits import FAILED, HELP, USAGE, CliError
from .server_commands import default_workers

__all__ = ["cli", "default_workers", "main"]

INTERRUPTED = 130


@click.group(epilog=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dmi-service-manager", prog_name="dsm")
def cli() -> None:
    """DMI Service Manager: Docker containers as jobs for 4CAT.

    \b
    On the server's machine: serve, check-config, build-service, token.
    Against a running server (over HTTP): upload, download, jobs, job, logs, cancel, services, gpus,
    submit, demo. They take --server (else DSM_SERVER, else http://127.0.0.1:4000) and --token (else
    DSM_TOKEN, sent as 'Authorization: Bearer'), print tables, and JSON with --json.
    """


for command in (server_commands.serve, server_commands.check_config, server_commands.build_service,
                server_commands.token, *client_commands.COMMANDS):
    cli.add_command(command)


def _fail(message: str, code: int) -> int:
    click.echo(f"dsm: {one_line(message, 2000)}", err=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """The `dsm` console script: runs a command and returns its exit code."""
    try:
        result: Any = cli.main(args=argv, prog_name="dsm", standalone_mode=False)
    except click.ClickException as exc:  # usage errors: Click's own message and code (2)
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("dsm: interrupted", err=True)
        return INTERRUPTED
    except CliError as exc:
        return _fail(exc.message, exc.code)
    except ConfigError as exc:
        return _fail(f"config error: {exc.message}", USAGE)
    except DsmError as exc:  # a failed build (BuildFailed), an engine that cannot be reached (RuntimeUnavailable)
        return _fail(exc.message, FAILED)
    except requests.RequestException as exc:  # a request made outside the Client, which maps its own
        url = str(exc.request.url) if exc.request is not None and exc.request.url else "the server"
        error = unreachable(urlsplit(url)._replace(path="", query="", fragment="").geturl(), exc)
        return _fail(error.message, error.code)
    except BrokenPipeError:  # `dsm logs -f 12 | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return FAILED
    except OSError as exc:  # this machine's side: an unwritable --out, a full disk, an unreadable file
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", FAILED)
    return result if isinstance(result, int) else 0
