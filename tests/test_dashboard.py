"""The dashboard at `/`, in a real browser (Playwright driving Debian's Chromium) against a real server and real jobs.

Every wait is bounded by an `expect(..., timeout=...)`; nothing asserts how long anything took.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from support import BUSYBOX, Server, base_config

CHROMIUM = "/usr/bin/chromium"
WAIT = 30_000  # ms: the longest any one thing on the page may take to show
HOSTILE_MESSAGE = "<img src=x onerror=window.pwned=1> step 1"
HOSTILE_ERROR = "<script>window.pwned=2</script> bad input"
HOSTILE_LOG = "<b onmouseover=window.pwned=3>log line</b>"
HOSTILE_COLLECTION = "<svg onload=window.pwned=4>"
HOSTILE_FILE = "<img src=x onerror=window.pwned=5>.txt"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for this file's tests (module scope: Playwright's loop is gone before other files)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/setup.sh --tests` (Debian's chromium package)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Opens the dashboard of a server in a fresh context (its own sessionStorage); fails the test on a script
    error or a Content-Security-Policy violation on the page."""
    contexts = []
    problems: list[str] = []

    def open_dashboard(server: Server, **context: Any) -> Page:
        made = browser.new_context(**({"viewport": {"width": 1280, "height": 900}} | context))
        contexts.append(made)
        page = made.new_page()
        page.set_default_timeout(WAIT)
        page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
        page.on("console", lambda message: problems.append(message.text)
                if message.type == "error" and ("Security Policy" in message.text or "Trusted Type" in message.text)
                else None)
        page.goto(server.url + "/")
        expect(page.locator("#updated")).not_to_be_empty(timeout=WAIT)  # the first poll is in
        return page

    yield open_dashboard
    for made in contexts:
        made.close()
    assert problems == []


def row(page: Page, table: str, job_id: int | str) -> Locator:
    return page.locator(f'#{table} tbody tr[data-key="{job_id}"]')


def field(found: Locator, label: str) -> Locator:
    return found.locator(f'td[data-label="{label}"]')


def use_token(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("#token-state")).to_have_text("token in use for this tab")


CONFIRMATIONS = {"Cancel": "Cancel now", "Delete": "Delete for good"}


def confirm(page: Page, action: str, what: str) -> None:
    """Press an action's button, then its confirmation."""
    page.get_by_role("button", name=f"{action} {what}", exact=True).click()
    page.get_by_role("button", name=f"{CONFIRMATIONS[action]}: {what}", exact=True).click()


def test_the_page_and_its_files_are_served_with_a_strict_policy(server: Server, browser: Browser) -> None:
    page = server.get("/")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "require-trusted-types-for 'script'" in policy
    assert "<script>" not in page.text and 'src="static/dashboard.js"' in page.text
    script = server.get("/static/dashboard.js")
    assert script.status_code == 200 and script.headers["Content-Type"].startswith("text/javascript")
    assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text
    assert server.get("/static/dashboard.css").headers["Content-Type"].startswith("text/css")
    again = server.get("/static/dashboard.js", headers={"If-None-Match": script.headers["ETag"]})
    assert again.status_code == 304
    slash = server.get("/dashboard/")  # followed to the page, whose relative file names then resolve
    assert slash.status_code == 200 and slash.url == f"{server.url}/dashboard" and 'src="static/' in slash.text
    for missing in ("/static/dashboard.html", "/static/..%2fdashboard.py", "/static/nope.js"):
        answer = server.get(missing)
        assert answer.status_code == 404 and answer.json()["status"] == "error"

    # In the browser the policy holds: markup assigned from script is refused, and inline handlers never run.
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(server.url + "/dashboard")
        refused = page.evaluate("""() => [
            (d) => { d.innerHTML = "<img src=x onerror='window.ran = 1'>"; },
            (d) => { d.setAttribute("onclick", "window.ran = 1"); d.click(); },
            (d) => { const s = document.createElement("script"); s.textContent = "window.ran = 1"; d.append(s); },
        ].map((attempt) => {
            const d = document.createElement("div");
            document.body.append(d);
            try { attempt(d); return "done"; } catch (error) { return error.name; } finally { d.remove(); }
        })""")
        assert refused == ["TypeError", "TypeError", "TypeError"]
        assert page.evaluate("typeof window.ran") == "undefined"
    finally:
        context.close()


def test_a_job_waits_then_runs_then_completes_without_a_reload(make_server: Callable[..., Server],
                                                               open_page: Callable[..., Page]) -> None:
    server = make_server(MAX_CONCURRENT_JOBS=1)
    page = open_page(server)
    page.evaluate("window.sameDocument = true")
    ahead = server.submit("fake_local", ["--sleep", "15"])["key"]
    server.wait_status(ahead, "running")
    job = server.submit("fake_local", ["--sleep", "8"])["key"]

    waiting = row(page, "queue", job)
    expect(field(waiting, "Place")).to_have_text("1 of 1", timeout=WAIT)
    expect(field(waiting, "Waits for")).to_have_text("capacity")
    expect(field(waiting, "Why")).to_have_text("all 1 job slots are in use")
    expect(field(row(page, "running", ahead), "Service")).to_have_text("fake_local")

    expect(field(row(page, "running", job), "Job")).to_have_text(str(job), timeout=WAIT)
    expect(waiting).to_have_count(0)
    expect(field(row(page, "finished", ahead), "Status")).to_have_text("complete")

    finished = row(page, "finished", job)
    expect(field(finished, "Status")).to_have_text("complete", timeout=WAIT)
    expect(field(finished, "Exit code")).to_have_text("0")
    expect(row(page, "running", job)).to_have_count(0)
    assert page.evaluate("window.sameDocument") is True  # it all happened on the page as first loaded


def test_following_a_running_jobs_log_shows_what_the_container_prints(make_server: Callable[..., Server],
                                                                       open_page: Callable[..., Page]) -> None:
    server = make_server()
    page = open_page(server)
    job = server.submit("fake_local", ["--stdout", "hello from the container", "--sleep", "15"])["key"]
    server.wait_status(job, "running")
    page.get_by_role("button", name=f"Follow the log of job {job}").click()
    expect(page.locator("#log-job")).to_have_text(str(job))
    expect(page.locator("#log-output")).to_contain_text("hello from the container", timeout=WAIT)
    expect(page.locator("#log-output")).to_contain_text(f"[dsm] job {job} ended: complete", timeout=WAIT)
    expect(page.locator("#log-state")).to_have_text("the job ended; its output is above")
    expect(field(row(page, "finished", job), "Status")).to_have_text("complete", timeout=WAIT)

    page.get_by_role("button", name=f"Show the log of job {job}").click()  # the stored output, once final
    expect(page.locator("#log-state")).to_have_text("the stored output (its last 200 lines)")
    expect(page.locator("#log-output")).to_contain_text("hello from the container")


def test_cancelling_needs_an_admin_token_and_the_page_says_why(make_server: Callable[..., Server], tmp_path: Path,
                                                               open_page: Callable[..., Page]) -> None:
    config = base_config(tmp_path)
    config["DOCKER_ENDPOINTS"]["fake"]["max_concurrent"] = 1
    server = make_server(config)
    page = open_page(server)
    running = server.submit("fake_local", ["--sleep", "120"])["key"]
    server.wait_status(running, "running")
    waiting = server.submit("fake_local", ["--sleep", "120"])["key"]
    expect(field(row(page, "queue", waiting), "Waits for")).to_have_text("per-service limit", timeout=WAIT)
    expect(field(row(page, "queue", waiting), "Why")).to_have_text("fake already runs its maximum of 1 job(s)")
    expect(row(page, "running", running)).to_have_count(1)

    confirm(page, "Cancel", f"job {running}")
    expect(page.locator("#notice")).to_have_text(
        f"Could not cancel job {running}: this needs a token: send 'Authorization: Bearer <token>' "
        "(an admin makes one with dsm token create) (HTTP 401)", timeout=WAIT)
    assert server.job(running)["status"] == "running"

    use_token(page, server.token("read"))
    confirm(page, "Cancel", f"job {running}")
    expect(page.locator("#notice")).to_contain_text(f"Could not cancel job {running}: the token", timeout=WAIT)
    expect(page.locator("#notice")).to_contain_text("this needs 'admin' (HTTP 403)")
    assert server.job(running)["status"] == "running"

    use_token(page, server.token("admin"))
    confirm(page, "Cancel", f"job {running}")
    expect(page.locator("#notice")).to_contain_text(f"Job {running}: asked to stop", timeout=WAIT)
    cancelled = row(page, "finished", running)
    expect(field(cancelled, "Status")).to_have_text("error", timeout=WAIT)
    expect(field(cancelled, "Error")).to_contain_text("Cancelled by dashboard")
    assert server.job(running)["status"] == "error"

    # The waiting one starts once the slot is free; a waiting job is cancelled at once.
    expect(row(page, "running", waiting)).to_have_count(1, timeout=WAIT)
    confirm(page, "Cancel", f"job {waiting}")
    expect(field(row(page, "finished", waiting), "Status")).to_have_text("error", timeout=WAIT)


def test_hostile_messages_names_and_output_are_shown_as_text(make_server: Callable[..., Server],
                                                              open_page: Callable[..., Page]) -> None:
    server = make_server()
    failed = server.submit("fake_local", ["--stderr", HOSTILE_ERROR, "--exit", "3"])["key"]
    running = server.submit("fake_local", ["--stdout", HOSTILE_LOG, "--sleep", "120"])["key"]
    server.wait_status(running, "running")
    posted = server.post("/status_update/", params={"key": running, "status": "running", "message": HOSTILE_MESSAGE})
    assert posted.status_code == 200, posted.text
    upload = server.post("/api/send_files", data={"folder_name": HOSTILE_COLLECTION},
                         files=[("4cat_uploads", (HOSTILE_FILE, b"12345"))])
    assert upload.status_code == 200, upload.text
    # Uploads clean the names they are sent; a service's output files keep whatever name the container gave.
    output = Path(server.config["UPLOAD_FOLDER_PATH"]) / HOSTILE_COLLECTION / "results"
    output.mkdir()
    (output / HOSTILE_FILE).write_text("found")
    server.wait_final(failed)

    page = open_page(server)
    expect(field(row(page, "running", running), "Progress")).to_have_text(HOSTILE_MESSAGE, timeout=WAIT)
    expect(field(row(page, "finished", failed), "Error")).to_have_text(HOSTILE_ERROR, timeout=WAIT)
    expect(page.locator("#services")).to_contain_text(HOSTILE_ERROR)  # the service's recent failure
    collection = row(page, "collections", HOSTILE_COLLECTION)
    expect(field(collection, "Collection")).to_have_text(HOSTILE_COLLECTION, timeout=WAIT)
    page.get_by_role("button", name=f"List the files of {HOSTILE_COLLECTION}").click()
    expect(collection.locator("ul.files li")).to_have_text(
        ["4cat_uploads/img_srcx_onerrorwindow.pwned5.txt", f"results/{HOSTILE_FILE}"], timeout=WAIT)
    page.get_by_role("button", name=f"Follow the log of job {running}").click()
    expect(page.locator("#log-output")).to_contain_text(HOSTILE_LOG, timeout=WAIT)

    page.locator("#log-output").hover()
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("main img, main script, main svg, main b").count() == 0


def test_terminal_colours_and_endless_messages_are_shown_plainly_and_short(make_server: Callable[..., Server],
                                                                          open_page: Callable[..., Page]) -> None:
    server = make_server()
    coloured = server.submit("fake_local", ["--stderr", "\x1b[31mred failure\x1b[0m", "--exit", "3"])["key"]
    running = server.submit("fake_local", ["--sleep", "120"])["key"]
    server.wait_status(running, "running")
    endless = "B" * 60_000
    assert server.post("/status_update/", params={"key": running, "status": "running",
                                                  "message": endless}).status_code == 200
    server.wait_final(coloured)
    page = open_page(server)
    expect(field(row(page, "finished", coloured), "Error")).to_have_text("red failure", timeout=WAIT)
    progress = field(row(page, "running", running), "Progress")
    expect(progress).to_have_text("…" + "B" * 600, timeout=WAIT)
    assert row(page, "running", running).bounding_box()["height"] < 600  # the other sections stay in view


def test_the_gpu_cards_show_their_reservations_and_why_a_job_waits_for_one(
        make_server: Callable[..., Server], tmp_path: Path, open_page: Callable[..., Page]) -> None:
    # A card declared by hand, cards named in NVIDIA_VISIBLE_DEVICES: the containers start on this GPU-less host.
    config = base_config(tmp_path, GPU_ENABLED=True, GPU_DEVICE_MODE="environment",
                         GPU_INVENTORY=[{"id": 0, "memory": "16GiB", "name": "Test card"}])
    config["DOCKER_ENDPOINTS"]["whisper"] = {"image_name": BUSYBOX, "local": True, "command": "fake-service",
                                             "data_path": "/app/data", "gpu_memory": "10GiB"}
    server = make_server(config)
    page = open_page(server)
    first = server.submit("whisper_local", ["--sleep", "120"])["key"]
    server.wait_status(first, "running")
    second = server.submit("whisper_local", ["--sleep", "120"])["key"]

    expect(field(row(page, "queue", second), "Waits for")).to_have_text("GPU memory", timeout=WAIT)
    expect(field(row(page, "queue", second), "Why")).to_contain_text("waiting for 10.0 GiB of GPU memory")
    card = page.locator("#gpus .card")
    expect(card).to_have_count(1)
    expect(card.locator("h3")).to_have_text("GPU 0: Test card")
    expect(card).to_contain_text("reserved by jobs here: 10.0 GiB")
    expect(card.locator("li")).to_have_text([f"job {first} (whisper): 10.0 GiB"])
    services = row(page, "services", "whisper")
    expect(field(services, "GPU")).to_have_text("yes, 10.0 GiB")
    expect(field(services, "Running")).to_have_text("1")
    expect(field(services, "Waiting")).to_have_text("1")


def test_with_require_token_the_page_asks_for_one(make_server: Callable[..., Server],
                                                  open_page: Callable[..., Page]) -> None:
    server = make_server(REQUIRE_TOKEN=True)
    submitted = server.post("/api/fake_local", json={"args": []},
                            headers={"Authorization": f"Bearer {server.token('submit')}"})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["key"]
    uploaded = server.post("/api/send_files", data={"folder_name": "private-run"},
                           files={"4cat_uploads": ("a.txt", b"x")},
                           headers={"Authorization": f"Bearer {server.token('submit')}"})
    assert uploaded.status_code == 200, uploaded.text

    page = open_page(server)
    expect(page.locator("#auth")).to_contain_text("This server needs a token to show its state.")
    expect(page.locator("#health")).to_have_text("needs a token")
    expect(page.locator("#finished-section .problem")).to_have_text("Needs a token (see above).")
    expect(page.locator("tbody tr")).to_have_count(0)

    use_token(page, "Bearer " + server.token("read"))  # pasted with its header's word: taken as the token
    expect(page.locator("#auth")).to_be_hidden(timeout=WAIT)
    expect(page.locator("#health")).to_have_text("healthy")
    expect(field(row(page, "finished", job), "Status")).to_have_text("complete", timeout=WAIT)
    expect(row(page, "collections", "private-run")).to_have_count(1, timeout=WAIT)

    page.get_by_role("button", name="Forget token").click()
    expect(page.locator("#auth")).to_contain_text("needs a token", timeout=WAIT)
    expect(row(page, "finished", job)).to_have_count(0)
    expect(row(page, "collections", "private-run")).to_have_count(0, timeout=5000)  # not kept for its 30 s
    assert page.evaluate("sessionStorage.length") == 0

    use_token(page, "dsm_not-a-token")
    expect(page.locator("#auth")).to_contain_text("The server refused the token in use:", timeout=WAIT)


def test_on_a_phone_nothing_scrolls_sideways(make_server: Callable[..., Server],
                                             open_page: Callable[..., Page]) -> None:
    server = make_server(MAX_CONCURRENT_JOBS=1)
    failed = server.submit("fake_local", ["--spam", "3000", "--exit", "1"])["key"]  # 3000 x's, no break
    server.wait_final(failed)
    running = server.submit("fake_local", ["--stdout", "y" * 2000, "--sleep", "120"])["key"]
    server.wait_status(running, "running")
    waiting = server.submit("fake_local", [])["key"]
    name = "c" * 200
    assert server.post("/api/send_files", data={"folder_name": name},
                       files=[("4cat_uploads", ("f" * 200 + ".txt", b"1"))]).status_code == 200

    page = open_page(server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                     device_scale_factor=3)
    expect(field(row(page, "queue", waiting), "Waits for")).to_have_text("capacity", timeout=WAIT)
    expect(field(row(page, "finished", failed), "Exit code")).to_have_text("1", timeout=WAIT)
    page.get_by_role("button", name=f"List the files of {name}").click()
    expect(row(page, "collections", name).locator("ul.files li")).to_have_count(1, timeout=WAIT)
    page.get_by_role("button", name=f"Follow the log of job {running}").click()
    expect(page.locator("#log-output")).to_contain_text("yyyy", timeout=WAIT)

    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[2] and widths[1] <= widths[2], widths
    page.mouse.wheel(600, 0)
    assert page.evaluate("window.scrollX") == 0


def test_deleting_a_collection_needs_an_admin_token(make_server: Callable[..., Server],
                                                    open_page: Callable[..., Page]) -> None:
    server = make_server()
    for name in ("keep-me", "old-run"):
        uploaded = server.post("/api/send_files", data={"folder_name": name},
                               files=[("4cat_uploads", ("a.txt", b"12345")), ("4cat_uploads", ("b.txt", b"678"))])
        assert uploaded.status_code == 200, uploaded.text
    page = open_page(server)
    old = row(page, "collections", "old-run")
    expect(field(old, "Files")).to_have_text("2", timeout=WAIT)
    expect(field(old, "Size")).to_have_text("8 B")

    confirm(page, "Delete", "collection old-run")
    expect(page.locator("#notice")).to_contain_text("Could not delete collection old-run: this needs a token",
                                                    timeout=WAIT)
    assert [c["name"] for c in server.get("/api/collections").json()["collections"]] == ["keep-me", "old-run"]

    use_token(page, server.token("admin"))
    confirm(page, "Delete", "collection old-run")
    expect(page.locator("#notice")).to_have_text("Collection old-run deleted.", timeout=WAIT)
    expect(old).to_have_count(0, timeout=WAIT)
    expect(row(page, "collections", "keep-me")).to_have_count(1)
    assert [c["name"] for c in server.get("/api/collections").json()["collections"]] == ["keep-me"]
    assert requests.get(server.url + "/api/list_filenames/old-run", timeout=30).status_code == 404
