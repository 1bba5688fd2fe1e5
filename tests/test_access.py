"""IP_WHITELIST and TRUSTED_PROXIES: who may use the server, and whose forwarded headers are believed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from dmi_service_manager.access import AccessPolicy
from support import Server, base_config


@pytest.mark.parametrize(("peer", "forwarded", "trusted", "client"), [
    ("10.0.0.5", None, [], "10.0.0.5"),
    ("10.0.0.5", "1.2.3.4", [], "10.0.0.5"),  # a header from an untrusted peer is ignored
    ("127.0.0.1", "1.2.3.4", ["127.0.0.1"], "1.2.3.4"),
    ("127.0.0.1", "9.9.9.9, 1.2.3.4", ["127.0.0.1"], "1.2.3.4"),  # only one step: 1.2.3.4 is not trusted
    ("127.0.0.1", "9.9.9.9, 172.17.0.3", ["127.0.0.1", "172.16.0.0/12"], "9.9.9.9"),
    ("127.0.0.1", "garbage", ["127.0.0.1"], "127.0.0.1"),
    ("::ffff:127.0.0.1", "5.6.7.8", ["127.0.0.1"], "5.6.7.8"),
    ("::1", "[2001:db8::1]:443", ["::1"], "2001:db8::1"),
    ("127.0.0.1", "", ["127.0.0.1"], "127.0.0.1"),
])
def test_the_client_is_the_first_untrusted_address_walking_back(peer: str, forwarded: str | None,
                                                                 trusted: list[str], client: str) -> None:
    assert AccessPolicy([], trusted).caller(peer, forwarded).address == client


def test_whitelist_takes_addresses_and_ranges() -> None:
    policy = AccessPolicy(["10.0.0.0/8", "::1", "192.168.1.7"], [])
    assert policy.allows("10.200.3.4", "/api/")
    assert policy.allows("::1", "/api/")
    assert policy.allows("192.168.1.7", "/api/")
    assert not policy.allows("192.168.1.8", "/api/")
    assert not policy.allows("not an address", "/api/")
    assert AccessPolicy([], []).allows("203.0.113.9", "/api/")


def test_the_progress_route_is_open_to_this_hosts_loopback_only() -> None:
    policy = AccessPolicy(["10.0.0.0/8"], ["127.0.0.1", "192.168.5.5"])
    assert policy.allows("127.0.0.1", "/status_update/", "127.0.0.1")
    assert policy.allows("127.0.0.1", "/status_update/", "::1")
    # A remote proxy that says its client was 127.0.0.1 speaks of its own host's loopback, not ours
    assert not policy.allows("127.0.0.1", "/status_update/", "192.168.5.5")
    assert not policy.allows("127.0.0.1", "/api/", "127.0.0.1")
    # A trusted proxy on this host relayed it (X-Forwarded-For, however empty or unreadable): not a container
    assert not policy.allows("127.0.0.1", "/status_update/", "127.0.0.1", forwarded=True)


def test_progress_relayed_by_a_proxy_on_this_host_is_not_exempt(make_server: Callable[..., Server],
                                                                tmp_path: Path) -> None:
    """nginx on this host, trusted: what it relays comes from elsewhere, even when its X-Forwarded-For is
    empty or unreadable (the caller would then be its own loopback address). A container sends none."""
    server = make_server(base_config(tmp_path, IP_WHITELIST=["10.9.9.9"], TRUSTED_PROXIES=["127.0.0.1"]))
    progress = "/status_update/?key=424242&status=running"
    assert server.post(progress).status_code == 200
    for relayed in ("", "junk", "127.0.0.1", "203.0.113.9"):
        assert server.post(progress, headers={"X-Forwarded-For": relayed}).status_code == 403, relayed


def test_an_untrusted_peers_forwarded_for_is_not_read() -> None:
    policy = AccessPolicy([], ["192.168.5.5"])
    assert policy.caller("203.0.113.7", "127.0.0.1").address == "203.0.113.7"
    assert policy.caller("192.168.5.5", "1" * 60_000).address == "192.168.5.5"  # no address is that long
    assert policy.caller("192.168.5.5", "10.1.1.1, " + "1" * 100).address == "192.168.5.5"


def test_outside_the_whitelist_is_403_json_on_every_route(make_server: Callable[..., Server], tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, IP_WHITELIST=["10.0.0.0/8"]))
    for method, path in (("get", "/api/"), ("post", "/api/fake_local"), ("get", "/api/list_filenames/x"),
                         ("post", "/api/send_files"), ("get", "/api/jobs/1"), ("get", "/jobs/")):
        response = getattr(server, method)(path)
        assert response.status_code == 403, path
        assert response.json()["status"] == "error" and response.json()["reason"]


def test_a_spoofed_forwarded_for_does_not_get_past_the_whitelist(make_server: Callable[..., Server],
                                                                  tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, IP_WHITELIST=["10.0.0.0/8"]))
    assert server.get("/api/", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 403


def test_behind_a_trusted_proxy_the_forwarded_client_is_checked(make_server: Callable[..., Server],
                                                                 tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, IP_WHITELIST=["10.0.0.0/8"], TRUSTED_PROXIES=["127.0.0.1"]))
    assert server.get("/api/", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200
    assert server.get("/api/", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 403
    # The left-most entry is the client's own claim; only the entry our proxy appended counts.
    assert server.get("/api/", headers={"X-Forwarded-For": "10.1.2.3, 203.0.113.9"}).status_code == 403
    assert server.get("/api/").status_code == 403  # the proxy itself is not on the list


def test_containers_on_the_host_may_always_post_progress(make_server: Callable[..., Server],
                                                          tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, IP_WHITELIST=["10.0.0.0/8"]))
    assert server.post("/status_update/?key=1&status=running").status_code == 200  # reached the route


def test_an_empty_trusted_proxies_list_never_crashes_a_request(make_server: Callable[..., Server],
                                                               tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, TRUSTED_PROXIES=None, IP_WHITELIST=None))
    for header in ("1.2.3.4", "", ",,,", "x" * 5000, "::1, 127.0.0.1"):
        assert server.get("/api/", headers={"X-Forwarded-For": header}).status_code == 200


def test_result_url_is_right_behind_a_trusted_reverse_proxy(make_server: Callable[..., Server],
                                                             tmp_path: Path) -> None:
    server = make_server(base_config(tmp_path, TRUSTED_PROXIES=["127.0.0.0/8"]))
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "dsm.example.org", "X-Forwarded-Prefix": "/dsm/",
               "X-Forwarded-For": "198.51.100.4"}
    body = server.post("/api/fake_local", json={"args": []}, headers=headers).json()
    assert body["result_url"] == f"https://dsm.example.org/dsm/api/jobs/{body['key']}"


def test_forwarded_url_headers_from_an_untrusted_peer_are_ignored(server: Server) -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example", "X-Forwarded-Prefix": "/x"}
    body = server.post("/api/fake_local", json={"args": []}, headers=headers).json()
    assert body["result_url"] == f"{server.url}/api/jobs/{body['key']}"
    weird = server.post("/api/fake_local", json={"args": []}, headers={"Host": "a b/c\\d"}).json()
    assert weird["result_url"] == f"http://127.0.0.1:{server.port}/api/jobs/{weird['key']}"


def test_a_page_of_another_web_site_cannot_have_a_browser_change_anything(make_server: Callable[..., Server],
                                                                         tmp_path: Path) -> None:
    """A browser on an allowed machine visits a hostile page, which posts a form or a no-cors fetch to this
    server: no job, no progress message, no upload. Browsers mark such requests with Sec-Fetch-Site; 4CAT's
    client, containers and the dashboard (same-origin) are not affected, nor a request that carries a token."""
    server = make_server(base_config(tmp_path))
    key = server.submit("fake_local", ["--sleep", "30"])["key"]
    forged = {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}
    attempts = [
        server.post("/api/fake_remote", data=json.dumps({"args": ["--stdout", "csrf"]}), headers=forged),
        server.post(f"/status_update/?key={key}&status=running&message=visit+evil.example", headers=forged),
        server.post("/api/send_files", data={"folder_name": "forged"}, files={"4cat_uploads": ("a.txt", b"x")},
                    headers={"Sec-Fetch-Site": "same-site"}),
    ]
    for response in attempts:
        assert response.status_code == 403 and "another web site" in response.json()["reason"], response.text
    assert [job["id"] for job in server.get("/jobs/").json()["jobs"]] == [key]
    assert server.job(key)["message"] != "visit evil.example"
    assert not (tmp_path / "uploads" / "forged").exists()
    # the dashboard's own requests, 4CAT's (no such header), a token's, and reads from anywhere go through
    assert server.post(f"/status_update/?key={key}&status=running&message=step+1",
                       headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert server.post("/api/fake_remote", json={"args": []}).status_code == 202
    assert server.get(f"/api/jobs/{key}", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    with_token = {"Sec-Fetch-Site": "cross-site", "Authorization": f"Bearer {server.token('admin')}"}
    assert server.delete(f"/api/jobs/{key}", headers=with_token).status_code == 202
