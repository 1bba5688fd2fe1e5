"""Output wildcards as the TES spec names them: POSIX pattern matching (IEEE Std 1003.1-2017, 2.13).

Python's fnmatch is not that: it lets `*` match a leading `.`, knows no `[[:digit:]]` classes, and
takes a `[` that never closes for a wildcard. A path is matched one component at a time, so no
wildcard ever matches a `/`; container paths hold no backslashes, so there is nothing to escape.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

_CLASSES = {  # the POSIX locale's classes
    "alnum": string.ascii_letters + string.digits,
    "alpha": string.ascii_letters,
    "blank": " \t",
    "cntrl": "".join(map(chr, range(32))) + "\x7f",
    "digit": string.digits,
    "graph": "".join(map(chr, range(33, 127))),
    "lower": string.ascii_lowercase,
    "print": "".join(map(chr, range(32, 127))),
    "punct": string.punctuation,
    "space": " \t\n\r\v\f",
    "upper": string.ascii_uppercase,
    "xdigit": string.hexdigits,
}


def _bracket(pattern: str, start: int) -> tuple[str, int] | None:
    """The regex of the bracket expression opening at `start`, and the index after it; None where the
    `[` never closes, which makes it an ordinary character."""
    index = start + 1
    negate = index < len(pattern) and pattern[index] in "!^"
    index += negate
    members: list[str] = []
    first = True
    while index < len(pattern):
        char = pattern[index]
        if char == "]" and not first:
            body = "".join(members)
            if not body:
                return ("[^\\s\\S]" if not negate else "."), index + 1  # nothing, or anything
            return f"[{'^' if negate else ''}{body}]", index + 1
        first = False
        if pattern.startswith("[:", index):
            end = pattern.find(":]", index + 2)
            name = pattern[index + 2:end] if end >= 0 else ""
            if name not in _CLASSES:
                return None  # an unknown class: the whole expression is invalid, and `[` is literal
            members.append(re.escape(_CLASSES[name]))
            index = end + 2
            continue
        if index + 2 < len(pattern) and pattern[index + 1] == "-" and pattern[index + 2] != "]":
            low, high = char, pattern[index + 2]
            if low <= high:  # a range that runs backwards matches nothing
                members.append(f"{re.escape(low)}-{re.escape(high)}")
            index += 3
            continue
        members.append(re.escape(char))
        index += 1
    return None


@lru_cache(maxsize=256)
def _compile(pattern: str) -> tuple[re.Pattern[str], bool]:
    """The component pattern as a regex, and whether it has a wildcard at all."""
    out: list[str] = []
    wild = False
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            out.append(".*")
            wild = True
        elif char == "?":
            out.append(".")
            wild = True
        elif char == "[" and (found := _bracket(pattern, index)) is not None:
            out.append(found[0])
            wild = True
            index = found[1]
            continue
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out), re.DOTALL), wild


def is_pattern(component: str) -> bool:
    """Whether a path component has a wildcard (a `[` that never closes is none)."""
    return _compile(component)[1]


def matches(component: str, name: str) -> bool:
    """Whether a file name matches a pattern component. A leading `.` is matched only by a `.`
    written first in the pattern, never by `*`, `?` or a bracket expression."""
    if name.startswith(".") and not component.startswith("."):
        return False
    return _compile(component)[0].fullmatch(name) is not None


def has_wildcard(path: str) -> bool:
    return any(is_pattern(part) for part in path.split("/"))


def path_matches(pattern: str, path: str) -> bool:
    """Whether a path matches a pattern, component by component: a wildcard never matches a `/`."""
    wanted, parts = pattern.split("/"), path.split("/")
    return len(wanted) == len(parts) and all(matches(w, p) for w, p in zip(wanted, parts, strict=True))
