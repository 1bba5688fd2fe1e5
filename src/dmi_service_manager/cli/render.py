"""How the client commands show what the server answered: Rich tables for people, JSON for scripts.

Everything the server sends is shown as plain text (`Text`), never read as Rich markup, so a job's
message or a container's output is printed as it is.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .client import one_line, printable

PIPE_WIDTH = 200  # a table written to a pipe or file is not cut to 80 columns
STATUS_STYLES = {"complete": "green", "error": "red", "running": "cyan", "pending": "yellow", "created": "yellow"}
TAIL_LINES = 20


def stdout_console() -> Console:
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=PIPE_WIDTH if wide else None)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def size(count: int | None) -> str:
    """Bytes in binary units, as the server's configuration and messages give them (GiB)."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_text(status: str) -> Text:
    return _text(status, STATUS_STYLES.get(status, ""))


def _flat(value: Any, limit: int = 0) -> str:
    return one_line(str(value), limit or 1_000_000) if value is not None else ""


def _text(value: Any, style: str = "") -> Text:
    """A server's text as Rich text: never markup, never a terminal control sequence."""
    return Text(printable(str(value)), style=style)


def _what(job: dict[str, Any]) -> str:
    if job.get("kind") == "tes":
        return f"TES task {job.get('task_id')}"
    return str(job.get("jobtype") or "")


def _took(job: dict[str, Any]) -> str:
    created = job.get("created_at")
    if not created:
        return "-"
    if job.get("completed_at"):
        return duration(job["completed_at"] - created)
    return duration(time.time() - created) + " so far"


# -- jobs


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("ID", justify="right", no_wrap=True)
    table.add_column("KIND", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("WHAT", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    table.add_column("TOOK", no_wrap=True)
    table.add_column("RECORDS", justify="right", no_wrap=True)
    table.add_column("MESSAGE", overflow="ellipsis", no_wrap=True, max_width=80)
    for job in jobs:
        records = job.get("processed_records")
        table.add_row(str(job.get("id")), _text(job.get("kind", "4cat")), status_text(str(job.get("status"))),
                      _text(_what(job)), when(job.get("created_at")), _took(job),
                      "-" if records is None else str(records), _text(_flat(job.get("message"), 80)))
    return table


def results_of(job: dict[str, Any]) -> dict[str, Any] | None:
    try:
        results = json.loads(job["results"]) if job.get("results") else None
    except ValueError:
        return None
    return results if isinstance(results, dict) else None


def job_view(job: dict[str, Any]) -> RenderableType:
    """One job: its fields, then the end of its output once it is final."""
    title = Text.assemble((f"job {job.get('id')}", "bold"), "  ", _what(job), "  ", status_text(str(job["status"])))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    grid.add_row("created", when(job.get("created_at")))
    if job.get("completed_at"):
        grid.add_row("completed", f"{when(job['completed_at'])} (took {_took(job)})")
    if job.get("message"):
        grid.add_row("message", _text(_flat(job["message"])))
    if job.get("processed_records") is not None:
        grid.add_row("records", str(job["processed_records"]))
    results = results_of(job)
    parts: list[RenderableType] = [title, grid]
    if results is not None:
        grid.add_row("returncode", str(results.get("returncode")))
        for key in ("report", "error"):
            text = str(results.get(key) or "").rstrip()
            if text.strip():
                lines = text.splitlines()
                cut = f" (last {TAIL_LINES} of {len(lines)} lines)" if len(lines) > TAIL_LINES else ""
                parts.append(Text(f"{key}{cut}:", style="bold"))
                parts.append(_text("\n".join("  " + line for line in lines[-TAIL_LINES:])))
    return Group(*parts)


# -- services and GPUs


def services_table(services: list[dict[str, Any]]) -> RenderableType:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("SERVICE", "IMAGE", "ENDPOINTS", "GPU"):
        table.add_column(name, no_wrap=True)
    for name in ("MAX", "RUNNING", "WAITING", "RECENT FAILURES"):
        table.add_column(name, justify="right", no_wrap=True)
    failures = Table.grid(padding=(0, 2))
    for service in services:
        gpu = ("yes, " + size(service["gpu_memory"]) if service.get("gpu_memory") else "yes") \
            if service.get("uses_gpu") else "no"
        limit = service.get("max_concurrent")
        table.add_row(_text(service["name"]), _text(service.get("image")),
                      _text(", ".join(service.get("endpoints") or []) or "-"), gpu,
                      "-" if limit is None else str(limit), str(service.get("running", 0)),
                      str(service.get("waiting", 0)), str(len(service.get("recent_failures") or [])))
        for failure in service.get("recent_failures") or []:
            why = " — ".join(_flat(x) for x in (failure.get("failure"), failure.get("message")) if x)
            failures.add_row(_text(service["name"]), f"job {failure.get('id')}", when(failure.get("completed_at")),
                             _text(_flat(why, 120)))
    if not failures.row_count:
        return table
    return Group(table, Text("\nrecent failures:", style="bold"), failures)


def gpus_view(answer: dict[str, Any]) -> RenderableType:
    cards = answer.get("cards") or []
    state = "enabled" if answer.get("enabled") else "not enabled"
    head = _text(f"GPUs: {state}" + (f", from {answer['source']}" if answer.get("source") else "")
                + f"; {len(cards)} card{'s' if len(cards) != 1 else ''}")
    parts: list[RenderableType] = [head]
    if answer.get("problem"):
        parts.append(Text(f"problem: {_flat(answer['problem'])}", style="yellow"))
    if cards:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name in ("ID", "NAME", "TOTAL", "USED", "RESERVED", "JOBS"):
            table.add_column(name, justify="right" if name in ("TOTAL", "USED", "RESERVED") else "left",
                             no_wrap=True)
        for card in cards:
            jobs = ", ".join(f"{job.get('id')} {job.get('service') or '?'}"
                             + (f" ({size(job['gpu_memory'])})" if job.get("gpu_memory") else "")
                             for job in card.get("jobs") or [])
            table.add_row(_text(card.get("id")), _text(card.get("name")), size(card.get("total")),
                          size(card.get("used")), size(card.get("reserved")), _text(jobs or "-"))
        parts.append(table)
    return Group(*parts)
