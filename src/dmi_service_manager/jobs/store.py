"""The job store: the only module that speaks SQL.

SQLite in WAL mode, one connection per thread, every write in its own short IMMEDIATE transaction,
so several worker processes can share the file safely. The table keeps the original DMI Service
Manager's columns and adds ours, so a database written by the original is migrated in place.
A PostgreSQL store would implement the same public methods.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .model import Job, JobStatus, error_results

SCHEMA_VERSION = 3
DATASET_KEY_PATH = ("request_json", "4CAT_dataset_key")

# Column name -> SQL type, beyond the original's (id, created_at, jobtype, completed_at, status,
# message, details, results).
_ADDED_COLUMNS = {
    "processed_records": "INTEGER",
    "service": "TEXT",
    "mode": "TEXT",
    "dataset_key": "TEXT",
    "timeout": "REAL",
    "claimed_at": "REAL",
    "started_at": "REAL",
    "container_id": "TEXT",
    "gpu_ids": "TEXT",
    "gpu_memory": "INTEGER",
    "stop_reason": "TEXT",
    "stop_detail": "TEXT",
    "callback_url": "TEXT",
    "callback_state": "TEXT",
    "last_polled_at": "REAL",
}
_ACTIVE = "status NOT IN ('complete', 'error')"


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    # -- connections

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- schema

    def migrate(self) -> list[str]:
        """Create or upgrade the schema; returns what it did, for the log. Safe to run concurrently."""
        notes: list[str] = []
        conn = self._conn()
        conn.execute("PRAGMA journal_mode = WAL")
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='jobs'").fetchone()
            if version >= SCHEMA_VERSION:
                return notes
            if not exists:
                db.execute(
                    "CREATE TABLE jobs (id INTEGER PRIMARY KEY, created_at INTEGER, jobtype TEXT,"
                    " completed_at INTEGER, status TEXT, message TEXT, details JSON, results JSON)"
                )
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED_COLUMNS.items():
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_dataset_key ON jobs (dataset_key)")
            db.execute(f"CREATE INDEX IF NOT EXISTS jobs_active ON jobs (status, id) WHERE {_ACTIVE}")
            db.execute("CREATE INDEX IF NOT EXISTS jobs_callbacks ON jobs (id) WHERE callback_url IS NOT NULL")
            if exists and version == 0:
                notes += self._adopt_original_rows(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return notes

    def _adopt_original_rows(self, db: sqlite3.Connection) -> list[str]:
        """Rows written by the original server: index their dataset keys and end what it left open."""
        db.execute(
            "UPDATE jobs SET dataset_key = json_extract(details, '$.request_json.\"4CAT_dataset_key\"')"
            " WHERE dataset_key IS NULL AND json_valid(details)"
        )
        now = int(time.time())
        ended = 0
        for row in db.execute(f"SELECT id, status FROM jobs WHERE {_ACTIVE} OR status IS NULL").fetchall():
            message = (
                f"This job was left '{row['status']}' by the original DMI Service Manager, which kept no"
                " record of its container; it was ended when this server took over the database."
            )
            db.execute(
                "UPDATE jobs SET status = 'error', message = ?, results = ?, completed_at = ? WHERE id = ?",
                (message, json.dumps(error_results(message)), now, row["id"]),
            )
            ended += 1
        db.execute(
            "UPDATE jobs SET results = ? WHERE status IN ('complete', 'error') AND results IS NULL",
            (json.dumps(error_results("The original server recorded no results for this job.")),),
        )
        return [f"migrated a database written by the original DMI Service Manager; ended {ended} open job(s)"]

    def instance_id(self) -> str:
        """A short id that labels this server's containers; made once, kept in the database."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
            if row:
                return str(row["value"])
            value = secrets.token_hex(4)
            db.execute("INSERT INTO meta (key, value) VALUES ('instance_id', ?)", (value,))
            return value

    # -- reading

    def get(self, job_id: int) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, *, current: bool = False, limit: int | None = None, offset: int = 0,
             newest_first: bool = False) -> list[Job]:
        sql = "SELECT * FROM jobs"
        if current:
            sql += " WHERE status IS NOT 'complete'"
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        params: tuple[Any, ...] = ()
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params = (limit, offset)
        return [_job(row) for row in self._conn().execute(sql, params)]

    def active(self) -> list[Job]:
        """Every job not yet final, oldest first: the queue and what runs."""
        return [_job(row) for row in self._conn().execute(f"SELECT * FROM jobs WHERE {_ACTIVE} ORDER BY id")]

    def find_by_details(self, keys: Sequence[str | int], value: Any) -> list[Job]:
        """Jobs whose stored details hold `value` at the JSON path `keys`."""
        if tuple(keys) == DATASET_KEY_PATH:
            rows = self._conn().execute("SELECT * FROM jobs WHERE dataset_key = ? ORDER BY id", (str(value),))
            return [_job(row) for row in rows]
        path = "$" + "".join(f"[{k}]" if isinstance(k, int) else "." + json.dumps(k) for k in keys)
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE json_valid(details) AND json_extract(details, ?) = ? ORDER BY id",
            (path, value),
        )
        return [_job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        return {str(row["status"]): int(row["n"]) for row in rows}

    # -- writing

    def create(
        self,
        *,
        jobtype: str,
        details: dict[str, Any],
        service: str,
        mode: str,
        dataset_key: str | None,
        timeout: float,
        gpu_memory: int | None,
        callback_url: str | None,
    ) -> Job:
        now = time.time()
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO jobs (created_at, jobtype, status, details, service, mode, dataset_key, timeout,"
                " gpu_memory, callback_url) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                (int(now), jobtype, json.dumps(details), service, mode, dataset_key, timeout, gpu_memory,
                 callback_url),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (cursor.lastrowid,)).fetchone()
        return _job(row)

    def update_progress(self, job_id: int, message: str | None, processed: int | None) -> bool:
        """Progress from inside a container; ignored once the job is final."""
        sets: list[str] = []
        params: list[Any] = []
        if message is not None:
            sets.append("message = ?")
            params.append(message)
        if processed is not None:
            sets.append("processed_records = ?")
            params.append(processed)
        if not sets:
            return self.get(job_id) is not None
        with self._write() as db:
            cursor = db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND {_ACTIVE}", (*params, job_id))
            return cursor.rowcount > 0

    def set_queue_messages(self, messages: dict[int, str]) -> None:
        """The server's own notes on waiting jobs; never written once a job runs (4CAT's bar would freeze)."""
        if not messages:
            return
        with self._write() as db:
            db.executemany(
                "UPDATE jobs SET message = ? WHERE id = ? AND status = 'pending' AND claimed_at IS NULL",
                [(message, job_id) for job_id, message in messages.items()],
            )

    def claim(self, job_id: int, gpu_ids: list[str]) -> bool:
        """Take a pending job for starting, with the GPUs it is placed on; false if it was cancelled."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET claimed_at = ?, gpu_ids = ? WHERE id = ? AND status = 'pending'"
                " AND claimed_at IS NULL AND stop_reason IS NULL",
                (time.time(), json.dumps(gpu_ids), job_id),
            )
            return cursor.rowcount > 0

    def release_claim(self, job_id: int) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET claimed_at = NULL, gpu_ids = NULL WHERE id = ? AND status = 'pending'",
                       (job_id,))

    def mark_running(self, job_id: int, *, container_id: str, gpu_ids: list[str], details: dict[str, Any]) -> bool:
        """The container exists; from here 4CAT's progress comes from the service, so our note goes."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET status = 'running', message = NULL, container_id = ?, gpu_ids = ?, details = ?"
                " WHERE id = ? AND status = 'pending'",
                (container_id, json.dumps(gpu_ids), json.dumps(details), job_id),
            )
            return cursor.rowcount > 0

    def set_started(self, job_id: int, started_at: float) -> None:
        """When the container started: timeouts count from here, not from the submit."""
        with self._write() as db:
            db.execute("UPDATE jobs SET started_at = ? WHERE id = ?", (started_at, job_id))

    def finish(self, job_id: int, status: JobStatus, results: dict[str, Any], *, message: str | None = None,
               only_if_pending: bool = False) -> bool:
        """Final status and results in one transaction (a final job with null results crashes 4CAT)."""
        assert status.final
        condition = "status = 'pending' AND claimed_at IS NULL" if only_if_pending else _ACTIVE
        with self._write() as db:
            sets = "status = ?, results = ?, completed_at = ?"
            params: list[Any] = [status.value, json.dumps(results), int(time.time())]
            if message is not None:
                sets += ", message = ?"
                params.append(message)
            cursor = db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND {condition}", (*params, job_id))
            return cursor.rowcount > 0

    def request_stop(self, job_id: int, reason: str, detail: str) -> bool:
        """Ask the scheduler to stop a job's container; the first reason given is the one kept."""
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE jobs SET stop_reason = ?, stop_detail = ? WHERE id = ? AND {_ACTIVE}"
                " AND stop_reason IS NULL",
                (reason, detail, job_id),
            )
            return cursor.rowcount > 0

    def touch_polled(self, job_id: int, now: float) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET last_polled_at = ? WHERE id = ?", (now, job_id))

    def set_callback_state(self, job_id: int, state: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET callback_state = ? WHERE id = ?", (json.dumps(state), job_id))

    def pending_callbacks(self) -> list[tuple[int, dict[str, Any]]]:
        rows = self._conn().execute(
            "SELECT id, callback_state FROM jobs WHERE callback_url IS NOT NULL"
            " AND status IN ('complete', 'error')"
            " AND (callback_state IS NULL OR json_extract(callback_state, '$.done') IS NOT 1)"
        )
        return [(int(row["id"]), json.loads(row["callback_state"] or "{}")) for row in rows]


def _job(row: sqlite3.Row) -> Job:
    try:
        status = JobStatus(row["status"])
    except ValueError:
        status = JobStatus.ERROR
    gpu_ids = json.loads(row["gpu_ids"]) if row["gpu_ids"] else []
    return Job(
        id=row["id"],
        created_at=row["created_at"],
        jobtype=row["jobtype"],
        status=status,
        completed_at=row["completed_at"],
        message=row["message"],
        processed_records=row["processed_records"],
        details=row["details"] if isinstance(row["details"], str) else "{}",
        results=row["results"],
        service=row["service"],
        mode=row["mode"],
        dataset_key=row["dataset_key"],
        timeout=row["timeout"],
        claimed_at=row["claimed_at"],
        started_at=row["started_at"],
        container_id=row["container_id"],
        gpu_ids=[str(g) for g in gpu_ids],
        gpu_memory=row["gpu_memory"],
        stop_reason=row["stop_reason"],
        stop_detail=row["stop_detail"],
        callback_url=row["callback_url"],
        last_polled_at=row["last_polled_at"],
    )

