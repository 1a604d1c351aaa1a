"""Local IPC between gateway workers and the controller: JSON lines over a Unix socket.

Each worker thread keeps one persistent connection, so a call costs one round trip
on a local socket (tens of microseconds), and a blocked `acquire` (cold start) holds
only its own connection.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from typing import Any

from controller import errors
from controller.errors import AutoDeployError

log = logging.getLogger("autodeploy.ipc")


class _Handler(socketserver.StreamRequestHandler):
    server: "IpcServer"

    def handle(self) -> None:
        try:
            self._serve_lines()
        except (ConnectionResetError, BrokenPipeError):
            return  # a gateway worker went away (restart or shutdown)

    def _serve_lines(self) -> None:
        for line in self.rfile:
            try:
                req = json.loads(line)
                reply = self.server.dispatch(req)
            except AutoDeployError as exc:
                reply = {"error": exc.to_json(), "retry_after": exc.retry_after}
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"error": AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: {exc}").to_json()}
            try:
                self.wfile.write(self.server.redact(json.dumps(reply)).encode() + b"\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return


class IpcServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a cold-start burst opens one connection per gateway thread at once

    def __init__(self, path: str, controller: Any, handlers: dict[str, Any] | None = None) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self.controller = controller
        # Extra ops (controller.auth.AuthService.handlers): handler(req, builtin) may wrap a built-in op.
        self.handlers = dict(handlers or {})
        # Masks secret values in every reply (status, errors with log lines); set by serve.
        self.redact: Any = lambda text: text
        super().__init__(path, _Handler)
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        daemon=True, name="ipc")

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        if os.path.exists(self.server_address):  # type: ignore[arg-type]
            os.unlink(self.server_address)  # type: ignore[arg-type]

    def dispatch(self, req: dict) -> dict:
        handler = self.handlers.get(req["op"])
        if handler is not None:
            return handler(req, self.builtin)
        return self.builtin(req)

    def builtin(self, req: dict) -> dict:
        op = req["op"]
        c = self.controller
        if op == "sync":
            return c.sync(int(req["worker"]), int(req["version"]), req.get("inflight", {}),
                          req.get("activity", {}), float(req.get("wait", 0)), req.get("metrics"))
        if op == "acquire":
            return {"instance": c.acquire(req["deployment"], req.get("rule"), float(req["timeout"]))}
        if op == "status":
            return {"status": c.status(req.get("name"))}
        if op == "unreachable":
            c.report_unreachable(req["instance"])
            return {}
        if op == "first_byte":
            return {"recorded": c.first_byte(str(req["instance"]), float(req["at"]))}
        if op == "events":
            name = req.get("name")
            return {"events": c.events_after(int(req.get("after", -1)), None if name is None else str(name),
                                             max(1, min(1000, int(req.get("limit", 200)))))}
        if op == "logs":
            return {"logs": c.log_tail(str(req["name"]), str(req["instance"]), max(1, min(2000, int(req.get("lines", 100)))))}
        if op == "coldstarts":
            return {"coldstarts": c.coldstarts.histograms()}
        if op == "action":
            return {"result": c.action(req["name"], req["action"], req.get("args", {}))}
        if op == "source":  # where desired state comes from (controller.sources); sync: poll git now
            if c.source is None:
                raise AutoDeployError(errors.GIT_NOT_CONFIGURED, "this controller has no desired-state source")
            if req.get("sync"):
                return {"source": c.source.sync(float(req.get("timeout", 60)))}
            return {"source": c.source.status(events=True)}
        raise KeyError(f"unknown op {op!r}")


class IpcClient:
    """Thread-safe client: one connection per calling thread, reconnecting once on failure."""

    def __init__(self, path: str, connect_timeout: float = 2.0) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self._local = threading.local()

    def _conn(self) -> tuple[socket.socket, Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout)
            sock.connect(self.path)
            sock.settimeout(None)
            conn = (sock, sock.makefile("rb"))
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn[1].close()
            conn[0].close()

    def call(self, op: str, **kw: Any) -> dict:
        payload = json.dumps({"op": op, **kw}).encode() + b"\n"
        for attempt in (1, 2):
            try:
                sock, rfile = self._conn()
                sock.sendall(payload)
                line = rfile.readline()
                if not line:
                    raise ConnectionError("controller closed the connection")
                break
            except OSError as exc:
                self._drop()
                if attempt == 2:
                    raise AutoDeployError(errors.CONTROLLER_UNAVAILABLE, str(exc)) from exc
        reply = json.loads(line)
        if "error" in reply:
            raise AutoDeployError.from_json(reply["error"], reply.get("retry_after"))
        return reply

    def close(self) -> None:
        self._drop()
