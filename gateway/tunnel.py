"""WebSocket in python mode: after the instance answers `101 Switching Protocols`, the
client's socket (handed over by gunicorn as `environ["gunicorn.socket"]`) and the
instance's socket are joined byte for byte until either side closes.

One loop per tunnel multiplexes both directions with a selector, so a tunnel holds one
worker thread (gthread) or one greenlet (gevent, where `selectors` is cooperative once
monkey-patched). A tunnel is bounded twice: `spec.tunnelTimeout` from the handshake on,
and `spec.tunnelIdleTimeout` without a byte either way. The frames are not parsed: the
instance and the client speak WebSocket to each other, the gateway only carries bytes.
"""
from __future__ import annotations

import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from flask import Response  # not werkzeug's: Flask would run that one (force_type) inside its error handling

CHUNK = 64 * 1024


def is_websocket_upgrade(headers: Any) -> bool:
    """`Connection: upgrade` plus `Upgrade: websocket` (tokens, any case, RFC 6455 4.1)."""
    upgrade = {t.strip().lower() for t in (headers.get("Upgrade") or "").split(",")}
    connection = {t.strip().lower() for t in (headers.get("Connection") or "").split(",")}
    return "websocket" in upgrade and "upgrade" in connection


@dataclass(frozen=True)
class TunnelEnd:
    reason: str  # "closed" | "idle" | "lifetime" | "error: ..."
    up_bytes: int  # client -> instance
    down_bytes: int  # instance -> client


def pump(client: socket.socket, upstream: socket.socket, lifetime_s: float, idle_s: float,
         clock: Callable[[], float] = time.monotonic) -> TunnelEnd:
    """Carry bytes both ways until both sides have closed, or a bound is hit.

    A side that closes its sending half (EOF) has that half-close passed on to the other
    side (`shutdown(SHUT_WR)`), as a TCP proxy should; the tunnel ends when both are done.
    """
    for s in (client, upstream):
        s.settimeout(idle_s)  # bounds a sendall to a peer that stopped reading
    sel = selectors.DefaultSelector()
    sel.register(client, selectors.EVENT_READ, upstream)
    sel.register(upstream, selectors.EVENT_READ, client)
    start = last = clock()
    moved = {id(client): 0, id(upstream): 0}
    reading = 2
    try:
        while reading:
            now = clock()
            if now - start >= lifetime_s:
                return TunnelEnd("lifetime", moved[id(client)], moved[id(upstream)])
            if now - last >= idle_s:
                return TunnelEnd("idle", moved[id(client)], moved[id(upstream)])
            events = sel.select(min(lifetime_s - (now - start), idle_s - (now - last)))
            for key, _ in events:
                src: socket.socket = key.fileobj  # type: ignore[assignment]
                dst: socket.socket = key.data
                data = src.recv(CHUNK)
                if not data:
                    sel.unregister(src)
                    reading -= 1
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass  # the other side is already gone
                    continue
                dst.sendall(data)
                moved[id(src)] += len(data)
                last = clock()
        return TunnelEnd("closed", moved[id(client)], moved[id(upstream)])
    except OSError as exc:  # a reset, or a peer that stopped reading for idle_s
        return TunnelEnd(f"error: {type(exc).__name__}: {exc}", moved[id(client)], moved[id(upstream)])
    finally:
        sel.close()


class TunnelSlots:
    """At most `limit` tunnels at once in this worker: each holds a thread (gthread), and
    plain requests must keep some."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.open -= 1


class Hijacked(Response):
    """What the view returns once the tunnel is over: the connection was used up outside
    WSGI, so the server must neither write a response nor reuse the connection.

    gunicorn (gthread and the gevent worker alike) treats a StopIteration escaping the
    application as "close this connection" without writing anything. It is raised here, in
    the response's WSGI call, which Flask runs outside its own error handling.
    """

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:  # type: ignore[override]
        raise StopIteration("websocket tunnel closed")


def response_head(upstream_headers: list[tuple[str, str]], drop: set[str], extra: list[tuple[str, str]]) -> bytes:
    """The 101 the client gets: the instance's end-to-end headers (Sec-WebSocket-Accept,
    -Protocol, -Extensions) plus ours."""
    upgrade = next((v for k, v in upstream_headers if k.lower() == "upgrade"), "websocket")
    lines = ["HTTP/1.1 101 Switching Protocols\r\n", f"Upgrade: {upgrade}\r\n", "Connection: Upgrade\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in upstream_headers if k.lower() not in drop]
    lines += [f"{k}: {v}\r\n" for k, v in extra]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")
