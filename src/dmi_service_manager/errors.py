"""The errors this service raises, each carrying the HTTP status it answers with.

Routes never build error bodies by hand: they raise one of these and `app.py` turns it into
`{"status": "error", "message": ..., "reason": ...}`. 4CAT reads `reason` in some places and
crashes when it is missing, so every error body carries both.
"""

from __future__ import annotations

from typing import Any


class DsmError(Exception):
    """Base class: a message meant for the person who sent the request."""

    status_code = 500

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra or {}
        self.headers = headers or {}  # sent with the error body (a 416's Content-Range)

    def body(self) -> dict[str, Any]:
        return {"status": "error", "message": self.message, "reason": self.message, **self.extra}


class ConfigError(DsmError):
    """The configuration cannot be used; raised before the server starts."""


class BadRequest(DsmError):
    status_code = 400


class Unauthorized(DsmError):
    """No token, or one this server does not know (or revoked)."""

    status_code = 401


class Forbidden(DsmError):
    """A known caller that may not do this (a token whose scope is too small)."""

    status_code = 403


class NotFound(DsmError):
    status_code = 404


class Conflict(DsmError):
    status_code = 409


class PayloadTooLarge(DsmError):
    status_code = 413


class PreconditionFailed(DsmError):
    status_code = 412


class RangeNotSatisfiable(DsmError):
    status_code = 416


class InsufficientStorage(DsmError):
    status_code = 507


class RuntimeUnavailable(DsmError):
    """Docker (or the GPU runtime behind it) cannot do what was asked."""

    status_code = 503


class GpuUnavailable(DsmError):
    """No GPU can serve this request; 4CAT reads a 503 here as 'out of GPU memory'."""

    status_code = 503


class AnswerCut(Exception):
    """An answer already under way cannot be finished (the file being sent shrank). Its status and length
    are sent, so no error body can follow: the connection is closed, and the client sees a short answer.
    The cause is logged once where it is found; the servers' own tracebacks for it are dropped."""
