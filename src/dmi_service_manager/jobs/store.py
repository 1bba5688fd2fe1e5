"""The job store: the only module that speaks SQL.

SQLite in WAL mode, one connection per thread, every write in its own short IMMEDIATE transaction,
so several worker processes can share the file safely. The table keeps the original DMI Service
Manager's columns and adds ours, so a database written by the original is migrated in place.
A PostgreSQL store would implement the same public methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import pathname2url

from .model import Failure, Job, JobStatus, Kind, error_results, sources_of

SCHEMA_VERSION = 5
# Page cache per connection. Every thread that asks has its own connection (two dozen per worker under
# load), so SQLite's 2 MiB default grew the server by tens of MiB as the store grew; the kernel's page
# cache serves the rest of the file as fast.
CACHE_KIB = 256
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
    # schema 4: a second front door (TES) and the kind of failure
    "kind": "TEXT",
    "failure": "TEXT",
    "gpus": "INTEGER",
    "cpus": "REAL",
    "mem_limit": "INTEGER",
    "step": "INTEGER",
    "task_id": "TEXT",
    "name": "TEXT",
    "tags": "TEXT",
    "task": "TEXT",
    "task_log": "TEXT",
}
_ACTIVE = "status NOT IN ('complete', 'error')"
# Columns that a status transition may set besides the status itself.
_TRANSITION_COLUMNS = frozenset({
    "results", "completed_at", "message", "container_id", "gpu_ids", "details", "failure", "task_log", "step",
})
# A TES state as a condition on the columns it is read from (see tes/states.py), from the same Failure
# properties that the displayed state reads.
_EXECUTOR = ", ".join(f"'{f.value}'" for f in Failure if f.by_executor)
_CANCELLED = ", ".join(f"'{f.value}'" for f in Failure if f.cancelled)
TES_STATE_SQL = {
    "QUEUED": "status = 'pending' AND claimed_at IS NULL AND stop_reason IS NULL",
    "INITIALIZING": "status = 'pending' AND claimed_at IS NOT NULL AND stop_reason IS NULL",
    "RUNNING": "status = 'running' AND (stop_reason IS NULL OR stop_reason = 'timeout')",
    "CANCELING": f"{_ACTIVE} AND stop_reason IN ('cancel', 'abandoned')",
    "COMPLETE": "status = 'complete'",
    "EXECUTOR_ERROR": f"status = 'error' AND failure IN ({_EXECUTOR})",
    "CANCELED": f"status = 'error' AND failure IN ({_CANCELLED})",
    "SYSTEM_ERROR": f"status = 'error' AND (failure IS NULL OR failure NOT IN ({_EXECUTOR}, {_CANCELLED}))",
}


@dataclass(frozen=True)
class TaskFilter:
    """What `GET /tasks` may filter by, as the TES spec defines each."""

    name_prefix: str | None = None
    state: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Tally:
    """So many jobs alike in what metrics say of them."""

    status: str
    service: str  # a TES task has none: its kind stands in
    kind: str
    failure: str | None
    started: bool
    count: int
    wait_bucket: int | None  # None: not started
    wait_total: float
    run_bucket: int | None  # None: not both started and ended
    run_total: float


@dataclass(frozen=True)
class JobFilter:
    """What a listing keeps: each field that is set must match exactly."""

    status: str | None = None
    service: str | None = None
    dataset_key: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class TokenRow:
    id: str
    name: str
    scope: str
    salt: bytes
    digest: bytes
    created_at: float
    revoked_at: float | None


# What a listing shows of a job (Job.listed): the wire fields, labelled with the kind and the TES id.
_LISTED_COLUMNS = "id, created_at, jobtype, completed_at, status, message, processed_records, details, results, kind," \
    " task_id"
BUSY_MS = 30_000  # how long a write waits for another process's
MIGRATION_WAIT_MS = 3_600_000


def open_problem(path: Path) -> str | None:
    """Why a database at `path` could not be used, or None. Changes nothing (no file is created, no
    migration run), so that a check of a config never alters the database an original server still uses;
    a server that found out only in its workers would restart them without end."""
    if path.exists():
        if not path.is_file():
            return f"{path} is not a file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} cannot be read and written by this user"
        try:
            with contextlib.closing(sqlite3.connect(f"file:{pathname2url(str(path))}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as exc:
            return f"{path} cannot be read as an SQLite database: {exc}"
        return None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".dsm-probe-"):
            pass
    except OSError as exc:
        return f"{path} cannot be created: {exc.strerror or exc}"
    return None


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
            conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. `durable`: on disk before it returns, a power cut included (WAL with
        synchronous=NORMAL, the rest's setting, survives any crash of this server but not of the machine)."""
        conn = self._conn()
        if durable:
            conn.execute("PRAGMA synchronous = FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if durable:
                conn.execute("PRAGMA synchronous = NORMAL")

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
        # The first start on a large database of the original's takes a while, and every worker migrates:
        # the others wait for the first one's transaction, however long, and then find nothing left to do.
        conn.execute(f"PRAGMA busy_timeout = {MIGRATION_WAIT_MS}")
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            with self._write() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='jobs'").fetchone()
                if version < SCHEMA_VERSION:
                    self._upgrade(db, exists=bool(exists))
                # At every start, not once: after a downgrade to the original and back, the jobs the original
                # made meanwhile must be found by the details query too, or 4CAT would submit them again.
                notes += self._adopt_original_rows(db)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        return notes

    def _upgrade(self, db: sqlite3.Connection, *, exists: bool) -> None:
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
        # schema 5: listings by status (the dashboard's, `dsm jobs --status`) of any status
        db.execute("CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id)")
        db.execute("CREATE INDEX IF NOT EXISTS jobs_callbacks ON jobs (id) WHERE callback_url IS NOT NULL")
        db.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_task_id ON jobs (task_id) WHERE task_id IS NOT NULL")
        db.execute("CREATE INDEX IF NOT EXISTS jobs_tasks ON jobs (id) WHERE kind = 'tes'")
        db.execute(
            "CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL,"
            " scope TEXT NOT NULL, salt BLOB NOT NULL, digest BLOB NOT NULL, created_at REAL NOT NULL,"
            " revoked_at REAL)"
        )
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _adopt_original_rows(self, db: sqlite3.Connection) -> list[str]:
        """Rows the original server wrote (ours always name a service or a kind): index their dataset
        keys, end what it left open, and mark them as seen."""
        original = "service IS NULL AND kind IS NULL"
        if db.execute(f"SELECT 1 FROM jobs WHERE {original} LIMIT 1").fetchone() is None:
            return []
        now = int(time.time())
        left_open = db.execute(f"SELECT id, status FROM jobs WHERE {original}"
                               " AND (status IS NULL OR status NOT IN ('complete', 'error'))").fetchall()
        for row in left_open:
            message = (
                f"This job was left '{row['status']}' by the original DMI Service Manager, which kept no"
                " record of its container; it was ended when this server took over the database."
            )
            db.execute(
                "UPDATE jobs SET status = 'error', message = ?, results = ?, completed_at = ?, failure = ?"
                " WHERE id = ?",
                (message, json.dumps(error_results(message)), now, Failure.ENGINE.value, row["id"]),
            )
        # Only rows whose results SQLite cannot vouch for are read in Python (hundreds of thousands may come).
        final = db.execute(
            f"SELECT id, status, results FROM jobs WHERE {original} AND status IN ('complete', 'error') AND NOT"
            " coalesce(CASE WHEN json_valid(results) THEN"  # CASE, not AND: SQLite may evaluate AND in any order
            " json_type(results) = 'object' AND json_type(results, '$.returncode') = 'integer'"
            " AND json_type(results, '$.error') = 'text'"
            " AND (json_extract(results, '$.returncode') = 0) = (status = 'complete') END, 0)"  # NULL: a key missing
        )
        for row in final.fetchall():
            fixed = _original_results(row["status"], row["results"])
            if fixed is not None:
                db.execute("UPDATE jobs SET status = ?, results = ? WHERE id = ?", (*fixed, row["id"]))
        # One pass over the rows: marked as seen, indexed for the details query, and times made the whole
        # seconds the protocol promises (a fraction of a second in a REAL column would be served as a float).
        taken = db.execute(
            "UPDATE jobs SET kind = '4cat', dataset_key = coalesce(dataset_key, CASE WHEN json_valid(details)"
            f" THEN json_extract(details, '$.request_json.\"4CAT_dataset_key\"') END),"
            " created_at = CAST(created_at AS INTEGER), completed_at = CAST(completed_at AS INTEGER)"
            f" WHERE {original}"
        ).rowcount
        return [f"took over {taken} job(s) written by the original DMI Service Manager (indexed for the"
                f" details query); ended {len(left_open)} it had left open"]

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

    def listing(self, *, current: bool = False, limit: int | None = None, offset: int = 0,
             newest_first: bool = False, after: int | None = None, where: JobFilter | None = None,
             max_bytes: int | None = None) -> list[Job]:
        """Jobs in id order, as a listing shows them: only the columns `Job.listed` reads (a TES task's
        document and logs can be large), the others left at their defaults. `after` continues from a job id
        (in the chosen direction) instead of an offset. `max_bytes`: stop once the jobs read hold that much
        text (always at least one job): rows are read one by one, so a few huge jobs never sit in memory
        together."""
        clauses: list[str] = []
        params: list[Any] = []
        if current:
            clauses.append("status IS NOT 'complete'")
        for column, value in (("status", where.status), ("service", where.service),
                              ("dataset_key", where.dataset_key), ("kind", where.kind)) if where else ():
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if after is not None:
            clauses.append("id < ?" if newest_first else "id > ?")
            params.append(after)
        sql = f"SELECT {_LISTED_COLUMNS} FROM jobs" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        sql += " LIMIT ? OFFSET ?"
        params += [-1 if limit is None else limit, offset]
        rows = self._conn().execute(sql, params)
        if max_bytes is None:
            return [_job(row) for row in rows]
        found: list[Job] = []
        held = 0
        for row in rows:
            found.append(_job(row))
            held += len(row["details"] or "") + len(row["results"] or "") + len(row["message"] or "")
            if held >= max_bytes:
                break
        return found

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

    def tallies(self, bounds: Sequence[float]) -> list[Tally]:
        """Every job counted once, by what metrics label it with and the bucket (index into `bounds`, or
        len(bounds) past the last) of how long it waited (created to started) and ran (started to
        completed): one scan of the table. Seconds; created_at and completed_at are whole seconds."""
        def bucket(value: str) -> str:
            cases = " ".join(f"WHEN {value} <= {float(b)!r} THEN {i}" for i, b in enumerate(bounds))
            return f"CASE {cases} ELSE {len(bounds)} END"

        rows = self._conn().execute(
            "SELECT status, service, kind, failure, started, count(*) AS n,"
            f" CASE WHEN started THEN {bucket('wait')} END AS wait_bucket, total(wait) AS wait_total,"
            f" CASE WHEN ran THEN {bucket('run')} END AS run_bucket, total(run) AS run_total"
            " FROM (SELECT status, COALESCE(service, jobtype) AS service, COALESCE(kind, '4cat') AS kind, failure,"
            " started_at IS NOT NULL AS started, started_at IS NOT NULL AND completed_at IS NOT NULL AS ran,"
            " max(started_at - created_at, 0) AS wait, max(completed_at - started_at, 0) AS run FROM jobs)"
            " GROUP BY 1, 2, 3, 4, 5, 7, 9")
        return [Tally(status=str(r["status"]), service=str(r["service"]), kind=str(r["kind"]), failure=r["failure"],
                      started=bool(r["started"]), count=int(r["n"]), wait_bucket=r["wait_bucket"],
                      wait_total=float(r["wait_total"]), run_bucket=r["run_bucket"], run_total=float(r["run_total"]))
                for r in rows]

    def recent_failures(self, limit: int) -> list[Job]:
        """The newest jobs that ended in error, newest first."""
        rows = self._conn().execute("SELECT * FROM jobs WHERE status = 'error' ORDER BY id DESC LIMIT ?", (limit,))
        return [_job(row) for row in rows]

    # -- writing

    def create(self, new: NewJob) -> Job:
        """Store a new job; durable, as its 202 promises (and so its id is never given again)."""
        now = time.time()
        with self._write(durable=True) as db:
            cursor = db.execute(
                "INSERT INTO jobs (created_at, jobtype, status, details, service, mode, dataset_key, timeout,"
                " gpu_memory, callback_url, kind, gpus, cpus, mem_limit, step, task_id, name, tags, task, task_log)"
                " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?)",
                (int(now), new.jobtype, json.dumps(new.details), new.service, new.mode, new.dataset_key,
                 new.timeout, new.gpu_memory, new.callback_url, new.kind.value, new.gpus, new.cpus, new.mem_limit,
                 new.task_id, new.name, json.dumps(new.tags) if new.tags else None,
                 json.dumps(new.task) if new.task else None, json.dumps(new.task_log) if new.task_log else None),
            )
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (cursor.lastrowid,)).fetchone()
        return _job(row)

    def update_progress(self, job_id: int, message: str | None, processed: int | None) -> bool:
        """Progress from inside a container; ignored once the job is final. An empty message keeps the one
        there, as the original did."""
        sets: list[str] = []
        params: list[Any] = []
        if message:
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
        """Take a pending job for starting, with the GPUs it is placed on; false if it was cancelled.
        The server's waiting note goes here, before the container starts: what the service posts from
        its first moment on is its own, never wiped by the start being recorded after it."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET claimed_at = ?, gpu_ids = ?, message = NULL WHERE id = ? AND status = 'pending'"
                " AND claimed_at IS NULL AND stop_reason IS NULL",
                (time.time(), json.dumps(gpu_ids), job_id),
            )
            return cursor.rowcount > 0

    def release_claim(self, job_id: int) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET claimed_at = NULL, gpu_ids = NULL WHERE id = ? AND status = 'pending'",
                       (job_id,))

    def transition(self, job_id: int, to: JobStatus, *, condition: str | None = None, **columns: Any) -> bool:
        """The one door for status changes: its guard comes from the transition table in model.py.

        `condition` narrows the guard further (SQL on the row); `columns` are written in the same
        transaction, so a final status never exists without its results.
        """
        unknown = set(columns) - _TRANSITION_COLUMNS
        assert not unknown, f"a transition cannot write {unknown}"
        sources = ", ".join(f"'{status.value}'" for status in sorted(sources_of(to)))
        guard = f"status IN ({sources})" + (f" AND {condition}" if condition else "")
        values = {name: _column_value(value) for name, value in columns.items()}
        if to.final:
            values.setdefault("completed_at", int(time.time()))
        sets = ", ".join(["status = ?", *(f"{name} = ?" for name in values)])
        with self._write() as db:
            cursor = db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND {guard}",
                                (to.value, *values.values(), job_id))
            return cursor.rowcount > 0

    def mark_running(self, job_id: int, *, container_id: str | None, gpu_ids: list[str],
                     details: dict[str, Any]) -> bool:
        """The container exists (None: its command could not run, and none is left). The message is
        left alone: the claim removed the server's note, and the service may have posted since."""
        return self.transition(job_id, JobStatus.RUNNING, container_id=container_id, gpu_ids=gpu_ids,
                               details=details)

    def finish(self, job_id: int, status: JobStatus, results: dict[str, Any], *, failure: Failure | None = None,
               message: str | None = None, only_if_waiting: bool = False,
               task_log: dict[str, Any] | None = None, completed_at: float | None = None) -> bool:
        """Final status and results in one transaction (a final job with null results crashes 4CAT).
        `completed_at`: when it ended, where that was before now (a container that exited while the server
        was down); else now."""
        assert status.final
        columns: dict[str, Any] = {"results": results, "failure": failure.value if failure else None}
        if completed_at is not None:
            columns["completed_at"] = int(min(completed_at, time.time()))
        if message is not None:
            columns["message"] = message
        if task_log is not None:
            columns["task_log"] = task_log
        waiting = "status = 'pending' AND claimed_at IS NULL"
        return self.transition(job_id, status, condition=waiting if only_if_waiting else None, **columns)

    def set_container(self, job_id: int, container_id: str | None, step: int) -> bool:
        """The container of a running job's current step (a TES task runs one per executor)."""
        with self._write() as db:
            cursor = db.execute("UPDATE jobs SET container_id = ?, step = ? WHERE id = ? AND status = 'running'",
                                (container_id, step, job_id))
            return cursor.rowcount > 0

    def advance_step(self, job_id: int, step: int, task_log: dict[str, Any]) -> bool:
        """One executor ended and the next is due: its log and the new step, in one transaction."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET step = ?, container_id = NULL, task_log = ? WHERE id = ? AND status = 'running'"
                " AND step = ?",
                (step, json.dumps(task_log), job_id, step - 1),
            )
            return cursor.rowcount > 0

    def set_started(self, job_id: int, started_at: float) -> None:
        """When the first container started: timeouts count from here, not from the submit."""
        with self._write() as db:
            db.execute("UPDATE jobs SET started_at = ? WHERE id = ? AND started_at IS NULL", (started_at, job_id))

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


    # -- TES tasks

    def get_task(self, task_id: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE task_id = ? AND kind = 'tes'", (task_id,)).fetchone()
        return _job(row) if row else None

    def tasks(self, where: TaskFilter, *, before: int | None, limit: int, minimal: bool) -> list[Job]:
        """TES tasks, newest first, below job id `before`. MINIMAL reads only the columns it shows."""
        clauses = ["kind = 'tes'"]
        params: list[Any] = []
        if before is not None:
            clauses.append("id < ?")
            params.append(before)
        if where.name_prefix:
            clauses.append("substr(name, 1, ?) = ?")
            params += [len(where.name_prefix), where.name_prefix]
        if where.state is not None:
            clauses.append(f"({TES_STATE_SQL.get(where.state, '0')})")
        for key, value in where.tags.items():
            path = "$." + json.dumps(key)
            if value == "":
                clauses.append("json_type(tags, ?) IS NOT NULL")
                params.append(path)
            else:
                clauses.append("json_extract(tags, ?) = ? AND json_type(tags, ?) = 'text'")
                params += [path, value, path]
        columns = (
            "id, created_at, jobtype, status, claimed_at, stop_reason, failure, task_id, kind"
            if minimal else "*"
        )
        sql = f"SELECT {columns} FROM jobs WHERE {' AND '.join(clauses)} ORDER BY id DESC LIMIT ?"
        return [_job(row) for row in self._conn().execute(sql, (*params, limit))]

    # -- API tokens

    def add_token(self, row: TokenRow) -> None:
        """A new token; a revoked one of the same name keeps its row, renamed, so the name can be used again."""
        with self._write() as db:
            db.execute("UPDATE tokens SET name = name || ' (revoked, ' || id || ')' WHERE name = ?"
                       " AND revoked_at IS NOT NULL", (row.name,))
            try:
                db.execute(
                    "INSERT INTO tokens (id, name, scope, salt, digest, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (row.id, row.name, row.scope, row.salt, row.digest, row.created_at),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"a token named {row.name!r} exists already") from None

    def token(self, token_id: str) -> TokenRow | None:
        found = self._conn().execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        return _token(found) if found else None

    def tokens(self) -> list[TokenRow]:
        return [_token(row) for row in self._conn().execute("SELECT * FROM tokens ORDER BY created_at")]

    def revoke_token(self, name_or_id: str) -> bool:
        with self._write() as db:
            cursor = db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE (name = ? OR id = ?) AND revoked_at IS NULL",
                (time.time(), name_or_id, name_or_id),
            )
            return cursor.rowcount > 0


@dataclass(frozen=True)
class NewJob:
    """Everything a front door decides about a job before it is stored."""

    jobtype: str
    details: dict[str, Any]
    timeout: float
    kind: Kind = Kind.FOURCAT
    service: str | None = None
    mode: str | None = None
    dataset_key: str | None = None
    gpus: int = 1
    gpu_memory: int | None = None
    cpus: float | None = None
    mem_limit: int | None = None
    callback_url: str | None = None
    task_id: str | None = None
    name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    task_log: dict[str, Any] = field(default_factory=dict)


def _column_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def _token(row: sqlite3.Row) -> TokenRow:
    return TokenRow(id=row["id"], name=row["name"], scope=row["scope"], salt=bytes(row["salt"]),
                    digest=bytes(row["digest"]), created_at=row["created_at"], revoked_at=row["revoked_at"])


def _original_results(status: str, text: Any) -> tuple[str, str] | None:
    """A final row of the original's in the shape 4CAT needs, or None when it has it: results decoding to
    an object with an int `returncode` (0 for `complete`, not 0 for `error`) and a string `error`. A
    `complete` whose returncode says it failed is an `error` (4CAT decides by the returncode); one with no
    results at all keeps the original's word, with a note."""
    results = _json_object(text)
    code, error = results.get("returncode"), results.get("error")
    code = code if isinstance(code, int) and not isinstance(code, bool) else None
    error = error if isinstance(error, str) else None
    if code is not None and error is not None and (code == 0) == (status == "complete"):
        return None
    note = "The original server recorded no usable results for this job."
    if status == "complete" and code not in (None, 0):
        status = "error"
    if status == "complete":
        fixed = {**results, "returncode": 0, "error": error or "", "note": note}
    else:
        fixed = {**results, "returncode": code or 1, "error": error or note}
    return status, json.dumps(fixed)


def _json_object(text: Any) -> dict[str, Any]:
    if not isinstance(text, str) or not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _job(row: sqlite3.Row) -> Job:
    """A job from a row; a partial row (a MINIMAL listing) leaves the other fields at their defaults.
    Every tick of the scheduler and every listing reads many: plain dict lookups, each column once."""
    col = dict(zip(row.keys(), row, strict=True)).get
    try:
        status = JobStatus(row["status"])
    except ValueError:
        status = JobStatus.ERROR
    gpu_ids = col("gpu_ids")
    failure: Any = col("failure")
    details = col("details")
    gpus = col("gpus")
    return Job(
        id=row["id"],
        created_at=row["created_at"],
        jobtype=row["jobtype"],
        status=status,
        completed_at=col("completed_at"),
        message=col("message"),
        processed_records=col("processed_records"),
        details=details if isinstance(details, str) else "{}",
        results=col("results"),
        service=col("service"),
        mode=col("mode"),
        dataset_key=col("dataset_key"),
        timeout=col("timeout"),
        claimed_at=col("claimed_at"),
        started_at=col("started_at"),
        container_id=col("container_id"),
        gpu_ids=[str(g) for g in json.loads(gpu_ids)] if gpu_ids else [],
        gpu_memory=col("gpu_memory"),
        stop_reason=col("stop_reason"),
        stop_detail=col("stop_detail"),
        callback_url=col("callback_url"),
        last_polled_at=col("last_polled_at"),
        kind=Kind.TES if col("kind") == "tes" else Kind.FOURCAT,
        failure=Failure(failure) if failure in Failure._value2member_map_ else None,
        gpus=gpus if gpus is not None else 1,
        cpus=col("cpus"),
        mem_limit=col("mem_limit"),
        step=col("step") or 0,
        task_id=col("task_id"),
        name=col("name"),
        tags=_json_object(col("tags")),
        task=_json_object(col("task")),
        task_log=_json_object(col("task_log")),
    )
