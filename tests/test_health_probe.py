"""One active health check (controller.health_checker.probe) against a real socket:
2xx/3xx pass, anything else, a hang past the timeout or a refused connection fail,
and the failure says which."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port
from controller.health_checker import probe


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/hang":
            time.sleep(1.0)
        status = {"/ok": 200, "/moved": 302, "/bad": 503}.get(self.path, 200)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_2xx_and_3xx_are_healthy(server: int):
    assert probe("127.0.0.1", server, "/ok", 1.0).ok
    assert probe("127.0.0.1", server, "/moved", 1.0).ok


def test_5xx_is_unhealthy_and_names_the_status(server: int):
    assert probe("127.0.0.1", server, "/bad", 1.0) == probe("127.0.0.1", server, "/bad", 1.0)
    result = probe("127.0.0.1", server, "/bad", 1.0)
    assert not result.ok and result.detail == "HTTP 503"


def test_an_answer_slower_than_the_timeout_fails(server: int):
    result = probe("127.0.0.1", server, "/hang", 0.2)
    assert not result.ok and result.detail == "timed out after 0.2 s"


def test_a_refused_connection_fails():
    result = probe("127.0.0.1", free_port(), "/health", 0.5)
    assert not result.ok and "ConnectionRefusedError" in result.detail
