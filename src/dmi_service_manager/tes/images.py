"""TES_ALLOWED_IMAGES: which images a task may name; nothing else runs."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable


def _with_tag(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return image if ":" in last or "@" in last else f"{image}:latest"


def image_allowed(image: str, allowed: Iterable[str]) -> bool:
    """Exact names or shell-style patterns; `ubuntu` and `ubuntu:latest` are one image."""
    names = {image, _with_tag(image)}
    for rule in allowed:
        for name in names:
            if name == rule or _with_tag(rule) == name or (any(c in rule for c in "*?[")
                                                           and fnmatch.fnmatchcase(name, rule)):
                return True
    return False
