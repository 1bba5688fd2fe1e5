"""Bearer tokens: 4CAT keeps working without one; a token sent is always checked; admin actions need one.

Wrong, mistyped or revoked tokens are 401 with the usual JSON error body; a valid token whose scope is
too small is 403. Tokens are made the way an admin makes them (`dsm token create`, shown once).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import pytest
import requests

from support import Server
from tes_support import create_token, revoke_token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: requests.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error" and body["reason"] and body["message"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_4cat_needs_no_token_unless_the_admin_requires_one(server: Server) -> None:
    key = server.submit("fake_local", ["--exit", "0"])["key"]
    assert server.get(f"/api/jobs/{key}").status_code == 200
    assert server.get("/api/").status_code == 200
    assert server.post("/status_update/", params={"key": key, "status": "running"}).status_code == 200


@pytest.mark.parametrize("authorization", [
    "Bearer dsm_0123456789abcdef_" + "A" * 43,  # well formed, unknown
    "Bearer not-a-token",
    "bearer not-a-token",
    "Bearer",
    "Bearer " + "x" * 10_000,
])
def test_a_wrong_token_is_401_on_every_route_even_those_that_need_none(server: Server, authorization: str) -> None:
    for method, path in (("GET", "/api/"), ("GET", "/jobs/"), ("GET", "/api/jobs/1"), ("POST", "/api/fake_local"),
                         ("GET", "/api/list_filenames/x"), ("GET", "/api/health")):
        assert_error(requests.request(method, server.url + path, headers={"Authorization": authorization},
                                      json={"args": []}, timeout=30), 401)


def test_another_scheme_is_no_token_so_4cat_behind_a_basic_auth_proxy_keeps_working(server: Server) -> None:
    """The original ignored Authorization; requests sends Basic for a URL with user:pass@, and so may a proxy."""
    basic = {"Authorization": "Basic dXNlcjpwYXNz"}
    key = server.post("/api/fake_local", json={"args": ["--exit", "0"]}, headers=basic).json()["key"]
    assert server.get(f"/api/jobs/{key}", headers=basic).status_code == 200
    assert_error(server.delete(f"/api/jobs/{key}", headers=basic), 401)  # where a token is needed, it is none


def test_a_revoked_token_is_401_at_once(server: Server) -> None:
    token = create_token(server, "alice", "read")
    assert server.get("/api/", headers=bearer(token)).status_code == 200
    revoke_token(server, "alice")
    assert_error(server.get("/api/", headers=bearer(token)), 401)


def test_a_token_is_stored_only_as_a_salted_hash(server: Server) -> None:
    token = create_token(server, "bob", "submit")
    secret = token.split("_", 2)[2]  # dsm_<hex id>_<secret>: the secret itself may hold "_"
    with sqlite3.connect(server.config["DATABASE_FILE"]) as db:
        rows = db.execute("SELECT * FROM tokens").fetchall()
    dumped = repr(rows)
    assert secret not in dumped and token not in dumped


def test_cancel_always_needs_an_admin_token(server: Server) -> None:
    key = server.submit("fake_local", ["--sleep", "60"])["key"]
    assert_error(server.delete(f"/api/jobs/{key}", headers={}), 401)
    assert_error(server.delete(f"/api/jobs/{key}", headers=bearer(server.token("submit"))), 403)
    assert server.job(key)["status"] != "error"  # refused means nothing happened
    cancelled = server.delete(f"/api/jobs/{key}", headers=bearer(server.token("admin")))
    assert cancelled.status_code in (200, 202)
    assert "Cancelled by token test-admin" in json.dumps(server.wait_final(key))  # the record says who did it


def test_deleting_a_collection_always_needs_an_admin_token(server: Server) -> None:
    upload = server.post("/api/send_files", data={"folder_name": "c1"},
                         files=[("4cat_uploads", ("a.txt", b"hello"))])
    assert upload.status_code == 200, upload.text
    assert_error(server.delete("/api/files/c1", headers={}), 401)
    assert_error(server.delete("/api/files/c1", headers=bearer(server.token("read"))), 403)
    assert server.get("/api/list_filenames/c1").status_code == 200
    assert server.delete("/api/files/c1").status_code == 200


def test_require_token_closes_every_route_but_the_pages_and_container_progress(
        make_server: Callable[..., Server]) -> None:
    server = make_server(REQUIRE_TOKEN=True)
    assert_error(server.get("/api/"), 401)
    assert_error(server.get("/jobs/"), 401)
    assert_error(server.post("/api/fake_local", json={"args": []}), 401)
    assert_error(server.post("/api/send_files", data={"folder_name": "c"}, files=[("f", ("a.txt", b"x"))]), 401)
    assert_error(server.get("/api/check_gpu_mem/fake"), 401)

    read, submit = server.token("read"), server.token("submit")
    assert server.get("/api/", headers=bearer(read)).status_code == 200
    assert_error(server.post("/api/fake_local", json={"args": []}, headers=bearer(read)), 403)
    submitted = server.post("/api/fake_local", json={"args": ["--sleep", "1"]}, headers=bearer(submit))
    assert submitted.status_code == 202
    key = submitted.json()["key"]

    # A container posts its progress from this host without a token; everything else still needs one.
    assert server.post("/status_update/", params={"key": key, "status": "running"}).status_code == 200
    assert_error(server.get(f"/api/jobs/{key}"), 401)
    assert server.get(f"/api/jobs/{key}", headers=bearer(read)).status_code == 200
    # The dashboard's page and the API description carry no data.
    assert server.get("/").status_code == 200
    assert server.get("/dashboard/").status_code == 200  # by way of its redirect to /dashboard
    assert server.get("/openapi.json").status_code == 200
