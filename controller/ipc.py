"""Local IPC between gateway workers and the controller: JSON lines over a Unix socket.

Each worker thread keeps one persistent connection, so a call costs one round trip
on a local socket (tens of microseconds), and a blocked `acquire` (cold start) holds
only its own connection. What travels is typed: `controller.contracts` holds the
messages and the one encoder/decoder both sides use. Every call has a read deadline,
so a wedged controller costs a gateway thread a bounded wait (1011), never a hang.
"""
from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from typing import Any, Callable

from controller import errors
from controller.contracts import (Acquire, AcquireReply, Action, ActionReply, ColdStarts, ColdStartsReply, Done,
                                  Events, EventsReply, FirstByte, FirstByteReply, Logs, LogsReply, Reply, Request,
                                  Source, SourceReply, Status, StatusReply, Sync, Unreachable, decode, encode,
                                  encode_error)
from controller.errors import AutoDeployError

log = logging.getLogger("autodeploy.ipc")

CALL_TIMEOUT_S = 30.0  # the read deadline of a call that does not wait on purpose (AUTODEPLOY_IPC_TIMEOUT)
MAX_LINE = 16 * 1024 * 1024  # one request line; a sync with thousands of instances' metrics is ~1 MB
WAIT_MARGIN_S = 5.0  # added to a call's own wait (acquire's timeout, sync's long poll, a git sync)

# handler(request, builtin) -> reply; may wrap the built-in op (controller.auth.AuthService.handlers)
Handler = Callable[[Any, Callable[[Any], Reply]], Reply]


class _Handler(socketserver.StreamRequestHandler):
    server: "IpcServer"

    def handle(self) -> None:
        try:
            self._serve_lines()
        except (ConnectionResetError, BrokenPipeError):
            return  # a gateway worker went away (restart or shutdown)

    def _serve_lines(self) -> None:
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:  # the rest of it cannot be told from a next request: answer, hang up
                self._send(encode_error(AutoDeployError(
                    errors.BAD_REQUEST, f"IPC message longer than {MAX_LINE} bytes")))
                self._linger()
                return
            try:
                reply = encode(self.server.dispatch(decode(line)))
            except AutoDeployError as exc:
                reply = encode_error(exc)
            except (ValueError, KeyError, TypeError) as exc:  # a handler's own slip: still a coded answer
                reply = encode_error(AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: {exc}"))
            if not self._send(reply):
                return

    def _linger(self, seconds: float = 1.0) -> None:
        """Close after the answer is read: unread input at close would reset the connection
        and lose the answer. Reading what follows is bounded by `seconds`."""
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(seconds)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and sock.recv(65536):
                pass
        except OSError:
            pass

    def _send(self, reply: bytes) -> bool:
        try:
            # The redactor re-dumps a line it masks: the newline is added after it.
            self.wfile.write(self.server.redact(reply[:-1].decode()).encode() + b"\n")
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False


class IpcServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # a cold-start burst opens one connection per gateway thread at once

    def __init__(self, path: str, controller: Any, handlers: dict[str, Handler] | None = None) -> None:
        if os.path.exists(path):
            os.unlink(path)
        self.controller = controller
        # Extra ops by name (controller.auth.AuthService.handlers): handler(req, builtin) may wrap a built-in op.
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

    def dispatch(self, req: Request) -> Reply:
        handler = self.handlers.get(req.op)
        if handler is not None:
            return handler(req, self.builtin)
        return self.builtin(req)

    def builtin(self, req: Request) -> Reply:
        c = self.controller
        if isinstance(req, Sync):
            return c.sync(req.worker, req.version, req.inflight, req.activity, req.wait, req.metrics)
        if isinstance(req, Acquire):
            return AcquireReply(c.acquire(req.deployment, req.rule, req.timeout))
        if isinstance(req, Status):
            return StatusReply(c.status(req.name))
        if isinstance(req, Unreachable):
            c.report_unreachable(req.instance)
            return Done()
        if isinstance(req, FirstByte):
            return FirstByteReply(c.first_byte(req.instance, req.at))
        if isinstance(req, Events):
            return EventsReply(c.events_after(req.after, req.name, max(1, min(1000, req.limit))))
        if isinstance(req, Logs):
            return LogsReply(c.log_tail(req.name, req.instance, max(1, min(2000, req.lines))))
        if isinstance(req, ColdStarts):
            return ColdStartsReply(c.coldstarts.histograms())
        if isinstance(req, Action):
            return ActionReply(c.action(req.name, req.action, req.args))
        if isinstance(req, Source):  # where desired state comes from (controller.sources); sync: poll git now
            if c.source is None:
                raise AutoDeployError(errors.GIT_NOT_CONFIGURED, "this controller has no desired-state source")
            if req.sync:
                return SourceReply(c.source.sync(req.timeout))
            return SourceReply(c.source.status(events=True))
        raise AutoDeployError(errors.BAD_REQUEST, f"bad IPC message: this controller does not answer {req.op!r}")


class IpcClient:
    """Thread-safe client: one connection per calling thread, reconnecting once on failure.

    Every call has a read deadline: its own wait (acquire's timeout, sync's long poll, a
    git sync's timeout) plus `wait_margin`, else `call_timeout`. Past it the connection is
    dropped (a late answer must not be read as the next call's) and the call raises 1011."""

    def __init__(self, path: str, connect_timeout: float = 2.0, call_timeout: float | None = None,
                 wait_margin: float = WAIT_MARGIN_S) -> None:
        self.path = path
        self.connect_timeout = connect_timeout
        self.wait_margin = wait_margin
        self.call_timeout = call_timeout if call_timeout is not None else \
            float(os.environ.get("AUTODEPLOY_IPC_TIMEOUT", CALL_TIMEOUT_S))
        self._local = threading.local()

    def _conn(self) -> tuple[socket.socket, Any]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout)
            sock.connect(self.path)
            conn = (sock, sock.makefile("rb"))
            self._local.conn = conn
            self._local.timeout = None
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn[1].close()
            conn[0].close()

    def read_timeout(self, msg: Request) -> float:
        """How long `msg` may wait for its answer."""
        if isinstance(msg, Acquire):
            return msg.timeout + self.wait_margin
        if isinstance(msg, Sync):
            return msg.wait + self.call_timeout
        if isinstance(msg, Source) and msg.sync:
            return max(self.call_timeout, msg.timeout + self.wait_margin)
        return self.call_timeout

    def request(self, msg: Request) -> Any:
        """Send `msg`, return its typed reply (`type(msg).reply`); a coded error raises."""
        payload = encode(msg)
        timeout = self.read_timeout(msg)
        for attempt in (1, 2):
            try:
                sock, rfile = self._conn()
                if self._local.timeout != timeout:
                    sock.settimeout(timeout)
                    self._local.timeout = timeout
                sock.sendall(payload)
                line = rfile.readline()
                if not line:
                    raise ConnectionError("controller closed the connection")
                break
            except TimeoutError as exc:  # not retried: the controller has the request and is wedged
                self._drop()
                raise AutoDeployError(errors.CONTROLLER_UNAVAILABLE, f"no answer to {msg.op!r} within "
                                      f"{timeout:g} s") from exc
            except OSError as exc:
                self._drop()
                if attempt == 2:
                    raise AutoDeployError(errors.CONTROLLER_UNAVAILABLE, str(exc)) from exc
        return decode(line, type(msg).reply)

    def close(self) -> None:
        self._drop()
