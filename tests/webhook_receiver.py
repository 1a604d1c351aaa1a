"""A real local HTTP server that records webhook POSTs (for the alert tests)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookReceiver:
    """Answers each POST with the next status of `statuses` (then 200); `hang_s` delays answers."""

    def __init__(self, statuses: list[int] | None = None, hang_s: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.hang_s = hang_s
        self.received: list[tuple[float, int, dict]] = []  # (arrival, status answered, body)
        self.attempts = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.hang_s:
                    time.sleep(receiver.hang_s)
                with receiver._lock:
                    receiver.attempts += 1
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.received.append((time.time(), status, json.loads(body)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def accepted(self) -> list[dict]:
        with self._lock:
            return [body for _, status, body in self.received if status < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
