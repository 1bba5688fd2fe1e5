"""Removing upload collections that nobody has touched for RETENTION_DAYS and no job needs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .storage import Storage

log = logging.getLogger(__name__)


def sweep_expired(storage: Storage, retention_days: float, in_use: Callable[[], set[str]]) -> list[str]:
    """Remove collections untouched for `retention_days` and named by no waiting or running job."""
    cutoff = time.time() - retention_days * 86400
    needed = in_use()
    removed = []
    for found in list(storage.collections()):
        if found.newest >= cutoff or found.name in needed:
            continue
        storage.remove_collection((found.name,))
        removed.append(found.name)
        log.warning("retention: removed collection %s, untouched for %.1f days", found.name,
                    (time.time() - found.newest) / 86400)
    return removed
