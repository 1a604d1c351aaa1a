"""Exact proxying and bounded waits, through a real `autodeploy serve` to a real instance
that misbehaves on purpose (tests/raw_backend.py): the request target byte for byte,
every in-flight count released, protocol errors coded, broken bodies aborted at once,
spec.requestTimeout, and no HTML error page from any layer."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import requests

from conftest import PY, deployment_yaml

BACKEND = Path(__file__).resolve().parent / "raw_backend.py"
# It reads $PORT; naming ${PORT} in the command gets each instance its own free port (a
# command without it listens on spec.port, which parallel tests would share).
RAW = f"PORT=${{PORT}} {PY} {BACKEND}"


def raw_http(url: str, request: bytes, timeout: float = 30.0) -> tuple[bytes, bool]:
    """Send raw bytes; return everything until the server closes, and whether it did."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as c:
        c.sendall(request)
        data = b""
        while True:
            try:
                chunk = c.recv(65536)
            except socket.timeout:
                return data, False
            if not chunk:
                return data, True
            data += chunk


def get(url: str, target: str) -> tuple[int, bytes]:
    data, _ = raw_http(url, f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode("latin-1"))
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.fixture
def backend(serve):
    return serve({"be.yaml": deployment_yaml("be", RAW, health="/health", idle="2s",
                                             extra_spec="requestTimeout: 1s")})


@pytest.fixture
def warm_backend(serve, data_plane):
    """The raw backend already running, and in haproxy mode programmed into HAProxy: the
    requests under test take the warm path of the data plane (HAProxy, or the gateway)."""
    s = serve({"be.yaml": deployment_yaml("be", RAW, health="/health", idle="5m",
                                          extra_spec="requestTimeout: 1s")})
    assert s.get("/d/be/health").status_code == 200
    ids = {i["id"] for i in s.instances("be")}
    s.wait_for(lambda: s.routing_settled("be", ids), what="the instance routed by the data plane")
    return s


TARGETS = ["/a%2Fb%3Fc", "/x%20HTTP/1.1", "/x%0d%0aInjected:%201", "/%2541", "/%C3%A9", "/%FF%FE", "/%C4%80",
           "/p;m=1/q?x=%2F&y=a+b#", "//double//slash", "/?", "/caf%C3%A9?q=%E2%82%AC"]


def test_request_target_reaches_the_instance_byte_for_byte(warm_backend, data_plane):
    for target in TARGETS:
        status, body = get(warm_backend.url, "/d/be" + target)
        if data_plane == "haproxy" and target.endswith("#"):
            # A fragment is not allowed in a request target (RFC 9112): HAProxy 2.6 refuses it
            # in its connection layer with its own 400 page (README, known limits).
            assert status == 400, body
            continue
        assert (status, body) == (200, repr(f"GET {target} HTTP/1.1\r\n".encode()).encode()), target
    status, body = get(warm_backend.url, "/d/be?only=query")
    assert body == repr(b"GET /?only=query HTTP/1.1\r\n").encode()


def test_absolute_form_target_is_forwarded_as_its_path(backend):
    status, body = get(backend.url, "http://example.test/d/be/a%2Fb?c=%20")
    assert (status, body) == (200, repr(b"GET /a%2Fb?c=%20 HTTP/1.1\r\n").encode())


def _in_flight(s) -> int:
    return sum(i["in_flight"] for i in s.instances("be"))


def test_every_failure_path_releases_the_in_flight_count_and_the_instance(backend):
    s = backend
    for target in ["/%C4%80", "/bad-status", "/bad-length", "/bad-chunk", "/cut-small", "/cut-big", "/cut-chunked",
                   "/%C4%80", "/hang"] * 2:
        get(s.url, "/d/be" + target)
    s.wait_for(lambda: s.instances("be") and _in_flight(s) == 0, what="in-flight back to 0")
    # idleTimeout 2s: an instance with a leaked count would stay Running forever.
    s.wait_for(lambda: s.status("be")["status"] == "Standby", timeout=30, what="the idle instance released")


def test_upstream_parse_errors_are_coded_502(backend):
    for target in ("/bad-status", "/bad-length"):
        status, body = get(backend.url, "/d/be" + target)
        assert status == 502, target
        assert requests.models.complexjson.loads(body)["code"] == 1022, body
    status, body = get(backend.url, "/d/be/cut-small")  # a small body is read whole: still a coded error
    assert (status, requests.models.complexjson.loads(body)["code"]) == (502, 1008)


@pytest.mark.parametrize("target", ["/cut-big", "/cut-chunked", "/bad-chunk"])
def test_upstream_breaking_mid_response_aborts_the_client_connection_at_once(warm_backend, data_plane, target):
    # Keep-alive: without the abort the gateway would hold this connection open (75 s) with a
    # short body, and the client could not tell it from a whole one.
    data, closed = raw_http(warm_backend.url, f"GET /d/be{target} HTTP/1.1\r\nHost: t\r\n\r\n".encode(),
                            timeout=20)
    head, _, body = data.partition(b"\r\n\r\n")
    if data_plane == "haproxy" and target == "/bad-chunk":
        # HAProxy parses the chunk sizes before it forwards anything: a coded 502 instead.
        assert head.startswith(b"HTTP/1.1 502") and requests.models.complexjson.loads(body)["code"] == 1008
        return
    assert closed, "the gateway kept the connection of a broken response open"
    assert head.startswith(b"HTTP/1.1 200")
    if target == "/cut-big":
        assert len(body) < 1_000_000
    else:
        assert not body.endswith(b"0\r\n\r\n")  # never the last chunk: the client sees it is cut


def test_request_timeout_answers_504_closes_the_instance_connection_and_releases(backend):
    s = backend
    r = s.get("/d/be/hang")
    assert (r.status_code, r.json()["code"]) == (504, 1021)
    assert r.json()["msg"].startswith("instance did not answer in time: ")
    assert s.wait_for(lambda: s.get("/d/be/closed-log").text.count("closed") >= 1, what="the instance side closed")
    s.wait_for(lambda: _in_flight(s) == 0, what="in-flight back to 0")
    assert s.get("/d/be/after").status_code == 200


def test_no_layer_answers_an_html_error_page(backend):
    cases = [
        (b"GET /d/be/x y HTTP/1.1\r\nHost: t\r\n\r\n", 400, 1013),  # gunicorn cannot parse it
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, 1013),
        (b"BREW /d/be/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 405, 1024),
        (b"TRACE /d/be/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 405, 1024),
        (b"GET /nowhere HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 404, 1020),
    ]
    for request, status, code in cases:
        data, _ = raw_http(backend.url, request)
        head, _, body = data.partition(b"\r\n\r\n")
        assert int(head.split(b" ")[1]) == status, data[:200]
        assert b"content-type: application/json" in head.lower(), head
        assert requests.models.complexjson.loads(body)["code"] == code


def test_a_deployment_without_request_timeout_waits_past_it(serve):
    # The default is 300 s; a 1.5 s answer passes where the 1 s deployment above would 504.
    s = serve({"slow.yaml": deployment_yaml("slow")})
    r = s.get("/d/slow/slow?ms=1500")
    assert r.status_code == 200
