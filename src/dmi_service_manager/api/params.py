"""The one place that reads numbers and JSON out of requests, so that no input reaches a 500.

Numbers: ASCII digits only (`'²'.isdigit()` is true and `int('²')` fails), within what SQLite's
integers take, in the body, the query (`QueryInt`) and the path (the `int` path convertor, replaced
here). JSON: nested at most MAX_DEPTH deep (Python's parser would recurse without end), numbers that
fit a float, and text that is valid UTF-8 (a lone surrogate cannot be stored or sent back).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from starlette.convertors import Convertor, register_url_convertor

from ..errors import BadRequest

MAX_INT = 2**62  # below SQLite's 2**63, with room for arithmetic
MAX_DEPTH = 64
_DECIMAL = re.compile(r"[0-9]{1,30}(?:\.[0-9]{1,30})?")


class _PathId(Convertor[int]):
    """`{job_id:int}` in a route: at most 18 ASCII digits. Starlette's own convertor would int() a
    5,000-digit id, past Python's limit on digits, and answer 500; a longer id matches no route (404)."""

    regex = "[0-9]{1,18}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("int", _PathId())  # before any router is built: each route compiles its path once


def _ascii_digits(value: Any) -> Any:
    """A query number as written: pydantic alone would take `1_000`, `1.0` or ` 1`."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise ValueError("must be a whole number written in ASCII digits")
        if len(value) > 19:  # int() of it is cheap, but no query number here may be that large
            raise ValueError(f"must be at most {MAX_INT}")
    return value


QueryInt = Annotated[int, BeforeValidator(_ascii_digits)]


def whole_number(text: str | None, field: str, *, low: int = 0, high: int = MAX_INT) -> int:
    """A whole number written in ASCII digits, between `low` and `high`; BadRequest naming the field if not."""
    value = (text or "").strip()
    if not value.isascii() or not value.isdigit():
        raise BadRequest(f"{field} must be a whole number, not {text!r}")
    number = int(value) if len(value) <= 19 else high + 1
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
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
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


def _finite(text: str) -> float:
    """`1e400` would become infinity, which no JSON can hold again."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def is_text(text: str) -> bool:
    """Whether this can be stored and sent back as UTF-8 (a lone surrogate cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(text: str) -> None:
    if not is_text(text):
        raise BadRequest("the JSON body holds text that is not valid Unicode (a lone surrogate)")
