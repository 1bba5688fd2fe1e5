"""Optional `callback_url`: POST the final job record there, retried with backoff.

Only hosts on CALLBACK_ALLOWED_HOSTS are ever contacted (checked when the job is submitted and again
before each attempt), redirects are not followed, and delivery state lives in the database so a
restart resumes unfinished deliveries.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import requests

from ..config import Config, split_url
from .store import Store

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
FIRST_DELAY = 1.0
TIMEOUT = 10.0


def callback_refusal(url: Any, config: Config) -> str | None:
    """Why this callback_url may not be called, or None: http(s) to a host on CALLBACK_ALLOWED_HOSTS only."""
    if not isinstance(url, str):
        return "callback_url must be a string"
    try:
        parts = split_url(url)
    except ValueError as exc:
        return f"callback_url is not a valid URL: {exc}"
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        return "callback_url must be an http(s) URL"
    if host.lower() not in {h.lower() for h in config.callback_allowed_hosts}:
        return f"callback_url host {host!r} is not in CALLBACK_ALLOWED_HOSTS on this server"
    return None


class Webhooks:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._wake = threading.Event()

    def job_final(self, job_id: int) -> None:
        self._wake.set()

    def start(self, stop: threading.Event) -> None:
        threading.Thread(target=self._run, args=(stop,), name="dsm-webhooks", daemon=True).start()

    def _run(self, stop: threading.Event) -> None:
        session = requests.Session()
        while not stop.is_set():
            self._wake.clear()
            next_due = self.deliver_due(session)
            self._wake.wait(min(next_due, 30.0))

    def deliver_due(self, session: requests.Session) -> float:
        """Try every delivery that is due; returns seconds until the next one is."""
        soonest = 30.0
        now = time.time()
        for job_id, state in self.store.pending_callbacks():
            wait = float(state.get("next_at", 0)) - now
            if wait > 0:
                soonest = min(soonest, wait)
                continue
            state = self._attempt(session, job_id, state)
            self.store.set_callback_state(job_id, state)
            if not state.get("done"):
                soonest = min(soonest, float(state["next_at"]) - time.time())
        return max(soonest, 0.05)

    def _attempt(self, session: requests.Session, job_id: int, state: dict[str, Any]) -> dict[str, Any]:
        job = self.store.get(job_id)
        attempts = int(state.get("attempts", 0)) + 1
        if job is None or job.callback_url is None:
            return {**state, "done": True, "attempts": attempts, "last_error": "job or callback_url gone"}
        refusal = callback_refusal(job.callback_url, self.config)
        if refusal:
            log.warning("job %s: not delivering: %s", job_id, refusal)
            return {**state, "done": True, "attempts": attempts, "last_error": refusal}
        try:
            response = session.post(job.callback_url, data=json.dumps({"status": "success", "job": job.wire()}),
                                    headers={"Content-Type": "application/json"}, timeout=TIMEOUT,
                                    allow_redirects=False)
            if 200 <= response.status_code < 300:
                log.info("job %s: delivered to its callback_url", job_id)
                return {"done": True, "attempts": attempts, "delivered_at": time.time()}
            error = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            error = str(exc)
        if attempts >= MAX_ATTEMPTS:
            log.error("job %s: giving up on callback_url after %d attempts: %s", job_id, attempts, error)
            return {"done": True, "attempts": attempts, "last_error": error, "gave_up": True}
        delay = FIRST_DELAY * 2 ** (attempts - 1)
        log.warning("job %s: callback failed (%s); retrying in %.0f s", job_id, error, delay)
        return {"done": False, "attempts": attempts, "last_error": error, "next_at": time.time() + delay}
