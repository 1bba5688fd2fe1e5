"""The one place that reads numbers and JSON out of requests, so that no input reaches a 500.

Numbers: ASCII digits only (`'²'.isdigit()` is true and `int('²')` fails), within what SQLite's
integers take. JSON: nested at most MAX_DEPTH deep (Python's parser would recurse without end),
and text that is valid UTF-8 (a lone surrogate cannot be stored or sent back).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import BadRequest

MAX_INT = 2**62  # below SQLite's 2**63, with room for arithmetic
MAX_DEPTH = 64
_DECIMAL = re.compile(r"[0-9]{1,30}(?:\.[0-9]{1,30})?")


def whole_number(text: str | None, field: str, *, low: int = 0, high: int = MAX_INT) -> int:
    """A whole number written in ASCII digits, between `low` and `high`; BadRequest naming the field if not."""
    value = (text or "").strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise BadRequest(f"{field} must be a whole number, not {text!r}")
    number = int(value)
    if not low <= number <= high:
        raise BadRequest(f"{field} must be between {low} and {high}")
    return number


def count(text: str | None, field: str) -> int:
    """A count that services may write as `12` or `12.0` (the original took any float)."""
    value = (text or "").strip()
    if not _DECIMAL.fullmatch(value):
        raise BadRequest(f"{field} must be a number of records, not {text!r}")
    number = int(float(value))
    if number > MAX_INT:
        raise BadRequest(f"{field} is larger than {MAX_INT}")
    return number


def decode_json(raw: bytes | bytearray) -> Any:
    """A JSON document, refused with BadRequest when it is malformed, too deep, or not storable text."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"the JSON body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    check_json(value)
    return value


def check_json(value: Any) -> None:
    """Walk a decoded document (without recursion): depth, lone surrogates, and integers SQLite can hold."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise BadRequest(f"the JSON body is nested more than {MAX_DEPTH} levels deep")
            children = item.items() if isinstance(item, dict) else ((None, v) for v in item)
            for key, child in children:
                if key is not None:
                    _text(key)
                pending.append((child, depth + 1))
        elif isinstance(item, str):
            _text(item)
        elif isinstance(item, int) and not isinstance(item, bool) and not -MAX_INT <= item <= MAX_INT:
            raise BadRequest(f"the JSON body holds a number too large to store: {item}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("the JSON body holds text that is not valid Unicode (a lone surrogate)") from None
