"""The Host-header check against DNS rebinding (a localhost server answers only localhost names, plus those
given with --allow-host) and /metrics behind the API key (/health stays open)."""
from __future__ import annotations

import httpx
import pytest

from ernielab.serve.hosts import LOCAL_HOSTS, allowed_hosts_for, host_of

API_KEY = "test-key"  # conftest's


@pytest.mark.parametrize("header,host", [("127.0.0.1:8000", "127.0.0.1"), ("LocalHost.", "localhost"),
                                         ("[::1]:8000", "[::1]"), ("[::1]", "[::1]"), ("evil.example:80", "evil.example"),
                                         ("", ""), ("[::1", "")])
def test_host_of(header, host):
    assert host_of(header) == host


def test_allowed_hosts_for_binds():
    assert allowed_hosts_for("127.0.0.1") == list(LOCAL_HOSTS)
    assert allowed_hosts_for("::1", ["box.lan"]) == [*LOCAL_HOSTS, "box.lan"]
    assert allowed_hosts_for("localhost") == list(LOCAL_HOSTS)
    assert allowed_hosts_for("127.0.0.2") == [*LOCAL_HOSTS, "127.0.0.2"]
    assert allowed_hosts_for("0.0.0.0") is None  # a public bind: its names are unknown; the API key guards it
    assert allowed_hosts_for("0.0.0.0", ["box.lan"]) == [*LOCAL_HOSTS, "0.0.0.0", "box.lan"]


def get(server, path: str, host: str | None = None, key: bool = True) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"} if key else {}
    if host is not None:
        headers["Host"] = host
    return httpx.get(server.url + path, headers=headers, timeout=10)


def test_dns_rebinding_hosts_refused(server):
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost.evil:{port}",
                 f"10.0.0.1:{port}"):
        for path in ("/", "/health", "/v1/models", "/v1/config"):
            r = get(server, path, host)
            assert r.status_code == 400, (host, path, r.text)
            assert r.json()["error"]["param"] == "Host" and "--allow-host" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/generate", json={"prompt": "x"}, timeout=10,
                       headers={"Host": host, "Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 400
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "localhost."):
        assert get(server, "/v1/models", host).status_code == 200, host


def test_allow_host_adds_names_and_metrics_open_without_key(make_server):
    server = make_server(api_key=None, allowed_hosts=[*LOCAL_HOSTS, "box.lan"])
    assert get(server, "/health", f"box.lan:{server.port}", key=False).status_code == 200
    assert get(server, "/health", f"evil.example:{server.port}", key=False).status_code == 400
    r = get(server, "/metrics", key=False)  # no key set: /metrics is open
    assert r.status_code == 200 and "ernielab_serve_queue_length" in r.text
    any_host = make_server(api_key=None, allowed_hosts=None)  # a server bound to a public address
    assert get(any_host, "/health", "evil.example", key=False).status_code == 200


def test_metrics_need_the_key_health_does_not(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/metrics", headers=headers, timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = get(server, "/metrics")
    assert r.status_code == 200 and "ernielab_serve_queue_length" in r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
