"""The data plane holds load: hundreds of open (hung) requests and slow clients do not
stop the API or other deployments, in both data planes. (bench/bench_dataplane.py runs
the full 1,000 streams and 500 slowloris sockets and times them; tests never time.)"""
from __future__ import annotations

import socket
from contextlib import ExitStack

from conftest import deployment_yaml

OPEN = 300  # enough to exhaust the old 2 x 64 gthread gateway, small enough for a 2-core CI


def _open(port: int, payload: bytes, stack: ExitStack) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    stack.callback(sock.close)
    sock.sendall(payload)


def test_hundreds_of_hung_requests_block_neither_the_api_nor_other_deployments(serve, data_plane):
    # a short graceful timeout: the hung requests are still open at the end of the test
    s = serve({"hung.yaml": deployment_yaml("hung"), "other.yaml": deployment_yaml("other")},
              "--graceful-timeout", "2")
    port = int(s.url.rsplit(":", 1)[1])
    assert s.get("/d/hung/health").status_code == 200  # warm: the hung requests reach the instance
    with ExitStack() as stack:
        for i in range(OPEN):
            _open(port, f"GET /d/hung/slow?ms=60000&i={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), stack)
        s.wait_for(lambda: s.status("hung")["instances"][0]["in_flight"] >= OPEN // 2, timeout=60,
                   what="the hung requests in flight")
        assert s.get("/api/deployments", timeout=10).status_code == 200
        assert s.get("/d/other/whoami", timeout=30).status_code == 200
        assert s.get("/d/hung/health", timeout=10).status_code == 200  # the same instance still answers


def test_slow_clients_do_not_stop_normal_requests(serve, data_plane):
    s = serve({"hello.yaml": deployment_yaml("hello")}, "--graceful-timeout", "2")
    port = int(s.url.rsplit(":", 1)[1])
    assert s.get("/d/hello/health").status_code == 200
    with ExitStack() as stack:
        for _ in range(OPEN):
            _open(port, b"GET /d/hello/whoami HTTP/1.1\r\nHost: x\r\nX-Slow: ", stack)  # never finishes
        for _ in range(5):
            assert s.get("/d/hello/whoami", timeout=10).status_code == 200
        assert s.get("/api/deployments", timeout=10).status_code == 200
