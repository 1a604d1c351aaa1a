#!/usr/bin/env python3
"""A tiny HTTP model stand-in that needs nothing but Python.

It behaves like a model server for the examples, tests and benchmarks:
  GET  /health            200 "ok" once loaded (see --load-seconds)
  GET  /whoami            instance id, pid, CUDA_VISIBLE_DEVICES, revision
  POST /v1/predict        echoes the JSON body back with the instance id
  POST /v1/audio/speech   returns a small WAV-shaped body (the TTS example's route)
  POST /upload            streams the body, returns its length and sha256
  GET  /stream?n=5&ms=50  server-sent events, one every ms milliseconds
  GET  /stream?n=5&lockstep=T   event i+1 is sent only once /admin/ack?token=T&i=i arrived (10 s at
                          most); each event says whether the previous one was acknowledged in time,
                          which proves every event reached the client before the next was sent
  GET  /slow?ms=200       answers after ms milliseconds
  GET  /status/<code>     answers with that status code (errors pass through the gateway)
  GET  /admin/health?fail=1   make /health answer 503 from now on (fail=0 heals it)
  GET  /admin/delay?ms=200    add this delay to every later request but /health (a slow instance)
  GET  /admin/errors?status=500   every later request but /health and /admin answers 500 (status=0 heals it)
  --error-status CODE     a broken model: every path but /health answers CODE (canary tests)
  anything else           200 with the method, path and query it saw
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

INSTANCE = os.environ.get("AUTODEPLOY_INSTANCE_ID", "local")
# Per-process switches for tests and benchmarks (see /admin/... above).
ADMIN = {"health_fail": False, "delay_ms": 0.0, "error_status": 0}
ERROR_STATUS = 0
ACKS: dict[str, int] = {}  # lockstep token -> highest event index the client acknowledged
ACKED = threading.Condition()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real model server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle plus the
        # client's delayed ACK adds ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt: str, *args: object) -> None:
        if os.environ.get("ECHO_MODEL_ACCESS_LOG"):
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance", INSTANCE)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _stream_body(self) -> tuple[int, str]:
        digest, total = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = self._read_body()
            digest.update(data)
            return len(data), digest.hexdigest()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
            remaining -= len(chunk)
        return total, digest.hexdigest()

    def handle_any(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path == "/admin/health":
            ADMIN["health_fail"] = query.get("fail", "1") not in ("0", "false")
            return self._json(200, {"instance": INSTANCE, **ADMIN})
        if path == "/admin/delay":
            ADMIN["delay_ms"] = float(query.get("ms", 0))
            return self._json(200, {"instance": INSTANCE, **ADMIN})
        if path == "/admin/errors":
            ADMIN["error_status"] = int(query.get("status", 500))
            return self._json(200, {"instance": INSTANCE, **ADMIN})
        if path == "/admin/ack":
            with ACKED:
                token = query.get("token", "")
                ACKS[token] = max(ACKS.get(token, -1), int(query.get("i", 0)))
                ACKED.notify_all()
            return self._json(200, {"instance": INSTANCE, "acked": ACKS[token]})
        if path == "/health":
            if ADMIN["health_fail"]:
                return self._send(503, b"failing on purpose", "text/plain")
            return self._send(200, b"ok", "text/plain")
        if ADMIN["delay_ms"]:
            time.sleep(ADMIN["delay_ms"] / 1000)
        if ERROR_STATUS or ADMIN["error_status"]:
            self._read_body()
            if ADMIN["error_status"]:
                return self._json(int(ADMIN["error_status"]), {"error": "broken on purpose (/admin/errors)",
                                                               "instance": INSTANCE})
            return self._json(ERROR_STATUS, {"error": "broken on purpose (--error-status)", "instance": INSTANCE})
        if path == "/whoami":
            return self._json(200, {
                "instance": INSTANCE, "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "revision": os.environ.get("AUTODEPLOY_REVISION"),
                "deployment": os.environ.get("AUTODEPLOY_DEPLOYMENT")})
        if path == "/upload":
            size, sha = self._stream_body()
            return self._json(200, {"bytes": size, "sha256": sha})
        if path == "/v1/predict":
            body = self._read_body()
            try:
                data = json.loads(body or b"null")
            except ValueError:
                return self._json(400, {"error": "body is not JSON"})
            return self._json(200, {"instance": INSTANCE, "input": data})
        if path == "/v1/audio/speech":
            text = json.loads(self._read_body() or b"{}").get("input", "")
            pcm = bytes(len(text) * 160)
            header = b"RIFF" + (36 + len(pcm)).to_bytes(4, "little") + b"WAVEfmt "
            return self._send(200, header + pcm, "audio/wav")
        if path == "/stream":
            n, ms = int(query.get("n", 5)), float(query.get("ms", 50))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Instance", INSTANCE)
            self.end_headers()
            token, prev_acked = query.get("lockstep"), True
            for i in range(n):
                event = f"data: {json.dumps({'i': i, 't': time.time(), 'prev_acked': prev_acked})}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if token is None:
                    time.sleep(ms / 1000)
                    continue
                with ACKED:
                    prev_acked = ACKED.wait_for(lambda: ACKS.get(token, -1) >= i, timeout=10.0)
            self.wfile.write(b"0\r\n\r\n")
            return None
        if path == "/slow":
            self._read_body()
            time.sleep(float(query.get("ms", 200)) / 1000)
            return self._json(200, {"instance": INSTANCE, "slept_ms": float(query.get("ms", 200))})
        if path.startswith("/status/"):
            self._read_body()
            return self._json(int(path.rsplit("/", 1)[1]), {"from": "model", "instance": INSTANCE},
                              headers={"X-From-Model": "1"})
        body = self._read_body()
        return self._json(200, {
            "instance": INSTANCE, "method": self.command, "path": path, "query": url.query,
            "body_bytes": len(body), "headers": {k.lower(): v for k, v in self.headers.items()}})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = handle_any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--load-seconds", type=float, default=0.0,
                        help="sleep before listening, like loading model weights")
    parser.add_argument("--fail-after", type=float, default=None,
                        help="exit with status 3 after this many seconds (for crash tests)")
    parser.add_argument("--error-status", type=int, default=0,
                        help="answer every request but /health with this status (a broken model)")
    args = parser.parse_args()
    global ERROR_STATUS
    ERROR_STATUS = args.error_status
    if args.load_seconds:
        time.sleep(args.load_seconds)
    # A listen backlog like a real server's (socketserver's default is 5): a proxy opening
    # hundreds of connections at once must not see them refused.
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"echo model {INSTANCE} listening on {args.host}:{args.port}", flush=True)
    if args.fail_after is not None:
        import threading
        threading.Timer(args.fail_after, lambda: os._exit(3)).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
