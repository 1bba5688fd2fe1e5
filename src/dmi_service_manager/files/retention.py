"""Which collections jobs still need, and removing the ones nobody needs any more."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from ..config import Config
from ..jobs.model import Job
from ..jobs.store import Store
from .storage import Storage

log = logging.getLogger(__name__)


def collections_in_use(jobs: Iterable[Job], config: Config) -> set[str]:
    """Collections named in the arguments of remote jobs, as `data/<collection>/...` or absolute.

    Arguments are relative to the container's working directory (normally the parent of
    `data_path`), so both `data/<c>/x` and `/app/data/<c>/x` name collection `<c>`.
    """
    used: set[str] = set()
    for job in jobs:
        if job.mode != "remote" or job.service not in config.docker_endpoints:
            continue
        data_path = config.docker_endpoints[job.service].data_path.rstrip("/")
        prefixes = (data_path + "/", os.path.basename(data_path) + "/", "./" + os.path.basename(data_path) + "/")
        request = job.details_dict().get("request_json") or {}
        for arg in request.get("args") or []:
            text = str(arg)
            for prefix in prefixes:
                if text.startswith(prefix):
                    collection = text[len(prefix):].split("/", 1)[0]
                    if collection:
                        used.add(collection)
    return used


def sweep_expired(storage: Storage, store: Store, config: Config) -> list[str]:
    """Remove collections untouched for RETENTION_DAYS and used by no waiting or running job."""
    assert config.retention_days
    cutoff = time.time() - config.retention_days * 86400
    in_use = collections_in_use(store.active(), config)
    removed = []
    for name, newest in list(storage.collections()):
        if newest >= cutoff or name in in_use:
            continue
        storage.remove_collection((name,))
        removed.append(name)
        log.warning("retention: removed collection %s, untouched for %.1f days", name, (time.time() - newest) / 86400)
    return removed
