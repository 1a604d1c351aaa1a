"""The proxy's upstream HTTP client against real servers on real sockets."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading

import pytest

from conftest import ECHO_MODEL, PY, free_port
from gateway.upstream import UpstreamConnectError, UpstreamPool, UpstreamProtocolError


@pytest.fixture(scope="module")
def echo():
    port = free_port()
    proc = subprocess.Popen([PY, str(ECHO_MODEL), "--port", str(port)], stdout=subprocess.DEVNULL)
    deadline = 100
    while deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            deadline -= 1
            threading.Event().wait(0.05)
    yield port
    proc.terminate()
    proc.wait()


def test_keep_alive_connection_is_reused_across_requests(echo):
    pool = UpstreamPool()
    pids = set()
    for _ in range(5):
        r = pool.request("127.0.0.1", echo, "GET", "/whoami", [])
        body = json.loads(r.read_all())
        assert r.status == 200 and r.reason == "OK"
        pids.add(body["pid"])
    assert len(pool._idle[("127.0.0.1", echo)]) == 1  # one connection served all five


def test_small_and_streamed_bodies_arrive_intact(echo):
    pool = UpstreamPool()
    small = pool.request("127.0.0.1", echo, "POST", "/upload", [], body=b"x" * 1000)
    assert json.loads(small.read_all())["bytes"] == 1000
    blob = os.urandom(3 << 20)
    pieces = (blob[i:i + 100_000] for i in range(0, len(blob), 100_000))
    big = pool.request("127.0.0.1", echo, "POST", "/upload", [], body=pieces, content_length=len(blob))
    assert json.loads(big.read_all()) == {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    chunked = pool.request("127.0.0.1", echo, "POST", "/upload", [], body=iter([b"ab", b"cd"]))
    assert json.loads(chunked.read_all())["bytes"] == 4


def test_chunked_response_yields_each_event_as_it_arrives(echo):
    pool = UpstreamPool()
    r = pool.request("127.0.0.1", echo, "GET", "/stream?n=3&ms=10", [])
    assert r.chunked
    events = list(r.stream())
    assert len(events) == 3 and all(e.startswith(b"data: ") for e in events)


def test_head_and_error_statuses_have_no_surprises(echo):
    pool = UpstreamPool()
    head = pool.request("127.0.0.1", echo, "HEAD", "/whoami", [])
    assert head.status == 200 and head.read_all() == b""
    err = pool.request("127.0.0.1", echo, "GET", "/status/503", [("X-A", "1")])
    assert err.status == 503 and json.loads(err.read_all())["from"] == "model"
    assert ("X-From-Model", "1") in err.headers


def test_refused_connect_is_a_connect_error():
    with pytest.raises(UpstreamConnectError):
        UpstreamPool().request("127.0.0.1", free_port(), "GET", "/", [])


def _one_shot_server(replies: list[bytes]) -> int:
    """A server that answers each connection's first request with the next reply, then closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def run() -> None:
        for reply in replies:
            conn, _ = srv.accept()
            conn.recv(65536)
            conn.sendall(reply)
            conn.close()
        srv.close()
    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1]


def test_stale_pooled_connection_is_retried_on_a_new_one():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    port = _one_shot_server([ok, ok])  # keep-alive promised, but each connection is closed after one answer
    pool = UpstreamPool()
    assert pool.request("127.0.0.1", port, "GET", "/", []).read_all() == b"hi"
    assert pool.request("127.0.0.1", port, "GET", "/", []).read_all() == b"hi"


def test_body_delimited_by_close_and_garbage_status_line():
    port = _one_shot_server([b"HTTP/1.0 200 OK\r\n\r\nuntil close", b"SSH-2.0-nope\r\n"])
    pool = UpstreamPool()
    assert pool.request("127.0.0.1", port, "GET", "/", []).read_all() == b"until close"
    with pytest.raises(UpstreamProtocolError):
        pool.request("127.0.0.1", port, "GET", "/", [])
