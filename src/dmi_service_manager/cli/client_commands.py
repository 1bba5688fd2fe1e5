"""The commands that talk to a running server over HTTP: upload, download, jobs, job, logs, cancel,
services, gpus, submit, demo.

Each takes `--server` (else DSM_SERVER, else http://127.0.0.1:4000) and `--token` (else DSM_TOKEN),
prints tables for people and, with `--json`, the server's answer as JSON for scripts.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..jobs.model import JobStatus, Kind
from ..tes.states import FINAL as TES_FINAL
from . import render, transfer
from .client import DEFAULT_SERVER, Client, decode
from .exits import FAILED, CliError

F = TypeVar("F", bound=Callable[..., Any])
FINAL = ("complete", "error")
POLL_SECONDS = 1.0


def _clean_token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A token read from a file may end in a line break (CRLF too): dropped. One inside is a mistake."""
    if value is None:
        return None
    token = value.strip()
    if not token.isprintable() or " " in token:
        raise click.BadParameter("the token holds a space, a line break or another control character; a token is"
                                 " one word, as `dsm token create` printed it")
    return token or None


def server_options(func: F) -> F:
    func = click.option("--token", envvar="DSM_TOKEN", show_envvar=True, callback=_clean_token,
                        help="API token, sent as 'Authorization: Bearer <token>'")(func)
    return click.option("--server", envvar="DSM_SERVER", default=DEFAULT_SERVER, show_default=True,
                        show_envvar=True, help="the server's URL")(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON on stdout, for scripts")(func)


def _job(client: Client, job_id: int) -> dict[str, Any]:
    answer = client.get_json(f"/api/jobs/{job_id}")
    job = answer.get("job") if isinstance(answer, dict) else None
    if not isinstance(job, dict):
        raise CliError(f"the server's answer for job {job_id} holds no job", 6)
    return job


def _wait(client: Client, job_id: int) -> dict[str, Any]:
    """Poll a job until it is final, showing its status, message and records on stderr meanwhile."""
    try:
        return _poll(client, job_id)
    except KeyboardInterrupt:  # only the waiting stops
        print(f"dsm: job {job_id} goes on on the server (dsm job {job_id}; dsm cancel {job_id} stops it)",
              file=sys.stderr)
        raise


def _poll(client: Client, job_id: int) -> dict[str, Any]:
    console = render.stderr_console()
    with Progress(SpinnerColumn(), TextColumn("job {task.fields[id]}"), TextColumn("{task.fields[status]}"),
                  TextColumn("{task.fields[records]}"), TextColumn("{task.fields[message]}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("", total=None, id=job_id, status="", records="", message="")
        while True:
            job = _job(client, job_id)
            if job["status"] in FINAL:
                return job
            records = job.get("processed_records")
            message = escape(" ".join((job.get("message") or "").split())[:100])  # as it is, not as markup
            progress.update(task, status=job["status"], message=message,
                            records="" if records is None else f"{records} records")
            time.sleep(POLL_SECONDS)


def _wait_task(client: Client, task_id: str) -> str:
    """A TES task's state once it is final (its job is not read through 4CAT's routes)."""
    while True:
        state = str(client.get_json(f"/ga4gh/tes/v1/tasks/{task_id}").get("state"))
        if state in TES_FINAL:
            return state
        time.sleep(POLL_SECONDS)


def _show_job(job: dict[str, Any]) -> None:
    render.stdout_console().print(render.job_view(job), soft_wrap=True)


# -- jobs


@click.command(context_settings={"ignore_unknown_options": True}, short_help="Submit a job (--wait: until it ends).")
@click.argument("endpoint")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--timeout", type=float, help="seconds the container may run (default: the service's)")
@click.option("--pass-key", is_flag=True, help="give the container --database_key and --dmi_sm_server")
@click.option("--wait", is_flag=True, help="wait until the job ends, showing its progress, and print its results")
@server_options
@json_option
def submit(endpoint: str, args: tuple[str, ...], timeout: float | None, pass_key: bool, wait: bool, server: str,
           token: str | None, as_json: bool) -> int:
    """Submit a job: dsm submit ocr_local --wait -- --images data/x.png ...

    ENDPOINT is a service endpoint (`ocr_local`, `whisper_remote`); the job's arguments come after `--`
    (before it, options this command does not know are the job's too). With --wait the exit code says how
    the job ended: 0 complete, 1 error.
    """
    client = Client(server, token)
    arguments = list(args[1:] if args[:1] == ("--",) else args)
    body: dict[str, Any] = {"args": arguments}
    if timeout is not None:  # 0 or less is the server's to refuse (a 400), not to drop in silence
        body["timeout"] = timeout
    if pass_key:
        body["pass_key"] = True
    name = endpoint.removeprefix("/").removeprefix("api/")
    answer = decode(client.request("POST", f"/api/{name}", json=body))
    if not wait:
        if as_json:
            render.print_json(answer)
        else:
            print(f"job {answer['key']}: {answer['status']} ({answer['result_url']})")
        return 0
    if not as_json:
        print(f"job {answer['key']}: {answer['status']} ({answer['result_url']})", file=sys.stderr)
    job = _wait(client, int(answer["key"]))
    if as_json:
        render.print_json({"status": "success", "job": job})
    else:
        _show_job(job)
    return 0 if job["status"] == "complete" else FAILED


@click.command()
@click.option("--current", is_flag=True,
              help="only jobs whose status is not complete (as the original: failed ones too; --status narrows)")
@click.option("--status", type=click.Choice([s.value for s in JobStatus]), help="only jobs with this status")
@click.option("--service", help="only jobs of this service (e.g. ocr)")
@click.option("--dataset-key", help="only the jobs 4CAT submitted for this dataset")
@click.option("--kind", type=click.Choice([k.value for k in Kind]), help="only 4CAT jobs, or only TES tasks")
@click.option("--limit", type=click.IntRange(min=1), default=30, show_default=True, help="at most this many")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, help="skip this many first")
@server_options
@json_option
def jobs(current: bool, status: str | None, service: str | None, dataset_key: str | None, kind: str | None,
         limit: int, offset: int, server: str, token: str | None, as_json: bool) -> int:
    """List jobs, newest first."""
    params = {"order": "desc", "limit": str(limit), "offset": str(offset)}
    for key, value in (("status", status), ("service", service), ("dataset_key", dataset_key), ("kind", kind)):
        if value is not None:
            params[key] = value
    if current:
        params["current"] = "1"
    answer = Client(server, token).get_json("/jobs/", params=params)
    if as_json:
        render.print_json(answer)
        return 0
    found = answer.get("jobs") or []
    if not found:
        filtered = current or any(value is not None for value in (status, service, dataset_key, kind))
        print("no jobs match" if filtered else "no jobs" + (f" after the first {offset}" if offset else ""),
              file=sys.stderr)
        return 0
    render.stdout_console().print(render.jobs_table(found))
    if len(found) == limit:
        print(f"(the newest {limit} from {offset}; --limit and --offset show more)", file=sys.stderr)
    return 0


@click.command(short_help="Show one job and, once it ended, its output.")
@click.argument("job_id", metavar="ID", type=int)
@server_options
@json_option
def job(job_id: int, server: str, token: str | None, as_json: bool) -> int:
    """Show one job: status, message, progress and, once it ended, the end of its output."""
    client = Client(server, token)
    if as_json:
        render.print_json(client.get_json(f"/api/jobs/{job_id}"))
    else:
        _show_job(_job(client, job_id))
    return 0


@click.command()
@click.argument("job_id", metavar="ID", type=int)
@click.option("--follow", "-f", is_flag=True, help="keep printing while the job runs; ends when it ends")
@click.option("--tail", type=click.IntRange(min=0), help="only the last N lines")
@server_options
def logs(job_id: int, follow: bool, tail: int | None, server: str, token: str | None) -> int:
    """A job's container output: stdout and stderr in the order they came while its container exists; once the
    job has ended and its container is gone, what was kept of its stdout, then of its stderr."""
    client = Client(server, token)
    params = {"follow": "1"} if follow else {}
    if tail is not None:
        params["tail"] = str(tail)
    response = client.request("GET", f"/api/jobs/{job_id}/logs", params=params, stream=True,
                              read_timeout=math.inf if follow else None)
    out = sys.stdout.buffer
    for chunk in client.chunks(response):
        out.write(chunk)
        out.flush()
    return 0


@click.command(short_help="Cancel a job (needs an admin token).")
@click.argument("job_id", metavar="ID", type=int)
@click.option("--wait", is_flag=True, help="wait until the job has ended")
@server_options
@json_option
def cancel(job_id: int, wait: bool, server: str, token: str | None, as_json: bool) -> int:
    """Cancel a waiting job, or stop a running one's container (needs an admin token: DSM_TOKEN)."""
    client = Client(server, token)
    response = client.request("DELETE", f"/api/jobs/{job_id}", params={"by": "dsm cancel"})
    answer = decode(response)
    found = answer.get("job") or {}
    if found.get("kind") == Kind.TES.value:  # read through the TES API, with the same token
        task = f"job {job_id} (TES task {found.get('task_id')})"
        state = _wait_task(client, str(found.get("task_id"))) if wait else None
        if as_json:
            render.print_json({**answer, "state": state} if state else answer)
        else:
            print(f"{task}: it ended {state}" if state else f"{task}: asked to stop; it ends shortly")
        return 0
    if wait and found.get("status") not in FINAL:
        found = _wait(client, job_id)
        answer = {"status": "success", "job": found}
    if as_json:
        render.print_json(answer)
    elif found.get("status") not in FINAL:
        print(f"job {job_id}: its container is being stopped; it ends shortly (dsm job {job_id})")
    elif response.status_code == 202 or str(found.get("message") or "").startswith("Cancelled by"):
        print(f"job {job_id} cancelled: it ended {found.get('status')}")
    else:
        print(f"job {job_id} had already ended ({found.get('status')}); nothing to cancel")
    return 0


# -- the server


@click.command(short_help="The services: jobs running, waiting, failed.")
@server_options
@json_option
def services(server: str, token: str | None, as_json: bool) -> int:
    """The services: image, endpoints, GPU use, jobs running and waiting, recent failures."""
    answer = Client(server, token).get_json("/api/services")
    if as_json:
        render.print_json(answer)
    else:
        render.stdout_console().print(render.services_table(answer.get("services") or []))
    return 0


@click.command(short_help="The GPU cards: memory and the jobs on each.")
@server_options
@json_option
def gpus(server: str, token: str | None, as_json: bool) -> int:
    """The GPUs: memory in total, in use and reserved per card, and the jobs on each."""
    answer = Client(server, token).get_json("/api/gpus")
    if as_json:
        render.print_json(answer)
    else:
        render.stdout_console().print(render.gpus_view(answer))
    return 0


# -- files


def _report(verb: str, report: transfer.UploadReport | transfer.DownloadReport, started: float,
            as_json: bool) -> int:
    if as_json:
        render.print_json(report.json())
    else:
        if isinstance(report, transfer.UploadReport):
            for local, stored in report.renamed.items():
                print(f"note: {local} is stored as {stored} (the server's secure_filename)", file=sys.stderr)
            for link in report.not_followed:
                print(f"note: {link} is a symlink to a folder; not followed", file=sys.stderr)
        for what, why in report.failed.items():
            print(f"failed: {what}: {why}", file=sys.stderr)
        print(transfer.summary(verb, report, started))
    return FAILED if report.failed else 0


@click.command(short_help="Upload a folder into a collection (resumable).")
@click.argument("folder", metavar="DIR", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("collection")
@server_options
@json_option
def upload(folder: Path, collection: str, server: str, token: str | None, as_json: bool) -> int:
    """Upload every file under DIR into COLLECTION, keeping sub-folders.

    Resumable: files the collection already has (same path, same size) are skipped. The server keeps no
    file directly in a collection, so files at the top of DIR need a folder: COLLECTION may name one
    (`mydata/4cat_uploads`). Names are stored as the server's secure_filename makes them.
    """
    started = time.monotonic()
    report = transfer.upload(Client(server, token), folder, collection, render.stderr_console())
    return _report("uploaded", report, started, as_json)


@click.command(short_help="Download a collection, or a file or folder of it.")
@click.argument("collection")
@click.argument("path", required=False)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="the folder to write into (default: ./<last part of COLLECTION>)")
@server_options
@json_option
def download(collection: str, path: str | None, out: Path | None, server: str, token: str | None,
             as_json: bool) -> int:
    """Download COLLECTION, or one file or folder PATH of it, into --out.

    Files keep their path inside the collection. Files already complete locally (same size) are skipped;
    nothing is written outside --out.
    """
    started = time.monotonic()
    client = Client(server, token)
    if path is None:
        collection, path = transfer.file_in_collection(client, collection)
    target = out if out is not None else Path(collection.rstrip("/").rsplit("/", 1)[-1] or "download")
    report = transfer.download(client, collection, path, target, render.stderr_console())
    return _report("downloaded", report, started, as_json)


@click.command(short_help="Run the OCR and speech-to-text demos against a running server.")
@server_options
@click.option("--out", default="dsm-data/demo-results", show_default=True,
              help="where to save the OCR results (speech to text's go to <out>-whisper)")
def demo(server: str, token: str | None, out: str) -> int:
    """Run the OCR and speech-to-text demos that a running server offers and print the text.
    Its samples come from the locally built service images: run it on the server's host."""
    from ..demo import run_demo

    return run_demo(Client(server, token), Path(out))


COMMANDS = (upload, download, jobs, job, logs, cancel, services, gpus, submit, demo)
