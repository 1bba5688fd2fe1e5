"""API tokens: made once, shown once, stored only as a salted hash, compared in constant time.

A token reads `dsm_<id>_<secret>`: the id finds the row, the secret is checked against its salted
SHA-256. The secret is 32 random bytes, so a fast hash is safe here (a slow KDF protects guessable
passwords, and would cost every request tens of milliseconds).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from .errors import BadRequest, Forbidden, Unauthorized
from .jobs.store import Store, TokenRow

SCOPES = ("read", "submit", "admin")  # each allows what the ones before it allow
_TOKEN = re.compile(r"dsm_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
NEEDS_TOKEN = "this needs a token: send 'Authorization: Bearer <token>' (an admin makes one with dsm token create)"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the token's name and what it may do."""

    name: str
    scope: str

    def require(self, scope: str) -> None:
        if SCOPES.index(self.scope) < SCOPES.index(scope):
            raise Forbidden(f"the token {self.name!r} has scope {self.scope!r}; this needs {scope!r}")


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("ascii")).digest()


class Tokens:
    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, name: str, scope: str) -> str:
        """A new token, returned once; only its salted hash is kept."""
        if not _NAME.fullmatch(name):
            raise BadRequest("a token name is 1-64 letters, digits and _ . @ - (starting with a letter or digit)")
        if scope not in SCOPES:
            raise BadRequest(f"scope must be one of {', '.join(SCOPES)}")
        token_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_bytes(16)
        try:
            self.store.add_token(TokenRow(id=token_id, name=name, scope=scope, salt=salt,
                                          digest=_digest(salt, secret), created_at=time.time(), revoked_at=None))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return f"dsm_{token_id}_{secret}"

    def verify(self, authorization: str | None) -> Principal:
        """The caller behind an `Authorization: Bearer` header; Unauthorized when there is none or it is wrong."""
        if not authorization:
            raise Unauthorized(NEEDS_TOKEN)
        kind, _, value = authorization.strip().partition(" ")
        match = _TOKEN.fullmatch(value.strip()) if kind.lower() == "bearer" else None
        row = self.store.token(match.group(1)) if match else None
        # Compare even when there is no row, so that timing does not tell which ids exist.
        expected = row.digest if row else b"\0" * 32
        salt = row.salt if row else b"\0" * 16
        ok = hmac.compare_digest(expected, _digest(salt, match.group(2) if match else "-"))
        if not (row and ok) or row.revoked_at is not None:
            raise Unauthorized("the token is not valid on this server (unknown, mistyped or revoked)")
        return Principal(name=row.name, scope=row.scope)

    def list(self) -> list[TokenRow]:
        return self.store.tokens()

    def revoke(self, name_or_id: str) -> bool:
        return self.store.revoke_token(name_or_id)
