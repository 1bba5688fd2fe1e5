"""What `dsm` exits with, and the one error type its commands raise for an expected failure.

Every expected failure ends the same way: one line on stderr, no traceback, and one of these codes, so
that a script can tell a refused token from a server that is down.
"""

from __future__ import annotations

OK = 0
FAILED = 1  # the job or the operation failed: a job ended `error`, a file was refused, a build failed
USAGE = 2  # a wrong command line (Click's own), or a config file that cannot be used
UNREACHABLE = 3  # no answer from the server: refused, unknown host, timed out
AUTH = 4  # the server wants a token (401) or a token with a larger scope (403)
NOT_FOUND = 5  # no such job, collection, file or service (404)
SERVER = 6  # any other error answer from the server (400, 409, 413, 5xx, ...)

HELP = """\b
Exit codes:
  0  ok
  1  the job or operation failed (a job ended in error, a file was refused, a build failed)
  2  usage error, or a config file that cannot be used
  3  the server cannot be reached
  4  the server wants a token, or a token with a larger scope (401, 403): set DSM_TOKEN
  5  not found (404): no such job, collection or file
  6  any other error answer from the server"""


class CliError(Exception):
    """An expected failure: `main` prints `message` as one line on stderr and exits with `code`."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
