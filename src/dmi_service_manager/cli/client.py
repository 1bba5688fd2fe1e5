"""The HTTP client of the `dsm` client commands: one server, one token, and every failure as one line.

Each request goes to `<server><path>` with `Authorization: Bearer <token>` when a token is set. An answer
that is not what was asked for becomes a `CliError` with one line naming what went wrong and an exit code
(see exits.py): the server cannot be reached (3), wants a token (4), has no such thing (5), or refused
otherwise (6). The server's error bodies are `{"status": "error", "message", "reason"}`; the reason is
what the line quotes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import requests

from .exits import AUTH, NOT_FOUND, SERVER, UNREACHABLE, CliError

DEFAULT_SERVER = "http://127.0.0.1:4000"
TIMEOUT = 30.0  # seconds to connect, and to wait for each answer (4CAT's own client waits as long)
CONNECT_TIMEOUT = 10.0
TOKEN_HINT = "set DSM_TOKEN (or --token) to a token from `dsm token create`"
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _version() -> str:
    try:
        return metadata.version("dmi-service-manager")
    except metadata.PackageNotFoundError:
        return "unknown"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text from elsewhere without terminal control characters (a job's message comes from any container,
    and an escape sequence could set the title, the clipboard or the colours); newlines and tabs stay."""
    return _CONTROL.sub("\ufffd", text)


def one_line(text: str, limit: int = 300) -> str:
    """Text from elsewhere (a server's reason, an exception) as one line of at most `limit` characters."""
    flat = " ".join(printable(str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class Client:
    """Requests to one server, with its token; errors become `CliError`s."""

    def __init__(self, server: str, token: str | None = None, timeout: float = TIMEOUT) -> None:
        self.base = server.rstrip("/")
        if not re.match(r"https?://[^/]", self.base):
            raise CliError(f"the server must be an http:// or https:// URL, not {server!r}", 2)
        try:  # a URL that can never be reached is a usage error (2), not an unreachable server (3)
            requests.Request("GET", self.base + "/").prepare()
            port = urlsplit(self.base).port
        except (requests.exceptions.InvalidURL, ValueError) as exc:
            raise CliError(f"the server's URL {server!r} is not usable: {one_line(str(exc))}", 2) from None
        if port == 0:
            raise CliError(f"the server's URL {server!r} names port 0", 2)
        self.token = token or None
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"dsm/{_version()}"
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    def url(self, path: str) -> str:
        return self.base + path

    def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None, json: Any = None,
                data: Any = None, files: Any = None, headers: Mapping[str, str] | None = None, stream: bool = False,
                read_timeout: float | None = None, accept: Iterable[int] = ()) -> requests.Response:
        """One request; an error status (other than those in `accept`) raises a CliError. `read_timeout`:
        seconds to wait for each part of the answer (None: the client's; infinity: no limit)."""
        waiting = self.timeout if read_timeout is None else None if math.isinf(read_timeout) else read_timeout
        timeout = (CONNECT_TIMEOUT, waiting)
        try:
            response = self.session.request(method, self.url(path), params=params, json=json, data=data,
                                            files=files, headers=headers, stream=stream, timeout=timeout)
        except requests.RequestException as exc:
            raise self.unreachable(exc) from None
        if response.status_code >= 400 and response.status_code not in accept:
            error = self.refusal(response)
            response.close()
            raise error
        return response

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        return decode(self.request("GET", path, params=params))

    def chunks(self, response: requests.Response, size: int | None = None) -> Iterator[bytes]:
        """A streamed body in pieces of `size` bytes (None: each piece as it comes, for a chunked body
        such as a followed log; a body of known length would come in one piece); a connection lost midway
        is a CliError too."""
        try:
            yield from response.iter_content(chunk_size=size)
        except requests.RequestException as exc:
            raise self.unreachable(exc, midway=True) from None
        finally:
            response.close()

    # -- failures as one line

    def unreachable(self, exc: requests.RequestException, *, midway: bool = False) -> CliError:
        return unreachable(self.base, exc, self.timeout, midway=midway)

    def refusal(self, response: requests.Response) -> CliError:
        status = response.status_code
        reason = reason_of(response)
        if status == 401:
            sent = "the token was refused" if self.token else "no token was sent"
            return CliError(f"{self.base} refused the request (401, {sent}): {reason}; {TOKEN_HINT}", AUTH)
        if status == 403 and reason.endswith("may not use this server"):  # the allow-list: no token helps
            return CliError(f"{self.base} refuses this machine (403): {reason}; an admin of that server adds its"
                            " address to IP_WHITELIST", AUTH)
        if status == 403:
            return CliError(f"{self.base} forbids this (403): {reason}; set DSM_TOKEN (or --token) to a token "
                            "whose scope allows it (`dsm token create --scope ...`)", AUTH)
        if status == 404:
            return CliError(f"not found: {reason}", NOT_FOUND)
        return CliError(f"the server answered {status}: {reason}", SERVER)


def unreachable(base: str, exc: requests.RequestException, timeout: float = TIMEOUT, *,
                midway: bool = False) -> CliError:
    """A request that got no answer, as one line naming the server."""
    if isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectTimeout):
        return CliError(f"the server at {base} did not answer within {timeout:g} s", UNREACHABLE)
    found = _ERRNO.search(str(exc))
    why = found.group(1).strip().lower() if found else one_line(type(exc).__name__, 80)
    if midway:
        return CliError(f"the connection to the server at {base} was lost: {why}", UNREACHABLE)
    return CliError(f"cannot reach the server at {base} ({why}); is `dsm serve` running there? "
                    "Set --server or DSM_SERVER", UNREACHABLE)


def reason_of(response: requests.Response) -> str:
    """The reason an error answer gives: `reason` (or `message`) of its JSON body, else its first text."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("reason", "message", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                return one_line(body[key])
    return one_line(response.text) or response.reason or f"HTTP {response.status_code}"


def decode(response: requests.Response) -> Any:
    """The JSON of a successful answer; an answer that is not JSON is the server's error (6)."""
    try:
        return response.json()
    except ValueError:
        raise CliError(f"the server answered {response.status_code} with a body that is not JSON: "
                       f"{one_line(response.text, 120)!r}", SERVER) from None
