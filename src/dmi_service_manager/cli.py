"""`dsm`: serve, check a config, build a bundled service, and talk to a running server."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import requests

from .config import load_config
from .errors import ConfigError

DEFAULT_SERVER = "http://127.0.0.1:4000"
FINAL = ("complete", "error")


def _load(path: str | None) -> Any:
    try:
        loaded = load_config(Path(path) if path else None)
    except ConfigError as exc:
        print(f"config error: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None
    return loaded


def default_workers() -> int:
    """One process per CPU: polls and uploads then use every core, as a bare app with as many workers
    would. Past four, an I/O-bound server gains little and each process costs its own memory."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import ENV_CONFIG, ENV_PORT, ENV_SUPERVISOR
    from .checks import engine_warnings
    from .runtime.backends import make_backend
    from .serving import HEAD_SECONDS, MAX_HEAD_BYTES, MAX_HEADERS, raise_descriptor_limit, uvicorn_settings

    loaded = _load(args.config)
    config = loaded.config
    print(f"dsm: using {loaded.source}", file=sys.stderr)
    warnings = loaded.warnings + engine_warnings(config, make_backend(config, timeout=5))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    os.environ[ENV_CONFIG] = str(Path(args.config).resolve()) if args.config else ""
    os.environ[ENV_PORT] = str(args.port)
    os.environ[ENV_SUPERVISOR] = str(os.getpid())
    soft, hard = raise_descriptor_limit()
    print(f"dsm: open files: {soft} (hard limit {hard}); request heads: at most {MAX_HEAD_BYTES} bytes,"
          f" {MAX_HEADERS} headers, {HEAD_SECONDS:g} s", file=sys.stderr)
    uvicorn.run(
        "dmi_service_manager.app:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=args.access_log,
        log_level=config.log_level.lower(),
        **uvicorn_settings(),
    )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from .checks import describe_endpoints, engine_warnings
    from .runtime.backends import make_backend

    loaded = _load(args.path)
    print(f"{loaded.source}: valid")
    endpoints = describe_endpoints(loaded.config)
    print("endpoints it would register:" if endpoints else "it would register no service endpoint")
    for line in endpoints:
        print(f"  {line}")
    warnings = loaded.warnings
    if not args.offline:
        backend = make_backend(loaded.config, timeout=5)
        engine = engine_warnings(loaded.config, backend)
        answers = not any(w.startswith(f"{backend.engine}:") for w in engine)
        print(f"backend: {backend.name} ({backend.engine}) " + ("answers" if answers else "does not answer"))
        warnings += engine
    for warning in warnings:
        print(f"warning: {warning}")
    if warnings and args.strict:
        print(f"{len(warnings)} warning(s); --strict fails on warnings", file=sys.stderr)
        return 1
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Tokens live in the server's database: made here, on the server's machine, and shown once."""
    from .errors import DsmError
    from .jobs.store import Store
    from .tokens import Tokens

    config = _load(args.config).config
    store = Store(config.database_file)
    store.migrate()
    tokens = Tokens(store)
    if args.action == "create":
        try:
            print(tokens.create(args.name, args.scope))
        except DsmError as exc:
            print(f"dsm token: {exc.message}", file=sys.stderr)
            return 2
        print(f"token {args.name!r} ({args.scope}) created; it is shown only this once", file=sys.stderr)
        return 0
    if args.action == "revoke":
        if not tokens.revoke(args.name):
            print(f"dsm token: no active token named {args.name!r}", file=sys.stderr)
            return 1
        print(f"token {args.name!r} revoked", file=sys.stderr)
        return 0
    for row in tokens.list():
        state = "revoked" if row.revoked_at else "active"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.created_at))
        print(f"{row.name:<24} {row.scope:<7} {state:<8} created {created}  id {row.id}")
    return 0


def cmd_build_service(args: argparse.Namespace) -> int:
    from .runtime.images import build_service

    tag = build_service(args.name, force=args.force, log=lambda line: print(line, file=sys.stderr), gpu=args.gpu,
                        models=Path(args.models) if args.models else None)
    print(tag)
    return 0


# -- client commands, over HTTP to a running server


def _get(server: str, path: str, **kwargs: Any) -> Any:
    response = requests.get(server.rstrip("/") + path, timeout=30, **kwargs)
    return _answer(response)


def _answer(response: requests.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = {"reason": response.text}
    if response.status_code >= 400:
        print(f"error {response.status_code}: {body.get('reason') or body}", file=sys.stderr)
        raise SystemExit(1)
    return body


def _print_job(job: dict[str, Any]) -> None:
    results = json.loads(job["results"]) if job.get("results") else None
    print(f"job {job['id']} {job['jobtype']}: {job['status']}" + (f" - {job['message']}" if job.get("message") else ""))
    if results:
        print(f"  returncode {results.get('returncode')}")
        for key in ("report", "error"):
            text = (results.get(key) or "").strip()
            if text:
                print(f"  {key}:\n    " + "\n    ".join(text.splitlines()[-20:]))


def cmd_submit(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"args": args.args}
    if args.timeout:
        body["timeout"] = args.timeout
    if args.pass_key:
        body["pass_key"] = True
    response = requests.post(f"{args.server.rstrip('/')}/api/{args.endpoint}", json=body, timeout=30)
    answer = _answer(response)
    print(f"job {answer['key']}: {answer['status']} ({answer['result_url']})")
    if not args.wait:
        return 0
    return wait_for(answer["result_url"])


def wait_for(result_url: str, interval: float = 1.0) -> int:
    while True:
        job = _answer(requests.get(result_url, timeout=30))["job"]
        if job["status"] in FINAL:
            _print_job(job)
            return 0 if job["status"] == "complete" else 1
        time.sleep(interval)


def cmd_jobs(args: argparse.Namespace) -> int:
    params = {"current": "1"} if args.current else {}
    params.update({"limit": str(args.limit), "order": "desc"})
    for job in _get(args.server, "/jobs/", params=params)["jobs"]:
        message = (job.get("message") or "").replace("\n", " ")[:80]
        kind = job.get("kind", "4cat")
        what = f"TES task {job.get('task_id')}" if kind == "tes" else job["jobtype"]
        print(f"{job['id']:>6}  {kind:<4}  {job['status']:<8}  {what:<28} {message}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    _print_job(_get(args.server, f"/api/jobs/{args.id}")["job"])
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    params = {"follow": "1" if args.follow else "0"}
    if args.tail is not None:
        params["tail"] = str(args.tail)
    with requests.get(f"{args.server.rstrip('/')}/api/jobs/{args.id}/logs", params=params, stream=True,
                      timeout=(10, None)) as response:
        if response.status_code >= 400:
            _answer(response)
        for chunk in response.iter_content(chunk_size=None):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    response = requests.delete(f"{args.server.rstrip('/')}/api/jobs/{args.id}", params={"by": "dsm cancel"},
                               timeout=30)
    _print_job(_answer(response)["job"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.server, Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsm", description="DMI Service Manager: Docker jobs for 4CAT")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (and the job scheduler)")
    serve.add_argument("--config", help="config.yml (default: ./config.yml, else the embedded default)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=4000)
    serve.add_argument("--workers", type=int, default=default_workers(),
                       help="worker processes, each serving every route (default: one per CPU, at most 4)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config and list the endpoints it would register")
    check.add_argument("path", nargs="?")
    check.add_argument("--strict", action="store_true", help="fail on warnings too")
    check.add_argument("--offline", action="store_true", help="do not ask Docker about images and GPUs")
    check.set_defaults(func=cmd_check_config)

    token = sub.add_parser("token", help="API tokens (TES, admin actions): create, list, revoke")
    token.add_argument("action", choices=["create", "list", "revoke"])
    token.add_argument("name", nargs="?", help="the token's name (revoke: its name or id)")
    token.add_argument("--name", dest="name_option", help="the token's name, for create")
    token.add_argument("--scope", choices=["read", "submit", "admin"], default="submit")
    token.add_argument("--config", help="config.yml (default: ./config.yml, else the embedded default)")
    token.set_defaults(func=cmd_token)

    build = sub.add_parser("build-service", help="build a bundled service image (e.g. ocr) without a registry")
    build.add_argument("name")
    build.add_argument("--force", action="store_true", help="rebuild even when the recipe is unchanged")
    build.add_argument("--gpu", action="store_true",
                       help="the GPU variant (e.g. whisper with the CUDA libraries), tagged dsm-<name>-gpu:latest")
    build.add_argument("--models", metavar="DIR",
                       help="bake the models in DIR (one model folder, or a folder of them) into the image (whisper)")
    build.set_defaults(func=cmd_build_service)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--server", default=os.environ.get("DSM_SERVER", DEFAULT_SERVER))
        return command

    submit = client("submit", "submit a job: dsm submit ocr_local -- --images data/x.png ...")
    submit.add_argument("endpoint")
    submit.add_argument("args", nargs=argparse.REMAINDER)
    submit.add_argument("--timeout", type=float)
    submit.add_argument("--pass-key", action="store_true")
    submit.add_argument("--wait", action="store_true", help="wait until the job ends and print its results")
    submit.set_defaults(func=cmd_submit)

    jobs = client("jobs", "list jobs, newest first")
    jobs.add_argument("--current", action="store_true", help="only jobs not yet complete")
    jobs.add_argument("--limit", type=int, default=30)
    jobs.set_defaults(func=cmd_jobs)

    job = client("job", "show one job")
    job.add_argument("id")
    job.set_defaults(func=cmd_job)

    logs = client("logs", "a job's container output")
    logs.add_argument("id")
    logs.add_argument("--tail", type=int)
    logs.add_argument("--follow", "-f", action="store_true")
    logs.set_defaults(func=cmd_logs)

    cancel = client("cancel", "cancel a waiting or running job")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_cancel)

    demo = client("demo", "run the OCR demo against a running server and print the text found")
    demo.add_argument("--out", default="dsm-data/demo-results", help="where to save the downloaded results")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "token":
        args.name = args.name_option or args.name
        if args.action != "list" and not args.name:
            parser.error(f"dsm token {args.action} needs a name (--name NAME)")
    if getattr(args, "args", None) and args.args[:1] == ["--"]:
        args.args = args.args[1:]
    try:
        return int(args.func(args))
    except requests.ConnectionError as exc:
        print(f"cannot reach the server: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
