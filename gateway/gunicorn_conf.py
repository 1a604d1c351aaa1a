"""gunicorn settings file that `autodeploy serve` passes with `-c python:gateway.gunicorn_conf`.

Command-line options still set everything else; this only adds the hook that keeps
Prometheus's multiprocess files right when a worker exits (gateway/metrics.py).
"""
from __future__ import annotations

import os
from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)


def _json_write_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own error answers (a request line it cannot parse, headers too large, a
    worker's unhandled error) are HTML pages; every error the gateway makes is coded JSON."""
    import json

    from gunicorn import util

    from controller import errors
    err = errors.GATEWAY_INTERNAL if status_int >= 500 else errors.BAD_REQUEST
    detail = f"{status_int} {reason}" + (f": {mesg}" if mesg else "")
    body = json.dumps({"code": err.code, "msg": f"{err.msg}: {detail}"}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1", "replace")
    util.write_nonblock(sock, head + body)
    _linger(sock)


def _linger(sock: Any, budget_s: float = 1.0, budget_bytes: int = 256 * 1024) -> None:
    """Lingering close (as Apache and nginx do): an answer written before the whole request
    was read (a 414 for a 9 KB request line) would otherwise be lost to the RST that closing a
    socket with unread input sends. Stop writing, then read what the client still sends, for
    at most `budget_s` and `budget_bytes`."""
    import socket
    import time
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + budget_s
        drained = 0
        while drained < budget_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            chunk = sock.recv(16384)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:
        return


def _install_json_errors() -> None:
    from gunicorn import util
    util.write_error = _json_write_error


_install_json_errors()  # this file is imported by the master before it forks the workers

# gunicorn believes X-Forwarded-Proto & co. from 127.0.0.1 by default and would make a
# client's `X-Forwarded-Proto: https` the request's scheme; whom to believe is decided by
# the gateway (--trusted-proxy), so gunicorn believes nobody.
forwarded_allow_ips = ""
secure_scheme_headers: dict[str, str] = {}
